"""The app-side loop over a mobile package's static graphs: prefill buckets and the fixed decode step.

This is the loop docs/deploy.md gives Kotlin and Swift apps, in numpy, so a test runs the contract the
accelerators get (edgegpt/contract.py, static-shape graphs):
- the KV cache is one buffer of P slots per layer that this loop owns; slot j holds position j;
- a prompt is cut into chunks; each runs in the smallest bucket that holds it (else the largest), left-padded;
- every step returns only its new key/value rows, which are written into their slots, so no step copies or
  shifts the cache;
- visibility is the additive ``attention_bias``: 0 for the filled slots and the row's own chunk up to itself,
  the package's mask value everywhere else.

    from edgegpt.runtime.static import StaticGenerator
    gen = StaticGenerator.load("pkg-android/")          # provider="nnapi" on a device build
    print(gen.generate("def parse(", max_new_tokens=32))
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort

from edgegpt import contract
from edgegpt.errors import ArgumentError, BundleError
from edgegpt.limits import check_int
from edgegpt.manifest import bundle_file, read_manifest
from edgegpt.runtime import providers as prov
from edgegpt.runtime.sampling import SamplingParams, select_next
from edgegpt.runtime.session import session_options
from edgegpt.runtime.text import load_bundle_tokenizer

DTYPES = {"int32": np.int32, "int64": np.int64, "float32": np.float32, "float16": np.float16}


class _Graph:
    """One static graph: its session and the contract its manifest entry states, checked against the graph."""

    def __init__(self, pkg: Path, entry: dict, so: ort.SessionOptions, plist: list, n_layer: int, max_past: int):
        if not isinstance(entry, dict):
            raise BundleError(f"{pkg}: edgegpt.json's package.static_graphs holds {entry!r}, not an entry")
        try:
            self.seq = check_int(entry.get("sequence_length"), "sequence_length", low=1, high=max_past)
            self.past = check_int(entry.get("past_slots"), "past_slots", low=1, high=max_past)
        except ArgumentError as e:
            raise BundleError(f"{pkg}: a static graph's {e}; re-run `edgegpt package`") from None
        ids, kv, mask = entry.get("ids_dtype"), entry.get("kv_dtype"), entry.get("mask_value")
        if ids not in ("int32", "int64") or kv not in ("float32", "float16"):
            raise BundleError(f"{pkg}: a static graph's dtypes ({ids!r}, {kv!r}) are not int32/int64 and "
                              f"float32/float16; re-run `edgegpt package`")
        if isinstance(mask, bool) or not isinstance(mask, (int, float)) or not -1e38 < mask <= -1e3:
            raise BundleError(f"{pkg}: a static graph's mask_value {mask!r} is not a large negative number; re-run "
                              f"`edgegpt package`")
        self.ids_dtype, self.kv_dtype, self.mask_value = DTYPES[ids], DTYPES[kv], float(mask)
        path = bundle_file(pkg, entry.get("file"), "package.static_graphs.file")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=plist)
        except Exception as e:  # onnxruntime raises its own exception types per failure
            raise BundleError(f"{pkg}: onnxruntime could not load {path.name} ({str(e).splitlines()[0][:160]}); "
                              f"re-run `edgegpt package`") from None
        want = {contract.INPUT_IDS: [1, self.seq], contract.POSITION_IDS: [1, self.seq],
                contract.ATTENTION_BIAS: [1, 1, self.seq, self.past + self.seq]}
        have = {i.name: i.shape for i in self.session.get_inputs()}
        kv_names = contract.past_names(n_layer)
        if set(have) != set(want) | set(kv_names) or any(have[k] != v for k, v in want.items()):
            raise BundleError(f"{pkg}: {path.name}'s inputs do not match its edgegpt.json entry; re-run "
                              f"`edgegpt package`")
        self.outputs = [contract.LOGITS, *contract.new_kv_names(n_layer)]
        if {o.name for o in self.session.get_outputs()} != set(self.outputs):
            raise BundleError(f"{pkg}: {path.name}'s outputs are not logits and new_key_values.*; re-run "
                              f"`edgegpt package`")


class StaticGenerator:
    """Generation over a package's static graphs, exactly as an app drives them on an accelerator."""

    def __init__(self, package: str | Path, *, provider: str = "cpu", threads: Optional[int] = None,
                 fallback: bool = False):
        self.package = Path(package)
        m = read_manifest(package)
        entries = (m.get("package") or {}).get("static_graphs")
        if not entries or not isinstance(entries, list):
            raise BundleError(f"{package} has no static graphs: make a mobile package with `edgegpt package BUNDLE "
                              f"--target android|ios`")
        a = m["architecture"]
        self.n_layer, self.n_head, self.head_dim = a["n_layer"], a["n_head"], a["head_dim"]
        self.max_context, self.eos_token_id = m["max_context"], m.get("eos_token_id")
        self.provider, plist = prov.resolve(provider, fallback=fallback)
        so = session_options(threads)
        graphs = [_Graph(self.package, e, so, plist, self.n_layer, self.max_context - 1) for e in entries]
        decode = [g for g in graphs if g.seq == 1]
        if len(decode) != 1 or len({(g.past, g.kv_dtype, g.ids_dtype, g.mask_value) for g in graphs}) != 1:
            raise BundleError(f"{package}: its static graphs are not one decode step and prefill buckets over one "
                              f"cache; re-run `edgegpt package`")
        self.decode = decode[0]
        self.buckets = sorted(graphs, key=lambda g: g.seq)  # the decode step is the 1-token bucket
        self.past = self.decode.past
        self.tokenizer = load_bundle_tokenizer(package)

    @classmethod
    def load(cls, package: str | Path, provider: str = "cpu", threads: Optional[int] = None, *,
             fallback: bool = False) -> "StaticGenerator":
        return cls(package, provider=provider, threads=threads, fallback=fallback)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def _bucket(self, remaining: int) -> _Graph:
        return next((g for g in self.buckets if g.seq >= remaining), self.buckets[-1])

    def _step(self, g: _Graph, ids: list[int], start: int, cache: dict) -> np.ndarray:
        """Run ``ids`` (at positions start..) left-padded in bucket ``g``; write their rows into the cache."""
        S, P, k = g.seq, self.past, len(ids)
        x = np.zeros((1, S), g.ids_dtype)
        x[0, S - k:] = ids
        pos = np.zeros((1, S), g.ids_dtype)
        pos[0, S - k:] = np.arange(start, start + k)
        bias = np.full((1, 1, S, P + S), g.mask_value, g.kv_dtype)
        bias[0, 0, :, :start] = 0  # the filled slots
        for r in range(S - k):  # a padding row sees itself only (its output is dropped)
            bias[0, 0, r, P + r] = 0
        for i in range(k):  # real row i sees its chunk up to itself
            bias[0, 0, S - k + i, P + S - k:P + S - k + i + 1] = 0
        out = g.session.run(g.outputs, {contract.INPUT_IDS: x, contract.POSITION_IDS: pos,
                                        contract.ATTENTION_BIAS: bias, **cache})
        if start + k <= P:  # the last position of a full context needs no slot
            for name, rows in zip(contract.past_names(self.n_layer), out[1:]):
                cache[name][:, :, start:start + k] = rows[:, :, S - k:]
        return out[0][0, -1].astype(np.float32)

    def _check(self, prompt: list[int], new_tokens: int) -> None:
        check_int(new_tokens, "max_new_tokens", low=1, high=self.max_context)
        if not prompt:
            raise ArgumentError("the prompt is empty")
        if len(prompt) + new_tokens > self.max_context:
            raise ArgumentError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({new_tokens}) exceeds the "
                                f"model's context of {self.max_context}")

    def _prefill(self, prompt: list[int]) -> tuple[np.ndarray, dict]:
        cache = {n: np.zeros((1, self.n_head, self.past, self.head_dim), self.decode.kv_dtype)
                 for n in contract.past_names(self.n_layer)}
        t = 0
        while t < len(prompt):
            g = self._bucket(len(prompt) - t)
            chunk = prompt[t:t + g.seq]
            logits = self._step(g, chunk, t, cache)
            t += len(chunk)
        return logits, cache

    def generate_ids(self, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                     ignore_eos: bool = False) -> list[int]:
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        self._check(prompt, max_new_tokens)
        logits, cache = self._prefill(prompt)
        rng = np.random.default_rng(seed)
        seen = np.zeros((1, logits.shape[-1]), bool)
        seen[0, prompt] = True
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(select_next(logits[None], params, rng, seen)[0])
            out.append(tok)
            seen[0, tok] = True
            if (tok == self.eos_token_id and not ignore_eos) or len(out) == max_new_tokens:
                break
            logits = self._step(self.decode, [tok], len(prompt) + len(out) - 1, cache)
        return out

    def score_ids(self, prompt: list[int], tokens: list[int]) -> np.ndarray:
        """The logits (len(tokens), vocab) that predict each of ``tokens`` after ``prompt``, fed one a step."""
        self._check(prompt, max(1, len(tokens)))
        logits, cache = self._prefill(prompt)
        rows = [logits]
        for i, tok in enumerate(tokens[:-1]):
            rows.append(self._step(self.decode, [tok], len(prompt) + i, cache))
        return np.stack(rows)

    def generate(self, text: str, max_new_tokens: int = 32, **kw) -> str:
        return self.tokenizer.decode(self.generate_ids(self.encode(text), max_new_tokens, **kw))

