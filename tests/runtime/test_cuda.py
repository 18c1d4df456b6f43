"""CUDA: the KV cache stays on the device (IO binding; the shared buffer updated in place), and greedy tokens
match the CPU's for fp32, fp16 and int4 on a trained model. Skipped without onnxruntime's CUDA provider;
scripts/gpu_check.sh installs onnxruntime-gpu and runs this file on a machine with an NVIDIA GPU."""

import numpy as np
import onnxruntime as ort
import pytest

from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.runtime import Generator
from edgegpt.runtime.generator import common_prefix

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="no CUDAExecutionProvider (pip install onnxruntime-gpu)")

PROMPTS = ["The for statement is used", "class C:\n    def", "Changed in version 3.8:"]


@pytest.fixture(scope="module")
def bundles(trained_checkpoint, tmp_path_factory):
    from edgegpt.quantize.bundle import quantize_bundle

    root = tmp_path_factory.mktemp("cuda")
    export_bundle(trained_checkpoint, root / "fp32")
    export_bundle(trained_checkpoint, root / "shared", ExportOptions(kv_cache="shared"))
    quantize_bundle(root / "fp32", root / "fp16", "fp16", force=True)
    quantize_bundle(root / "fp32", root / "int4", "int4", force=True)
    return root


@pytest.mark.parametrize("layout", ["fp32", "shared"])
def test_the_cache_stays_on_the_device(bundles, layout):
    gpu = Generator.load(bundles / layout, provider="cuda")
    cache = gpu.session.start(1)
    before = [p.data_ptr() for p in cache.past]
    cache.step(np.array([[1, 2]]), np.ones((1, 2), np.int64), np.arange(2)[None])
    cache.step(np.array([[3]]), np.ones((1, 3), np.int64), np.array([[2]]))
    assert all(p.device_name().lower() == "cuda" for p in cache.past)
    if layout == "shared":  # the kernel writes the new slots into the same buffers, bound once
        assert [p.data_ptr() for p in cache.past] == before


@pytest.mark.parametrize("precision, exact", [("fp32", True), ("shared", True), ("fp16", False), ("int4", False)])
def test_greedy_tokens_match_the_cpu(bundles, precision, exact):
    """fp32 exactly; fp16 and int4 run other kernels on each provider (CUDA's fp16 GEMMs, MatMulNBits'
    dequantize-then-GEMM against the CPU's int8 dot products), so they must agree for at least half the tokens
    of every prompt and exactly on most prompts."""
    cpu = Generator.load(bundles / precision)
    gpu = Generator.load(bundles / precision, provider="cuda")
    agree = []
    for prompt in PROMPTS:
        ids = cpu.encode(prompt)
        a = cpu.generate_ids([ids], 24, ignore_eos=True)[0]
        b = gpu.generate_ids([ids], 24, ignore_eos=True)[0]
        agree.append(common_prefix(a, b))
    if exact:
        assert agree == [24] * len(PROMPTS)
    else:
        assert min(agree) >= 12 and sum(a == 24 for a in agree) >= 2, agree
