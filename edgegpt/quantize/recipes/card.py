"""What a recipe card is: its options and the facts about it that the CLI, quantize and package read.
No onnx import here or in any card module's top level: the CLI builds its flags from the cards."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from edgegpt.errors import QuantizeError


@dataclass(frozen=True)
class Option:
    """One recipe option. ``cli``: whether ``edgegpt quantize`` has a flag for it (--name-with-dashes)."""

    name: str
    default: Any
    choices: tuple = ()
    help: str = ""
    cli: bool = True
    negative: str = ""  # a boolean option's "off" flag (--symmetric/--asymmetric)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        if self.choices and value not in self.choices:
            raise QuantizeError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {value}")
        return value


@dataclass(frozen=True)
class RecipeCard:
    name: str
    summary: str  # one line: what the precision is for
    budget_pct: float  # default max perplexity increase over the fp32 source, percent
    targets: tuple[str, ...]  # package targets (edgegpt.package.targets) that run it
    build: Callable[..., dict] = field(repr=False)
    options: tuple[Option, ...] = ()
    kv_dtype: str = "float32"  # the KV cache the recipe's graph keeps
    int8_kv_cache: str = "never"  # "auto": on by default for shared-KV exports; "allowed": with --kv-cache int8
    calibration: str = "unused"  # "required", "optional" (a default text is used), "unused"
    order: int = 100  # position in --mode's list
    # peak RSS of `edgegpt quantize`: peak_memory times the source bundle's bytes plus peak_memory_gb, a line through
    # the peaks measured at two GPT-2 sizes where there are two, else a multiple of one (docs/benchmarks.md, the
    # cost curve): what the up-front memory check asks for
    peak_memory: float = 7.0
    peak_memory_gb: float = 0.0
    # the bundle's bytes over its fp32 source's (the cost curve's bundles at GPT-2 large and XL): what a package
    # target that needs the weights in one file checks before it quantizes
    size_ratio: float = 1.0

    def memory_needed(self, source_bytes: int) -> int:
        """Bytes of memory quantizing a source bundle of ``source_bytes`` is expected to peak at."""
        return int(self.peak_memory * source_bytes + self.peak_memory_gb * 1e9)

    def resolve(self, options: Optional[dict] = None) -> dict:
        """Every option of this recipe, the given ones checked against their choices, the rest defaulted."""
        given = {k: v for k, v in (options or {}).items() if v is not None}
        known = {o.name: o for o in self.options}
        bad = sorted(set(given) - set(known))
        if bad:
            raise QuantizeError(f"{self.name} does not take {', '.join(bad)}; its options are "
                                f"{', '.join(sorted(known)) or 'none'}")
        return {name: o.check(given.get(name, o.default)) for name, o in known.items()}

    def apply(self, src: Path, dst: Path, options: dict, calibration: Optional[str] = None) -> dict:
        """Write dst from the graph src; the manifest's recipe section: name, options, what build adds."""
        if self.calibration == "required" and calibration is None:
            raise QuantizeError(f"{self.name} needs calibration text: pass --calibration PATH (text like your prompts)")
        return {"name": self.name, **options, **self.build(Path(src), Path(dst), options, calibration)}


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizers log a generic "consider pre-processing before quantization" warning on the
    root logger; drop it for the duration of the call only (an app's own logging is left alone). Their
    calibration sessions log onnxruntime's own warnings (an overridable initializer such as logits_to_keep
    is one) at its default severity: errors only meanwhile, the default (warnings) after."""
    import onnxruntime as ort

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root, f = logging.getLogger(), _Drop()
    root.addFilter(f)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.removeFilter(f)
        ort.set_default_logger_severity(2)
