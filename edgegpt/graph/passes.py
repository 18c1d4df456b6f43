"""Graph passes every stage shares: count ops and weight bytes, tie and untie the LM head, drop unused
opset imports, restrict the logits to the last position, order nodes, make node names unique.
"""

from __future__ import annotations

import collections
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegpt import contract
from edgegpt.errors import ExportError

LM_HEAD_WEIGHT_T = "lm_head.weight_t"  # an untied head's own (n_embd, vocab) weight
LM_HEAD_MATMUL = "/model/lm_head/MatMul"  # named like the fused builder's nodes


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


def untie_lm_head(model: onnx.ModelProto) -> Optional[str]:
    """Gemm(x, wte, transB=1) -> MatMul(x, wte^T) with its own initializer, so weight-only
    quantizers (which take MatMul with a constant B) can quantize the head while the embedding
    Gather keeps the original table. Returns the new MatMul's name. onnxruntime's quantizers rewrite
    a Gemm(transB=1) into a MatMul by transposing its weight in place, which would corrupt the
    embedding Gather that shares it."""
    inits = {t.name: t for t in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Gemm" and node.input[1] in inits and any(a.name == "transB" and a.i for a in node.attribute):
            w = numpy_helper.to_array(inits[node.input[1]])
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), LM_HEAD_WEIGHT_T))
            mm = helper.make_node("MatMul", [node.input[0], LM_HEAD_WEIGHT_T], list(node.output), name=LM_HEAD_MATMUL)
            model.graph.node.remove(node)
            model.graph.node.insert(i, mm)
            return mm.name
    return None


def weight_matmuls(model: onnx.ModelProto, exclude: Optional[str] = None) -> list[str]:
    """Names of the MatMuls whose B is a constant (the weight matmuls), but ``exclude``."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits and n.name != exclude]


def embedding_name(model: onnx.ModelProto) -> str:
    """The token-embedding table's initializer (it ends with transformer.wte.weight in every graph we write)."""
    name = next((t.name for t in model.graph.initializer if t.name.endswith("transformer.wte.weight")), None)
    if name is None:
        raise ExportError("the graph has no transformer.wte.weight initializer; re-run `edgegpt export`")
    return name


def drop_unused_opsets(model: onnx.ModelProto) -> None:
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


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
        if out.name == contract.LOGITS:
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


def unique_node_names(model: onnx.ModelProto) -> None:
    """onnxruntime's float16 converter names its Cast nodes after the tensor they cast, so a tensor feeding
    two blocked (fp32) nodes gets two identical Casts (same name, same output), which onnxruntime rejects.
    Drop the repeats, then make any remaining duplicate node names unique."""
    casts = set()
    for node in list(model.graph.node):
        if node.op_type == "Cast":
            key = (tuple(node.input), tuple(node.output), node.attribute[0].i)
            if key in casts:
                model.graph.node.remove(node)
            casts.add(key)
    seen: dict[str, int] = {}
    for node in model.graph.node:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0


def replace_node(model: onnx.ModelProto, node: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    """``nodes`` in ``node``'s place in the graph (the order stays topological when they read what it read)."""
    idx = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for k, n in enumerate(nodes):
        model.graph.node.insert(idx + k, n)
