"""The web target: a package laid out as transformers.js (and its onnxruntime-web backend) loads models from the
Hugging Face Hub, so `AutoModelForCausalLM.from_pretrained(DIR, { dtype })` takes it with no options: config and
tokenizer files at the top, the graph under onnx/ named by transformers.js's dtype for its precision."""

from __future__ import annotations

from pathlib import Path

from edgegpt.errors import PackageError
from edgegpt.manifest import MODEL_FILE, sha256_file

ONNX_DIR = "onnx"
# edgegpt precision -> (transformers.js dtype, the file it loads for that dtype under onnx/)
DTYPES = {"fp32": ("fp32", "model.onnx"), "fp16": ("fp16", "model_fp16.onnx"),
          "int8": ("q8", "model_quantized.onnx"), "int4": ("q4", "model_q4.onnx")}


def web_layout(tmp: Path, precision: str) -> dict:
    """Move tmp's graph to onnx/<transformers.js name>; returns the manifest's package.web section."""
    if precision not in DTYPES:
        raise PackageError(f"transformers.js has no dtype for {precision}; choose one of {', '.join(DTYPES)}")
    dtype, name = DTYPES[precision]
    (tmp / ONNX_DIR).mkdir()
    dst = tmp / ONNX_DIR / name
    (tmp / MODEL_FILE).rename(dst)
    return {"layout": "transformers.js (Hugging Face Hub)", "dtype": dtype, "model_file": f"{ONNX_DIR}/{name}",
            "sha256": sha256_file(dst), "bytes": dst.stat().st_size}


def readme(m: dict) -> str:
    w = m["package"]["web"]
    return (f"edgegpt package for the web ({m['package']['precision']}): transformers.js loads it as it loads a Hub "
            f"model.\n\n  const model = await AutoModelForCausalLM.from_pretrained(URL_OR_DIR, {{ dtype: "
            f"\"{w['dtype']}\" }});\n  const tokenizer = await AutoTokenizer.from_pretrained(URL_OR_DIR);\n\n"
            f"Files: config.json, generation_config.json, tokenizer.json, tokenizer_config.json, "
            f"special_tokens_map.json, {w['model_file']} (sha256 in edgegpt.json).\n")
