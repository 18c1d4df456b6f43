"""The embeddable runtime: numpy + onnxruntime + tokenizers, nothing else.

    from edgegpt.runtime import Generator
    gen = Generator.load("bundle/", provider="cpu", threads=4)
    print(gen.generate("Once upon a time", max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1))

Names are imported on first use, so ``edgegpt.runtime.hugepages`` can run before onnxruntime is loaded.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"Generator": "generator", "GenerationConfig": "generator", "ModelSession": "session",
            "SamplingParams": "sampling", "PROVIDERS": "providers", "available": "providers",
            "StaticGenerator": "static"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
