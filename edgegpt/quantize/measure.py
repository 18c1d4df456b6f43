"""The quality `edgegpt quantize` records for a new bundle, measured on it before it is sealed.

Perplexity, KL and top-1 agreement over strided windows against the fp32 source; greedy agreement; and
the same KL along the decode path (a prompt, then one token a step through the cache), which is what
generation sees and what strided perplexity never runs: an int8 KV cache read back, a screened head, int8
activations quantized one row at a time. An int8 KV cache chosen by ``--kv-cache auto`` is kept only if it adds at most its
allowance to the KL the quantized weights alone give; otherwise the draft goes back to the fp32 cache.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from edgegpt import contract
from edgegpt.manifest import MODEL_FILE, Draft
from edgegpt.quality.evaluate import SourceRun, decode_path, decode_paths, evaluate, greedy_agreement, run_source

log = logging.getLogger(__name__)

# --kv-cache auto keeps the int8 cache only if, along the decode path, it adds at most this much KL to
# what the quantized weights alone give: a relative share of that KL plus an absolute floor. On a
# trained 4x256 model it added 0.3-3% (int4) and 5-11% (int8), on prose, Python source and digits,
# and nothing measurable at positions past the calibration windows.
KV_AUTO_RELATIVE, KV_AUTO_ABSOLUTE = 0.25, 1e-4


def io_with_kv(manifest: dict, kv_dtype: str) -> dict:
    """A copy of the manifest's io section with the KV cache in ``kv_dtype``."""
    io = json.loads(json.dumps(manifest["io"]))
    for x in io["inputs"] + io["outputs"]:
        if contract.is_kv(x["name"]):
            x["dtype"] = kv_dtype
    return io


def measure(src: Path, draft: Draft, text: str, *, eval_tokens: int, budget_pct: float, user_text: bool,
            weights_only: Optional[Path], kv_auto: bool, scratch: Path) -> dict:
    """Fill draft.manifest["quality"]; returns it. ``weights_only``: a folder holding the same weights with
    the fp32 cache, when the draft keeps an int8 one. The source runs first, alone, and leaves its logits in
    ``scratch`` (quality.evaluate.SourceRun): its session and the draft's are never in memory together."""
    from edgegpt.limits import release_freed

    source = run_source(src, text, scratch, max_tokens=eval_tokens)
    release_freed()
    ref = source.result
    res = evaluate(draft, text, reference=source)
    increase = 100.0 * (res.perplexity / ref.perplexity - 1.0)
    q = draft.manifest["quality"] = {
        "perplexity": round(res.perplexity, 4), "source_perplexity": round(ref.perplexity, 4),
        "ppl_increase_pct": round(increase, 3), "budget_pct": budget_pct, "kl_mean": res.kl_mean,
        "top1_agreement": round(res.top1_agreement, 5), "eval_tokens": res.tokens,
        "eval_text": "user text" if user_text else "builtin:pydoc held-out tail",
    }
    if weights_only is not None:  # strided perplexity prefills an empty cache and never reads the int8 one back
        _check_int8_cache(source, draft, weights_only, text, kv_auto)
    else:  # what generation sees: a short prompt, then one token a step (int8 activations get one row's scale;
        # a screened head runs its screen, which perplexity's many rows never do)
        q["decode_path"] = decode_path(draft, source, text)
    q["greedy_agreement"] = round(greedy_agreement(source, draft), 4)
    return q


def _check_int8_cache(src: SourceRun, draft: Draft, weights_only: Path, text: str, auto: bool) -> None:
    """Measure the draft's int8 cache along the decode path against the same weights with an fp32 cache,
    and record both. With ``auto``, an int8 cache that adds more than its allowance is dropped: the draft
    goes back to the fp32 cache, and its manifest says why."""
    m = draft.manifest
    fp32 = Draft(weights_only, {**m, "io": io_with_kv(m, "float32")})
    dp, fp32_dp = decode_paths([draft, fp32], src, text)
    added = dp["kl_mean"] - fp32_dp["kl_mean"]
    allowance = KV_AUTO_RELATIVE * fp32_dp["kl_mean"] + KV_AUTO_ABSOLUTE
    dp.update(fp32_cache_kl_mean=fp32_dp["kl_mean"], fp32_cache_top1_agreement=fp32_dp["top1_agreement"])
    kv = m["recipe"]["kv_cache"]
    kv["chosen_by"] = "auto" if auto else "--kv-cache int8"
    kv["added_kl"], kv["auto_allowance_kl"] = round(added, 6), round(allowance, 6)
    if auto and added > allowance:
        log.warning("the int8 KV cache adds %.2e KL along the decode path, over auto's allowance of %.2e: "
                    "keeping the fp32 cache (--kv-cache int8 forces it)", added, allowance)
        from edgegpt.graph.io import copy_graph, external_data_name, shaped_op_counts

        copy_graph(weights_only / MODEL_FILE, draft.path / MODEL_FILE)
        m["recipe"]["kv_cache"] = {"dtype": "float32", "chosen_by": "auto", "rejected_int8": {**kv, "decode_path": dp}}
        m.update(io=fp32.manifest["io"], graph=dict(m["graph"], op_counts=shaped_op_counts(draft.path / MODEL_FILE),
                                                      external_data=external_data_name(draft.path / MODEL_FILE)))
        m["quality"]["decode_path"] = fp32_dp  # what the bundle as written (fp32 cache) gives
        return
    m["quality"]["decode_path"] = dp
