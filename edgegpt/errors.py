"""One error family for everything a user can get wrong.

Library code raises these; only the CLI turns them into a one-line message and a non-zero exit.
Each message names the problem and, where there is one, the fix.
"""


class EdgeGPTError(Exception):
    """Base class of every error edgegpt raises on purpose."""


class CheckpointError(EdgeGPTError):
    """A checkpoint directory is missing, malformed or of an unsupported architecture."""


class DataError(EdgeGPTError):
    """Training or evaluation text is missing, empty or too short."""


class OutputExistsError(EdgeGPTError):
    """The output directory already holds something we would overwrite."""


class BundleError(EdgeGPTError):
    """A bundle directory is missing, corrupt, foreign or does not match its manifest."""


class ExportError(EdgeGPTError):
    """Export to ONNX failed or produced a graph that does not hold its parity tolerance."""


class ProviderError(EdgeGPTError):
    """An execution provider is unknown or not available in the installed onnxruntime."""


class QuantizeError(EdgeGPTError):
    """A quantization recipe cannot be applied, or its result is over its quality budget."""
