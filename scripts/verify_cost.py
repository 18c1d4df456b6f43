"""The cost model of speculative decoding: the time of a verification step over K + 1 rows relative to a
one-token decode step, per bundle, after a fixed context, timed in one process with the bundles and row
counts alternated (median of --rounds). With the acceptance a drafter reaches (tokens per verification step,
from `Generator.last_tokens_per_step` or model.generate.draft_acceptance) it projects the speedup:

    speedup = tokens per step / (verify(K) / step(1) + K * draft step / target step)

    python scripts/verify_cost.py BUNDLE... [--context 192] [--max-k 8] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgegpt.runtime import ModelSession

    sessions = [ModelSession(b, threads=args.threads) for b in args.bundles]
    caches = []
    for s in sessions:
        if not s.kv_capacity or s.last_logits_only:
            raise SystemExit(f"{s.bundle}: export with --kv-cache shared and without --last-logits-only")
        c = s.start(1, slots=args.context + args.max_k + 2)
        x = np.random.default_rng(0).integers(0, s.vocab_size, size=(1, args.context))
        c.step(x, np.ones_like(x), np.arange(args.context)[None])
        caches.append(c)
    times = {(i, k): [] for i in range(len(sessions)) for k in range(args.max_k + 1)}
    for _ in range(args.rounds):
        for k in range(args.max_k + 1):
            for i, c in enumerate(caches):  # rows k + 1 at positions context..context+k; the cache is not advanced
                ids = np.zeros((1, k + 1), np.int64)
                mask = np.ones((1, args.context + k + 1), np.int64)
                pos = np.arange(args.context, args.context + k + 1, dtype=np.int64)[None]
                t = time.perf_counter()
                c.step(ids, mask, pos, all_rows=k > 0)
                times[(i, k)].append(time.perf_counter() - t)
    print(f"verification step over K + 1 rows / one-token step, after {args.context} tokens, {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print("| bundle | one-token step ms | " + " | ".join(f"K={k}" for k in range(1, args.max_k + 1)) + " |")
    print("|---|---:|" + "---:|" * args.max_k)
    for i, s in enumerate(sessions):
        one = statistics.median(times[(i, 0)])
        ratios = [statistics.median(times[(i, k)]) / one for k in range(1, args.max_k + 1)]
        print(f"| {s.bundle.name} ({s.manifest['precision']}) | {1e3 * one:.2f} | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
