"""The systems a benchmark can time, each behind one small interface.

``load()`` builds it (timed as load time), ``run(prompts, new_tokens)`` generates exactly
``new_tokens`` tokens per prompt and returns the wall-clock time at which each new token became
available; it leaves the first prompt's new tokens in ``tokens``, so a report can show which systems
produce the same output. Systems other than edgegpt's own runtime are optional: a missing package raises a
clear BenchError naming it.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional

from edgegpt.errors import BenchError


def onnx_precision(directory: str | Path) -> Optional[str]:
    """The precision of an onnxruntime-genai model directory: an edgegpt bundle's manifest, else what the
    decoder graph's ops say (4-bit MatMulNBits: int4; 8-bit or integer MatMuls: int8; fp16 weights: fp16)."""
    from edgegpt.manifest import MANIFEST, read_manifest

    d = Path(directory)
    if (d / MANIFEST).is_file():
        return read_manifest(d)["precision"]
    try:
        import onnx

        name = json.loads((d / "genai_config.json").read_text())["model"]["decoder"]["filename"]
        graph = onnx.load(str(d / name), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - no onnx, or not a model we can read: unknown
        return None
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    ops = {n.op_type for n in graph.node}
    if 4 in bits:
        return "int4"
    if bits or ops & {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        return "fp16"
    return "fp32"


def quiet_torch_extensions() -> None:
    """Keep torchao's import-time warnings out of a report: where it is installed (executorch brings it),
    transformers imports it, and it logs a warning for each of its CUDA kernels a CPU machine cannot load, then
    torch logs one per enum torchao registers. Neither is about the run being measured."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


class System(ABC):
    label: str = ""
    kind: str = ""
    tokens: list[int] = []  # the first prompt's new tokens from the last run
    hugepages: bool = False  # start its worker with glibc's huge pages for malloc (edgegpt.runtime.hugepages)
    precision: Optional[str] = None  # fp32 | fp16 | int8 | int4 (None: unknown): whom it is compared with

    @abstractmethod
    def load(self) -> None:
        """Build the system (timed as its load time)."""

    @abstractmethod
    def run(self, prompts: list[list[int]], new_tokens: int) -> list[float]:
        """Generate exactly new_tokens per prompt; the perf_counter time at which each token was ready."""


class EdgeGPT(System):
    kind = "edgegpt"

    def __init__(self, bundle: str, threads: Optional[int], provider: str, label: Optional[str] = None,
                 speculate: Optional[str] = None):
        self.bundle, self.threads, self.provider, self.speculate = bundle, threads, provider, speculate
        self.label = label or Path(bundle).name

    def load(self) -> None:
        from edgegpt.runtime import Generator
        from edgegpt.runtime.generator import GenerationConfig

        self.gen = Generator.load(self.bundle, provider=self.provider, threads=self.threads, speculate=self.speculate)
        self._cfg = GenerationConfig

    def run(self, prompts, new_tokens):
        cfg = self._cfg(max_new_tokens=new_tokens, ignore_eos=True)
        stamps, tokens = [], []
        for step in self.gen.iter_ids(prompts, cfg):
            stamps.append(time.perf_counter())
            tokens.append(step[0])
        self.tokens = [int(t) for t in tokens]
        return stamps


def _hf_generate(model, prompts, new_tokens, lookup: Optional[int] = None) -> tuple[list[float], list[int]]:
    """transformers' generate, stamping the time each token is ready (a logits processor per step; with
    ``lookup``, prompt_lookup_num_tokens, a streamer, since one step then yields several tokens); the stamps and
    the first prompt's new tokens."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.streamers import BaseStreamer

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    class Stream(BaseStreamer):
        prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate hands the prompt over first
                self.prompt_seen = True
                return
            stamps.extend([time.perf_counter()] * int(value.numel()))

        def end(self):
            pass

    ids = torch.tensor(prompts)
    kw = dict(prompt_lookup_num_tokens=lookup, streamer=Stream()) if lookup else \
        dict(logits_processor=LogitsProcessorList([Stamp()]))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)
    # assisted generation can accept past max_new_tokens within its last step
    return stamps[:new_tokens], [int(t) for t in out[0, ids.shape[1]:ids.shape[1] + new_tokens]]


class TorchEager(System):
    """PyTorch eager: transformers GPT2LMHeadModel.generate, fp32, on the checkpoint the bundle came from."""

    kind = "torch"
    label = "torch eager (transformers)"

    def __init__(self, checkpoint: str, threads: Optional[int], lookup: Optional[int] = None):
        self.checkpoint, self.threads, self.lookup = checkpoint, threads, lookup
        if lookup:
            self.label = f"{self.label} +prompt_lookup_num_tokens={lookup}"

    def load(self) -> None:
        quiet_torch_extensions()
        try:
            import torch
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise BenchError("--baseline torch needs torch and transformers: pip install 'edgegpt[dev]'") from None
        if self.threads:
            torch.set_num_threads(self.threads)
        if not Path(self.checkpoint, "config.json").is_file():
            raise BenchError(f"--baseline torch: the bundle's source checkpoint {self.checkpoint} is not there; "
                             f"pass --checkpoint DIR")
        self.model = GPT2LMHeadModel.from_pretrained(self.checkpoint).eval()

    def run(self, prompts, new_tokens):
        stamps, self.tokens = _hf_generate(self.model, prompts, new_tokens, lookup=self.lookup)
        return stamps


class Optimum(System):
    """Hugging Face Optimum's ORTModelForCausalLM on the same bundle (torch held at 1 thread so it
    does not fight onnxruntime's threads for the cores)."""

    kind = "optimum"
    label = "optimum ORTModelForCausalLM"

    def __init__(self, bundle: str, threads: Optional[int]):
        self.bundle, self.threads = bundle, threads

    def load(self) -> None:
        try:
            import onnxruntime as ort
            import torch
            from optimum.onnxruntime import ORTModelForCausalLM
        except ImportError:
            raise BenchError("--baseline optimum needs optimum-onnx: pip install 'edgegpt[interop]'") from None
        torch.set_num_threads(1)
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
        self.model = ORTModelForCausalLM.from_pretrained(self.bundle, session_options=so)

    def run(self, prompts, new_tokens):
        stamps, self.tokens = _hf_generate(self.model, prompts, new_tokens)
        return stamps


class GenAI(System):
    """onnxruntime-genai's Generator on the same bundle (via its genai_config.json)."""

    kind = "genai"
    label = "onnxruntime-genai"

    def __init__(self, bundle: str, threads: Optional[int], label: Optional[str] = None):
        self.bundle, self.threads = bundle, threads
        if label:
            self.label = label

    def load(self) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise BenchError("--baseline genai needs onnxruntime-genai: pip install 'edgegpt[interop]'") from None
        import json
        import os
        import tempfile

        self.og = og
        # genai takes its thread count from genai_config.json: run from a temporary view of the bundle
        # (links to its files) whose config sets it, leaving the bundle itself untouched.
        self._view = tempfile.TemporaryDirectory(prefix="edgegpt-genai-")
        for f in Path(self.bundle).iterdir():
            if f.is_file() and f.name != "genai_config.json":
                os.symlink(f.resolve(), Path(self._view.name) / f.name)
        cfg = json.loads(Path(self.bundle, "genai_config.json").read_text())
        if self.threads:
            cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = self.threads
        Path(self._view.name, "genai_config.json").write_text(json.dumps(cfg))
        self.model = og.Model(self._view.name)

    def run(self, prompts, new_tokens):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompts[0]) + new_tokens, min_length=len(prompts[0]) + new_tokens,
                                  do_sample=False, batch_size=len(prompts))
        gen = og.Generator(self.model, params)
        gen.append_tokens(prompts)
        stamps = []
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        self.tokens = [int(t) for t in gen.get_sequence(0)[len(prompts[0]):]]
        return stamps
