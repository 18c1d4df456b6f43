"""How much decode slows down as the context grows, measured in one process that alternates the systems.

    python scripts/peers/context_slowdown.py BUNDLE... [--gguf FILE ...] [--contexts 192,960] [--rounds 6]

For each round and context, every system prefills the same random prompt ids, then decodes --steps single
tokens; the figure is the median step time. Rounds alternate the systems, so the host's drift hits them
alike, and the first round is a warm-up. This is steadier on a noisy host than `edgegpt bench
--sweep-context`, whose separate worker processes time only a few tokens per point. llama.cpp runs through
llama-cpp-python (`pip install llama-cpp-python`) when --gguf is given.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _edgegpt(bundle: str, threads: int):
    from edgegpt.runtime.session import ModelSession

    s = ModelSession(bundle, threads=threads)

    def run(ids: np.ndarray, steps: int) -> float:
        cache = s.start(1, slots=len(ids) + steps + 1)
        x = ids[None]
        cache.step(x, np.ones_like(x), np.arange(len(ids))[None])
        times = []
        for t in range(len(ids), len(ids) + steps):
            t0 = time.perf_counter()
            cache.step(np.asarray([[7]]), np.ones((1, t + 1), np.int64), np.asarray([[t]]))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return run, s.vocab_size, s.max_context


def _llama(gguf: str, threads: int, n_ctx: int):
    from llama_cpp import Llama

    m = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_ctx, verbose=False)

    def run(ids: np.ndarray, steps: int) -> float:
        m.reset()
        m.eval([int(i) for i in ids])
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            m.eval([7])
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", help="edgegpt bundle directories")
    ap.add_argument("--gguf", action="append", default=[], help="a GGUF of the same weights (repeatable)")
    ap.add_argument("--contexts", default="192,960", help="context lengths to decode after [192,960]")
    ap.add_argument("--steps", type=int, default=48, help="decode steps timed after each prefill [48]")
    ap.add_argument("--rounds", type=int, default=6, help="rounds, the first one a warm-up [6]")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.bundles and not args.gguf:
        ap.error("give at least one bundle or --gguf")
    contexts = [int(c) for c in args.contexts.split(",")]
    systems, vocab, limit = {}, None, None
    for b in args.bundles:
        run, v, ctx = _edgegpt(b, args.threads)
        systems[f"edgegpt {Path(b).name}"] = run
        vocab, limit = min(vocab or v, v), min(limit or ctx, ctx)
    n_ctx = (limit or max(contexts) + args.steps + 1)
    for g in args.gguf:
        systems[f"llama.cpp {Path(g).name}"] = _llama(g, args.threads, n_ctx)
    if max(contexts) + args.steps >= n_ctx:
        ap.error(f"the largest context plus --steps must stay below the model's {n_ctx} tokens")
    ids = np.random.default_rng(1234).integers(0, vocab or 256, max(contexts)).astype(np.int64)
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for c in contexts:
            for name, run in systems.items():
                times.setdefault((name, c), []).append(run(ids[:c], args.steps))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    head = " | ".join(f"ms/token at {c}" for c in contexts)
    print(f"\n| system | {head} | kept (last / first) |\n|---|" + "---:|" * (len(contexts) + 1))
    for name in systems:
        med = [1e3 * float(np.median(times[(name, c)][1:] or times[(name, c)])) for c in contexts]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {med[0] / med[-1]:.2f} |")


if __name__ == "__main__":
    main()
