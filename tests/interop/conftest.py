"""The interop tests' shared fixtures: transformers.js (and playwright-core) installed from npm into
tests/interop/js, and the trained model's bundles at each precision."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="session")
def transformers_js():
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("needs node and npm")
    if not all((JS / "node_modules" / p).is_dir() for p in ("@huggingface/transformers", "playwright-core")):
        # onnxruntime-node's install script fetches CUDA libraries from nuget; its CPU binary ships in the package
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip", "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip"}
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=JS, env=env,
                       check=True, capture_output=True, timeout=600)
    return JS / "generate.mjs"


@pytest.fixture(scope="session")
def bundles(trained_checkpoint, tmp_path_factory):
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions
    from edgegpt.quantize.bundle import quantize_bundle

    root = tmp_path_factory.mktemp("tjs")
    export_bundle(trained_checkpoint, root / "fp32", ExportOptions(kv_cache="concat"))  # Optimum's, transformers.js's
    quantize_bundle(root / "fp32", root / "int8", "int8", eval_tokens=512, force=True)
    quantize_bundle(root / "fp32", root / "int4", "int4", eval_tokens=512, force=True)
    quantize_bundle(root / "fp32", root / "fp16", "fp16", eval_tokens=512, force=True)
    # what a web int8 package holds: 7-bit weights (package.bundle._web_options)
    quantize_bundle(root / "fp32", root / "int8-web", "int8", eval_tokens=512, force=True,
                    options={"reduce_range": True})
    return root


def native_for_web(bundles: Path, precision: str) -> Path:
    """The bundle whose graph a web package of ``precision`` holds."""
    return bundles / ("int8-web" if precision == "int8" else precision)
