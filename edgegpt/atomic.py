"""Atomic directory outputs: build in a temporary sibling, rename into place when complete.

A crash, an interrupt or a failed check leaves the destination exactly as it was (absent, or the
previous complete version), never half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgegpt.errors import OutputExistsError


def check_output_dir(out: Path, *, overwrite: bool, what: str = "output", inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that is one of the inputs."""
    out = Path(out)
    for src in inputs:
        if src is not None and out.resolve() == Path(src).resolve():
            raise OutputExistsError(f"{what} dir {out} is the input; choose a different --out")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{what} dir {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{what} path {out} exists and is not a directory")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other dir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
