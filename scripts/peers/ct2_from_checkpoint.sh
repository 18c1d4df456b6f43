#!/usr/bin/env bash
# Convert a GPT-2 checkpoint (HF layout, ours or downloaded) for CTranslate2, so that `edgegpt bench --ct2 DIR`
# times CTranslate2 beside edgegpt bundles of the same weights.
#
#   pip install ctranslate2
#   scripts/peers/ct2_from_checkpoint.sh CHECKPOINT OUT_PREFIX      # writes OUT_PREFIX-f32 and OUT_PREFIX-int8
#
# CTranslate2's own converter (ct2-transformers-converter, through transformers). Its CPU speed depends on
# CT2_USE_MKL on AMD CPUs (float32 faster with MKL, int8 far slower with it): the bench passes the variable
# through to its worker. A benchmarking aid, not a dependency of edgegpt.
set -euo pipefail
CKPT=$1; OUT=$2
ct2-transformers-converter --model "$CKPT" --output_dir "$OUT-f32" --force > /dev/null
ct2-transformers-converter --model "$CKPT" --output_dir "$OUT-int8" --quantization int8 --force > /dev/null
echo "$OUT-f32 $OUT-int8"
