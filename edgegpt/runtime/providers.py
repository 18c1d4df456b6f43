"""Execution providers by short name, with explicit (never silent) fallback."""

from __future__ import annotations

import logging
from typing import Optional

import onnxruntime as ort

from edgegpt.errors import ProviderError

log = logging.getLogger(__name__)

# short name -> (onnxruntime provider, where it comes from)
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "every onnxruntime package"),
    "cuda": ("CUDAExecutionProvider", "pip install onnxruntime-gpu (NVIDIA GPU, CUDA 12)"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime on macOS / onnxruntime-objc on iOS"),
    "nnapi": ("NnapiExecutionProvider", "onnxruntime-android"),
    "xnnpack": ("XnnpackExecutionProvider", "onnxruntime-android / onnxruntime-objc, or a build with --use_xnnpack"),
    "qnn": ("QNNExecutionProvider", "pip install onnxruntime-qnn (Qualcomm NPU)"),
    "dml": ("DmlExecutionProvider", "pip install onnxruntime-directml (Windows)"),
}
# Where an execution provider keeps the tensors it produces (for IO binding of the KV cache).
DEVICE = {"cuda": "cuda", "dml": "dml"}


def available() -> list[str]:
    inv = {v[0]: k for k, v in PROVIDERS.items()}
    return [inv[p] for p in ort.get_available_providers() if p in inv]


def resolve(provider: str, *, fallback: bool = False, options: Optional[dict] = None) -> tuple[str, list]:
    """Short name -> (the short name actually used, providers list for InferenceSession).

    CPU always comes last so nodes an accelerator cannot take still run. An unavailable provider
    is a ProviderError, or with ``fallback`` a warning and the CPU provider.
    """
    name = provider.lower()
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    ep, package = PROVIDERS[name]
    if ep not in ort.get_available_providers():
        msg = (f"provider {name!r} ({ep}) is not in this onnxruntime {ort.__version__}; it comes with {package}. "
               f"Available here: {', '.join(available())}")
        if not fallback:
            raise ProviderError(msg + " (or pass fallback=True / --fallback to use cpu)")
        log.warning("%s; falling back to cpu", msg)
        name, ep = "cpu", PROVIDERS["cpu"][0]
    chosen = [(ep, dict(options or {}))]
    if name != "cpu":
        chosen.append(("CPUExecutionProvider", {}))
    return name, chosen
