"""One error family for everything a user can get wrong.

Library code raises these; only the CLI turns them into a one-line message and a non-zero exit.
Each message names the problem and, where there is one, the fix. Anything else that escapes (a
TypeError, a KeyError) is a bug in edgegpt and keeps its traceback.

    EdgeGPTError
    |-- ArgumentError        (also a ValueError) an argument out of range or of the wrong type
    |-- CheckpointError      a checkpoint dir is missing, malformed or unsupported
    |-- DataError            training / evaluation / calibration text is missing, empty or too short
    |-- OutputError          the output location cannot take the result
    |   `-- OutputExistsError   ... because something is already there
    |-- BundleError          a bundle is missing, corrupt, foreign, unsafe or disagrees with its manifest
    |-- ExportError          export failed
    |   `-- VerificationFailed  ... the written graph does not hold its parity tolerance
    |-- ProviderError        an execution provider is unknown or not installed
    |-- QuantizeError        a recipe cannot be applied, or its result is over its quality budget
    |-- PackageError         a bundle cannot be packaged for a target
    `-- BenchError           a benchmark cannot run as asked
"""

from __future__ import annotations

import errno


class EdgeGPTError(Exception):
    """Base class of every error edgegpt raises on purpose."""


class ArgumentError(EdgeGPTError, ValueError):
    """An argument of the public API (or a CLI option) is out of range or of the wrong type."""


class CheckpointError(EdgeGPTError):
    """A checkpoint directory is missing, malformed or of an unsupported architecture."""


class DataError(EdgeGPTError):
    """Training, evaluation or calibration text is missing, empty or too short."""


class OutputError(EdgeGPTError):
    """The output location cannot take the result (not writable, full, or would destroy an input)."""


class OutputExistsError(OutputError):
    """The output directory already holds something we would overwrite."""


class BundleError(EdgeGPTError):
    """A bundle directory is missing, corrupt, foreign, unsafe or does not match its manifest."""


class ExportError(EdgeGPTError):
    """Export to ONNX failed."""


class VerificationFailed(ExportError):
    """The written bundle does not hold its parity tolerance (kept on disk only with keep_failed)."""


class ProviderError(EdgeGPTError):
    """An execution provider is unknown or not available in the installed onnxruntime."""


class QuantizeError(EdgeGPTError):
    """A quantization recipe cannot be applied, or its result is over its quality budget."""


class PackageError(EdgeGPTError):
    """A bundle cannot be packaged for the target asked for."""


class BenchError(EdgeGPTError):
    """A benchmark cannot run as asked (missing package, checkpoint instead of bundle, ...)."""


_OS_HINTS = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "choose a location you may write to",
    errno.EPERM: "choose a location you may write to",
    errno.ENOENT: "check the path",
}


def os_error_message(e: OSError) -> str:
    """One line for an operating-system error (a full disk, a read-only or missing path)."""
    what = e.strerror or type(e).__name__
    where = f": {e.filename}" if e.filename else ""
    hint = _OS_HINTS.get(e.errno or 0)
    return f"{what}{where}" + (f" ({hint})" if hint else "")
