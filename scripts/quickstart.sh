#!/usr/bin/env bash
# The main job end to end on the embedded default: a tiny GPT trained on builtin:pydoc (CPython's
# own documentation, read at run time), exported to a verified ONNX bundle
# and generated from with onnxruntime. Everything lands in ./quickstart/.
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
