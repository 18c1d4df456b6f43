"""int4: weight-only 4-bit blocks (MatMulNBits), chosen by GPTQ on calibration text by default. The LM
head stays 8-bit by default: most of GPT-2's 4-bit error lives in the tied embedding / head."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edgegpt import contract
from edgegpt.quantize.recipes.card import Option, RecipeCard

# Calibration for GPTQ: windows of 128 tokens. KL to fp32 on the trained 4x256 model with 16 / 32 / 64 / 128
# windows: 0.0148 / 0.0139 / 0.0137 / 0.0125 (GPT-2 small shape: 0.00425 at 32, 0.00355 at 128); each doubling
# adds ~12 s to quantizing GPT-2 small.
GPTQ_WINDOWS = 128


def build(src: Path, dst: Path, opts: dict, calibration: Optional[str]) -> dict:
    from edgegpt.graph.io import remove_graph, save_graph
    from edgegpt.limits import release_freed
    from edgegpt.quantize.heads import HEAD_BLOCK, finish_head, load_untied, resolve_embedding, store_embedding

    embedding = resolve_embedding(opts["embedding"], opts["lm_head"])
    model, head = load_untied(src)
    info = {}
    if opts["algorithm"] == "gptq":
        # the untied graph goes to a file and leaves memory: GPTQ reads it from there one weight at a time
        untied = dst.with_name("untied.onnx")
        save_graph(model, untied)
        del model
        release_freed()
        try:
            info = _gptq(untied, head, src.parent, dst, opts, calibration)
        finally:
            remove_graph(untied)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, bits=4, block_size=opts["block_size"], is_symmetric=opts["symmetric"],
                                 accuracy_level=opts["accuracy_level"] or None,
                                 nodes_to_exclude=[] if opts["lm_head"] == "int4" else [head])
        q.process()
        save_graph(q.model.model, dst)
        del model, q
    release_freed()
    finish_head(dst, head, opts["lm_head"], accuracy_level=opts["accuracy_level"])
    table = store_embedding(dst, embedding, opts["lm_head"])
    if head is not None and opts["lm_head"] == "int8":
        info["lm_head_block_size"] = HEAD_BLOCK
    return {"embedding": embedding, "embedding_table": table, **info}


def _gptq(untied: Path, head: Optional[str], bundle: Path, dst: Path, opts: dict, calibration: Optional[str]) -> dict:
    """The body's MatMuls (and the head with --lm-head int4) of the graph at ``untied`` as GPTQ-chosen 4-bit
    blocks, written to ``dst``."""
    from edgegpt.corpus import calibration_text
    from edgegpt.quantize.calibration import calibration_feeds
    from edgegpt.quantize.gptq import gptq_file

    feeds = calibration_feeds(bundle, calibration_text(calibration), windows=GPTQ_WINDOWS, window=128)
    done = gptq_file(untied, dst, feeds, block_size=opts["block_size"], symmetric=opts["symmetric"],
                     accuracy_level=opts["accuracy_level"], exclude=None if opts["lm_head"] == "int4" else {head})
    return {"calibration_tokens": sum(f[contract.INPUT_IDS].size for f in feeds), "gptq_matmuls": done,
            "calibration_text": "user text" if calibration else "builtin:pydoc (training part)"}


CARD = RecipeCard(
    # peak RSS 1.83 GB at GPT-2 small (0.50 GB), 3.08 GB at medium (1.42 GB), 4.13 GB at large (3.10 GB), 7.69 GB
    # at XL (6.23 GB): a line just above all four
    peak_memory=1.0, peak_memory_gb=1.68,
    size_ratio=0.15,  # 456 / 3097 MB at large, 911 / 6232 MB at XL
    name="int4", order=20, build=build, budget_pct=4.0, targets=("cpu", "cuda", "android", "ios", "web"),
    int8_kv_cache="auto", calibration="optional",
    summary="4-bit weight blocks (MatMulNBits, GPTQ): the smallest, fastest decode on CPUs",
    options=(
        # GPTQ in blocks of 128 with a zero point per block. On a trained 4x256 model the KL to fp32 is
        # 0.0125, against 0.0237 for round-to-nearest in blocks of 64 and 0.0320 in blocks of 128; and
        # blocks of 128 are the faster kernel: W1 decode 1.11x and TTFT 0.79x those of round-to-nearest 64
        # (GPT-2 small shape, same run). Quantizing GPT-2 small takes ~2 min instead of ~50 s.
        Option("block_size", 128, (16, 32, 64, 128, 256), "weights per quantization block [128]"),
        Option("accuracy_level", 4, (0, 1, 2, 3, 4),
               "MatMulNBits compute type; 4 = int8 dot products, 2.3x faster decode on CPU (onnxruntime/mobius#402) "
               "[4]"),
        Option("symmetric", False, (True, False),
               "symmetric blocks (no zero points) or a zero point per block [asymmetric]", negative="--asymmetric"),
        Option("lm_head", "int8", ("fp32", "int8", "int4"), "precision of the tied LM head [int8]"),
        Option("embedding", "auto", ("auto", "fp32", "int8", "int4"),
               "precision of the token-embedding table (GatherBlockQuantized) [int8 with a quantized head]"),
        Option("algorithm", "gptq", ("rtn", "gptq"),
               "GPTQ (rounding errors corrected on calibration text: less than half the KL to fp32 of rtn, same "
               "speed, slower to quantize) or rtn (round to nearest) [gptq]"),
    ),
)
