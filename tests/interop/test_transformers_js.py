"""Bundles load in transformers.js (node, onnxruntime-node) as written, and web packages as Hub models, and give
the runtime's greedy tokens."""

from __future__ import annotations

import json
import subprocess

import pytest

from edgegpt.runtime import Generator
from tests.interop.conftest import native_for_web

pytestmark = pytest.mark.slow


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
    gen = Generator.load(native_for_web(bundles, precision))  # the same recipe on the same source: the same graph
    prompt = "The with statement"
    res = subprocess.run(["node", str(transformers_js), str(tmp_path / "web"), prompt, "16", m["package"]["web"]["dtype"]],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["prompt_ids"] == gen.encode(prompt)
    assert got["ids"] == gen.generate_ids([got["prompt_ids"]], 16, ignore_eos=True)[0]
