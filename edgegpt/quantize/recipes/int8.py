"""int8: onnxruntime's dynamic int8 MatMuls, written as quantize_dynamic writes them (quantize/matmul_int8.py).
Per-channel int8 weights of the block MatMuls with int8 activations quantized at run time (weight MatMuls only:
attention's activation x activation MatMuls stay fp32); the tied LM head as an 8-bit MatMulNBits whose blocks
the embedding also reads, by default. Before quantizing, activation outliers of the LayerNorm-fed MatMuls (and
the head) migrate into their weights (quantize/smooth.py): on two trained models, 0.63-0.87x the windowed KL and
0.69-0.72x the decode-path KL without it, at no run-time cost."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

from edgegpt.quantize.recipes.card import Option, RecipeCard

VNNI = {"avx512_vnni", "avx_vnni"}
SMOOTH_WINDOWS = 32  # calibration windows of 128 tokens that smoothing measures activation ranges on


def cpu_flags() -> set[str]:
    """x86 ISA extensions from /proc/cpuinfo (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(src: Path, dst: Path, opts: dict, calibration: Optional[str]) -> dict:
    from edgegpt.graph.io import remove_graph, save_graph
    from edgegpt.graph.passes import weight_matmuls
    from edgegpt.limits import release_freed
    from edgegpt.quantize.heads import (INT8_HEAD_BLOCK, finish_head, load_untied, resolve_embedding,
                                        store_embedding)
    from edgegpt.quantize.matmul_int8 import quantize_matmuls

    embedding = resolve_embedding(opts["embedding"], opts["lm_head"])
    flags = cpu_flags()
    # Without VNNI, x86 u8s8 kernels use VPMADDUBSW which saturates; reduce_range (7-bit weights)
    # avoids it at a small accuracy cost (onnxruntime#6004).
    reduce_range = opts["reduce_range"]
    if reduce_range == "auto":
        reduce_range = platform.machine() in ("x86_64", "AMD64") and not flags & VNNI
    model, head = load_untied(src)
    block_matmuls = weight_matmuls(model, exclude=head)
    info, scales = {}, {}
    if opts["smooth"]:
        from edgegpt.corpus import calibration_text
        from edgegpt.quantize.calibration import calibration_feeds
        from edgegpt.quantize.smooth import smooth

        schemes = dict.fromkeys(block_matmuls, 0)
        if head is not None and opts["lm_head"] == "int8":
            schemes[head] = INT8_HEAD_BLOCK
    # the phases below read the graph from a file, one weight at a time where it has a data file (GPT-2 large and
    # up): smoothing chooses its factors and the quantizer applies them as it reads each weight
    untied = dst.with_name("untied.onnx")
    save_graph(model, untied)
    del model
    release_freed()
    factors = {}
    try:
        if opts["smooth"]:
            feeds = calibration_feeds(src.parent, calibration_text(calibration), windows=SMOOTH_WINDOWS, window=128)
            info["smoothing"], scales, factors = smooth(untied, feeds, schemes)
            info["smoothing"]["calibration_text"] = "user text" if calibration else "builtin:pydoc (training part)"
            del feeds
            release_freed()
        quantize_matmuls(untied, dst, block_matmuls, reduce_range=reduce_range, factors=factors)
    finally:
        remove_graph(untied)
    release_freed()
    finish_head(dst, head, opts["lm_head"], accuracy_level=4, block_size=INT8_HEAD_BLOCK)
    table = store_embedding(dst, embedding, opts["lm_head"], scales.get(head))
    if head is not None and opts["lm_head"] == "int8":
        info["lm_head_block_size"] = INT8_HEAD_BLOCK
    return {"embedding": embedding, "embedding_table": table, "reduce_range": reduce_range,
            "quantized_matmuls": len(block_matmuls), "cpu_vnni": bool(flags & VNNI), **info}


CARD = RecipeCard(
    # peak RSS 1.96 GB at GPT-2 small (0.50 GB), 4.14 GB at large (3.10 GB), 7.52 GB at XL (6.23 GB): under
    # 1.1x + 1.5 GB at all three
    peak_memory=1.1, peak_memory_gb=1.5,
    size_ratio=0.255,  # 790 / 3097 MB at large, 1580 / 6232 MB at XL
    name="int8", order=10, build=build, budget_pct=1.0, targets=("cpu", "android", "ios", "web"), int8_kv_cache="auto",
    calibration="optional",
    summary="int8 weights, int8 activations at run time (VNNI): the fastest with the least quality cost on CPUs",
    options=(
        # "auto": 7-bit weights where this machine's int8 kernels saturate; a package for another runtime
        # (onnxruntime-web's WASM kernels) says what that runtime needs
        Option("reduce_range", "auto", ("auto", True, False), cli=False),
        Option("smooth", True, (True, False),
               "migrate activation outliers into the weights before quantizing (SmoothQuant, folded into the "
               "LayerNorms; measured on --calibration text) [on]", negative="--no-smooth"),
        Option("lm_head", "int8", ("fp32", "int8"), "precision of the tied LM head [int8]"),
        Option("embedding", "auto", ("auto", "fp32", "int8", "int4"),
               "precision of the token-embedding table (GatherBlockQuantized) [int8 with a quantized head]"),
    ),
)
