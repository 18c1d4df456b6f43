import pytest

from edgegpt.export.bundle import export_bundle


@pytest.fixture(scope="session")
def fp32_bundle(hf_checkpoint, tmp_path_factory):
    """gpt2-like random-init checkpoint exported to an fp32 bundle (path, checkpoint path)."""
    src = hf_checkpoint("gpt2-like")
    out = tmp_path_factory.mktemp("rt") / "bundle"
    export_bundle(src, out)
    return out, src
