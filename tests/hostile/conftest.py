"""Fixtures for the hostile-input suite: a tiny real bundle to tamper with, and the one-line check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgegpt.export.bundle import export_bundle


@pytest.fixture(scope="session")
def tiny_bundle(hf_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "bundle"
    export_bundle(hf_checkpoint("small-vocab"), out)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A fresh copy of the tiny bundle to edit."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))


def one_line_error(res, match: str) -> str:
    """A CliRunner result that failed the way a user should see: a non-zero exit, no traceback, one
    line that says what is wrong."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), f"a traceback: {res.exception!r}"
    lines = [line for line in res.stderr.strip().splitlines() if line.strip() and not line.startswith("\r")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert match in lines[0], lines[0]
    return lines[0]
