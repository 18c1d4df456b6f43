"""The bundle manifest (edgegpt.json): format constants, writer and a reader that checks them.

Pure Python: the runtime reads manifests without torch or onnx installed. A reader that meets a
foreign or newer bundle fails in one line saying what to re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    """sha256 and size of every file of the bundle but the manifest itself (and hidden files, such as
    the marker of a folder still being written)."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(Path(bundle).iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}


def write_manifest(bundle: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    (Path(bundle) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


class Draft(os.PathLike):
    """A bundle being built: its (temporary) folder and the manifest it will have. Anything that takes a
    bundle (sessions, the tokenizer, quality measurements) takes a Draft, so a result can be measured
    before its manifest is written, once, by ``seal``."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def seal(bundle: Path, manifest: dict) -> dict:
    """The one bundle writer: the file table (sizes and sha256s, computed once, here) and the total size
    go into the manifest, which is then written. Call it last, on the complete folder."""
    files = file_table(bundle)
    sealed = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", "size_bytes")}
    sealed.update(files=files, size_bytes=sum(f["bytes"] for f in files.values()))
    write_manifest(bundle, sealed)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **sealed}


def bundle_file(bundle: str | Path, name: object, what: str = "file") -> Path:
    """The path of a file a manifest names, checked to lie inside the bundle: a plain file name (no
    folders, no ``..``, not absolute) that is not a link leading out. Every path edgegpt reads or
    writes on a bundle's word goes through here."""
    bundle = Path(bundle)
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or ":" in name):
        raise BundleError(f"{bundle}: edgegpt.json names {what} {name!r}, which is not a file inside the bundle; "
                          f"the bundle is corrupt or was tampered with: re-run `edgegpt export`")
    path = bundle / name
    if path.is_symlink() and path.resolve().parent != bundle.resolve():
        raise BundleError(f"{bundle}: {name} is a link to {path.resolve()}, outside the bundle; refusing to read it")
    return path


def manifest_files(m: dict) -> list[tuple[str, object]]:
    """(what, file name) for every file a manifest points to."""
    g = m.get("graph") if isinstance(m.get("graph"), dict) else {}
    out = [("graph.file", g.get("file"))]
    if g.get("external_data") is not None:
        out.append(("graph.external_data", g["external_data"]))
    files = m.get("files")
    if files is not None:
        if not isinstance(files, dict):
            out.append(("files", files))
        else:
            out += [("files entry", name) for name in files]
    p = m.get("package") if isinstance(m.get("package"), dict) else {}
    o = p.get("ort_format") if isinstance(p.get("ort_format"), dict) else {}
    out += [(f"package.ort_format.{k}", o[k]) for k in ("file", "required_operators") if k in o]
    for v in p.get("static_graphs") or []:
        if not isinstance(v, dict):
            out.append(("package.static_graphs", v))
            continue
        out += [(f"package.static_graphs.{k}", v[k]) for k in ("file", "required_operators") if k in v]
    if "report" in p:
        out.append(("package.report", p["report"]))
    return out


def _check_links(bundle: Path) -> None:
    """No entry of the bundle may be a link that leads out of it."""
    root = bundle.resolve()
    for p in bundle.iterdir():
        if p.is_symlink() and not (p.resolve() == root or root in p.resolve().parents):
            raise BundleError(f"{bundle}: {p.name} is a link to {p.resolve()}, outside the bundle; refusing to "
                              f"load it (copy the file in instead)")


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_dims(path: Path, m: dict) -> None:
    a = m["architecture"]
    if not isinstance(a, dict):
        raise BundleError(f"{path}: architecture is not an object; re-run `edgegpt export`")
    for k in ("n_layer", "n_head", "n_embd", "head_dim", "vocab_size", "n_positions"):
        if not _positive_int(a.get(k)):
            raise BundleError(f"{path}: architecture.{k} must be a positive integer, got {a.get(k)!r}; "
                              f"re-run `edgegpt export`")
    if a["n_head"] * a["head_dim"] != a["n_embd"]:
        raise BundleError(f"{path}: n_head x head_dim ({a['n_head']} x {a['head_dim']}) is not n_embd ({a['n_embd']}); "
                          f"re-run `edgegpt export`")
    ctx = m.get("max_context")
    if not _positive_int(ctx) or ctx > a["n_positions"]:
        raise BundleError(f"{path}: max_context {ctx!r} must be a positive integer no larger than n_positions "
                          f"({a['n_positions']}); re-run `edgegpt export`")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = m.get(k)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise BundleError(f"{path}: {k} {v!r} is not a token id; re-run `edgegpt export`")
    if not isinstance(m["graph"], dict) or not isinstance(m["io"], dict):
        raise BundleError(f"{path}: graph and io must be objects; re-run `edgegpt export`")


def read_manifest(bundle: str | Path | Draft) -> dict:
    """The manifest of a bundle, checked: format and version, the fields every reader uses, and
    every file it names inside the bundle (a bundle is untrusted input). A Draft's own manifest is ours."""
    if isinstance(bundle, Draft):
        return bundle.manifest
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle dir {bundle} does not exist")
    path = bundle / MANIFEST
    if not path.is_file():
        if (bundle / MODEL_FILE).is_file():
            hint = f" though it holds a {MODEL_FILE}: re-run `edgegpt export` to write a complete bundle"
        elif (bundle / "config.json").is_file():
            hint = " (it looks like a checkpoint: run `edgegpt export` on it first)"
        else:
            hint = ""
        raise BundleError(f"{bundle} has no {MANIFEST}: not an edgegpt bundle{hint}")
    _check_links(bundle)
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); re-run `edgegpt export`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{path} is not an edgegpt manifest; re-run `edgegpt export`")
    if m.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path} has format_version {m.get('format_version')}, this edgegpt reads {FORMAT_VERSION}; "
                          f"re-run `edgegpt export` with this version")
    for key in ("architecture", "io", "graph", "precision"):
        if key not in m:
            raise BundleError(f"{path} lacks {key!r}; re-run `edgegpt export`")
    package = m.get("package")
    if isinstance(package, dict) and "web" in package:  # its graph lies under onnx/, where edgegpt never reads
        raise BundleError(f"{bundle} is a web package (transformers.js's layout) for JavaScript runtimes; edgegpt "
                          f"loads the bundle it was packaged from")
    _check_dims(path, m)
    for what, name in manifest_files(m):
        bundle_file(bundle, name, what)
    if not (bundle / m["graph"]["file"]).is_file():
        raise BundleError(f"{bundle} is missing its graph {m['graph']['file']}; re-run `edgegpt export`")
    return m


def verify_files(bundle: str | Path, manifest: dict | None = None) -> None:
    """Check every file in the manifest's table against its recorded size and sha256: an edited,
    truncated or missing file is named in one line."""
    bundle = Path(bundle)
    m = read_manifest(bundle) if manifest is None else manifest
    files = m.get("files")
    if not files:
        raise BundleError(f"{bundle}: edgegpt.json has no file table to check; re-run `edgegpt export`")
    for name, entry in files.items():
        path = bundle_file(bundle, name, "files entry")
        if not isinstance(entry, dict) or not {"sha256", "bytes"} <= entry.keys():
            raise BundleError(f"{bundle}: edgegpt.json's entry for {name} lacks its sha256 and size")
        if not path.is_file():
            raise BundleError(f"{bundle} is missing {name}, which its manifest lists; re-run the command that wrote it")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{bundle}: {name} is {size:,} bytes, its manifest says {entry['bytes']:,} "
                              f"(truncated or edited); re-run the command that wrote it")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{bundle}: {name} does not match the sha256 in its manifest (edited or corrupt); "
                              f"re-run the command that wrote it")


def folder_kind(path: str | Path) -> str:
    """"bundle" or "checkpoint" by the folder's own files, or a BundleError saying what it holds instead."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return "bundle"
    if (path / MODEL_FILE).is_file():
        read_manifest(path)  # names the missing manifest
    if (path / "config.json").is_file():
        return "checkpoint"
    raise BundleError(f"{path} is neither an edgegpt bundle (no {MANIFEST}) nor a checkpoint dir (no config.json)")


def bundle_size(bundle: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(bundle).iterdir() if p.is_file() and not p.name.startswith("."))
