"""Score llama.cpp GGUFs with the evaluator behind every bundle's manifest, so that quality at
"matching precision" is compared the way speed is: same weights, same text, same windows.

    python scripts/peers/gguf_from_checkpoint.py CHECKPOINT G --types f32,q8_0,q4_0
    edgegpt export CHECKPOINT --out b-fp32
    edgegpt quantize b-fp32 --out b-int4 --mode int4
    python scripts/peers/kl_vs_llama.py b-fp32 b-int4 G-f32.gguf G-q8_0.gguf G-q4_0.gguf

The first argument is the fp32 reference bundle (exported without --last-logits-only); the others are
bundles or .gguf files. Each is scored on the reference's tokens of the text (default: builtin:pydoc's
held-out tail, the first 4096 tokens, windows of 256 with stride 128, as `edgegpt quantize` records):
KL divergence of the next-token distribution to the reference, perplexity, top-1 agreement. The f32
GGUF doubles as a check that the GGUF holds the same weights (KL ~ 0). A random-weight model
says nothing about quality: use a trained checkpoint. Needs llama-cpp-python for the GGUFs; a
benchmarking aid, not a dependency of edgegpt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edgegpt.corpus import default_eval_text
from edgegpt.quality.evaluate import score, window_logits
from edgegpt.runtime.session import ModelSession
from edgegpt.runtime.text import load_bundle_tokenizer


def llama_logits(gguf: str, window: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=window, n_batch=window, logits_all=True, n_threads=threads, verbose=False)

    def run(chunk: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval(chunk.tolist())
        return np.asarray(llm.scores[:len(chunk)], np.float32)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", help="fp32 bundle (every position's logits)")
    ap.add_argument("models", nargs="+", help="bundles and .gguf files to score against it")
    ap.add_argument("--text", help="text file [builtin:pydoc held-out tail]")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    text = Path(args.text).read_text() if args.text else default_eval_text()
    ref = ModelSession(args.reference, threads=args.threads)
    window = min(args.window, ref.max_context)
    ids = np.asarray(load_bundle_tokenizer(args.reference).encode(text).ids[:args.max_tokens], np.int64)
    ref_fn = lambda chunk: window_logits(ref, chunk)  # noqa: E731
    rows = [("reference " + Path(args.reference).name, score(ref_fn, ids, window=window))]
    for m in args.models:
        if m.endswith(".gguf"):
            fn = llama_logits(m, window, args.threads)
            name = "llama.cpp " + Path(m).name
        else:
            sess = ModelSession(m, threads=args.threads)
            fn = lambda chunk, s=sess: window_logits(s, chunk)  # noqa: E731
            name = "edgegpt " + Path(m).name
        rows.append((name, score(fn, ids, window=window, reference=ref_fn)))
    print(f"{len(ids)} tokens, windows of {window}, stride {window // 2}; KL and top-1 against {args.reference}")
    print("| model | KL to fp32 | perplexity | top-1 agreement |\n|---|---:|---:|---:|")
    for name, r in rows:
        kl = "-" if r.kl_mean is None else f"{r.kl_mean:.5f}"
        top1 = "-" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
        print(f"| {name} | {kl} | {r.perplexity:.2f} | {top1} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
