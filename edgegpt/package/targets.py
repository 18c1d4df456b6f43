"""Deployment targets as data: the precision each defaults to (and why), the execution providers an app
should try in order, and whether it is a mobile target (ORT format, static graphs). Which
precisions a target runs comes from the recipe cards (quantize/recipes/), not from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from edgegpt.errors import PackageError
from edgegpt.quantize.recipes import precisions_for


@dataclass(frozen=True)
class Target:
    name: str
    default_precision: str
    providers: tuple[str, ...]  # in the order an app should try them
    mobile: bool
    why: str

    @property
    def precisions(self) -> tuple[str, ...]:
        return precisions_for(self.name)


TARGETS = {
    "cpu": Target("cpu", "int8", ("cpu",), False,
                  "int8 (dynamic, VNNI) is the fastest with the least quality cost on laptop CPUs; fp16 has no fast "
                  "CPU kernels"),
    "cuda": Target("cuda", "fp16", ("cuda", "cpu"), False,
                   "fp16 halves memory traffic and uses tensor cores; MatMulInteger (int8 dynamic) has no CUDA kernel"),
    "android": Target("android", "int8-static", ("nnapi", "xnnpack", "cpu"), True,
                      "NNAPI and QNN accelerate static (QDQ) int8; dynamic int8 and int4 run on the CPU EP"),
    "ios": Target("ios", "fp16", ("coreml", "xnnpack", "cpu"), True,
                  "CoreML's ML Program runs fp16 natively on the GPU / Neural Engine"),
    "web": Target("web", "int8", ("wasm", "webgpu"), False,
                  "int8 (transformers.js's q8, model_quantized.onnx) is the smallest download with int8's quality, "
                  "and what transformers.js loads by default on WASM"),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise PackageError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def choose_precision(t: Target, requested: Optional[str]) -> str:
    p = requested or t.default_precision
    if p not in t.precisions:
        hint = " (fp16 has no fast CPU kernels: it runs slower than fp32 there)" if p == "fp16" else ""
        raise PackageError(f"target {t.name} cannot run {p} bundles{hint}; choose one of {', '.join(t.precisions)}")
    return p
