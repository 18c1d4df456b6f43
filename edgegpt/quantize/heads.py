"""The tied LM head and the token embedding, as the precision recipes and the screened head share them.

GPT-2 ties its LM head to the token embedding (one (vocab, n_embd) table read by a Gather and by a
Gemm(transB=1)). A recipe that quantizes the head first gives it a copy of its own (graph.passes.
untie_lm_head); ``finish_head`` then either quantizes that copy to 8 bits or ties it back, and
``store_embedding`` stores the table the Gather reads in int8 / int4 blocks: the head's own blocks when
both have the same precision (one copy of the table in the file, as a tied GGUF has), a copy otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegpt.errors import QuantizeError
from edgegpt.graph.io import load_graph, save_graph
from edgegpt.graph.passes import LM_HEAD_WEIGHT_T, embedding_name, replace_node, tie_lm_head, untie_lm_head

# The 8-bit LM head (int4 recipe, and the screened fp32 head's approximation) in blocks of 128: W1 decode
# 1.10-1.12x and 34 MB less RSS than block 32 for int8 on the GPT-2 small shape; the 768 x 50257 head alone
# runs 1.30 ms vs 1.38 (block 64) and 1.55 (block 256).
HEAD_BLOCK = 128
# The int8 recipe's head (and so its shared embedding table) in blocks of 64: KL to fp32 along 8 decode paths
# 0.88x and 0.83x, windowed 0.93x and 0.90x block 128's on the pydoc and code models of docs/quantization.md;
# W1 decode 1.00x, TTFT 1.07x (every position's logits) and a 2% larger bundle at GPT-2 small's shape.
INT8_HEAD_BLOCK = 64
# One fp32 scale per 32 values along the embedding axis.
EMBEDDING_BLOCK = 32
HEAD_PRECISIONS = ("fp32", "int8", "int4")


def load_untied(src: Path) -> tuple[onnx.ModelProto, Optional[str]]:
    """The graph with its LM head as a MatMul of its own (None when it has no tied head)."""
    model = load_graph(src)
    return model, untie_lm_head(model)


def finish_head(path: Path, head: Optional[str], precision: str, *, accuracy_level: int = 4,
                block_size: int = HEAD_BLOCK) -> None:
    """The untied head after the body was quantized, in place: an 8-bit MatMulNBits in blocks of ``block_size``
    (int8), tied back to the embedding (fp32), or left as the body's quantizer wrote it (int4)."""
    if head is None or precision == "int4":
        return
    model = onnx.load(str(path))
    if precision == "fp32":
        tie_lm_head(model, embedding_name(model))
        save_graph(model, path)
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # nodes_to_exclude, not nodes_to_include: the quantizer takes every MatMul of its op types in addition
    # to the included ones, so only excluding the rest keeps a float body float
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head]
    q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level or None, nodes_to_exclude=others)
    q.process()
    save_graph(q.model.model, path)


def resolve_embedding(embedding: str, lm_head: str) -> str:
    """The embedding precision to use: auto is int8 (GatherBlockQuantized) once the head has its own
    quantized weights, fp32 when the fp32 head still reads the shared table."""
    if embedding == "auto":
        return "fp32" if lm_head == "fp32" else "int8"
    if embedding != "fp32" and lm_head == "fp32":
        raise QuantizeError("a quantized embedding needs a quantized LM head (the fp32 head reads the embedding "
                            "table itself): pass --lm-head int8 or --embedding fp32")
    return embedding


def store_embedding(path: Path, precision: str, head_precision: str, head_scale: Optional[np.ndarray] = None) -> str:
    """The token embedding at ``precision``, in place: read from the quantized head's own blocks when the
    head has that precision (returns "shared"), else as a blocked copy of its own (returns "copy").
    ``head_scale``: the per-channel factors smoothing multiplied the head's weight rows by (quantize.smooth),
    which the shared rows are divided by again."""
    if precision == "fp32":
        return "fp32"
    if precision == head_precision and share_head_table(path, head_scale):
        return "shared"
    quantize_embedding(path, precision)
    return "copy"


def share_head_table(path: Path, head_scale: Optional[np.ndarray] = None) -> bool:
    """Replace the token-embedding Gather with GatherBlockQuantized over the LM head's MatMulNBits weights, in
    place; False (nothing changed) when the graph has no such head.

    MatMulNBits stores B as (vocab, n_embd / block, block bytes): row v is token v's embedding in blocks along
    n_embd, which is exactly GatherBlockQuantized's layout for data of rank 3 with quantize_axis 2. So the
    Gather reads the head's bytes (an (n, blocks, block) output, reshaped to n_embd) and only the scales and
    zero points (1/block of the table) are stored twice, in the shapes each op wants. onnxruntime has no
    pass that shares a table between the two ops (its quantizers write one copy each).
    """
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    head = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] in inits
                 and n.input[1].startswith(LM_HEAD_WEIGHT_T)), None)
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and n.input[0].endswith("transformer.wte.weight")), None)
    if head is None or gather is None:
        return False
    attrs = {a.name: a.i for a in head.attribute}
    bits, block, K, N = attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]
    table = inits[gather.input[0]]
    if list(table.dims) != [N, K] or any(gather.input[0] in n.input for n in model.graph.node if n is not gather):
        return False
    blocks = -(-K // block)  # the quantizer pads n_embd with zeros to whole blocks
    scales = numpy_helper.to_array(inits[head.input[2]]).astype(np.float32).reshape(N, blocks, 1)
    if len(head.input) > 3 and head.input[3]:
        zp = numpy_helper.to_array(inits[head.input[3]]).reshape(N, -1)
        if bits == 4:  # two blocks' zero points per byte, low nibble first
            zp = np.stack([zp & 0x0F, zp >> 4], -1).reshape(N, -1)[:, :blocks]
        zp = zp[:, :blocks].astype(np.uint8)
    else:  # MatMulNBits' default zero point
        zp = np.full((N, blocks), 2 ** (bits - 1), np.uint8)
    name = gather.input[0]
    model.graph.initializer.remove(table)
    model.graph.initializer.extend([numpy_helper.from_array(scales, name + ".scale"),
                                    numpy_helper.from_array(zp.reshape(N, blocks, 1), name + ".zero_point")])
    out = gather.output[0]
    unscaled = out if head_scale is None else out + "_smoothed"
    rows = unscaled if blocks * block == K else out + "_padded"
    nodes = [
        helper.make_node("GatherBlockQuantized", [head.input[1], gather.input[1], name + ".scale", name + ".zero_point"],
                         [out + "_blocks"], name=gather.name + "BlockQuantized", domain="com.microsoft",
                         block_size=block, gather_axis=0, quantize_axis=2, bits=bits),
        # the index tensor's shape + [width]: with fixed input shapes this folds to a constant
        helper.make_node("Shape", [gather.input[1]], [out + "_ids_shape"], name=gather.name + "/IdsShape"),
        helper.make_node("Concat", [out + "_ids_shape", name + ".width"], [out + "_shape"], name=gather.name + "/Shape",
                         axis=0),
        helper.make_node("Reshape", [out + "_blocks", out + "_shape"], [rows], name=gather.name + "/Rows"),
    ]
    model.graph.initializer.append(numpy_helper.from_array(np.array([blocks * block], np.int64), name + ".width"))
    if rows != unscaled:  # drop the padding
        model.graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), name + suffix)
                                        for v, suffix in ((0, ".start"), (K, ".end"), (-1, ".axis"))])
        nodes.append(helper.make_node("Slice", [rows, name + ".start", name + ".end", name + ".axis"], [unscaled],
                                      name=gather.name + "/Unpad"))
    if unscaled != out:  # the head's rows carry smoothing's factors; the embedding does not
        model.graph.initializer.append(numpy_helper.from_array((1.0 / head_scale).astype(np.float32), name + ".unsmooth"))
        nodes.append(helper.make_node("Mul", [unscaled, name + ".unsmooth"], [out], name=gather.name + "/Unsmooth"))
    # onnx's shape inference cannot see through the contrib op: declare the new tensors' shapes (the index
    # dims, symbolic or fixed, then the row layout), so that fixed-shape graphs stay fully static
    ids = next((i for i in model.graph.input if i.name == gather.input[1]), None)
    if ids is not None:
        dims = [d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim]
        shapes = {out + "_blocks": dims + [blocks, block], rows: dims + [blocks * block], unscaled: dims + [K]}
        model.graph.value_info.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, shape)
                                      for t, shape in shapes.items() if t != out)
    replace_node(model, gather, nodes)
    save_graph(model, path)
    return True


def quantize_embedding(path: Path, precision: str) -> None:
    """Replace the token-embedding Gather with GatherBlockQuantized over a blocked int8 / int4 copy
    of the table (symmetric, one fp32 scale per EMBEDDING_BLOCK values along the embedding axis), in place.

    A decode step reads one row of this table, so this is about size and memory (GPT-2 small's
    fp32 table is 154 MB, 44% of an int4 bundle), not speed. Only valid once the LM head has its
    own weights (untied), which is checked here.
    """
    if precision == "fp32":
        return
    bits = 8 if precision == "int8" else 4
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and n.input[0].endswith("transformer.wte.weight")), None)
    if gather is None:
        raise QuantizeError("found no token-embedding Gather on transformer.wte.weight to quantize")
    if any(gather.input[0] in n.input for n in model.graph.node if n is not gather):
        raise QuantizeError("the embedding table is still read by the LM head; untie the head first (--lm-head int8)")
    w = numpy_helper.to_array(inits[gather.input[0]]).astype(np.float32)
    V, C = w.shape
    if C % EMBEDDING_BLOCK:
        raise QuantizeError(f"n_embd={C} is not a multiple of {EMBEDDING_BLOCK}; pass --embedding fp32")
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(V, C // EMBEDDING_BLOCK, EMBEDDING_BLOCK)
    scale = np.maximum(np.abs(blocks).max(-1), 1e-12) / qmax  # (V, C / block)
    q = np.clip(np.round(blocks / scale[..., None]), -qmax - 1, qmax).astype(np.int16).reshape(V, C)
    name = gather.input[0]
    if bits == 8:  # uint8 with an explicit zero point of 128
        data = (q + 128).astype(np.uint8)
        extra = [numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), name + ".zero_point")]
    else:  # two 4-bit values per byte, low nibble first; the default zero point is 8
        u = (q + 8).astype(np.uint8)
        data = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
        extra = []
    model.graph.initializer.remove(inits[name])
    model.graph.initializer.extend([numpy_helper.from_array(data, name + ".q"),
                                    numpy_helper.from_array(scale.astype(np.float32), name + ".scale"), *extra])
    inputs = [name + ".q", gather.input[1], name + ".scale"] + ([name + ".zero_point"] if extra else [])
    node = helper.make_node("GatherBlockQuantized", inputs, list(gather.output), name=gather.name + "BlockQuantized",
                            domain="com.microsoft", block_size=EMBEDDING_BLOCK, gather_axis=0, quantize_axis=1,
                            bits=bits)
    replace_node(model, gather, [node])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_graph(model, path)
