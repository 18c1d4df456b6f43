"""Speculative decoding with the target's own output: a drafter proposes up to K tokens, the target checks
them in one multi-token step, the longest prefix it agrees with is kept, and the caches rewind to it.

A step of a bandwidth-bound decoder reads every weight once whether it computes one row or nine, so each
accepted draft token is a token for (almost) nothing. The shared KV buffer (``export --kv-cache shared``)
makes the rest cheap: the verification step writes its rows in place, and rewinding to any prefix is only
a shorter attention mask (the stale slots are overwritten later).

Drafters:
- ``LookupDrafter``: n-gram prompt lookup. The last n tokens (n = 3, 2, 1) are looked up among everything
  seen so far (prompt and output); what followed the latest earlier occurrence is proposed. No model: strong
  where the answer repeats its input (code, edits, quotes, summaries).
- ``ModelDrafter``: a draft bundle that shares the tokenizer (the int4 bundle of the same model for its fp32
  one, a distilled student for its teacher), with its own shared KV buffer.

Greedy output is the target's: a draft token is kept only where the target's own argmax (with the
repetition penalty applied as decoding would) is that token. Sampling keeps the target's distribution with
the standard rule (Leviathan et al., Chen et al.): a draft token d drawn from q is kept with probability
min(1, p(d) / q(d)), else the token is drawn from max(0, p - q) renormalized; a lookup draft is q = one-hot.
The draws come from the generation's seeded generator, so a seeded run is reproducible, though not the same
draws as without speculation.

K adapts to what is accepted (one more after a fully accepted step, one past the accepted run after a
rejection). Speculation switches itself off where it does not pay: when its steps cost more time per token
than 0.97x a plain step (``Payoff``, measured on the steps themselves), and it retries now and then.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from edgegpt.errors import ArgumentError
from edgegpt.runtime.sampling import SamplingParams, apply_repetition_penalty, distribution

log = logging.getLogger(__name__)

K_START, K_MAX = 4, 7  # K + 1 rows per verification step: the screened head screens up to 8 rows


class LookupDrafter:
    """n-gram prompt lookup over the context, indexed incrementally (O(n) per new token)."""

    free = True  # proposing runs no model: Payoff can shadow it while speculation is off

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.ns = tuple(range(max_n, min_n - 1, -1))
        self.reset()

    def reset(self) -> None:
        self.index: dict[int, dict[tuple, int]] = {n: {} for n in self.ns}
        self.seen: list[int] = []

    def _sync(self, context: Sequence[int]) -> None:
        if len(context) < len(self.seen) or list(context[:len(self.seen)]) != self.seen:
            self.reset()
        for i in range(len(self.seen), len(context)):  # the n-gram ending before token i, continued at i
            for n in self.ns:
                if i >= n:
                    self.index[n][tuple(context[i - n:i])] = i
        self.seen = list(context)

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng, seen) -> tuple[list[int], None]:
        self._sync(context)
        for n in self.ns:
            i = self.index[n].get(tuple(context[-n:])) if len(context) >= n else None
            if i is not None:
                return list(context[i:i + k]), None
        return [], None


class ModelDrafter:
    """A draft bundle with its own shared KV buffer; ``fed`` is what that buffer holds."""

    free = False

    def __init__(self, draft, target_session):
        s = draft.session
        if not s.kv_capacity:
            raise ArgumentError(f"the draft {s.bundle} keeps a growing KV cache; export it with --kv-cache shared")
        if s.vocab_size != target_session.vocab_size:
            raise ArgumentError(f"the draft {s.bundle} has a vocabulary of {s.vocab_size}, the target "
                                f"{target_session.vocab_size}: a draft must share the target's tokenizer")
        self.gen, self.cache, self.fed = draft, None, []

    def reset(self) -> None:
        pass  # the draft's cache is kept across generations: the next one feeds only what differs

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng, seen):
        s = self.gen.session
        if len(context) + k > s.max_context:
            return [], None
        if self.cache is None:
            self.cache = s.start(1, slots=s.max_context)
        keep = min(_common_prefix(self.fed, context), len(context) - 1)
        new = np.asarray([context[keep:]], np.int64)
        logits = self.cache.step(new, np.ones((1, len(context)), np.int64),
                                 np.arange(keep, len(context), dtype=np.int64)[None])
        self.fed = list(context)
        drafts, dists = [], []
        local_seen = None if seen is None else seen.copy()
        for j in range(k):
            row = _penalized(logits[0], params, local_seen)
            if params.greedy:
                d, dist = int(np.argmax(row)), None
            else:
                idx, probs = distribution(row, params)
                d, dist = int(idx[rng.choice(idx.shape[0], p=probs)]), (idx, probs)
            drafts.append(d)
            dists.append(dist)
            if local_seen is not None:
                local_seen[d] = True
            if j + 1 < k:
                n = len(self.fed)
                logits = self.cache.step(np.asarray([[d]], np.int64), np.ones((1, n + 1), np.int64),
                                         np.asarray([[n]], np.int64))
                self.fed.append(d)
        return drafts, dists


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _penalized(row: np.ndarray, params: SamplingParams, seen: Optional[np.ndarray]) -> np.ndarray:
    if params.repetition_penalty == 1.0 or seen is None:
        return row
    row = np.array(row, dtype=np.float32, copy=True)[None]
    apply_repetition_penalty(row, seen[None], params.repetition_penalty)
    return row[0]


def verify(rows: np.ndarray, drafts: list[int], dists, params: SamplingParams, rng,
           seen: Optional[np.ndarray]) -> tuple[int, int]:
    """rows: the target's logits at [pending, d1, ..., dn] (n + 1, V). Returns (drafts kept, the token that
    follows them): the target's own pick at the first disagreement, or after the last draft."""
    for i, d in enumerate(drafts):
        row = _penalized(rows[i], params, seen)
        if params.greedy:
            g = int(np.argmax(row))
            if g != d:
                return i, g
        else:
            idx, p = distribution(row, params)
            p_d = float(p[idx == d].sum())
            q = dists[i] if dists is not None else None
            q_d = 1.0 if q is None else float(q[1][q[0] == d].sum())
            if not rng.random() < min(1.0, p_d / q_d if q_d > 0 else 0.0):
                return i, _residual_sample(idx, p, q, d, rows.shape[-1], rng)
        if seen is not None:
            seen[d] = True
    row = _penalized(rows[len(drafts)], params, seen)
    if params.greedy:
        return len(drafts), int(np.argmax(row))
    idx, p = distribution(row, params)
    return len(drafts), int(idx[rng.choice(idx.shape[0], p=p)])


def _residual_sample(idx: np.ndarray, p: np.ndarray, q, d: int, vocab: int, rng) -> int:
    """A token from max(0, p - q), renormalized (q one-hot at d for a lookup draft)."""
    pv = np.zeros(vocab)
    pv[idx] = p
    qv = np.zeros(vocab)
    if q is None:
        qv[d] = 1.0
    else:
        qv[q[0]] = q[1]
    r = np.maximum(pv - qv, 0.0)
    if r.sum() <= 0:  # p == q: any draw from p is the answer
        r = pv
    r /= r.sum()
    return int(rng.choice(vocab, p=r))


class Payoff:
    """Whether speculating pays, by the clock: the median time per token of the last speculative steps
    (drafting and verifying) against the median time of the last plain steps, kept across a Generator's generations. The
    first PROBE steps run plain; speculation goes off when, over its last WINDOW steps, it is not at least 3%
    faster per token, and is tried again after RETRY steps while off (the text may start repeating), twice as
    long after every trial that keeps it off (up to RETRY_MAX), so a drafter that never pays costs almost nothing.
    Each generation starts with it on (``new_generation``)."""

    PROBE, WINDOW, MARGIN, RETRY, RETRY_MAX = 3, 6, 0.97, 32, 2048

    def __init__(self):
        self.plain_s: list[float] = []
        self.spec: list[tuple[float, int]] = []
        self.off, self.waited, self.retry = False, 0, self.RETRY
        self.hits: list[bool] = []  # shadow(): the last proposals made while off, matched or not

    SHADOW = (3, 4)  # lookup while off: back on when 3 of its last 4 unverified proposals were the next token

    def shadow(self, hit: bool) -> None:
        """While off, a lookup drafter still proposes (for free: no model runs) and the proposal is set against
        the token the plain step then produced. When the text starts repeating, speculation comes back at once
        instead of after the retry interval; the clock judges it again over its next WINDOW steps."""
        need, of = self.SHADOW
        self.hits = (self.hits + [hit])[-of:]
        if self.off and sum(self.hits) >= need:
            log.info("speculation back on: lookup matched %d of the last %d tokens", sum(self.hits), of)
            self.spec, self.off, self.waited, self.hits = [], False, 0, []

    def new_generation(self) -> None:
        """A new text may repeat where the last did not: speculation starts on again, judged afresh on its first
        WINDOW steps (the plain steps' times are kept). The retry interval keeps growing within a generation
        only, so one generation that did not pay cannot keep the next from speculating."""
        self.spec, self.off, self.waited, self.retry, self.hits = [], False, 0, self.RETRY, []

    def speculate(self) -> bool:
        if len(self.plain_s) < self.PROBE:
            return False
        if not self.off:
            return True
        self.waited += 1
        if self.waited < self.retry:
            return False
        self.waited, self.retry = 0, min(2 * self.retry, self.RETRY_MAX)
        return True

    def plain(self, seconds: float) -> None:
        self.plain_s = (self.plain_s + [seconds])[-16:]

    def speculative(self, seconds: float, tokens: int) -> None:
        self.spec = (self.spec + [(seconds, tokens)])[-self.WINDOW:]
        if self.plain_s and (len(self.spec) == self.WINDOW or self.off):
            # medians on both sides: a step the OS preempts (a shared 2-core host) must not decide alone
            per_token = float(np.median([s / n for s, n in self.spec]))
            off = per_token > self.MARGIN * float(np.median(self.plain_s))
            if off != self.off:
                log.info("speculation %s: %.2f ms a token against %.2f plain", "off" if off else "back on",
                         1e3 * per_token, 1e3 * float(np.median(self.plain_s)))
            if not off:
                self.retry = self.RETRY
            self.off = off


class AdaptiveK:
    def __init__(self):
        self.k = K_START

    def update(self, proposed: int, accepted: int) -> None:
        self.k = min(self.k + 1, K_MAX) if accepted == proposed else max(1, accepted + 1)
