"""Next-token selection in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeded.

Shared by the ONNX runtime and the PyTorch reference generator, so both pick tokens the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from edgegpt.errors import ArgumentError

# top-p looks at this many best candidates first (argpartition, O(V)); only when they hold less
# than top_p of the mass does it sort the whole vocabulary. Exact either way.
_TOP_P_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ArgumentError(f"{name} must be a number, got {v!r}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ArgumentError(f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ArgumentError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ArgumentError(f"seed must be a whole number >= 0 (or None), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# A screened LM head (quantize/screen.py) recomputes in fp32 every token within this margin of the
# best possible logit; sampling sets it to this many times the temperature, so a token left at its
# int8 approximation has at most e^-25 of the top token's probability (together < 1e-6 for 50k tokens)
SCREEN_MARGIN_PER_TEMPERATURE = 25.0


def screen_margin(params: SamplingParams) -> float:
    """The screened head's margin that keeps a generation with ``params`` exact: 0 for greedy
    decoding, 25 x the temperature for sampling, and the largest float (the plain fp32 head) under
    a repetition penalty, which can lift any token to the top."""
    if params.repetition_penalty != 1.0:
        return float(np.finfo(np.float32).max)
    return SCREEN_MARGIN_PER_TEMPERATURE * params.temperature


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """CTRL-style penalty, in place: logits of already-seen tokens are divided (if > 0) or
    multiplied (if < 0) by ``penalty``. logits (B, V) float32; seen (B, V) bool."""
    if penalty == 1.0:
        return
    hit = logits[seen]
    logits[seen] = np.where(hit > 0, hit / penalty, hit * penalty)


def distribution(row: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution sampling draws from for one row of (penalized) logits: the candidate ids (after
    top-k and top-p) and their probabilities at the temperature. Speculative sampling's acceptance rule
    compares the target's and the draft's."""
    row = row.astype(np.float64) / p.temperature
    idx = np.arange(row.shape[0])
    if p.top_k and p.top_k < row.shape[0]:
        idx = np.argpartition(-row, p.top_k - 1)[: p.top_k]
    if p.top_p < 1.0 and idx.shape[0] > 1:
        idx = _top_p(row, idx, p.top_p)
    sub = row[idx]
    probs = np.exp(sub - sub.max())
    probs /= probs.sum()
    return idx, probs


def _sample_row(row: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    idx, probs = distribution(row, p)
    return int(idx[rng.choice(idx.shape[0], p=probs)])


def _top_p(row: np.ndarray, idx: np.ndarray, top_p: float) -> np.ndarray:
    """Smallest set of the highest-probability ids in ``idx`` whose mass reaches ``top_p``."""
    z = row[idx]
    logsum = z.max() + np.log(np.exp(z - z.max()).sum())
    cand = idx
    if idx.shape[0] > _TOP_P_CANDIDATES:
        part = np.argpartition(-z, _TOP_P_CANDIDATES - 1)[:_TOP_P_CANDIDATES]
        if np.exp(z[part] - logsum).sum() >= top_p:
            cand = idx[part]
    order = cand[np.argsort(-row[cand], kind="stable")]
    mass = np.cumsum(np.exp(row[order] - logsum))
    keep = int(np.searchsorted(mass, top_p)) + 1  # first index whose cumulative mass reaches top_p
    return order[: min(keep, order.shape[0])]


def select_next(
    logits: np.ndarray,
    params: SamplingParams,
    rng: Optional[np.random.Generator] = None,
    seen: Optional[np.ndarray] = None,
) -> np.ndarray:
    """logits (B, V) -> next ids (B,) int64. ``seen`` (B, V) bool marks tokens for the penalty."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = np.array(logits, dtype=np.float32, copy=True)
        apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    if rng is None:
        rng = np.random.default_rng(params.seed)
    return np.array([_sample_row(row, params, rng) for row in logits], dtype=np.int64)
