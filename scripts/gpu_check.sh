#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU, run from the repository root. About 5 minutes:
#   1. onnxruntime-gpu beside this tree's edgegpt (from a folder of wheels when the machine is offline);
#   2. the CUDA tests (tests/runtime/test_cuda.py): the KV cache stays on the device in both layouts (IO binding,
#      the shared buffer), and fp32 / fp16 / int4 greedy tokens match the CPU's on a trained model;
#   3. W1 and W2 at GPT-2 small's shape: fp16 and int4 on CUDA beside fp32 and int4 on the CPU, one bench
#      invocation per provider, medians of 3, JSON and text under $OUT.
#
#   scripts/gpu_check.sh [WHEEL_DIR]        # WHEEL_DIR: onnxruntime-gpu and what it needs, for pip --no-index
#
# The int4 bundle uses round-to-nearest blocks (--algorithm rtn), the same MatMulNBits kernel as the default
# GPTQ, to keep the check inside its time.
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
WORK=${WORK:-/tmp/edgegpt-gpu-check}
SITE="$WORK/site"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "onnxruntime-gpu"
if [ -n "${1:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$1"/*.whl
else
    "$PY" -m pip install -q --no-compile --target "$SITE" onnxruntime-gpu
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

p = ort.get_available_providers()
assert "CUDAExecutionProvider" in p, f"onnxruntime {ort.__version__} has no CUDA provider: {p}"
# the provider is listed even when its CUDA / cuDNN libraries do not load (a wheel built for another CUDA
# major version): a session tells
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
s = ort.InferenceSession(helper.make_model(g).SerializeToString(), providers=["CUDAExecutionProvider"])
assert s.get_providers()[0] == "CUDAExecutionProvider", (
    f"onnxruntime {ort.__version__} could not start CUDA here (providers {s.get_providers()}): install the "
    f"onnxruntime-gpu build for this machine's CUDA major version")
print("onnxruntime", ort.__version__, "runs on CUDA")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

step "CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/runtime/test_cuda.py 2>&1 | tee "$OUT/tests.txt"

step "GPT-2 small's shape: fp32, fp16, int4 bundles"
edgegpt() { "$PY" -m edgegpt.launch "$@"; }
[ -d "$WORK/m124" ] || "$PY" scripts/peers/make_w1_model.py "$WORK/m124"
[ -d "$WORK/fp32" ] || edgegpt export "$WORK/m124" --out "$WORK/fp32"
[ -d "$WORK/fp16" ] || edgegpt quantize "$WORK/fp32" --mode fp16 --out "$WORK/fp16" --force
[ -d "$WORK/int4" ] || edgegpt quantize "$WORK/fp32" --mode int4 --algorithm rtn --out "$WORK/int4" --force

for w in W1 W2; do
    step "$w on CUDA (fp16, int4)"
    edgegpt bench "$WORK/fp16" "$WORK/int4" --workload "$w" --provider cuda --runs 3 \
        --json "$OUT/$w-cuda.json" 2>&1 | tee "$OUT/$w-cuda.txt"
    step "$w on the CPU (fp32, int4)"
    edgegpt bench "$WORK/fp32" "$WORK/int4" --workload "$w" --threads "$(nproc)" --runs 3 \
        --json "$OUT/$w-cpu.json" 2>&1 | tee "$OUT/$w-cpu.txt"
done
step "done"
