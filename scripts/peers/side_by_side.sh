#!/usr/bin/env bash
# edgegpt's fast bundles beside llama.cpp and onnxruntime-genai on W1 and W2, one bench invocation per
# workload (interleaved runs, same prompt ids, exactly 128 new tokens).
#
#   scripts/peers/side_by_side.sh CHECKPOINT [OUT_DIR] [RUNS]
#
# CHECKPOINT: an HF GPT-2 layout dir (ours, or a local copy of gpt2). Without one, make the W1 model
# (GPT-2 small shape, random weights) with:  python scripts/peers/make_w1_model.py out/m124
# Needs: pip install -e ".[dev]" (onnxruntime-genai comes with it) and, for llama.cpp,
#        pip install gguf llama-cpp-python   (builds llama.cpp; skipped with a note when absent)
set -euo pipefail
CKPT=${1:?usage: side_by_side.sh CHECKPOINT [OUT_DIR] [RUNS]}
OUT=${2:-side-by-side}
RUNS=${3:-5}
mkdir -p "$OUT"

build() {  # name, then the command that writes "$OUT/name"
  local name=$1; shift
  if [ -f "$OUT/$name/edgegpt.json" ]; then echo "== $name: already there"; else echo "== $name"; "$@"; fi
}
build src-fp32  edgegpt export "$CKPT" --out "$OUT/src-fp32" --kv-cache shared
build fp32      edgegpt export "$CKPT" --out "$OUT/fp32" --kv-cache shared --last-logits-only
build fp32-screened edgegpt quantize "$OUT/src-fp32" --out "$OUT/fp32-screened" --mode fp32 --lm-head screened --last-logits-only
build int8      edgegpt quantize "$OUT/src-fp32" --out "$OUT/int8" --mode int8 --kv-cache fp32 --last-logits-only
build int4      edgegpt quantize "$OUT/src-fp32" --out "$OUT/int4" --mode int4 --kv-cache fp32 --last-logits-only
build int8-kv8  edgegpt quantize "$OUT/src-fp32" --out "$OUT/int8-kv8" --mode int8 --kv-cache int8 --last-logits-only
build int4-kv8  edgegpt quantize "$OUT/src-fp32" --out "$OUT/int4-kv8" --mode int4 --kv-cache int8 --last-logits-only

PEERS=(--genai "$OUT/fp32" --genai "$OUT/fp32-screened" --genai "$OUT/int8" --genai "$OUT/int4")
# what onnxruntime-genai users get for GPT-2 today: Optimum's export (+ int8 / int4) with a genai_config.json
[ -f "$OUT/opt-int4/genai_config.json" ] || python "$(dirname "$0")/optimum_for_genai.py" "$CKPT" "$OUT/opt"
PEERS+=(--genai "$OUT/opt-fp32" --genai "$OUT/opt-int8" --genai "$OUT/opt-int4")
if python -c "import gguf, llama_cpp" 2>/dev/null; then
  [ -f "$OUT/m-q4_0.gguf" ] || python "$(dirname "$0")/gguf_from_checkpoint.py" "$CKPT" "$OUT/m" --types f32,q8_0,q4_0
  PEERS+=(--gguf "$OUT/m-f32.gguf" --gguf "$OUT/m-q8_0.gguf" --gguf "$OUT/m-q4_0.gguf")
else
  echo "note: gguf / llama-cpp-python not installed: llama.cpp is left out"
fi

for W in W1 W2; do
  echo "== $W"
  edgegpt bench "$OUT/fp32" "$OUT/fp32-screened" "$OUT/int8" "$OUT/int4" "$OUT/int8-kv8" "$OUT/int4-kv8" "${PEERS[@]}" \
    --workload "$W" --runs "$RUNS" --roofline --json "$OUT/$W.json" | tee "$OUT/$W.txt"
done

echo "== decode ms/token after 192 and 960 context tokens (the mean contexts of W1 and W2), one invocation"
edgegpt bench "$OUT/fp32" "$OUT/fp32-screened" "$OUT/int8" "$OUT/int4" "$OUT/int8-kv8" "$OUT/int4-kv8" "${PEERS[@]}" \
  --prompt-tokens 16 --new-tokens 16 --sweep-context 192,960 --runs "$RUNS" --json "$OUT/sweep.json" | tee "$OUT/sweep.txt"
