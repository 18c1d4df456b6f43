import pytest

from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions


@pytest.fixture(scope="session")
def fp32_bundle(hf_checkpoint, tmp_path_factory):
    """gpt2-like random-init checkpoint exported to an fp32 bundle with the concat cache (path, checkpoint path);
    tests/runtime/test_shared_kv.py runs the shared buffer."""
    src = hf_checkpoint("gpt2-like")
    out = tmp_path_factory.mktemp("rt") / "bundle"
    export_bundle(src, out, ExportOptions(kv_cache="concat"))
    return out, src
