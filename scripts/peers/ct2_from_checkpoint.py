"""Convert a GPT-2 checkpoint (HF layout, ours or downloaded) for CTranslate2, so that `edgegpt bench --ct2 DIR`
times CTranslate2 beside edgegpt bundles of the same weights.

    pip install ctranslate2
    python scripts/peers/ct2_from_checkpoint.py CHECKPOINT OUT_PREFIX    # writes OUT_PREFIX-f32, OUT_PREFIX-int8

CTranslate2's own converter (TransformersConverter, through transformers), with one addition: a tokenizer
smaller than the model's vocabulary (the random-weight benchmark models of make_w1_model.py) is padded with
unused tokens, as gguf_from_checkpoint.py pads the GGUF's; CTranslate2 refuses the mismatch otherwise. Its
CPU speed depends on CT2_USE_MKL on AMD CPUs (float32 faster with MKL, int8 far slower with it); the bench
passes the variable through to its worker. A benchmarking aid, not a dependency of edgegpt.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out_prefix")
    args = ap.parse_args(argv)
    from edgegpt.model.checkpoint import read_config

    if not read_config(args.checkpoint).default_attn_scale:  # its GPT-2 loader reads neither option
        print(f"error: {args.checkpoint} scales attention otherwise (scale_attn_weights / "
              f"scale_attn_by_inverse_layer_idx), which CTranslate2's GPT-2 converter does not read", file=sys.stderr)
        return 2
    import ctranslate2.converters.transformers as ct2t

    def padded(self, spec, tokens, _orig=ct2t.GPT2Loader.set_vocabulary):
        size = spec.decoder.embeddings.weight.shape[0]
        _orig(self, spec, list(tokens) + [f"<unused_{i}>" for i in range(size - len(tokens))])

    ct2t.GPT2Loader.set_vocabulary = padded
    for suffix, quantization in (("f32", None), ("int8", "int8")):
        out = ct2t.TransformersConverter(args.checkpoint).convert(f"{args.out_prefix}-{suffix}", quantization=quantization,
                                                                  force=True)
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
