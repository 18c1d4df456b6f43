"""What `edgegpt quantize` will do, decided before any work: every refusal lives here.

``plan_quantize`` reads only the source manifest and the arguments, so it is pure and each refusal
is one test. The KV cache of a shared-buffer export goes int8 by default for the recipes whose card
says ``int8_kv_cache="auto"`` (checked along the decode path after building; ``measure.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from edgegpt import contract
from edgegpt.errors import QuantizeError
from edgegpt.quantize.recipes import CARDS, RecipeCard, card

KV_CHOICES = ("auto", "fp32", "int8")


@dataclass(frozen=True)
class QuantizePlan:
    card: RecipeCard
    options: dict  # every option of the recipe, resolved
    kv_int8: bool  # build an int8 KV cache
    kv_auto: bool  # ... and drop it again if it costs too much quality
    budget_pct: float
    last_logits_only: bool


def _kv_dtypes(manifest: dict) -> set[str]:
    return {x["dtype"] for x in manifest["io"]["inputs"] if contract.is_kv(x["name"])}


def plan_quantize(manifest: dict, mode: str, options: Optional[dict] = None, *, kv_cache: Optional[str] = None,
                  max_ppl_increase: Optional[float] = None, last_logits_only: bool = False,
                  name: str = "the bundle") -> QuantizePlan:
    """The plan for quantizing the bundle whose manifest is ``manifest`` (called ``name`` in errors)."""
    c = card(mode)
    opts = c.resolve(options)
    if manifest["precision"] != "fp32":
        raise QuantizeError(f"{name} is already {manifest['precision']}; quantizing it again to {mode} compounds the "
                            f"error. Quantize the fp32 bundle it came from instead")
    if manifest.get("recipe", {}).get("lm_head") == "screened":
        origin = manifest.get("source_bundle", {}).get("path", "the fp32 export it came from")
        raise QuantizeError(f"{name} has a screened LM head (a CPU decoding variant of fp32); start from {origin} "
                            f"instead")
    if _kv_dtypes(manifest) != {"float32"}:
        raise QuantizeError(f"{name} already keeps a quantized KV cache; quantize the fp32 bundle it came from instead")
    graph = manifest["graph"]
    if graph.get("options", {}).get("last_logits_only"):
        raise QuantizeError(f"{name} was exported with --last-logits-only; quality is measured by perplexity, which "
                            f"needs every position's logits. Export without --last-logits-only")
    if kv_cache not in (None, *KV_CHOICES):
        raise QuantizeError(f"kv_cache must be one of {', '.join(KV_CHOICES)}, got {kv_cache!r}")
    kv_auto = kv_cache in (None, "auto")
    shared = bool(graph.get("options", {}).get("shared_kv_buffer"))
    kv_int8 = kv_cache == "int8" or (kv_auto and shared and c.int8_kv_cache == "auto")
    if kv_int8 and c.int8_kv_cache == "never":
        takes = [n for n, x in CARDS.items() if x.int8_kv_cache != "never"]
        raise QuantizeError(f"--kv-cache int8 goes with --mode {', '.join(takes[:-1])} or {takes[-1]}, not {mode}")
    if c.name == "fp32" and not kv_int8 and opts.get("lm_head") != "screened":
        raise QuantizeError("--mode fp32 keeps the weights as they are; it is only useful with --kv-cache int8 "
                            "or --lm-head screened")
    if kv_int8 and not shared:
        raise QuantizeError(f"{name} has a concat KV cache; an int8 cache needs the shared buffer: "
                            f"re-export with --kv-cache shared")
    budget = c.budget_pct if max_ppl_increase is None else float(max_ppl_increase)
    return QuantizePlan(c, opts, kv_int8, kv_auto, budget, last_logits_only)
