"""The systems a benchmark can time, each behind one small interface.

``load()`` builds it (timed as load time), ``run(prompts, new_tokens)`` generates exactly
``new_tokens`` tokens per prompt and returns the wall-clock time at which each new token became
available; it leaves the first prompt's new tokens in ``tokens``, so a report can show which systems
produce the same output. Systems other than edgegpt's own runtime are optional: a missing package raises a
clear BenchError naming it.
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional

from edgegpt.errors import BenchError


# llama.cpp's general.file_type (gguf-py's LlamaFileType) for the precisions edgegpt ships
GGUF_FILE_TYPES = {0: "fp32", 1: "fp16", 7: "int8", 2: "int4", 3: "int4", 14: "int4", 15: "int4"}
GGUF_NAME_TAGS = (("f32", "fp32"), ("f16", "fp16"), ("q8_0", "int8"), ("q4_0", "int4"), ("q4_1", "int4"),
                  ("q4_k", "int4"))


def gguf_precision(path: str | Path) -> Optional[str]:
    """The precision of a GGUF file: its general.file_type when gguf-py is installed, else a tag in
    its name (gguf_from_checkpoint.py names files NAME-f32.gguf, NAME-q8_0.gguf, ...)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.file_type")
        if field is not None:
            return GGUF_FILE_TYPES.get(int(field.parts[field.data[0]][0]))
    except Exception:  # noqa: BLE001 - gguf-py missing, or a file it cannot read: fall back to the name
        pass
    stem = Path(path).stem.lower()
    return next((prec for tag, prec in GGUF_NAME_TAGS if re.search(rf"(^|[-_.]){tag}($|[-_.])", stem)), None)


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


class LlamaCpp(System):
    """llama.cpp (llama-cpp-python) on a GGUF file of the same weights
    (scripts/peers/gguf_from_checkpoint.py writes one). Batch 1; greedy by argmax of the last logits."""

    kind = "llama.cpp"

    def __init__(self, gguf: str, threads: Optional[int], n_ctx: int, lookup: Optional[int] = None):
        self.gguf, self.threads, self.n_ctx, self.lookup = gguf, threads, n_ctx, lookup
        self.label = f"llama.cpp {Path(gguf).stem}" + (f" +LlamaPromptLookupDecoding({lookup})" if lookup else "")

    def load(self) -> None:
        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError:
            raise BenchError("--gguf needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp)") from None
        import numpy as np

        self.np, self.llama_cpp = np, llama_cpp
        draft = None
        if self.lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=self.lookup)
        self.llm = Llama(model_path=self.gguf, n_ctx=self.n_ctx, n_batch=512, n_ubatch=512,
                         n_threads=self.threads or None, n_threads_batch=self.threads or None, verbose=False,
                         draft_model=draft)

    def run(self, prompts, new_tokens):
        if len(prompts) != 1:
            raise BenchError("the llama.cpp baseline runs batch 1 only")
        if self.lookup:  # llama-cpp-python's own loop: it drafts, verifies and rewinds
            stamps, new = [], []
            self.llm.reset()  # else generate reuses the last run's cache of the same prompt
            for tok in self.llm.generate(list(prompts[0]), temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                         repeat_penalty=1.0, reset=True):
                stamps.append(time.perf_counter())
                new.append(int(tok))
                if len(new) == new_tokens:
                    break
            self.tokens = new
            return stamps
        llm, np = self.llm, self.np
        llm.reset()
        stamps, new = [], []
        llm.eval(list(prompts[0]))
        # the last position's logits straight from the context (Llama.scores stays empty without
        # logits_all); a view, no copy
        logits = np.ctypeslib.as_array(self.llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
        for _ in range(new_tokens):
            nxt = int(np.argmax(logits))
            stamps.append(time.perf_counter())
            new.append(nxt)
            if len(stamps) < new_tokens:
                llm.eval([nxt])
                logits = np.ctypeslib.as_array(self.llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
        self.tokens = new
        return stamps


# CTranslate2's compute types (Generator.compute_type: the type a converted model was saved in) -> precision
CT2_PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "fp16", "int8": "int8", "int8_float32": "int8",
                  "int8_float16": "int8", "int8_bfloat16": "int8"}


def ct2_precision(path: str | Path) -> Optional[str]:
    """The precision a CTranslate2 model directory was converted to (None when ctranslate2 is missing)."""
    try:
        import ctranslate2
    except ImportError:
        return None
    return CT2_PRECISIONS.get(ctranslate2.Generator(str(path), device="cpu", intra_threads=1).compute_type)


class CTranslate2(System):
    """CTranslate2's Generator on a model converted from the same checkpoint (scripts/peers/ct2_from_checkpoint.py).
    Batch 1, greedy (sampling_topk 1), end_token [] so that an end-of-text token never stops it early; the prompt
    goes in as its vocabulary's token strings, which is what generate_tokens takes."""

    kind = "ctranslate2"

    def __init__(self, path: str, threads: Optional[int]):
        self.path, self.threads = path, threads
        self.label = f"CTranslate2 {Path(path).name}"

    def load(self) -> None:
        try:
            import ctranslate2
        except ImportError:
            raise BenchError("--ct2 needs ctranslate2: pip install ctranslate2") from None
        self.vocab = json.loads(Path(self.path, "vocabulary.json").read_text())
        self.gen = ctranslate2.Generator(self.path, device="cpu", intra_threads=self.threads or 0, inter_threads=1)

    def run(self, prompts, new_tokens):
        if len(prompts) != 1:
            raise BenchError("the CTranslate2 baseline runs batch 1 only")
        stamps, new = [], []
        for step in self.gen.generate_tokens([self.vocab[i] for i in prompts[0]], max_length=new_tokens,
                                             sampling_topk=1, end_token=[]):
            stamps.append(time.perf_counter())
            new.append(int(step.token_id))
        self.tokens = new
        return stamps
