"""torch -> ONNX with KV-cache inputs: one graph for prefill (past length 0) and cached decode.

Exporter: torch.onnx's TorchScript exporter (``dynamo=False``) at opset 17. Our GPT is plain
tensors in and out with no data-dependent control flow, which is exactly what tracing handles;
it needs no onnxscript dependency, exports GPT-2 small in seconds, and its op patterns (MatMul +
Add, LayerNormalization, the tanh GELU) are the ones onnxruntime's fusions and quantizers know.
Opset 17 is the first with LayerNormalization as a standard op, and every execution provider we
target (CPU, CUDA, CoreML, NNAPI, XNNPACK, QNN) supports it.

After tracing, onnxruntime's basic-level optimizer (constant folding, dead and redundant node
elimination: standard ops only) cleans the graph, the tied LM head is rewritten to share the
embedding, unused opset imports are dropped and shapes are inferred.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from edgegpt import contract
from edgegpt.errors import ExportError
from edgegpt.model.gpt import GPT

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization


GRAPHS = ("fused", "traced")


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    last_logits_only: bool = False
    # always: weights in model.onnx.data (onnxruntime maps it: less resident memory, faster load); auto: only
    # above EXTERNAL_DATA_THRESHOLD; never: one file
    external_data: str = "always"
    # fused: built from our weights with onnxruntime contrib ops (MultiHeadAttention or
    # GroupQueryAttention, FastGelu): the fastest on CPU/CUDA. traced: torch.onnx's standard-op
    # graph, for providers that lack the contrib ops (NNAPI, CoreML, QNN, XNNPACK, other runtimes).
    graph: str = "fused"
    # shared: one fixed-capacity buffer per layer that is both past and present, updated in place (fused graph
    # only; edgegpt.runtime and onnxruntime-genai's past_present_share_buffer): the faster decode, the int8 KV
    # cache, the kept prompt cache and speculation. concat: present = past + new (any runtime; Optimum and
    # transformers.js need it). auto: shared where the graph can take it (kv_layout), else concat.
    kv_cache: str = "auto"


class _ContractWrapper(torch.nn.Module):
    """Flat tensors in the contract's order in, flat tensors out: what torch.onnx traces."""

    def __init__(self, model: GPT, last_logits_only: bool):
        super().__init__()
        self.model, self.last_logits_only = model, last_logits_only

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, present = self.model(input_ids, past, attention_mask, position_ids, self.last_logits_only)
        return (logits, *[t for kv in present for t in kv])


KV_CACHES = ("auto", "shared", "concat")


def kv_layout(options: ExportOptions, head_dim: int) -> str:
    """The KV cache an export writes: ``auto`` is the shared buffer wherever GroupQueryAttention takes the model
    (the fused graph, head_dim a multiple of 8), else concat."""
    if options.kv_cache != "auto":
        return options.kv_cache
    return "shared" if options.graph == "fused" and head_dim % 8 == 0 else "concat"


def check_opset(opset: int) -> None:
    import onnx

    # torch's TorchScript exporter writes opsets up to 20.
    highest = min(onnx.defs.onnx_opset_version(), 20)
    if not MIN_OPSET <= opset <= highest:
        raise ExportError(f"opset {opset} cannot be written here: choose {MIN_OPSET}..{highest} "
                          f"(onnx {onnx.__version__}, torch {torch.__version__})")


def _example_inputs(model: GPT) -> tuple[torch.Tensor, ...]:
    # batch 2, seq 3, past 2: no axis of size 1, so tracing cannot specialise a dynamic axis to 1.
    cfg, B, T, P = model.config, 2, 3, 2
    kv = [torch.zeros(B, cfg.n_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    return (torch.ones(B, T, dtype=torch.long), torch.ones(B, P + T, dtype=torch.long),
            torch.arange(P, P + T).repeat(B, 1), *kv)


def export_graph(model: GPT, dest: Path, options: ExportOptions) -> dict:
    """Write dest/model.onnx (+ model.onnx.data when large). Returns the graph section of the manifest."""
    import onnx

    from edgegpt.graph import io as gio, passes as gp
    from edgegpt.manifest import MODEL_FILE

    check_opset(options.opset)
    if options.graph not in GRAPHS:
        raise ExportError(f"graph must be one of {', '.join(GRAPHS)}, got {options.graph!r}")
    if options.kv_cache not in KV_CACHES:
        raise ExportError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {options.kv_cache!r}")
    if options.kv_cache == "shared" and options.graph != "fused":
        raise ExportError("--kv-cache shared needs --graph fused (GroupQueryAttention updates the buffer in place)")
    if options.kv_cache == "shared" and model.config.head_dim % 8:
        raise ExportError(f"--kv-cache shared needs head_dim divisible by 8 (GroupQueryAttention), got "
                          f"{model.config.head_dim}; use --kv-cache concat")
    n_layer = model.config.n_layer
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = options.external_data == "always" or (
        options.external_data == "auto" and param_bytes > gio.EXTERNAL_DATA_THRESHOLD)
    if options.external_data == "never" and param_bytes >= gio.PROTOBUF_LIMIT:
        raise ExportError(f"the model has {param_bytes / 1e9:.2f} GB of weights, over protobuf's 2 GB limit; "
                          f"use --external-data always (the default)")
    if options.graph == "fused":
        return _export_fused(model, dest, options, external, kv_layout(options, model.config.head_dim) == "shared")
    with tempfile.TemporaryDirectory(prefix="edgegpt-export-", dir=dest) as work:
        raw = Path(work) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic we meant
            torch.onnx.export(
                _ContractWrapper(model.eval(), options.last_logits_only), _example_inputs(model), str(raw),
                dynamo=False, opset_version=options.opset, do_constant_folding=True,
                input_names=contract.input_names(n_layer), output_names=contract.output_names(n_layer),
                dynamic_axes=contract.dynamic_axes(n_layer, last_logits_only=options.last_logits_only),
            )
        raw_model = onnx.load(str(raw), load_external_data=False)
        nodes_traced = len(raw_model.graph.node)
        del raw_model
        basic = Path(work) / "basic.onnx"
        gio.ort_optimize(raw, basic, external_data_file="basic.data" if external else None)
        m = onnx.load(str(basic))
        wte_name = next((t.name for t in m.graph.initializer if t.name.endswith("transformer.wte.weight")), None)
        tied = bool(wte_name) and gp.tie_lm_head(m, wte_name)
        gp.drop_unused_opsets(m)
        out = dest / MODEL_FILE
        gio.save_model(m, out, external=external)
        counts = gp.op_counts(m)
        del m
    gio.infer_shapes(out)
    return {
        "file": MODEL_FILE,
        "external_data": gio.EXTERNAL_DATA_FILE if external else None,
        "exporter": f"torch.onnx TorchScript (torch {torch.__version__})",
        "opset": options.opset,
        "options": {"graph": "traced", "last_logits_only": options.last_logits_only, "fused_attention": None,
                    "shared_kv_buffer": False},
        "lm_head_tied": tied,
        "nodes_traced": nodes_traced,
        "op_counts": counts,
    }


def _export_fused(model: GPT, dest: Path, options: ExportOptions, external: bool, shared: bool) -> dict:
    from edgegpt.atomic import match_umask
    from edgegpt.export.fused import build_fused
    from edgegpt.graph import io as gio, passes as gp
    from edgegpt.manifest import MODEL_FILE

    out = dest / MODEL_FILE
    # the weights go to a data file as the graph is built, never into a protobuf beside the torch model's; a graph
    # that keeps them inline reads them back from a scratch one as it is written, one at a time
    with tempfile.TemporaryDirectory(prefix="edgegpt-fused-", dir=dest) as scratch:
        data = (dest if external else Path(scratch)) / gio.EXTERNAL_DATA_FILE
        with open(data, "wb") as f:
            m = build_fused(model.eval(), last_logits_only=options.last_logits_only, opset=options.opset,
                            shared_kv=shared, data=f, location=data.name)
        if external:
            match_umask(data)
            gio.write_streamed(m, out)
        else:
            gio.write_streamed(m, out, folder=Path(scratch))
    return {
        "file": MODEL_FILE,
        "external_data": gio.EXTERNAL_DATA_FILE if external else None,
        "exporter": "edgegpt fused builder (onnxruntime contrib ops)",
        "opset": options.opset,
        "options": {"graph": "fused", "last_logits_only": options.last_logits_only,
                    "fused_attention": "com.microsoft." + ("GroupQueryAttention" if shared else "MultiHeadAttention"),
                    "shared_kv_buffer": shared, "kv_capacity": model.config.n_positions if shared else None},
        "lm_head_tied": True,
        "op_counts": gp.op_counts(m),
    }
