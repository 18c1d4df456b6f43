#!/usr/bin/env bash
# The quality table of docs/quantization.md in one command: every edgegpt precision and llama.cpp's ladder on
# the same trained checkpoint, scored on the same held-out text (windowed KL, decode-path KL, perplexity,
# top-1 agreement, model file size).
#
#   scripts/peers/quality_table.sh CHECKPOINT OUT [TEXT_FILE [CALIBRATION_FILE]]
#
# CHECKPOINT: a trained HF GPT-2 checkpoint (`edgegpt train`); TEXT_FILE: held-out evaluation text
# [builtin:pydoc's held-out tail]; CALIBRATION_FILE: text for GPTQ and smoothing, not the held-out text
# [builtin:pydoc less its held-out tail]. Needs gguf and llama-cpp-python (scripts/peers/gguf_from_checkpoint.py).
set -euo pipefail
CKPT=$1; OUT=$2; TEXT=${3:-}; CAL=${4:-}
mkdir -p "$OUT"
EVAL=()
if [ -n "$TEXT" ]; then EVAL=(--eval-text "$TEXT"); fi
if [ -n "$CAL" ]; then EVAL+=(--calibration "$CAL"); fi
edgegpt export "$CKPT" --out "$OUT/fp32" --overwrite > /dev/null
q() { local name=$1; shift; edgegpt quantize "$OUT/fp32" --out "$OUT/$name" --overwrite --force "${EVAL[@]}" "$@" > /dev/null; }
q int8 --mode int8
q int8-no-smooth --mode int8 --no-smooth
q fp16 --mode fp16
q int4 --mode int4
q int4-small --mode int4 --lm-head int4 --embedding int4
rm -rf "$OUT/ort-fp16"; python scripts/peers/ort_fp16.py "$OUT/fp32" "$OUT/ort-fp16" > /dev/null
python scripts/peers/gguf_from_checkpoint.py "$CKPT" "$OUT/llama" --types f32,q8_0,q6_K,q5_K_M,q4_K_M,q4_K_S,q4_0 > /dev/null
TEXTARG=(); if [ -n "$TEXT" ]; then TEXTARG=(--text "$TEXT"); fi
python scripts/peers/kl_vs_llama.py "$OUT/fp32" "${TEXTARG[@]}" \
  "$OUT/fp16" "$OUT/ort-fp16" "$OUT/int8" "$OUT/int8-no-smooth" "$OUT/int4" "$OUT/int4-small" \
  "$OUT"/llama-f32.gguf "$OUT"/llama-q8_0.gguf "$OUT"/llama-q6_K.gguf "$OUT"/llama-q5_K_M.gguf \
  "$OUT"/llama-q4_K_M.gguf "$OUT"/llama-q4_K_S.gguf "$OUT"/llama-q4_0.gguf
