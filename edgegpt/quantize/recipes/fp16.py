"""fp16: float16 weights, compute and KV cache for GPU and mobile targets, with onnxruntime's float16
converter. LayerNormalization, Softmax and the logits stay float32 (fp16 overflow: onnxruntime#6328,
#11384). On a CPU fp16 is slower than fp32 (onnxruntime#9892), so no CPU target takes it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from edgegpt import contract
from edgegpt.quantize.recipes.card import RecipeCard

log = logging.getLogger(__name__)

FP32_OPS = ["LayerNormalization", "Softmax"]


def convert(model):
    """The fp16 graph of an fp32 model (also used by package for its static graphs)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edgegpt.graph.passes import topological_sort, unique_node_names

    # The converter places its Casts by the types in value_info; onnx's own shape inference stops at
    # contrib ops, so without this a tensor feeding both a blocked LayerNormalization and an fp16 Add
    # gets no Cast and the graph is mistyped.
    try:
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception as e:  # noqa: BLE001 - the converter still works on graphs it can type itself
        log.debug("symbolic shape inference failed (%s); converting without it", e)
    # logits stay fp32 (sampling and perplexity want them); the KV cache goes fp16.
    model = convert_float_to_float16(model, keep_io_types=[contract.LOGITS], op_block_list=FP32_OPS)
    unique_node_names(model)
    topological_sort(model)
    return model


def build(src: Path, dst: Path, opts: dict, calibration: Optional[str]) -> dict:
    from edgegpt.graph.io import load_graph, save_graph

    save_graph(convert(load_graph(src)), dst)
    return {"fp32_ops": FP32_OPS, "fp32_io": [contract.LOGITS]}


CARD = RecipeCard(
    # peak RSS 3.03 GB at GPT-2 small (0.50 GB), 7.07 GB at medium (1.42 GB)
    peak_memory=4.38, peak_memory_gb=0.85,
    name="fp16", order=30, build=build, budget_pct=1.0, targets=("cuda", "ios", "web"), kv_dtype="float16",
    summary="float16 weights and KV cache for GPUs and CoreML (slower than fp32 on a CPU)",
)
