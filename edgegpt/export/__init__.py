"""torch -> ONNX export with KV cache, the bundle it writes, and parity verification.

Submodules import torch and onnx; import them explicitly (``edgegpt.export.bundle``).
"""
