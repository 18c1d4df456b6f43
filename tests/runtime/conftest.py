import pytest

from edgegpt.export.bundle import export_bundle


@pytest.fixture(scope="session")
def fp32_bundle(hf_checkpoint, tmp_path_factory):
    """gpt2-like random-init checkpoint exported to an fp32 bundle (path, checkpoint path)."""
    src = hf_checkpoint("gpt2-like")
    out = tmp_path_factory.mktemp("rt") / "bundle"
    export_bundle(src, out)
    return out, src


@pytest.fixture(scope="session")
def trained_bundle(trained_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt-trained") / "bundle"
    export_bundle(trained_checkpoint, out)
    return out
