"""Text: plain files or the built-in corpus ``builtin:pydoc``, and how it is split.

``builtin:pydoc`` is CPython's own reference documentation (``pydoc_data.topics``, about 110k tokens),
present in every installation; ``builtin:pystdlib`` is the standard library's own source (about 9 MB), with
a few packages held out (``builtin:pystdlib-heldout``). Both are read at run time and never copied into
this repository. pydoc's last HELD_OUT_FRACTION is what the trainer validates on and what quality is measured
on (``default_eval_text``); calibration reads only the rest (``calibration_text``).

Pure Python: the runtime's quality tools use it without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from edgegpt.errors import DataError

BUILTIN_PREFIX = "builtin:"
HELD_OUT_FRACTION = 0.05  # the trainer's validation tail: text it never trained on


def builtin_pydoc() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distro Pythons split pydoc_data out
        raise DataError("builtin:pydoc needs the pydoc_data module, which this Python lacks; pass text files") from None
    return "\n\n".join(topics[k] for k in sorted(topics))


# builtin:pystdlib: the running Python's own standard library source. Tests, bundled packages and the codec
# tables are left out (they are data more than code); these packages are held out of it for evaluation and
# prompts (builtin:pystdlib-heldout), about 5% of the rest.
STDLIB_SKIP = {"test", "tests", "site-packages", "dist-packages", "encodings", "pydoc_data", "idlelib", "lib2to3",
               "turtledemo", "__pycache__"}
STDLIB_HELD_OUT = ("email", "http", "json")


def _stdlib_files() -> tuple[list[Path], Path]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not STDLIB_SKIP & set(f.relative_to(root).parts))
    if not files:
        raise DataError(f"builtin:pystdlib found no Python source under {root}; pass text files")
    return [f.relative_to(root) for f in files], root


def builtin_pystdlib(held_out: bool = False) -> str:
    """The standard library's source, one file after another, without (or only) the held-out packages."""
    rel, root = _stdlib_files()
    keep = [f for f in rel if (f.parts[0] in STDLIB_HELD_OUT) == held_out]
    return "\n\n".join((root / f).read_text(encoding="utf-8", errors="replace") for f in keep)


BUILTINS = {"pydoc": builtin_pydoc, "pystdlib": builtin_pystdlib,
            "pystdlib-heldout": lambda: builtin_pystdlib(held_out=True)}


def read_text(source: str | Path) -> str:
    s = str(source)
    if s.startswith(BUILTIN_PREFIX):
        name = s[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise DataError(f"unknown built-in corpus {s!r}; available: {', '.join(BUILTIN_PREFIX + k for k in BUILTINS)}")
        return BUILTINS[name]()
    path = Path(s)
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass the text files in it (e.g. --data {path}/*.txt)")
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_nonempty(source: str | Path, what: str) -> str:
    """read_text for a text the user gives for one purpose (calibration, evaluation): refuses an empty one
    instead of falling back to a default."""
    text = read_text(source)
    if not text.strip():
        raise DataError(f"the {what} text {source} is empty; give text like your prompts (or leave the option out "
                        f"for the built-in default)")
    return text


def read_corpus(sources: Sequence[str | Path]) -> list[str]:
    """One string per source; an empty corpus is an error."""
    if not sources:
        raise DataError("no training text given; pass --data PATH (or --data builtin:pydoc)")
    texts = [read_text(s) for s in sources]
    if not any(t.strip() for t in texts):
        raise DataError(f"the corpus ({', '.join(map(str, sources))}) is empty")
    return texts


def default_eval_text(max_chars: int = 40_000) -> str:
    """A held-out slice of builtin:pydoc: the tail the trainer keeps for validation."""
    text = builtin_pydoc()
    tail = text[int(len(text) * (1 - HELD_OUT_FRACTION)):]
    return tail[:max_chars]


def calibration_text(text: Optional[str]) -> str:
    """The user's text, or builtin:pydoc without its held-out tail (which quality is measured on)."""
    if text is not None:
        if not text.strip():
            raise DataError("the calibration text is empty; give text like your prompts (or none, for builtin:pydoc)")
        return text
    full = builtin_pydoc()
    return full[: int(len(full) * (1 - HELD_OUT_FRACTION))][:200_000]
