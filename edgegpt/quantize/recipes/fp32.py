"""fp32: the weights as they are, for two things. With ``--kv-cache int8`` the cache of an fp32 model is
stored in int8 (llama.cpp's f32 models keep an f16 cache for the same reason). With ``--lm-head
screened`` an 8-bit copy of the tied head is read and every token that could be the greedy pick is
recomputed in fp32 (quantize/screen.py): the fp32 bundle's greedy tokens, ~25% fewer bytes a decode step."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edgegpt.quantize.recipes.card import Option, RecipeCard


def build(src: Path, dst: Path, opts: dict, calibration: Optional[str]) -> dict:
    from edgegpt.graph.io import load_graph, save_rewritten

    # read without the weights of a data file and written one weight at a time (its data file gets dst's name)
    model = load_graph(src, load_external_data=False)
    info = {}
    if opts["lm_head"] == "screened":
        from edgegpt.quantize.screen import screen_lm_head

        info = screen_lm_head(model, folder=src.parent)
    save_rewritten(model, src.parent, dst, {})
    return info


CARD = RecipeCard(
    # peak RSS with --lm-head screened from a source with a data file: 1.60 GB at GPT-2 small (0.50 GB), 2.98 GB at
    # medium (1.42 GB), 4.28 GB at large (3.10 GB), 7.41 GB at XL (6.23 GB): a line just above all four
    peak_memory=1.18, peak_memory_gb=1.32,
    name="fp32", order=50, build=build, budget_pct=1.0, targets=("cpu", "cuda", "android", "ios", "web"),
    int8_kv_cache="allowed",
    summary="the fp32 weights, with --kv-cache int8 or --lm-head screened",
    options=(
        Option("lm_head", "fp32", ("fp32", "screened"),
               "screened reads an 8-bit copy of the head and recomputes in fp32 every token that could be the "
               "greedy pick (same tokens, ~25% faster CPU decode) [fp32]"),
    ),
)
