"""A web package generates in a real headless Chromium: transformers.js on onnxruntime-web (WASM), served from
localhost with the page this project ships (tests/interop/web/index.html), the text read back from the page."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from edgegpt.runtime import Generator
from tests.interop.conftest import native_for_web

HERE = Path(__file__).parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.slow


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site(transformers_js, tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    root = tmp_path_factory.mktemp("site")
    shutil.copy2(HERE / "web" / "index.html", root / "index.html")
    (root / "node_modules").symlink_to(transformers_js.parent / "node_modules")
    (root / "models").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("precision,device", [("int8", "wasm"), ("fp32", "wasm"), ("int4", "wasm"), ("fp16", "wasm"),
                                              ("fp32", "webgpu"), ("int4", "webgpu"), ("fp16", "webgpu"),
                                              ("int8", "webgpu")])
def test_web_package_generates_in_chromium(site, transformers_js, bundles, precision, device):
    from edgegpt.package.bundle import package_bundle

    root, url = site
    pkg = root / "models" / "pkg"
    shutil.rmtree(pkg, ignore_errors=True)
    m = package_bundle(bundles / "fp32", "web", pkg, precision=precision, force=True)
    native = Generator.load(native_for_web(bundles, precision))  # the native runtime on the same graph
    prompt = "The with statement"
    res = subprocess.run(["node", str(transformers_js.parent / "browser.mjs"),
                          f"{url}/index.html?dtype={m['package']['web']['dtype']}&prompt={prompt}&n=16&device={device}"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "CHROMIUM": CHROMIUM})
    assert res.returncode == 0, res.stderr[-2000:]
    page = res.stdout.strip().splitlines()[-1]
    if device == "webgpu" and "does not support fp16" in page:  # SwiftShader, headless Chromium's adapter here
        pytest.skip("this browser's WebGPU adapter has no shader-f16")
    assert not page.startswith("ERROR"), page[:2000]
    got = json.loads(page)
    assert got["prompt_ids"] == native.encode(prompt)
    assert got["ids"] == native.generate_ids([got["prompt_ids"]], 16, ignore_eos=True)[0]
    assert got["text"] and got["seconds"] > 0 and got["device"] == device
