"""The bundle manifest (edgegpt.json): format constants, writer and a reader that checks them.

Pure Python: the runtime reads manifests without torch or onnx installed. A reader that meets a
foreign or newer bundle fails in one line saying what to re-run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgegpt.errors import BundleError

MANIFEST = "edgegpt.json"
FORMAT = "edgegpt-bundle"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(bundle: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of the bundle but the manifest itself."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(Path(bundle).iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(bundle: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    (Path(bundle) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(bundle: str | Path) -> dict:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle dir {bundle} does not exist")
    path = bundle / MANIFEST
    if not path.is_file():
        hint = " (it looks like a checkpoint: run `edgegpt export` on it first)" if (bundle / "config.json").is_file() \
            and not (bundle / MODEL_FILE).is_file() else ""
        raise BundleError(f"{bundle} has no {MANIFEST}: not an edgegpt bundle{hint}")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise BundleError(f"{path} is not valid JSON ({e}); re-run `edgegpt export`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{path} is not an edgegpt manifest; re-run `edgegpt export`")
    if m.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path} has format_version {m.get('format_version')}, this edgegpt reads {FORMAT_VERSION}; "
                          f"re-run `edgegpt export` with this version")
    for key in ("architecture", "io", "graph", "precision"):
        if key not in m:
            raise BundleError(f"{path} lacks {key!r}; re-run `edgegpt export`")
    if not (bundle / m["graph"]["file"]).is_file():
        raise BundleError(f"{bundle} is missing its graph {m['graph']['file']}; re-run `edgegpt export`")
    return m


def bundle_size(bundle: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(bundle).iterdir() if p.is_file())
