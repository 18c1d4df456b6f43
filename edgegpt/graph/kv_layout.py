"""The fused graph's shared KV buffer rewritten to the concat layout, for runtimes that grow the cache themselves.

export/fused.py builds each layer's attention in one of two ways over the same weights:

    shared (the default)                               concat (Optimum, transformers.js)
    MatMul c_attn -> Add c_attn.b                      MatMul c_attn -> Split q, k, v
      -> GroupQueryAttention(qkv, past buffer,           -> MultiHeadAttention(q, k, v, bias=c_attn.b,
         seqlens_k, total) -> out, buffer                   key_padding_mask, past) -> out, past + new
    mask: ReduceSum/Sub/Cast, Shape/Cast/Squeeze       mask: Cast(attention_mask, int32)

``shared_to_concat`` turns the first into the second, node for node as the builder writes it, so a bundle
exported with the default layout packages for transformers.js without its checkpoint. onnx and onnxruntime
have no pass between the two attention kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegpt import contract
from edgegpt.errors import BundleError
from edgegpt.graph.passes import topological_sort

MS = "com.microsoft"
MASK_INT32, MASK_CAST = "/model/mask/int32", "/model/mask/Cast"
# GroupQueryAttention attributes the concat graph has no use for, or that only the int8 cache sets
DROPPED, REFUSED = {"num_heads", "kv_num_heads", "scale"}, {"k_quant_type", "v_quant_type", "kv_cache_bit_width"}


def shared_to_concat(model: onnx.ModelProto) -> int:
    """Rewrite a fused shared-KV graph (loaded with or without its external data) to the concat layout in place;
    returns the layers rewritten. Raises BundleError for a graph export/fused.py did not write this way."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not gqa or any(n.op_type == "If" for n in g.node):
        raise BundleError("the graph has no plain GroupQueryAttention layers (an int8 KV cache, or not a shared-KV "
                          "export): package the fp32 bundle of `edgegpt export`")
    new_nodes, dropped = {}, set()
    for node in gqa:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        add = producers.get(node.input[0])
        if (set(attrs) - DROPPED or set(attrs) & REFUSED or add is None or add.op_type != "Add"
                or add.input[1] not in inits or attrs.get("num_heads") != attrs.get("kv_num_heads")):
            raise BundleError(f"{node.name} is not the attention export/fused.py writes; re-export the bundle")
        qkv, bias = add.input
        width = int(np.prod(inits[bias].dims)) // 3
        h = node.name.rsplit("/attn/", 1)[0]
        sizes = f"{h}/attn/split_sizes"
        g.initializer.append(numpy_helper.from_array(np.array([width] * 3, np.int64), sizes))
        q, k, v = f"{h}/attn/q", f"{h}/attn/k", f"{h}/attn/v"
        extra = {"scale": attrs["scale"]} if "scale" in attrs else {}
        new_nodes[node.name] = [
            helper.make_node("Split", [qkv, sizes], [q, k, v], f"{h}/attn/Split", domain="", axis=-1),
            helper.make_node("MultiHeadAttention", [q, k, v, bias, MASK_INT32, "", node.input[3], node.input[4]],
                             list(node.output), f"{h}/attn/MultiHeadAttention", domain=MS,
                             num_heads=attrs["num_heads"], unidirectional=1, **extra)]
        dropped.add(add.name)
    nodes = [helper.make_node("Cast", [contract.ATTENTION_MASK], [MASK_INT32], MASK_CAST, domain="",
                              to=TensorProto.INT32)]
    for n in g.node:
        if n.name not in dropped:
            nodes.extend(new_nodes.get(n.name, [n]))
    del g.node[:]
    g.node.extend(_live(nodes, {o.name for o in g.output}))
    used = {i for n in g.node for i in n.input} | {i.name for i in g.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    produced = {o for n in g.node for o in n.output}
    stale = [v for v in g.value_info if v.name not in produced]  # the removed nodes' inferred shapes
    for v in stale:
        g.value_info.remove(v)
    for value in list(g.input) + list(g.output):  # kv_slots -> past_sequence_length (+ sequence_length)
        if contract.is_kv(value.name):
            dim = value.type.tensor_type.shape.dim[2]
            dim.dim_param = contract.PAST if value.name.startswith(contract.PAST_PREFIX) else contract.TOTAL
    topological_sort(model)
    return len(gqa)


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes something still reads (the shared layout's length arithmetic is left unread)."""
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        alive = [n for n in nodes if any(o in read for o in n.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive
