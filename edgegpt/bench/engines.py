"""The peers with engines of their own, each behind systems.System: llama.cpp (a GGUF file), CTranslate2 (a
converted model directory) and ExecuTorch (a .pte program). Each converts from the same checkpoint with a script
in scripts/peers/, and each knows its precision, so that a report compares it with edgegpt's at the same one.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

from edgegpt.bench.systems import System, quiet_torch_extensions
from edgegpt.errors import BenchError


# llama.cpp's general.file_type (gguf-py's LlamaFileType) for the precisions edgegpt ships
GGUF_FILE_TYPES = {0: "fp32", 1: "fp16", 7: "int8", 2: "int4", 3: "int4", 14: "int4", 15: "int4"}
GGUF_NAME_TAGS = (("f32", "fp32"), ("f16", "fp16"), ("q8_0", "int8"), ("q4_0", "int4"), ("q4_1", "int4"),
                  ("q4_k", "int4"))


def name_tag_precision(path: str | Path, tags: tuple[tuple[str, str], ...]) -> Optional[str]:
    """The precision of the first of ``tags`` (tag, precision) that stands as a word of the file's name."""
    stem = Path(path).stem.lower()
    return next((prec for tag, prec in tags if re.search(rf"(^|[-_.]){tag}($|[-_.])", stem)), None)


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
    return name_tag_precision(path, GGUF_NAME_TAGS)


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


# scripts/peers/executorch_from_checkpoint.py names its programs NAME-fp32.pte, NAME-8da8w.pte, NAME-8da4w.pte
# (optimum-executorch's recipe names); the plain tags are accepted too
PTE_NAME_TAGS = (("fp32", "fp32"), ("f32", "fp32"), ("fp16", "fp16"), ("8da8w", "int8"), ("8w", "int8"),
                 ("int8", "int8"), ("8da4w", "int4"), ("4w", "int4"), ("int4", "int4"))


def pte_precision(path: str | Path, arch: Optional[dict] = None) -> Optional[str]:
    """The precision an ExecuTorch program's name claims, checked against its size when the model's shape
    (``arch``, a manifest's architecture) is known: a delegate's weights are opaque, and optimum-executorch's
    int8/int4 recipes quantize only nn.Linear (GPT-2's blocks are Conv1D), which leaves every block fp32. A
    program counts as int8 or int4 only if it is no larger than fp32 embeddings plus every linear layer (an
    untied head included) at 16 bits; otherwise BenchError names the fix."""
    prec = name_tag_precision(path, PTE_NAME_TAGS)
    if prec in ("int8", "int4") and arch:
        d = arch["n_embd"]
        embeddings = 4 * (arch["vocab_size"] + arch["n_positions"]) * d
        linears = 4 * (arch["n_layer"] * (4 * d * d + 2 * d * arch["n_inner"]) + arch["vocab_size"] * d)
        size = Path(path).stat().st_size
        if size > embeddings + linears // 2:
            raise BenchError(f"{path} is named {prec} but is {size / 1e6:.1f} MB, more than an {prec} program of this "
                             f"model can be ({(embeddings + linears // 2) / 1e6:.1f} MB): its linear layers are not "
                             f"quantized; export it with scripts/peers/executorch_from_checkpoint.py")
    return prec


class ExecuTorch(System):
    """ExecuTorch's runtime on a .pte program exported from the same checkpoint
    (scripts/peers/executorch_from_checkpoint.py: transformers' static-cache module, XNNPACK). Its one method,
    forward(input_ids [1, T], cache_position [T]) -> logits, does the prefill and each decode step; the cache lives
    in the program's buffers and a prompt at position 0 starts a new sequence. Batch 1; greedy by argmax."""

    kind = "executorch"

    def __init__(self, path: str, threads: Optional[int]):
        self.path, self.threads = path, threads
        self.label = f"ExecuTorch {Path(path).stem}"

    def load(self) -> None:
        quiet_torch_extensions()
        try:
            import torch
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
        except ImportError:
            raise BenchError("--executorch needs executorch: pip install executorch") from None
        if self.threads:
            portable_lib._unsafe_reset_threadpool(self.threads)  # XNNPACK's pool; it starts at the core count
        prog = Runtime.get().load_program(Path(self.path))
        if "forward" not in prog.method_names:
            raise BenchError(f"{self.path} has no forward method; export it with "
                             f"scripts/peers/executorch_from_checkpoint.py")
        self.max_len = (int(prog.load_method("get_max_seq_len").execute([])[0])
                        if "get_max_seq_len" in prog.method_names else None)
        self.forward, self.torch = prog.load_method("forward"), torch

    def run(self, prompts, new_tokens):
        if len(prompts) != 1:
            raise BenchError("the ExecuTorch baseline runs batch 1 only")
        torch, prompt = self.torch, list(prompts[0])
        if self.max_len is not None and len(prompt) + new_tokens > self.max_len:
            raise BenchError(f"{len(prompt)} + {new_tokens} tokens exceed the program's cache of {self.max_len}")
        logits = self.forward.execute([torch.tensor([prompt]), torch.arange(len(prompt))])[0]
        stamps, new = [], []
        for i in range(new_tokens):
            new.append(int(logits[0, -1].argmax()))
            stamps.append(time.perf_counter())
            if len(new) < new_tokens:
                logits = self.forward.execute([torch.tensor([[new[-1]]]), torch.tensor([len(prompt) + i])])[0]
        self.tokens = new
        return stamps
