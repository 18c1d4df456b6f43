"""Score llama.cpp GGUFs with the evaluator behind every bundle's manifest, so that quality at
"matching precision" is compared the way speed is: same weights, same text, same windows.

    python scripts/peers/gguf_from_checkpoint.py CHECKPOINT G --types f32,q8_0,q4_0
    edgegpt export CHECKPOINT --out b-fp32
    edgegpt quantize b-fp32 --out b-int4 --mode int4
    python scripts/peers/kl_vs_llama.py b-fp32 b-int4 G-f32.gguf G-q8_0.gguf G-q4_0.gguf

The first argument is the fp32 reference bundle (exported without --last-logits-only); the others are
bundles or .gguf files. Each is scored on the reference's tokens of the text (default: builtin:pydoc's
held-out tail, the first 4096 tokens, windows of 256 with stride 128, as `edgegpt quantize` records):
KL divergence of the next-token distribution to the reference, perplexity, top-1 agreement; and the KL
along the decode path (32 prompt tokens, then one token a step through each model's own cache, as
`edgegpt quantize` records it in quality.decode_path), and the model file's size. The f32
GGUF doubles as a check that the GGUF holds the same weights (KL ~ 0). A random-weight model
says nothing about quality: use a trained checkpoint. Needs llama-cpp-python for the GGUFs; a
benchmarking aid, not a dependency of edgegpt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edgegpt.corpus import default_eval_text
from edgegpt.manifest import MODEL_FILE
from edgegpt.quality.evaluate import (DECODE_PROMPT, DECODE_TOKENS, decode_logps, log_softmax, path_stats, score,
                                      window_logits)
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


def _size(model: str) -> int:
    """The weights' file: a .gguf (which also holds the vocabulary), or a bundle's graph."""
    p = Path(model)
    return (p if p.suffix == ".gguf" else p / MODEL_FILE).stat().st_size


def llama_decode_logps(gguf: str, ids: list[int], prompt: int, threads: int) -> np.ndarray:
    """decode_logps for a GGUF: the prompt in one batch, then one token per llama_eval call."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=len(ids), n_batch=max(prompt, 1), logits_all=True, n_threads=threads,
                verbose=False)
    llm.reset()
    llm.eval(ids[:prompt])
    rows = [np.asarray(llm.scores[prompt - 1], np.float32)]
    for t in range(prompt, len(ids) - 1):
        llm.eval([ids[t]])
        rows.append(np.asarray(llm.scores[t], np.float32))
    return log_softmax(np.stack(rows))


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
    path = ids[:min(DECODE_PROMPT + DECODE_TOKENS, ref.max_context)].tolist()
    ref_path = decode_logps(ref, path, DECODE_PROMPT)
    rows = [("reference " + Path(args.reference).name, score(ref_fn, ids, window=window), None,
             _size(args.reference))]
    for m in args.models:
        if m.endswith(".gguf"):
            fn = llama_logits(m, window, args.threads)
            name = "llama.cpp " + Path(m).name
            lp = llama_decode_logps(m, path, DECODE_PROMPT, args.threads)
        else:
            sess = ModelSession(m, threads=args.threads)
            fn = lambda chunk, s=sess: window_logits(s, chunk)  # noqa: E731
            name = "edgegpt " + Path(m).name
            lp = decode_logps(sess, path, DECODE_PROMPT)
        rows.append((name, score(fn, ids, window=window, reference=ref_fn), path_stats(ref_path, lp, DECODE_PROMPT),
                     _size(m)))
    print(f"{len(ids)} tokens, windows of {window}, stride {window // 2}; decode path: {DECODE_PROMPT} prompt tokens "
          f"then {len(path) - DECODE_PROMPT - 1} steps; KL and top-1 against {args.reference}")
    print("| model | windowed KL | decode-path KL | perplexity | top-1 agreement | model file MB |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, r, dp, size in rows:
        kl = "-" if r.kl_mean is None else f"{r.kl_mean:.2e}"
        dkl = "-" if dp is None else f"{dp['kl_mean']:.2e}"
        top1 = "-" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
        print(f"| {name} | {kl} | {dkl} | {r.perplexity:.2f} | {top1} | {size / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
