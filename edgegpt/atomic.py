"""Atomic directory outputs: build in a temporary sibling, rename into place when complete.

Guarantees (docs/design.md, "Security and failure model"):

- A crash, an interrupt or a failed check leaves the destination exactly as it was (absent, or the
  previous complete version), never half-written.
- An output is never written into, over or around one of the command's inputs, and ``--overwrite``
  replaces only a folder that holds the same kind of output (or nothing), never a user's other files.
- Without ``overwrite`` the final rename refuses an existing target (``renameat2(RENAME_NOREPLACE)``
  on Linux), so of two processes writing the same new output one fails instead of replacing the other.
- The temporaries of a run killed with SIGKILL are named after their process and carry a marker;
  the next run that writes beside them removes those of dead processes (or restores a previous
  output that a kill caught between the two renames of a replacement).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

from edgegpt.errors import OutputError, OutputExistsError

log = logging.getLogger(__name__)

MARKER = ".edgegpt-partial"  # inside every temporary folder: "pid host"
_TEMP_KINDS = ("tmp", "scratch")

# What makes a folder "an output of this kind" that --overwrite may replace.
KIND_MARKERS = {
    "bundle": ("edgegpt.json",),
    "package": ("edgegpt.json",),
    "checkpoint": ("config.json", "training_state.pt"),
}


def _within(a: Path, b: Path) -> bool:
    """a is b or lies inside b (both resolved)."""
    return a == b or b in a.parents


def _existing_ancestor(path: Path) -> Path:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p


def check_writable(out: Path) -> None:
    """Refuse, before any work, an output whose nearest existing folder cannot be written."""
    base = _existing_ancestor(Path(out).parent)
    if not base.is_dir():
        raise OutputError(f"cannot create {out}: {base} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".edgegpt-probe-", dir=base)
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror} in {base}; choose a writable --out") from None


def check_free_space(out: Path, need_bytes: int) -> None:
    """Refuse, before any work, an output that cannot fit on its file system."""
    base = _existing_ancestor(Path(out).parent)
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise OutputError(f"{out} needs about {need_bytes / 1e6:,.0f} MB but {base} has {free / 1e6:,.0f} MB free; "
                          f"free some space or choose another --out")


def describe_contents(path: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in path.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_dir(out: Path, *, overwrite: bool, what: str = "output", inputs: Sequence[Optional[Path]] = (),
                     need_bytes: int = 0) -> None:
    """Refuse an output that would destroy an input or a user's files, exists (unless ``overwrite``),
    or cannot be written. ``what`` names the kind of output (KIND_MARKERS)."""
    out = Path(out)
    target = out.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if target == s:
            raise OutputExistsError(f"{what} dir {out} is the input; choose a different --out")
        if _within(target, s):
            raise OutputExistsError(f"{what} dir {out} lies inside the input {src}; choose a --out outside it")
        if _within(s, target):
            raise OutputExistsError(f"{what} dir {out} contains the input {src}; writing it would delete the input: "
                                    f"choose a different --out")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputExistsError(f"{what} path {out} exists and is not a directory; choose a different --out")
        if not overwrite:
            raise OutputExistsError(f"{what} dir {out} already exists; pass --overwrite to replace it")
        markers = KIND_MARKERS.get(what, ())
        if markers and any(out.iterdir()) and not any((out / m).is_file() for m in markers):
            raise OutputExistsError(f"{out} holds files that are not an edgegpt {what} ({describe_contents(out)}); "
                                    f"--overwrite replaces only a {what} or an empty folder: choose another --out")
    check_writable(out)
    if need_bytes:
        check_free_space(out, need_bytes)


def match_umask(path: Path) -> None:
    """Give a file the mode of every other file we write (some writers create theirs 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(folder: Path, pid: int) -> bool:
    """A temporary of ours whose process (named in the folder's name) is gone, on this host."""
    try:
        host = (folder / MARKER).read_text().split()[1]
    except (OSError, IndexError):
        host = socket.gethostname()  # the marker is removed just before the final rename
    return host == socket.gethostname() and not _pid_alive(pid)


def clean_stale(out: Path) -> None:
    """Remove the temporaries that killed runs left beside ``out``; put back a previous output that
    a kill caught between moving it aside and renaming its replacement into place."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        name = entry.name
        if not name.startswith(f".{out.name}.") or not entry.is_dir() or entry.is_symlink():
            continue
        kind, _, rest = name[len(out.name) + 2:].partition("-")
        try:
            pid = int(rest.split("-", 1)[0])
        except ValueError:
            continue
        if kind in _TEMP_KINDS and _stale(entry, pid):
            log.info("removing %s, left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)
        elif kind == "old" and not _pid_alive(pid):
            if out.exists():
                log.info("removing %s, the previous version of %s left by an interrupted run", entry, out)
                shutil.rmtree(entry, ignore_errors=True)
            else:
                log.warning("restoring %s from %s (an interrupted run had moved it aside)", out, entry)
                os.replace(entry, out)


def _make_temp(out: Path, kind: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    (tmp / MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return tmp


@contextlib.contextmanager
def scratch_dir(near: Path) -> Iterator[Path]:
    """A temporary working folder beside ``near`` (same file system), removed on exit and, after a
    SIGKILL, by the next run that writes there."""
    near = Path(near)
    clean_stale(near)
    tmp = _make_temp(near, "scratch")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, failing with FileExistsError when dst exists: atomically where the kernel and file
    system support renameat2(RENAME_NOREPLACE), else after a check."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def atomic_dir(out: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it becomes ``out``.

    ``replace``: an existing ``out`` (already checked by check_output_dir) is replaced. Otherwise
    the rename refuses a target that appeared meanwhile (another process) and this result is dropped.
    """
    out = Path(out)
    clean_stale(out)
    tmp = _make_temp(out, "tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other dir
    try:
        yield tmp
        (tmp / MARKER).unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace or not out.exists():
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputExistsError(f"{out} was created by another process while this one ran; nothing was "
                                    f"replaced (pass --overwrite to replace it)") from None
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
