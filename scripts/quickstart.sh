#!/usr/bin/env bash
# The main job end to end on the embedded default: a tiny GPT trained on builtin:pydoc (CPython's
# own documentation, read at run time), then generation from it. Everything lands in ./quickstart/.
set -euo pipefail
OUT=${1:-quickstart}
mkdir -p "$OUT"

echo "== train a tiny GPT on builtin:pydoc"
edgegpt train --data builtin:pydoc --out "$OUT/tiny" --preset tiny --overwrite

echo "== generate with PyTorch"
edgegpt generate "$OUT/tiny" --prompt "The with statement" --max-new-tokens 40
