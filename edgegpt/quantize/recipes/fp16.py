"""fp16: float16 weights, compute and KV cache for GPU and mobile targets, with onnxruntime's float16
converter. LayerNormalization, Softmax and the logits stay float32 (fp16 overflow: onnxruntime#6328,
#11384). On a CPU fp16 is slower than fp32 (onnxruntime#9892), so no CPU target takes it."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

from edgegpt import contract
from edgegpt.quantize.recipes.card import RecipeCard

log = logging.getLogger(__name__)

FP32_OPS = ["LayerNormalization", "Softmax"]


class _NumpyHelper:
    """onnx.numpy_helper as the shape inference sees it, whose to_array reads a weight kept in a data file from
    ``folder`` (onnx's reads it from the working directory, or fails)."""

    def __init__(self, folder: Optional[Path]):
        self.folder = folder

    def __getattr__(self, name: str):
        from onnx import numpy_helper

        return getattr(numpy_helper, name)

    def to_array(self, tensor, base_dir: str = ""):
        from edgegpt.graph.io import read_weight

        if self.folder is None:
            return self.__getattr__("to_array")(tensor, base_dir)
        return read_weight(tensor, self.folder)


def convert(model, folder: Optional[Path] = None):
    """The fp16 graph of an fp32 model (also used by package for its static graphs). A weight kept in a data file
    in ``folder`` (a graph loaded with load_external_data=False) is only retyped: its bytes are still fp32
    (``build``); the shape inference reads the few values it needs (biases, shapes) from the file."""
    from unittest import mock

    from onnx import helper
    from onnxruntime.tools import symbolic_shape_infer
    from onnxruntime.transformers import float16

    from edgegpt.graph.passes import topological_sort, unique_node_names

    # The converter places its Casts by the types in value_info; onnx's own shape inference stops at
    # contrib ops, so without this a tensor feeding both a blocked LayerNormalization and an fp16 Add
    # gets no Cast and the graph is mistyped.
    try:
        with mock.patch.object(symbolic_shape_infer, "numpy_helper", _NumpyHelper(folder)):
            model = symbolic_shape_infer.SymbolicShapeInference.infer_shapes(model, auto_merge=True,
                                                                             guess_output_rank=True)
    except Exception as e:  # noqa: BLE001 - the converter still works on graphs it can type itself
        log.debug("symbolic shape inference failed (%s); converting without it", e)
    # logits stay fp32 (sampling and perplexity want them); the KV cache goes fp16. The converter reads each
    # converted weight's values only to learn its shape (make_value_info_from_tensor), which a weight in a data
    # file does not have in memory: its shape is its dims.
    by_dims = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))  # noqa: E731
    with mock.patch.object(float16, "make_value_info_from_tensor", by_dims):
        model = float16.convert_float_to_float16(model, keep_io_types=[contract.LOGITS], op_block_list=FP32_OPS)
    unique_node_names(model)
    topological_sort(model)
    return model


def build(src: Path, dst: Path, opts: dict, calibration: Optional[str]) -> dict:
    """The graph is converted without its weights (in a data file: a graph that keeps them inline is staged
    into one first); then each fp32 weight the converter retyped is read from the data file, converted by the
    converter's own tensor conversion and written, one at a time (graph.io.save_rewritten): the fp32 weights are
    never all in memory (the converter converts a loaded graph in place, which holds the fp32 bytes and the fp16
    ones at once)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import convert_tensor_float_to_float16

    from edgegpt.graph.io import data_file, load_graph, save_model, save_rewritten
    from edgegpt.limits import release_freed

    with tempfile.TemporaryDirectory(prefix="fp16-", dir=dst.parent) as scratch:
        if not data_file(src).is_file():  # weights inline: to a data file first, so that they can leave memory
            staged = Path(scratch) / "model.onnx"
            save_model(load_graph(src), staged, external=True)
            release_freed()
            src = staged
        model = load_graph(src, load_external_data=False)
        stored = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        model = convert(model, src.parent)
        halves = [t for t in model.graph.initializer if t.name in stored and t.data_type == onnx.TensorProto.FLOAT16]
        for t in halves:
            t.data_type = onnx.TensorProto.FLOAT  # what its bytes in the data file are, until rewritten

        def half(name: str):
            return lambda values: [convert_tensor_float_to_float16(numpy_helper.from_array(values, name))]

        save_rewritten(model, src.parent, dst, {t.name: half(t.name) for t in halves})
    return {"fp32_ops": FP32_OPS, "fp32_io": [contract.LOGITS]}


CARD = RecipeCard(
    # peak RSS 1.81 GB at GPT-2 small (0.50 GB), 3.25 GB at medium (1.42 GB), 5.80 GB at large (3.10 GB): a line
    # just above all three
    peak_memory=1.54, peak_memory_gb=1.10,
    size_ratio=0.5,  # 1549 / 3097 MB at large
    name="fp16", order=30, build=build, budget_pct=1.0, targets=("cuda", "ios", "web"), kv_dtype="float16",
    summary="float16 weights and KV cache for GPUs and CoreML (slower than fp32 on a CPU)",
)
