"""ONNX graph passes shared by export and quantize: tie the LM head, drop unused opset imports,
infer shapes, save with or without external data, count ops.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegpt.errors import BundleError, ExportError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3
# Above this many bytes of weights, write them to model.onnx.data beside the graph: leaves headroom
# under protobuf's 2 GiB hard limit for the graph itself and for later passes that add initializers.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 1024**3)
EXTERNAL_DATA_FILE = "model.onnx.data"


def load_graph(path: Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """onnx.load of a graph read from a bundle (untrusted): a file that is not an ONNX model, or whose
    external data points outside its folder (onnx refuses that itself), is one BundleError."""
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, onnx's ValidationError, OSError ...
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BundleError(f"{Path(path).parent}: {Path(path).name} is not a readable ONNX model ({detail}); "
                          f"re-run `edgegpt export`") from None


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    c = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                            for n in model.graph.node)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def tie_lm_head(model: onnx.ModelProto, wte_name: str) -> bool:
    """Rewrite MatMul(x, wte^T constant) as Gemm(x, wte, transB=1) and drop the transposed copy.

    torch.onnx constant-folds the tied head's transpose into a second (n_embd, vocab) initializer;
    for GPT-2 small that is 154 MB of duplicated weights. x is 2-D by construction (gpt.py).
    """
    inits = {t.name: t for t in model.graph.initializer}
    if wte_name not in inits:
        return False
    wte = numpy_helper.to_array(inits[wte_name])
    for i, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        b = inits[node.input[1]]
        if tuple(b.dims) != wte.shape[::-1] or not np.array_equal(numpy_helper.to_array(b), wte.T):
            continue
        gemm = helper.make_node("Gemm", [node.input[0], wte_name], list(node.output), name=node.name or "lm_head",
                                transB=1)
        model.graph.node.remove(node)
        model.graph.node.insert(i, gemm)
        if not any(b.name in n.input for n in model.graph.node):
            model.graph.initializer.remove(b)
        return True
    return False


def drop_unused_opsets(model: onnx.ModelProto) -> None:
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def save_model(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    """Save; with ``external`` the weights go to model.onnx.data next to the graph."""
    path = Path(path)
    if not external and model.ByteSize() >= PROTOBUF_LIMIT:
        raise ExportError(f"the graph is {model.ByteSize() / 1e9:.2f} GB, over protobuf's 2 GB limit; "
                          f"use --external-data auto (or always)")
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
        # onnx creates the data file 0600: give it the mode of every other file in the bundle, so a bundle
        # copied to an app or a server stays readable by the account that runs it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path.parent / EXTERNAL_DATA_FILE, 0o666 & ~umask)
    else:
        onnx.save_model(model, str(path))


def infer_shapes(path: Path) -> None:
    """onnx shape inference, in place, path-based so models over 2 GB work too."""
    onnx.shape_inference.infer_shapes_path(str(path), str(path))


def ort_optimize(src: Path, dst: Path, *, external_data_file: str | None = None) -> None:
    """onnxruntime's basic-level optimizer (constant folding, dead and redundant node elimination;
    standard ops only) from src to dst."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if external_data_file:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data_file)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types per failure
        raise ExportError(f"onnxruntime could not load the graph {Path(src).name}: {e}".splitlines()[0]) from None


def slice_last_position(model: onnx.ModelProto) -> bool:
    """Make a fused-builder graph compute logits for the last position only: a Slice on the final
    hidden state feeds the LM head (its Shape and Reshape, see fused.py). False when the graph is
    not one the fused builder wrote."""
    nodes = {n.name: n for n in model.graph.node}
    shape, flat = nodes.get("/model/lm_head/Shape"), nodes.get("/model/lm_head/Reshape")
    if shape is None or flat is None or shape.input[0] != flat.input[0]:
        return False
    hidden = flat.input[0]
    consts = [numpy_helper.from_array(np.array(v, np.int64), f"/model/last/{k}")
              for k, v in (("starts", [-1]), ("ends", [np.iinfo(np.int64).max]), ("axes", [1]))]
    model.graph.initializer.extend(consts)
    sl = helper.make_node("Slice", [hidden] + [c.name for c in consts], ["/model/last/out"], name="/model/last/Slice")
    model.graph.node.insert(list(model.graph.node).index(shape), sl)
    shape.input[0] = flat.input[0] = "/model/last/out"
    for out in model.graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].ClearField("dim_param")
            out.type.tensor_type.shape.dim[1].dim_value = 1
    return True


def topological_sort(model: onnx.ModelProto) -> None:
    """Order the nodes so every input is produced before it is read (onnxruntime's float16
    converter appends its Casts at the end; tools that walk the list in order then fail)."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"the graph has a cycle or an unproduced input near node {rest[0].name!r}")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
