"""Calibration text as model inputs: GPTQ, int8-static and the int8 KV cache all calibrate on the same
windows of the calibration text (corpus.calibration_text: the user's, or builtin:pydoc without the
held-out tail that quality is measured on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgegpt import contract
from edgegpt.errors import QuantizeError
from edgegpt.runtime.session import ModelSession
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
    """Prefill feeds for the fp32 ``bundle``'s graph (either KV layout) over calibration windows of ``text``."""
    sess = ModelSession(bundle)
    chunks = calibration_windows(bundle, text, windows=windows, window=window, max_context=sess.max_context)
    empty = sess.empty_past_numpy(1, slots=len(chunks[0]))
    return [{contract.INPUT_IDS: c[None], contract.ATTENTION_MASK: np.ones((1, len(c)), np.int64),
             contract.POSITION_IDS: np.arange(len(c), dtype=np.int64)[None],
             **{n: empty for n in contract.past_names(sess.n_layer)}} for c in chunks]
