"""Bundles load in transformers.js (node, onnxruntime-node) as written, and web packages as Hub models, and give
the runtime's greedy tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgegpt.runtime import Generator

JS = Path(__file__).parent / "js"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def transformers_js():
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("needs node and npm")
    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        # onnxruntime-node's install script fetches CUDA libraries from nuget; its CPU binary ships in the package
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip", "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip"}
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=JS, env=env,
                       check=True, capture_output=True, timeout=600)
    return JS / "generate.mjs"


@pytest.fixture(scope="module")
def bundles(trained_checkpoint, tmp_path_factory):
    from edgegpt.export.bundle import export_bundle
    from edgegpt.quantize.bundle import quantize_bundle

    root = tmp_path_factory.mktemp("tjs")
    export_bundle(trained_checkpoint, root / "fp32")
    quantize_bundle(root / "fp32", root / "int8", "int8", eval_tokens=512, force=True)
    quantize_bundle(root / "fp32", root / "int4", "int4", eval_tokens=512, force=True)
    quantize_bundle(root / "fp32", root / "fp16", "fp16", eval_tokens=512, force=True)
    return root


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_transformers_js_generates_the_runtimes_greedy_tokens(transformers_js, bundles, precision):
    gen = Generator.load(bundles / precision)
    for prompt in ("The with statement", "A class definition defines"):
        res = subprocess.run(["node", str(transformers_js), str(bundles / precision), prompt, "16"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        got = json.loads(res.stdout.strip().splitlines()[-1])
        assert got["prompt_ids"] == gen.encode(prompt)
        assert got["ids"] == gen.generate_ids([got["prompt_ids"]], 16, ignore_eos=True)[0]


@pytest.mark.parametrize("precision", ["int8", "fp32", "int4", "fp16"])
def test_web_packages_load_as_hub_models(transformers_js, bundles, tmp_path, precision):
    from edgegpt.package.bundle import package_bundle

    m = package_bundle(bundles / "fp32", "web", tmp_path / "web", precision=precision, force=True)
    gen = Generator.load(bundles / precision)  # the same recipe on the same source: the same graph
    prompt = "The with statement"
    res = subprocess.run(["node", str(transformers_js), str(tmp_path / "web"), prompt, "16", m["package"]["web"]["dtype"]],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["prompt_ids"] == gen.encode(prompt)
    assert got["ids"] == gen.generate_ids([got["prompt_ids"]], 16, ignore_eos=True)[0]
