"""Perplexity of a bundle on text, with the runtime (numpy + onnxruntime), over strided windows.

Each window is up to ``window`` tokens long and starts ``stride`` tokens after the previous one;
only the tokens a previous window has not scored are scored, and each of those sees at least
``window - stride`` tokens of context (the usual strided-perplexity method). Against a reference
bundle (the fp32 source) the same windows also give the mean KL divergence of the next-token
distribution and top-1 agreement: on a few thousand tokens perplexity barely separates 8- and
4-bit schemes while KL ranks them cleanly (docs/design.md, Quality).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgegpt import contract
from edgegpt.errors import DataError, QuantizeError
from edgegpt.runtime.session import ModelSession
from edgegpt.runtime.text import load_bundle_tokenizer

# Prompts of our own (not third-party text) that greedy agreement decodes from.
AGREEMENT_PROMPTS = ("The with statement", "A class definition defines", "def f(x):\n    return")


@dataclass
class EvalResult:
    perplexity: float
    tokens: int
    windows: int
    window: int
    stride: int
    kl_mean: Optional[float] = None
    top1_agreement: Optional[float] = None

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items() if v is not None}


# The decode path every quantized manifest records: a prompt of this many tokens, then this many fed one a step
DECODE_PROMPT, DECODE_TOKENS = 32, 256


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored target index within the window) for every window."""
    out, prev_end, start = [], 0, 0
    while True:
        end = min(start + window, n)
        out.append((start, end, max(prev_end - start, 1) if start else 1))
        if end == n:
            return out
        prev_end, start = end, start + stride


def window_logits(sess: ModelSession, ids: np.ndarray) -> np.ndarray:
    feed = {contract.INPUT_IDS: ids[None], contract.ATTENTION_MASK: np.ones((1, len(ids)), np.int64),
            contract.POSITION_IDS: np.arange(len(ids), dtype=np.int64)[None]}
    empty = sess.empty_past_numpy(1)
    feed.update({name: empty for name in contract.past_names(sess.n_layer)})
    return sess.forward_numpy(feed)[0][0].astype(np.float32)


def evaluate(bundle: str | Path, text: str, *, window: Optional[int] = None, stride: Optional[int] = None,
             max_tokens: int = 4096, reference: Optional[str | Path | SourceRun] = None,
             threads: Optional[int] = None) -> EvalResult:
    """Perplexity of ``bundle`` on ``text``; with ``reference`` (a bundle, or a SourceRun of one on the same text
    and windows, whose own window, stride and token count are used), also KL and top-1 agreement against it."""
    stored = isinstance(reference, SourceRun)
    if stored:
        window, stride, max_tokens = reference.result.window, reference.result.stride, reference.max_tokens
    sess = ModelSession(bundle, threads=threads)
    if sess.last_logits_only:
        raise QuantizeError(f"{bundle} was exported with --last-logits-only; perplexity needs every position's logits "
                            f"(export without it)")
    ids = np.asarray(load_bundle_tokenizer(bundle).encode(text).ids[:max_tokens], dtype=np.int64)
    ref = ModelSession(reference, threads=threads) if reference and not stored else None
    return score(lambda chunk: window_logits(sess, chunk), ids, window=min(window or 256, sess.max_context), stride=stride,
                 reference=(lambda chunk: window_logits(ref, chunk)) if ref is not None else None,
                 reference_rows=reference.rows.read if stored else None)


def score(logits: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, *, window: int, stride: Optional[int] = None,
          reference: Optional[Callable[[np.ndarray], np.ndarray]] = None,
          reference_rows: Optional[Callable[[int], np.ndarray]] = None,
          keep_rows: Optional[Callable[[np.ndarray], None]] = None) -> EvalResult:
    """Perplexity (and KL / top-1 agreement against ``reference``) of any model given as a function
    from a window of token ids to its (tokens, vocab) logits: bundles here, and peers such as
    llama.cpp in scripts/peers/kl_vs_llama.py, scored on exactly the same windows. ``reference_rows``
    instead gives the reference's logits of window k's scored rows, as ``keep_rows`` was given them."""
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise DataError(f"stride must be in (0, window={window}], got {stride}")
    if len(ids) < window:
        raise DataError(f"the evaluation text is {len(ids)} tokens, shorter than one window of {window}; "
                        f"give a text of at least {window} tokens")
    nll, count, kl, agree = 0.0, 0, 0.0, 0
    spans = _windows(len(ids), window, stride)
    compare = reference is not None or reference_rows is not None
    for k, (start, end, first) in enumerate(spans):
        chunk = ids[start:end]
        rows = logits(chunk)[first - 1:-1]  # rows predicting targets first..end-1
        if keep_rows is not None:
            keep_rows(rows)
        lp = log_softmax(rows)
        targets = chunk[first:]
        nll -= lp[np.arange(len(targets)), targets].sum()
        count += len(targets)
        if compare:
            rp = log_softmax(reference(chunk)[first - 1:-1] if reference is not None else reference_rows(k))
            kl += float((np.exp(rp) * (rp - lp)).sum())
            agree += int((rp.argmax(-1) == lp.argmax(-1)).sum())
    res = EvalResult(perplexity=float(np.exp(nll / count)), tokens=count, windows=len(spans), window=window,
                     stride=stride)
    if compare:
        res.kl_mean, res.top1_agreement = kl / count, agree / count
    return res


class RowFile:
    """Float32 logit rows written to a file in blocks and read back by block number (not kept in memory)."""

    def __init__(self, path: Path):
        self.path, self.blocks, self.size = Path(path), [], 0
        self.path.write_bytes(b"")

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.float32)
        with open(self.path, "ab") as f:
            f.write(rows.tobytes())
        self.blocks.append((self.size, rows.shape))
        self.size += rows.nbytes

    def read(self, k: int) -> np.ndarray:
        offset, shape = self.blocks[k]
        return np.fromfile(self.path, np.float32, count=int(np.prod(shape)), offset=offset).reshape(shape)


@dataclass
class SourceRun:
    """A source bundle run once on its own over a text: its perplexity, its logits on every scored row (in a
    file), its decode-path log-probabilities and its greedy tokens. Measuring a quantized bundle against this,
    rather than against the source bundle itself, keeps the two sessions out of memory at the same time (GPT-2
    XL: its 6.2 GB fp32 session beside the 1.6 GB int8 one)."""
    max_tokens: int
    result: EvalResult
    rows: RowFile
    decode_ids: list[int]
    decode_prompt: int
    decode: np.ndarray
    greedy: dict[str, list[int]]


def run_source(src: str | Path, text: str, folder: Path, *, max_tokens: int = 4096, prompt: int = DECODE_PROMPT,
               tokens: int = DECODE_TOKENS, new_tokens: int = 16, prompts=AGREEMENT_PROMPTS) -> SourceRun:
    """``src`` measured once on ``text`` (its rows go to a file in ``folder``), then closed."""
    from edgegpt.runtime import Generator

    gen = Generator.load(src)
    sess = gen.session
    if sess.last_logits_only:
        raise QuantizeError(f"{src} was exported with --last-logits-only; perplexity needs every position's logits "
                            f"(export without it)")
    tok = load_bundle_tokenizer(src)
    ids = np.asarray(tok.encode(text).ids[:max_tokens], dtype=np.int64)
    rows = RowFile(Path(folder) / "source-rows.f32")
    result = score(lambda chunk: window_logits(sess, chunk), ids, window=min(256, sess.max_context), keep_rows=rows.write)
    path_ids = tok.encode(text).ids[:min(prompt + tokens, sess.max_context)]
    if len(path_ids) <= prompt + 1:
        raise DataError(f"the eval text is {len(path_ids)} tokens; the decode-path check needs more than {prompt + 1}")
    decode = decode_logps(sess, path_ids, prompt)
    greedy = {p: gen.generate_ids([gen.encode(p)], new_tokens, ignore_eos=True)[0] for p in prompts}
    return SourceRun(max_tokens, result, rows, path_ids, prompt, decode, greedy)


def decode_path(bundle: str | Path, reference: str | Path, text: str, *, prompt: int = DECODE_PROMPT,
                tokens: int = DECODE_TOKENS) -> dict:
    """KL and top-1 agreement against ``reference`` along the decode path: ``prompt`` tokens of
    ``text`` prefilled, then ``tokens`` more fed one at a time through each bundle's own KV cache
    (teacher-forced). Strided perplexity never reads a cache back; this is what measures a
    quantized cache (shared-buffer bundles, where the cache lives in place)."""
    return decode_paths([bundle], reference, text, prompt=prompt, tokens=tokens)[0]


def decode_paths(bundles: list[str | Path], reference: str | Path | SourceRun, text: str, *,
                 prompt: int = DECODE_PROMPT, tokens: int = DECODE_TOKENS) -> list[dict]:
    """decode_path for several bundles over the same tokens, running the reference once (or not at all, given
    a SourceRun: its own prompt and tokens, cut to the bundles' context)."""
    sessions = [ModelSession(b) for b in bundles]
    if isinstance(reference, SourceRun):
        limit = min(s.max_context for s in sessions)
        ids, prompt = reference.decode_ids[:limit], reference.decode_prompt
        rp = reference.decode[:max(len(ids) - prompt, 0)]
    else:
        sessions.append(ModelSession(reference))
        limit = min(s.max_context for s in sessions)
        ids = load_bundle_tokenizer(reference).encode(text).ids[:min(prompt + tokens, limit)]
    if len(ids) <= prompt + 1:
        raise DataError(f"the eval text is {len(ids)} tokens; the decode-path check needs more than {prompt + 1}")
    logps = [decode_logps(s, ids, prompt) for s in sessions]
    if not isinstance(reference, SourceRun):
        rp = logps.pop()
    return [path_stats(rp, lp, prompt) for lp in logps]


def decode_logps(sess: ModelSession, ids: list[int], prompt: int) -> np.ndarray:
    """Log-probabilities along the decode path: the last prompt row, then one row per token fed alone."""
    cache = sess.start(1, slots=len(ids))
    x = np.asarray(ids[:prompt], np.int64)[None]
    rows = [log_softmax(cache.step(x, np.ones_like(x), np.arange(prompt, dtype=np.int64)[None]))]
    for t in range(prompt, len(ids) - 1):
        rows.append(log_softmax(cache.step(np.asarray([[ids[t]]], np.int64), np.ones((1, t + 1), np.int64),
                                            np.asarray([[t]], np.int64))))
    return np.concatenate(rows)


def path_stats(ref: np.ndarray, logp: np.ndarray, prompt: int) -> dict:
    """KL to the reference's rows and top-1 agreement, for log-probabilities from decode_logps (or a peer's)."""
    kl = float((np.exp(ref) * (ref - logp)).sum(-1).mean())
    return {"kl_mean": float(f"{kl:.4g}"),  # four significant digits: fp16's is ~1e-7
            "top1_agreement": round(float((ref.argmax(-1) == logp.argmax(-1)).mean()), 5),
            "prompt_tokens": prompt, "positions": int(logp.shape[0])}


def greedy_agreement(src: str | Path | SourceRun, dst, new_tokens: int = 16, prompts=AGREEMENT_PROMPTS) -> float:
    """Share of greedy tokens (free-running, per prompt, up to the first divergence counted as
    disagreement from there on) that ``dst`` produces identically to ``src`` (a bundle, or a SourceRun
    holding its tokens for these prompts)."""
    from edgegpt.runtime import Generator
    from edgegpt.runtime.generator import common_prefix

    b = Generator.load(dst)
    a = None if isinstance(src, SourceRun) else Generator.load(src)
    same = total = 0
    for p in prompts:
        ids = b.encode(p)
        x = src.greedy[p][:new_tokens] if a is None else a.generate_ids([ids], new_tokens, ignore_eos=True)[0]
        y = b.generate_ids([ids], new_tokens, ignore_eos=True)[0]
        same, total = same + common_prefix(x, y), total + len(x)
    return same / total
