"""Calibration text as model inputs: GPTQ, int8-static and the int8 KV cache all calibrate on the same
windows of the calibration text (corpus.calibration_text: the user's, or builtin:pydoc without the
held-out tail that quality is measured on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgegpt import contract
from edgegpt.errors import BundleError, QuantizeError
from edgegpt.manifest import read_manifest
from edgegpt.runtime.session import NP_DTYPES
from edgegpt.runtime.text import load_bundle_tokenizer

def calibration_windows(bundle: str | Path, text: str, *, windows: int, window: int,
                        max_context: int) -> list[np.ndarray]:
    """Up to ``windows`` spans of ``window`` tokens of ``text`` (the bundle's tokenizer), spread evenly
    over it: GPTQ, int8-static and the int8 KV cache all calibrate on these. A short text gives a
    shorter window, and no more windows than it holds without piling up overlaps."""
    ids = load_bundle_tokenizer(bundle).encode(text).ids
    window = min(window, max_context, len(ids))
    if window < 16:
        raise QuantizeError(f"the calibration text is {len(ids)} tokens; give at least a few hundred")
    count = min(windows, len(ids) // window + 1)
    starts = sorted(set(np.linspace(0, len(ids) - window, count).astype(int).tolist()))
    return [np.asarray(ids[s:s + window], np.int64) for s in starts]


def calibration_feeds(bundle: Path, text: str, *, windows: int, window: int) -> list[dict]:
    """Prefill feeds for the fp32 ``bundle``'s graph (either KV layout) over calibration windows of ``text``.
    The shapes come from its manifest: a session just to read them held GPT-2 small's 0.5 GB of weights twice."""
    m = read_manifest(bundle)
    a, options = m["architecture"], m["graph"].get("options", {})
    chunks = calibration_windows(bundle, text, windows=windows, window=window, max_context=m["max_context"])
    slots = len(chunks[0]) if options.get("shared_kv_buffer") else 0  # a shared buffer sized to the window
    try:
        kv = NP_DTYPES.get(contract.kv_dtype(m["io"]))
    except (StopIteration, KeyError, TypeError, AttributeError):  # an io section that is not edgegpt's
        kv = None
    if kv is None:
        raise BundleError(f"{bundle}: edgegpt.json's KV cache dtype is not one edgegpt writes; re-run `edgegpt export`")
    empty = np.zeros((1, a["n_head"], slots, a["head_dim"]), kv)
    return [{contract.INPUT_IDS: c[None], contract.ATTENTION_MASK: np.ones((1, len(c)), np.int64),
             contract.POSITION_IDS: np.arange(len(c), dtype=np.int64)[None],
             **{n: empty for n in contract.past_names(a["n_layer"])}} for c in chunks]
