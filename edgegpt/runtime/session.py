"""An onnxruntime session over a bundle, driven by its manifest, with the KV cache kept in
OrtValues that go from one step's outputs to the next step's inputs without touching numpy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort

from edgegpt import contract
from edgegpt.errors import ArgumentError, BundleError
from edgegpt.limits import check_memory, check_threads
from edgegpt.manifest import bundle_file, read_manifest, verify_files as check_files
from edgegpt.runtime import hugepages, providers as prov

log = logging.getLogger(__name__)

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "int64": np.int64}
CPU_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)", "int64": "tensor(int64)"}


def ort_message(e: Exception) -> str:
    """The part of an onnxruntime exception that says what went wrong, short enough for one line."""
    text = str(e).replace("\n", " ")
    if "Status Message: " in text:
        text = text.split("Status Message: ", 1)[1]
    return text[:160]


def session_options(threads: Optional[int] = None, *, spinning: bool = True, optimization: str = "all",
                    config: Optional[dict] = None) -> ort.SessionOptions:
    """Session options chosen for token-by-token decoding.

    - intra-op threads: the caller's count (default: physical cores as onnxruntime sees them);
      inter-op 1 and sequential execution: a decoder graph is a chain, parallel branches are few.
    - memory pattern off: the KV cache grows every step, so a cached allocation plan never
      repeats (onnxruntime#5796: RSS ratchets with changing shapes); the arena stays on.
    - spinning on by default: off cost decode 9-23% on GPT-2 small's shape. Once a run ends the worker
      spins ~50 ms and then sleeps, so an idle app burns no core (onnxruntime#14018); turn it off where
      another busy thread shares the cores with generation.
    """
    so = ort.SessionOptions()
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise ArgumentError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
    so.graph_optimization_level = levels[optimization]
    if check_threads(threads) is not None:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_mem_pattern = False
    # fatal only: every onnxruntime error reaches the caller as an exception, which edgegpt words in one line
    so.log_severity_level = 4
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, str(v))
    return so


class ModelSession:
    """One bundle's graph: validated against its manifest, stepped with IO binding."""

    def __init__(self, bundle: str | Path, *, provider: str = "cpu", threads: Optional[int] = None,
                 fallback: bool = False, provider_options: Optional[dict] = None, spinning: bool = True,
                 optimization: str = "all", session_config: Optional[dict] = None, verify_files: bool = False):
        """verify_files: check every file against the sha256 its manifest records before loading
        (reads the whole bundle once: about a second for GPT-2 small's 500 MB)."""
        self.bundle = Path(bundle)
        self.manifest = m = read_manifest(bundle)  # a manifest.Draft brings its own
        if verify_files:
            check_files(self.bundle, m)
        arch = m["architecture"]
        self.n_layer, self.n_head, self.head_dim = arch["n_layer"], arch["n_head"], arch["head_dim"]
        self.vocab_size, self.max_context = arch["vocab_size"], m["max_context"]
        self.eos_token_id, self.pad_token_id = m.get("eos_token_id"), m.get("pad_token_id")
        io = {x["name"]: x for x in m["io"]["inputs"] + m["io"]["outputs"]}
        want = set(contract.input_names(self.n_layer)) | set(contract.output_names(self.n_layer))
        if set(io) != want or any(x["dtype"] not in NP_DTYPES for x in io.values()):
            raise BundleError(f"{self.bundle}: edgegpt.json's inputs/outputs do not match the edgegpt contract "
                              f"({sorted(set(io) ^ want)[:3]}); re-run `edgegpt export`")
        self.kv_dtype = NP_DTYPES[io[contract.PAST_KEY.format(0)]["dtype"]]
        options = m["graph"].get("options", {})
        self.last_logits_only = bool(options.get("last_logits_only"))
        # shared: past and present are one fixed-capacity buffer per layer, updated in place
        self.kv_capacity = options.get("kv_capacity") if options.get("shared_kv_buffer") else None
        if self.kv_capacity is not None and self.kv_capacity != self.max_context:
            raise BundleError(f"{self.bundle}: edgegpt.json's kv_capacity ({self.kv_capacity!r}) is not its max_context "
                              f"({self.max_context}); re-run `edgegpt export`")
        self.provider, plist = prov.resolve(provider, fallback=fallback, options=provider_options)
        self.device = prov.DEVICE.get(self.provider, "cpu")
        so = session_options(threads, spinning=spinning, optimization=optimization, config=session_config)
        path = bundle_file(self.bundle, m["graph"]["file"], "graph.file")
        # On CPU keep LayerNorm(x + bias + residual) as Add, Add, LayerNormalization: onnxruntime's
        # fusion into SkipLayerNormalization makes it ~5x slower there (see export/fused.py).
        disabled = CPU_DISABLED_OPTIMIZERS if self.provider == "cpu" else []
        try:
            self.session = ort.InferenceSession(str(path), so, providers=plist, disabled_optimizers=disabled)
        except Exception as e:  # onnxruntime raises Fail / InvalidProtobuf / NoSuchFile ...
            raise BundleError(f"{self.bundle}: onnxruntime cannot load {path.name} "
                              f"({str(e).splitlines()[0][:200]}); re-run `edgegpt export`") from None
        self._check_graph(io)
        # a screened LM head (quantize/screen.py) takes a margin the runtime sets per generation
        overridable = {x.name for x in self.session.get_overridable_initializers()}
        self.screened = contract.SCREEN_MARGIN in overridable
        # the graph computes the logits of only as many last positions as asked (export/fused.py)
        self.keeps_logits = contract.LOGITS_TO_KEEP in overridable and not self.last_logits_only
        self._past_names = contract.past_names(self.n_layer)
        self._present_names = contract.present_names(self.n_layer)
        self._output_names = contract.output_names(self.n_layer)
        self._probe()
        if self.provider == "cpu" and not hugepages.active():
            log.debug("huge pages are off for this process: decode runs a few percent slower; call "
                      "edgegpt.runtime.hugepages.enable() first thing in main (Linux, glibc >= 2.35)")

    def _check_graph(self, io: dict) -> None:
        """The graph must have exactly the manifest's inputs and outputs, with its dtypes, and the
        fixed dimensions of the KV cache and the logits must be the manifest's."""
        values = {x.name: x for x in self.session.get_inputs() + self.session.get_outputs()}
        if set(values) != set(io):
            extra = sorted(set(values) ^ set(io))[:3]
            raise BundleError(f"{self.bundle}: the graph's inputs/outputs do not match edgegpt.json ({extra}); "
                              f"re-run `edgegpt export`")
        for name, spec in io.items():
            if values[name].type != ORT_TYPES[spec["dtype"]]:
                raise BundleError(f"{self.bundle}: {name} is {values[name].type} in the graph but {spec['dtype']} in "
                                  f"edgegpt.json; re-run `edgegpt export`")
        want = {1: ("n_head", self.n_head), 3: ("head_dim", self.head_dim)}
        for name in contract.past_names(self.n_layer) + contract.present_names(self.n_layer):
            shape = values[name].shape
            for axis, (what, n) in want.items():
                if len(shape) != 4 or (isinstance(shape[axis], int) and shape[axis] != n):
                    raise BundleError(f"{self.bundle}: {name} has shape {shape} in the graph, but edgegpt.json says "
                                      f"{what} {n}; re-run `edgegpt export`")
        vocab = values[contract.LOGITS].shape[-1]
        if isinstance(vocab, int) and vocab != self.vocab_size:
            raise BundleError(f"{self.bundle}: the graph's logits cover {vocab} tokens, edgegpt.json says vocab_size "
                              f"{self.vocab_size}; re-run `edgegpt export`")

    def _probe(self) -> None:
        """One token at the last position the manifest allows: a context (max_context) that the graph's
        position table cannot hold fails here, at load, instead of mid-generation. It also does the first
        run's allocations a generation would otherwise pay for at its first step."""
        cache = KVCache(self, 1, slots=1)
        pos = np.array([[self.max_context - 1]], np.int64)
        try:
            cache.step(np.zeros((1, 1), np.int64), np.ones((1, 1), np.int64), pos)
        except BundleError as e:
            raise BundleError(f"{self.bundle}: one token at position {self.max_context - 1} does not run: edgegpt.json's "
                              f"max_context ({self.max_context}) may exceed what the graph holds; re-run `edgegpt "
                              f"export`") from None

    def kv_bytes(self, batch: int, slots: Optional[int] = None) -> int:
        """Bytes of the KV cache of ``batch`` rows over ``slots`` tokens (default: the model's context)."""
        n = slots or self.max_context
        return 2 * self.n_layer * batch * self.n_head * n * self.head_dim * np.dtype(self.kv_dtype).itemsize

    def check_memory(self, batch: int, slots: Optional[int] = None, prompt_tokens: int = 0) -> None:
        """Refuse a generation whose KV cache and logits cannot fit in the memory available."""
        rows = batch * (1 if self.last_logits_only or self.keeps_logits else max(1, prompt_tokens))
        need = self.kv_bytes(batch, slots) + 4 * rows * self.vocab_size
        check_memory(need, f"a KV cache of {batch} rows x {slots or self.max_context} tokens",
                     "lower the batch size, the prompt length or max_new_tokens")

    def empty_past_numpy(self, batch: int, slots: Optional[int] = None) -> np.ndarray:
        """Zeros for every past input before the first step: 0 slots (concat layout), or a shared
        buffer of ``slots`` (default: the full capacity). Sizing the buffer to the generation
        instead of the model's context saves memory: GPT-2 small's full fp32 buffer is 75 MB."""
        n = 0 if not self.kv_capacity else min(slots or self.kv_capacity, self.kv_capacity)
        return np.zeros((batch, self.n_head, n, self.head_dim), self.kv_dtype)

    def empty_past(self, batch: int, slots: Optional[int] = None) -> list[ort.OrtValue]:
        z = self.empty_past_numpy(batch, slots)
        return [ort.OrtValue.ortvalue_from_numpy(z.copy() if self.kv_capacity else z, self.device, 0)
                for _ in range(2 * self.n_layer)]

    def start(self, batch: int, slots: Optional[int] = None) -> "KVCache":
        """A fresh, empty KV cache (and IO binding) for one generation of ``batch`` rows that will
        hold at most ``slots`` tokens (shared layout; default the model's context)."""
        return KVCache(self, batch, slots=slots)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """One stateless forward pass over an explicit past (a list of OrtValues); returns the last
        position's logits (B, V) and present. Generation uses ``start()`` instead, which keeps one
        binding for the whole loop."""
        cache = KVCache(self, input_ids.shape[0], past=past)
        logits = cache.step(input_ids, attention_mask, position_ids)
        return logits.copy(), cache.past

    def forward_numpy(self, feed: dict) -> list[np.ndarray]:
        """Plain session.run for evaluation code that wants every position's logits."""
        return self.session.run(self._output_names, feed)


class KVCache:
    """The KV cache of one generation, kept in OrtValues behind IO binding.

    Concat layout: each step's present (allocated by onnxruntime on the provider's device) becomes
    the next step's past without touching numpy. Shared layout: the past/present buffers are bound
    once, on both sides, and updated in place by the kernel, so a decode step rebinds only the
    three small int64 inputs (16 us of Python per step in the generation loop, from 29 when every
    step rebound the past too). Decode-step logits land in a preallocated buffer in both layouts.
    Rebinding an input name replaces its value; outputs are not rebound in place (onnxruntime would
    hand a bound output's old buffer back), so every output change clears that side first.
    """

    def __init__(self, session: ModelSession, batch: int, past: Optional[list[ort.OrtValue]] = None,
                 slots: Optional[int] = None):
        if past is None:
            session.check_memory(batch, slots)
        self.s = session
        self.binding = session.session.io_binding()
        self.past = past if past is not None else session.empty_past(batch, slots)
        logits_dtype = np.float16 if session.manifest["io"]["outputs"][0]["dtype"] == "float16" else np.float32
        self._logits = np.empty((batch, 1, session.vocab_size), logits_dtype)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self._outputs_for = None  # which logits binding the outputs were last bound for
        self._past_bound = False  # shared layout: the past buffers stay bound after the first step
        # a screened head's margin: bound with the past, changed in place (the OrtValue wraps this array)
        self._margin = np.zeros((), np.float32) if session.screened else None
        self._margin_value = ort.OrtValue.ortvalue_from_numpy(self._margin) if session.screened else None
        # how many last positions' logits a step computes (bound with the past, changed in place)
        self._keep = np.array([contract.KEEP_ALL_LOGITS], np.int64) if session.keeps_logits else None
        self._keep_value = ort.OrtValue.ortvalue_from_numpy(self._keep) if session.keeps_logits else None

    def set_screen_margin(self, margin: float) -> None:
        """A screened head recomputes in fp32 every token within ``margin`` of the best possible
        logit (runtime.sampling.screen_margin picks it); no-op for other bundles."""
        if self._margin is not None:
            self._margin[()] = margin

    def _bind_outputs(self, one_row: bool) -> None:
        s, b = self.s, self.binding
        b.clear_binding_outputs()
        if one_row:
            b.bind_ortvalue_output(contract.LOGITS, self._logits_value)
        else:
            b.bind_output(contract.LOGITS, "cpu")
        for name, value in zip(s._present_names, self.past):
            if s.kv_capacity:  # present *is* past: the kernel writes the new slots in place
                b.bind_ortvalue_output(name, value)
            else:
                b.bind_output(name, s.device)
        self._outputs_for = one_row

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, *,
             all_rows: bool = False) -> np.ndarray:
        """Run one step; returns the last position's logits (B, V) float32, or with ``all_rows`` every fed
        position's (B, T, V) (speculative verification; not on --last-logits-only bundles). The array may be
        overwritten by the next step: consume it first."""
        s, b = self.s, self.binding
        one_row = input_ids.shape[1] == 1 or s.last_logits_only or (s.keeps_logits and not all_rows)
        if self._keep is not None:
            self._keep[0] = 1 if one_row else contract.KEEP_ALL_LOGITS
        if not self._past_bound:  # concat: a new past every step; shared: bound once, then left alone
            b.clear_binding_inputs()
            for name, value in zip(s._past_names, self.past):
                b.bind_ortvalue_input(name, value)
            if self._margin_value is not None:
                b.bind_ortvalue_input(contract.SCREEN_MARGIN, self._margin_value)
            if self._keep_value is not None:
                b.bind_ortvalue_input(contract.LOGITS_TO_KEEP, self._keep_value)
            self._past_bound = bool(s.kv_capacity)
        # rebinding a bound input name replaces its value (outputs are another matter: _bind_outputs)
        b.bind_cpu_input(contract.INPUT_IDS, input_ids)
        b.bind_cpu_input(contract.ATTENTION_MASK, attention_mask)
        b.bind_cpu_input(contract.POSITION_IDS, position_ids)
        if not s.kv_capacity or not one_row or self._outputs_for is not one_row:
            # concat: fresh presents every step; every-position logits: a fresh (tokens, vocab) output
            # each multi-token step (onnxruntime would reuse the last one, of the last step's shape)
            self._bind_outputs(one_row)
        try:
            s.session.run_with_iobinding(b)
        except Exception as e:  # onnxruntime's Fail / InvalidArgument / RuntimeException: the graph is not what
            # its manifest says (a correct bundle never fails a step with inputs the runtime checked)
            raise BundleError(f"{s.bundle}: onnxruntime failed to run the graph ({ort_message(e)}); "
                              f"the bundle does not match its edgegpt.json: re-run `edgegpt export`") from None
        if one_row and s.kv_capacity:
            logits = self._logits[:, -1, :]
        else:
            outs = b.get_outputs()
            if not s.kv_capacity:  # concat layout: this step's present is the next step's past
                self.past = list(outs[1:])
            logits = self._logits[:, -1, :] if one_row else outs[0].numpy()[:, slice(None) if all_rows else -1, :]
        if all_rows and logits.ndim == 2:
            logits = logits[:, None, :]
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)
