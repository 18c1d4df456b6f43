"""Time to first token of a follow-up turn, with and without Generator(prompt_cache=True).

Each round: a fresh history of random ids is generated from (the previous turn, which fills the
cache), then history + reply + new ids is the next prompt, timed on the caching generator and on a
fresh one, alternating. Prints the medians and in how many rounds both produced the same greedy tokens.

    python scripts/bench_prompt_cache.py m-int4 m-fp32 --history 896 --reply 16 --new 32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgegpt.runtime import Generator
from edgegpt.runtime.generator import GenerationConfig


def first_token_ms(gen: Generator, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    steps = gen.iter_ids([prompt], GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
    first = next(steps)
    ms = 1000 * (time.perf_counter() - t0)
    return ms, [int(first[0])] + [int(x[0]) for x in steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="bundles exported with --kv-cache shared")
    ap.add_argument("--history", type=int, default=896)
    ap.add_argument("--reply", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for bundle in args.bundles:
        cached = Generator.load(bundle, threads=args.threads, prompt_cache=True)
        fresh = Generator.load(bundle, threads=args.threads)
        vocab = cached.session.vocab_size
        rng = np.random.default_rng(1)
        with_cache, without, same = [], [], 0
        for _ in range(args.rounds):
            history = [int(x) for x in rng.integers(0, vocab, args.history)]
            _, reply = first_token_ms(cached, history, args.reply)
            turn = history + reply + [int(x) for x in rng.integers(0, vocab, args.new)]
            time.sleep(0.2)
            ms_c, out_c = first_token_ms(cached, turn, args.reply)
            time.sleep(0.2)
            ms_f, out_f = first_token_ms(fresh, turn, args.reply)
            with_cache.append(ms_c)
            without.append(ms_f)
            same += out_c == out_f
        print(f"{bundle}: follow-up of {len(turn)} tokens, {cached.last_reused_tokens} reused; TTFT "
              f"{statistics.median(without):.1f} ms without the prompt cache, {statistics.median(with_cache):.1f} ms "
              f"with it (medians of {args.rounds}); the same greedy tokens as the fresh generator in {same} of "
              f"{args.rounds} rounds")


if __name__ == "__main__":
    main()
