"""edgegpt: a GPT-2 family model from PyTorch to a small, fast, offline ONNX Runtime deployment.

The package root stays import-light: torch, onnx and transformers are imported only by the
modules that need them (``edgegpt.model``, ``edgegpt.export``, ``edgegpt.quantize``), so that
``edgegpt.runtime`` works with numpy + onnxruntime + tokenizers alone.
"""

__version__ = "0.1.0"

from edgegpt.errors import EdgeGPTError  # noqa: E402  (light, no third-party imports)

__all__ = ["EdgeGPTError", "__version__"]
