"""The generation loop an offline app embeds: numpy + onnxruntime + tokenizers only.

    gen = Generator.load("bundle/", provider="cpu", threads=4)
    gen.generate("Once upon a time", max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1)
    for piece in gen.stream("Hello", max_new_tokens=32): print(piece, end="")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from edgegpt.errors import ArgumentError
from edgegpt.limits import check_int
from edgegpt.runtime.sampling import SamplingParams, screen_margin, select_next
from edgegpt.runtime.session import ModelSession
from edgegpt.runtime.text import IncrementalDecoder, StopStrings, load_bundle_tokenizer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    params: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    truncate_prompt: bool = False


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> (ids, attention_mask), both (B, T) int64, left-padded."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p):] = p
            mask[i, T - len(p):] = 1
    return ids, mask


def _token_rows(prompts: object) -> list[list[int]]:
    """Prompts of token ids as lists of ints, or an ArgumentError naming what was given instead."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
        raise ArgumentError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    rows = []
    for p in prompts:
        if isinstance(p, (str, bytes)) or not (isinstance(p, Sequence) or isinstance(p, np.ndarray)):
            raise ArgumentError(f"each prompt must be a list of token ids, got {type(p).__name__}")
        row = []
        for t in p:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise ArgumentError(f"token ids must be whole numbers, got {t!r}")
            row.append(int(t))
        rows.append(row)
    return rows


def _stop_strings(stop: object) -> tuple[str, ...]:
    """One stop string or several; a plain string is one stop string, not its characters."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ArgumentError(f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(stop)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class Generator:
    """prompt_cache: keep the KV cache of the last single-prompt generation, and start the next one
    from the longest prefix it shares with it (a chat turn whose prompt is the history plus a new
    message prefills only the new message). Needs a bundle exported with ``--kv-cache shared``, whose
    fixed buffer lets the cache rewind to any prefix for free; it holds the model's whole context
    (GPT-2 small: 75 MB fp32, 19 MB with the int8 cache). ``last_reused_tokens`` says how many
    prompt tokens the last generation took from it."""

    def __init__(self, session: ModelSession, tokenizer, *, prompt_cache: bool = False, speculate=None):
        """speculate: None, "lookup" (n-gram prompt lookup) or a draft Generator sharing the tokenizer
        (runtime/speculate.py); single-prompt generations then verify drafted tokens in one step."""
        self.session, self.tokenizer = session, tokenizer
        self.max_context = session.max_context
        eos = session.eos_token_id
        self.eos_token_id = eos
        pad = session.pad_token_id if session.pad_token_id is not None else eos
        # GPT-2 configs keep eos 50256 even for smaller vocabularies; padding must be a row of the table
        self.pad_token_id = pad if pad is not None and pad < session.vocab_size else 0
        if prompt_cache and not session.kv_capacity:
            raise ArgumentError(f"prompt_cache needs a bundle with a shared KV buffer; {session.bundle} keeps a "
                             f"growing one: re-export with `edgegpt export MODEL --kv-cache shared`")
        self.prompt_cache = prompt_cache
        self._cache = None  # the kept KVCache; its positions 0..n-1 hold the K/V of _cached[:_cached_n]
        self._cached: list[int] = []
        self._cached_n = 0
        self.last_reused_tokens = 0
        self.speculate = speculate
        self.drafter = self._drafter(speculate)
        if self.drafter is not None:
            from edgegpt.runtime.speculate import Payoff

            self._payoff = Payoff()
        self.last_tokens_per_step = None  # speculation: tokens the last generation yielded per target step

    def _drafter(self, speculate):
        from edgegpt.runtime import speculate as spec

        if speculate is None:
            return None
        s = self.session
        if not s.kv_capacity or s.last_logits_only:
            raise ArgumentError(f"speculative decoding verifies several tokens in one step: {s.bundle} needs a shared "
                                f"KV buffer and every position's logits (export with --kv-cache shared, without "
                                f"--last-logits-only)")
        if s.manifest.get("precision") == "int8":
            raise ArgumentError(f"{s.bundle} is int8: its MatMuls quantize each step's activations with one scale "
                                f"for all the step's rows, so a verification step's tokens can differ from one-token "
                                f"steps'. Speculate on the fp32 (or --lm-head screened) or int4 bundle, whose output "
                                f"stays exact")
        if speculate == "lookup":
            return spec.LookupDrafter()
        if isinstance(speculate, Generator):
            if speculate.tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ArgumentError(f"the draft {speculate.session.bundle} has another tokenizer than the target: a "
                                    f"draft must share it")
            return spec.ModelDrafter(speculate, s)
        raise ArgumentError(f"speculate must be None, 'lookup' or a draft Generator, got {speculate!r}")

    @classmethod
    def load(cls, bundle: str | Path, provider: str = "cpu", threads: Optional[int] = None, *,
             fallback: bool = False, provider_options: Optional[dict] = None, spinning: bool = True,
             optimization: str = "all", session_config: Optional[dict] = None,
             prompt_cache: bool = False, verify_files: bool = False, speculate=None) -> "Generator":
        """verify_files: check every file of the bundle against its manifest's sha256 first. speculate:
        "lookup", or a draft bundle's path (loaded with the same provider and threads), or a Generator."""
        session = ModelSession(bundle, provider=provider, threads=threads, fallback=fallback,
                               provider_options=provider_options, spinning=spinning, optimization=optimization,
                               session_config=session_config, verify_files=verify_files)
        if speculate is not None and speculate != "lookup" and not isinstance(speculate, Generator):
            # the draft's threads must not spin while the target's run (they share the cores)
            speculate = cls.load(speculate, provider=provider, threads=threads, fallback=fallback,
                                 spinning=False, verify_files=verify_files)
        return cls(session, load_bundle_tokenizer(bundle), prompt_cache=prompt_cache, speculate=speculate)

    def clear_prompt_cache(self) -> None:
        """Forget the kept KV cache (the next generation prefills its whole prompt)."""
        self._cached_n = 0

    # -- token-level core -------------------------------------------------------------------

    def _check_prompts(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
        if not prompts:
            raise ArgumentError("no prompts given")
        self.session.check_memory(len(prompts), self.max_context, max(len(p) for p in prompts))
        if any(len(p) == 0 for p in prompts):
            raise ArgumentError("a prompt tokenizes to no tokens; give at least one token of text")
        if cfg.max_new_tokens < 1:
            raise ArgumentError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        if cfg.max_new_tokens >= self.max_context:
            raise ArgumentError(f"max_new_tokens ({cfg.max_new_tokens}) must be below the model's context of "
                             f"{self.max_context} tokens")
        room = self.max_context - cfg.max_new_tokens
        longest = max(len(p) for p in prompts)
        if longest > room:
            if not cfg.truncate_prompt:
                raise ArgumentError(f"prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                                 f"model's context of {self.max_context} tokens; shorten the prompt, lower "
                                 f"max_new_tokens, or pass truncate_prompt=True to keep the last {room} prompt tokens")
            prompts = [p[-room:] for p in prompts]
        vocab = self.session.vocab_size
        for p in prompts:
            if min(p) < 0 or max(p) >= vocab:
                raise ArgumentError(f"token ids must be in [0, {vocab}); got {min(p)}..{max(p)}")
        return prompts

    def _stop_ids(self, cfg: GenerationConfig) -> set[int]:
        """Token ids that end a row: the caller's stop ids, plus eos unless ignored."""
        ids = set(cfg.stop_token_ids)
        if self.eos_token_id is not None and not cfg.ignore_eos:
            ids.add(self.eos_token_id)
        return ids

    def iter_ids(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> Iterator[np.ndarray]:
        """Yield the next token of every row, (B,) int64, once per step; rows that finished
        (eos / stop token) yield pad_token_id. Stops when every row has finished."""
        prompts = self._check_prompts(_token_rows(prompts), cfg)
        if self.session.kv_capacity and len({len(p) for p in prompts}) > 1:
            raise ArgumentError("this bundle's shared KV buffer takes no padding: give prompts of one length per call "
                             "(generate_ids / generate run them one at a time)")
        params = cfg.params
        stop_arr = np.array(sorted(self._stop_ids(cfg)), dtype=np.int64)
        B = len(prompts)
        ids, mask = left_pad(prompts, self.pad_token_id)
        rng = np.random.default_rng(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = np.zeros((B, self.session.vocab_size), dtype=bool)
            for i, p in enumerate(prompts):
                seen[i, p] = True
        # position ids that skip left padding; decode steps continue from each row's last one
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        next_pos = pos[:, -1:] + 1
        total = ids.shape[1] + cfg.max_new_tokens
        full_mask = np.ones((B, total), dtype=np.int64)
        full_mask[:, : ids.shape[1]] = mask
        done = np.zeros(B, dtype=bool)
        step_ids, step_pos, length = ids, pos, ids.shape[1]
        reuse = self.prompt_cache and B == 1
        if reuse:  # continue the kept cache from the prefix it shares with this prompt (at least one token new)
            keep = min(common_prefix(self._cached[:self._cached_n], prompts[0]), len(prompts[0]) - 1)
            if self._cache is None:
                self._cache = self.session.start(1, slots=self.max_context)
            # the tokens fed grow in place; only a successful step extends how many the cache holds
            cache, self._cached, self._cached_n = self._cache, list(prompts[0]), 0
            step_ids, step_pos = ids[:, keep:], pos[:, keep:]
            self.last_reused_tokens = keep
        else:
            cache = self.session.start(B, slots=total)
        cache.set_screen_margin(screen_margin(params))
        if self.drafter is not None and B == 1:
            yield from self._speculative(cache, list(prompts[0]), step_ids, step_pos, length, cfg, rng, seen,
                                         set(stop_arr.tolist()), reuse)
            return
        for _ in range(cfg.max_new_tokens):
            logits = cache.step(step_ids, np.ascontiguousarray(full_mask[:, :length]), step_pos)
            if reuse:
                self._cached_n = length
            nxt = select_next(logits, params, rng, seen)
            nxt[done] = self.pad_token_id
            if seen is not None:
                seen[np.arange(B), nxt] = True
            if stop_arr.size:
                done |= np.isin(nxt, stop_arr)
            yield nxt
            if done.all():
                return
            step_ids, step_pos = nxt[:, None], next_pos
            next_pos = next_pos + 1
            length += 1
            if reuse:
                self._cached.append(int(nxt[0]))

    def _speculative(self, cache, context: list[int], step_ids, step_pos, length: int, cfg: GenerationConfig, rng,
                     seen, stops: set, reuse: bool) -> Iterator[np.ndarray]:
        """iter_ids for one prompt with a drafter (runtime/speculate.py). ``length``: tokens the cache holds
        after the first step; each later step feeds the pending token and up to K drafts."""
        from edgegpt.runtime.speculate import AdaptiveK, verify

        params, drafter, k, payoff = cfg.params, self.drafter, AdaptiveK(), self._payoff
        drafter.reset()
        payoff.new_generation()
        row_seen = None if seen is None else seen[0]
        logits = cache.step(step_ids, np.ones((1, length), np.int64), step_pos)
        if reuse:
            self._cached, self._cached_n = context, length
        new = [int(select_next(logits, params, rng, seen)[0])]
        emitted, steps = 0, 1
        while True:
            for tok in new:  # the tokens this step settled: kept drafts, then the target's own pick
                context.append(tok)
                if row_seen is not None:
                    row_seen[tok] = True
                emitted += 1
                yield np.asarray([tok], np.int64)
                if tok in stops or emitted == cfg.max_new_tokens:
                    self.last_tokens_per_step = emitted / steps
                    return
            t = context[-1]  # pending: sampled, not in the cache yet; the cache holds `length` tokens
            room = cfg.max_new_tokens - emitted - 1
            on = room > 0 and payoff.speculate()
            # off: a free drafter's proposal, unverified, tells Payoff when the text starts repeating (untimed)
            shadow = drafter.propose(context, 1, params, rng, row_seen)[0] if not on and drafter.free else None
            t0 = time.perf_counter()
            drafts, dists = drafter.propose(context, min(k.k, room), params, rng, row_seen) if on else ([], None)
            feed = np.asarray([[t, *drafts]], np.int64)
            mask = np.ones((1, length + feed.shape[1]), np.int64)
            pos = np.arange(length, length + feed.shape[1], dtype=np.int64)[None]
            steps += 1
            if not drafts:
                logits = cache.step(feed, mask, pos)
                new = [int(select_next(logits, params, rng, seen)[0])]
                payoff.plain(time.perf_counter() - t0)
                if shadow is not None:
                    payoff.shadow(shadow[:1] == new)
            else:
                rows = cache.step(feed, mask, pos, all_rows=True)[0]
                kept, follow = verify(rows, drafts, dists, params, rng, None if row_seen is None else row_seen.copy())
                k.update(len(drafts), kept)
                payoff.speculative(time.perf_counter() - t0, kept + 1)
                new = [*drafts[:kept], follow]
            length += len(new)
            if reuse:
                self._cached_n = length

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, **kw) -> list[list[int]]:
        """New ids per prompt; a row ends at (and includes) its first stop/eos token."""
        cfg = self.make_config(max_new_tokens, **kw)
        prompts = _token_rows(prompts)
        if self.session.kv_capacity and len({len(p) for p in prompts}) > 1:
            return [self.generate_ids([p], max_new_tokens, **kw)[0] for p in prompts]
        rows: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        stops = self._stop_ids(cfg)
        for nxt in self.iter_ids(prompts, cfg):
            for i, t in enumerate(nxt.tolist()):
                if not finished[i]:
                    rows[i].append(t)
                    finished[i] = t in stops
        return rows

    # -- text API ---------------------------------------------------------------------------

    def make_config(self, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                repetition_penalty: float = 1.0, seed: Optional[int] = None,
                stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                truncate_prompt: bool = False) -> GenerationConfig:
        check_int(max_new_tokens, "max_new_tokens", low=1)
        stop_ids = (stop_token_ids,) if isinstance(stop_token_ids, int) else stop_token_ids
        return GenerationConfig(max_new_tokens, SamplingParams(temperature, top_k, top_p, repetition_penalty, seed),
                                tuple(_token_rows([stop_ids])[0]), bool(ignore_eos), bool(truncate_prompt))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: a str of valid Unicode (text read with errors='surrogateescape' from a
        non-UTF-8 source is refused by name)."""
        if not isinstance(text, str):
            raise ArgumentError(f"the prompt must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ArgumentError(f"the prompt is not valid UTF-8 text (undecodable byte at character {e.start}); "
                                f"give UTF-8 text") from None
        return self.tokenizer.encode(text).ids

    def stream(self, prompt: str, max_new_tokens: int = 64, *, stop: Sequence[str] = (), **kw) -> Iterator[str]:
        """Yield text as it is produced: whole UTF-8 characters only, cut before any stop string."""
        for piece, _ in self.stream_ids(self.encode(prompt), max_new_tokens, stop=stop, **kw):
            if piece:
                yield piece

    def stream_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, *, stop: Sequence[str] = (),
                   **kw) -> Iterator[tuple[str, Optional[int]]]:
        """stream() for a prompt of token ids, also yielding each new token: (text, id) per token, where
        the text may be empty while a partial character or a possible stop string is held back; a held-back
        tail comes last as (text, None). The token that completes a stop string is the last id yielded."""
        cfg = self.make_config(max_new_tokens, **kw)
        decoder, stops = IncrementalDecoder(self.tokenizer), StopStrings(_stop_strings(stop))
        special = {self.eos_token_id} if self.eos_token_id is not None else set()
        for nxt in self.iter_ids([list(prompt_ids)], cfg):
            t = int(nxt[0])
            if t in special and not cfg.ignore_eos:
                break
            yield stops.feed(decoder.push(t)), t
            if stops.stopped:
                return
        tail = stops.feed(decoder.flush()) + stops.flush()
        if tail:
            yield tail, None

    def generate(self, prompt: Union[str, Sequence[str]], max_new_tokens: int = 64, *, stop: Sequence[str] = (),
                 **kw) -> Union[str, list[str]]:
        """Generated text (without the prompt) for one prompt, or a list for a batch."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, max_new_tokens, stop=stop, **kw))
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ArgumentError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}"[:200])
        stop = _stop_strings(stop)
        rows = self.generate_ids([self.encode(p) for p in prompt], max_new_tokens, **kw)
        out = []
        for row in rows:
            if row and row[-1] == self.eos_token_id and not kw.get("ignore_eos"):
                row = row[:-1]
            s = StopStrings(stop)
            out.append(s.feed(self.tokenizer.decode(row, skip_special_tokens=False)) + s.flush())
        return out
