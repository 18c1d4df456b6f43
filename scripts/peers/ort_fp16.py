"""An fp32 bundle converted by onnxruntime's own float16 converter with keep_io_types (inputs, outputs and the
KV cache stay fp32), as a quality baseline for `edgegpt quantize --mode fp16`:

    python scripts/peers/ort_fp16.py FP32_BUNDLE OUT

A benchmarking aid, not a dependency of edgegpt.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import onnx

from edgegpt.manifest import MODEL_FILE, read_manifest, seal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it first")
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.bundle, tmp)
    model = convert_float_to_float16(onnx.load(str(args.bundle / MODEL_FILE)), keep_io_types=True)
    onnx.save_model(model, str(tmp / MODEL_FILE))
    seal(tmp, read_manifest(args.bundle))
    tmp.rename(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
