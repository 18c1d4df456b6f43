#!/usr/bin/env bash
# The main job end to end on the embedded default: a tiny GPT trained on builtin:pydoc (CPython's
# own documentation, read at run time), exported to a verified ONNX bundle
# and generated from with onnxruntime, quantized to int8 and int4 (and fp32 with a screened LM head), and benchmarked. Everything lands in ./quickstart/.
set -euo pipefail
OUT=${1:-quickstart}
mkdir -p "$OUT"

echo "== train a tiny GPT on builtin:pydoc"
edgegpt train --data builtin:pydoc --out "$OUT/tiny" --preset tiny --overwrite

echo "== generate with PyTorch (the reference)"
edgegpt generate "$OUT/tiny" --prompt "The with statement" --max-new-tokens 40

echo "== export to a verified ONNX bundle with KV cache"
edgegpt export "$OUT/tiny" --out "$OUT/tiny-fp32" --overwrite

echo "== generate with onnxruntime (edgegpt.runtime), streaming"
edgegpt generate "$OUT/tiny-fp32" --prompt "The with statement" --max-new-tokens 40 --stream

echo "== quantize to int8 and int4 (perplexity, KL and greedy agreement measured and recorded)"
edgegpt quantize "$OUT/tiny-fp32" --out "$OUT/tiny-int8" --mode int8 --overwrite | grep -E "^(precision|size|quality)"
edgegpt quantize "$OUT/tiny-fp32" --out "$OUT/tiny-int4" --mode int4 --overwrite | grep -E "^(precision|size|quality)"

echo "== fp32 with a screened LM head: an 8-bit head read, every possible greedy pick recomputed in fp32 (same tokens)"
edgegpt quantize "$OUT/tiny-fp32" --out "$OUT/tiny-fp32-screened" --mode fp32 --lm-head screened --overwrite \
  | grep -E "^(precision|quality)"
edgegpt generate "$OUT/tiny-fp32-screened" --prompt "The with statement" --max-new-tokens 40

echo "== sample from the int4 bundle (temperature 0.8, top-p 0.95, seeded)"
edgegpt generate "$OUT/tiny-int4" --prompt "The with statement" --max-new-tokens 40 --temperature 0.8 --top-p 0.95 --seed 1

echo "== benchmark fp32 / int8 / int4 against PyTorch eager (W1 sizes: 128-token prompt, 128 new tokens)"
edgegpt bench "$OUT/tiny-fp32" "$OUT/tiny-int8" "$OUT/tiny-int4" --workload W1 --baseline torch --checkpoint "$OUT/tiny" --runs 3
