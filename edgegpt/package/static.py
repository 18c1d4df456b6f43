"""Static-shape graphs an accelerator can take whole: a fixed decode step and prefill buckets.

Each is the package's dynamic graph (its precision already applied) rewritten to the static contract in
edgegpt/contract.py, then given fixed dimensions and constant-folded by onnxruntime:
- the mask arithmetic (Cast, Range, LessOrEqual, And, Where) becomes one Add of an ``attention_bias`` input
  the app builds, so no boolean op or Where is left (NNAPI has neither);
- the cache is a buffer of P slots the app owns; the graph returns only the S new key/value rows;
- a prefill bucket computes the LM head for its last row only (prompts are left-padded into the bucket);
- per accelerator: NNAPI gets int32 token and position ids (its Gather needs int32 indices unless they are
  constant) and LayerNormalization written as ReduceMean / Sub / Mul / Add / Sqrt / Div (NNAPI has no
  LayerNormalization); CoreML (ML Program) gets the embedding lookups as GatherND (it has no Gather).
onnx's and onnxruntime's tools fix dimensions and fold constants; none rewrites a mask into a bias or
decomposes LayerNormalization, so those two passes are written here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegpt import contract
from edgegpt.errors import PackageError
from edgegpt.graph.io import load_graph, ort_optimize
from edgegpt.graph.passes import replace_node

# What the app writes into attention_bias for a hidden key. Finite, so a row with every key hidden (a
# padding row) softmaxes to uniform instead of NaN; small enough that exp() of a hidden score is exactly 0.
MASK_VALUE = {TensorProto.FLOAT: -1e9, TensorProto.FLOAT16: -3e4}
ACCELERATORS = ("nnapi", "coreml")


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _depends_on(model: onnx.ModelProto, tensor: str, source: str) -> bool:
    prod, seen, todo = _producers(model), set(), [tensor]
    while todo:
        t = todo.pop()
        if t == source:
            return True
        if t in seen or t not in prod:
            continue
        seen.add(t)
        todo.extend(prod[t].input)
    return False


def _mask_to_bias(model: onnx.ModelProto, kv_type: int) -> int:
    """Where(mask, scores, min) -> Add(scores, attention_bias). Returns how many were rewritten."""
    inits = {t.name for t in model.graph.initializer}
    n = 0
    for node in list(model.graph.node):
        if node.op_type != "Where" or not _depends_on(model, node.input[0], contract.ATTENTION_MASK):
            continue
        scores = [x for x in node.input[1:] if x not in inits]
        if len(scores) != 1:
            raise PackageError(f"the attention mask's Where node {node.name!r} has no single scores input")
        replace_node(model, node, [helper.make_node("Add", [scores[0], contract.ATTENTION_BIAS], list(node.output),
                                                    name=f"{node.name}/bias")])
        n += 1
    if not n:
        raise PackageError("no attention-mask Where node found: static graphs need an `edgegpt export --graph "
                           "traced` bundle")
    model.graph.input.append(helper.make_tensor_value_info(contract.ATTENTION_BIAS, kv_type, None))
    return n


def _new_kv_outputs(model: onnx.ModelProto, n_layer: int) -> None:
    """present.* = Concat(past, new) -> outputs new_key_values.* = new (the Concat stays inside)."""
    prod = _producers(model)
    outs = {o.name: o for o in model.graph.output}
    for present, new in zip(contract.present_names(n_layer), contract.new_kv_names(n_layer)):
        concat = prod.get(present)
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            raise PackageError(f"{present} is not Concat(past, new): static graphs need a concat-cache bundle")
        elem = outs[present].type.tensor_type.elem_type
        model.graph.output.remove(outs[present])
        old = concat.input[1]
        for n in model.graph.node:  # the new rows' tensor takes the output's name
            n.input[:] = [new if x == old else x for x in n.input]
            n.output[:] = [new if x == old else x for x in n.output]
        model.graph.output.append(helper.make_tensor_value_info(new, elem, None))


def _last_row_only(model: onnx.ModelProto) -> None:
    """Slice the final LayerNormalization's input to the last row: the LM head runs once per prefill."""
    prod = _producers(model)
    node, todo = None, [contract.LOGITS]
    while todo:  # walk back from the logits to the first LayerNormalization
        n = prod.get(todo.pop())
        if n is None:
            continue
        if n.op_type == "LayerNormalization":
            node = n
            break
        todo.extend(n.input)
    if node is None:
        raise PackageError("no final LayerNormalization before the logits")
    name = node.name or "ln_f"
    consts = [numpy_helper.from_array(np.array(v, np.int64), f"{name}/last_row/{k}")
              for k, v in (("starts", [-1]), ("ends", [np.iinfo(np.int64).max]), ("axes", [1]))]
    model.graph.initializer.extend(consts)
    sliced = f"{name}/last_row"
    idx = list(model.graph.node).index(node)
    model.graph.node.insert(idx, helper.make_node("Slice", [node.input[0], *[c.name for c in consts]], [sliced],
                                                  name=sliced))
    node.input[0] = sliced


def _decompose_layernorm(model: onnx.ModelProto) -> None:
    """LayerNormalization(x, g, b) over the last axis -> (x - mean) / sqrt(var + eps) * g + b."""
    for node in [n for n in model.graph.node if n.op_type == "LayerNormalization"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1 or len(node.output) > 1 and any(node.output[1:]):
            raise PackageError(f"LayerNormalization {node.name!r} is not over the last axis alone")
        g_type = next(t.data_type for t in model.graph.initializer if t.name == node.input[1])
        p = f"{node.name}/decomposed"
        eps = numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), helper.tensor_dtype_to_np_dtype(g_type)),
                                      f"{p}/eps")
        model.graph.initializer.append(eps)
        x, out = node.input[0], node.output[0]
        nodes = [helper.make_node("ReduceMean", [x], [f"{p}/mean"], axes=[-1], keepdims=1),
                 helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/d"]),
                 helper.make_node("Mul", [f"{p}/d", f"{p}/d"], [f"{p}/d2"]),
                 helper.make_node("ReduceMean", [f"{p}/d2"], [f"{p}/var"], axes=[-1], keepdims=1),
                 helper.make_node("Add", [f"{p}/var", eps.name], [f"{p}/var_eps"]),
                 helper.make_node("Sqrt", [f"{p}/var_eps"], [f"{p}/std"]),
                 helper.make_node("Div", [f"{p}/d", f"{p}/std"], [f"{p}/norm"]),
                 helper.make_node("Mul", [f"{p}/norm", node.input[1]], [f"{p}/scaled"]),
                 helper.make_node("Add", [f"{p}/scaled", node.input[2]], [out])]
        for k, n in enumerate(nodes):
            n.name = f"{p}/{k}"
        replace_node(model, node, nodes)


def _ids_for(model: onnx.ModelProto, accelerator: str) -> None:
    """NNAPI: int32 ids for the embedding Gathers. CoreML: GatherND over the ids with a trailing axis."""
    ids = {contract.INPUT_IDS, contract.POSITION_IDS}
    for node in list(model.graph.node):
        if node.op_type != "Gather" or node.input[1] not in ids:
            continue
        if accelerator == "coreml":
            col = f"{node.input[1]}/as_indices"
            axes = numpy_helper.from_array(np.array([-1], np.int64), f"{col}/axes")
            model.graph.initializer.append(axes)
            replace_node(model, node, [helper.make_node("Unsqueeze", [node.input[1], axes.name], [col]),
                                       helper.make_node("GatherND", [node.input[0], col], list(node.output),
                                                        name=f"{node.name}/nd")])
    if accelerator == "nnapi":
        for vi in model.graph.input:
            if vi.name in ids:
                vi.type.tensor_type.elem_type = TensorProto.INT32


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes no output needs, then the inputs and initializers nothing reads."""
    prod, live, todo = _producers(model), set(), [o.name for o in model.graph.output]
    while todo:
        t = todo.pop()
        if t in live:
            continue
        live.add(t)
        if t in prod:
            todo.extend(x for x in prod[t].input if x)
    keep = [n for n in model.graph.node if any(o in live for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {x for n in keep for x in n.input} | {o.name for o in model.graph.output}
    for vi in [vi for vi in model.graph.input if vi.name not in used]:
        model.graph.input.remove(vi)
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
    del model.graph.value_info[:]


def static_graph(src: Path, dst: Path, *, seq: int, past: int, n_layer: int, accelerator: str,
                 fp16: bool = False) -> dict:
    """Write the static graph of ``src`` for ``seq`` new rows over a ``past``-slot cache, converted to fp16
    after its shapes are fixed and folded when ``fp16`` (folding the fp16 graph's Casts would store fp32
    copies of the weights). Returns its contract."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    if accelerator not in ACCELERATORS:
        raise PackageError(f"static graphs are made for {', '.join(ACCELERATORS)}, not {accelerator!r}")
    model = load_graph(src)
    kv_type = next(i.type.tensor_type.elem_type for i in model.graph.input
                   if i.name == contract.PAST_KEY.format(0))
    _mask_to_bias(model, kv_type)
    _new_kv_outputs(model, n_layer)
    if seq > 1:
        _last_row_only(model)
    _ids_for(model, accelerator)
    if accelerator == "nnapi":
        _decompose_layernorm(model)
    _prune(model)
    bias = next(i for i in model.graph.input if i.name == contract.ATTENTION_BIAS)
    bias.type.tensor_type.CopyFrom(helper.make_tensor_type_proto(kv_type, [1, 1, seq, past + seq]).tensor_type)
    for param, value in ((contract.BATCH, 1), (contract.SEQ, seq), (contract.PAST, past),
                         (contract.TOTAL, past + seq)):
        make_dim_param_fixed(model.graph, param, value)
    past_shape = next(i for i in model.graph.input if i.name == contract.PAST_KEY.format(0)).type.tensor_type.shape
    heads, head_dim = (d.dim_value for d in (past_shape.dim[1], past_shape.dim[3]))
    for o in model.graph.output:  # logits [1, 1, V]; new rows [1, H, S, D]
        dims = [1, 1, o.type.tensor_type.shape.dim[2].dim_value] if o.name == contract.LOGITS else \
            [1, heads, seq, head_dim]
        o.type.tensor_type.shape.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, dims).tensor_type.shape)
    staged = dst.with_name(dst.stem + ".unfolded.onnx")
    onnx.save_model(model, str(staged))
    try:
        ort_optimize(staged, dst)  # with every shape static, the shape arithmetic folds into constants
    finally:
        staged.unlink(missing_ok=True)
    folded = load_graph(dst)
    if fp16:
        from edgegpt.quantize.recipes.fp16 import convert

        folded, kv_type = convert(folded), TensorProto.FLOAT16
    # every tensor's shape, contrib ops' outputs too (onnx's inference stops at them), so a checker or an
    # accelerator's compiler sees a static graph throughout
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    onnx.save_model(SymbolicShapeInference.infer_shapes(folded, auto_merge=True), str(dst))
    ids_dtype = "int32" if accelerator == "nnapi" else "int64"
    return {"sequence_length": seq, "past_slots": past, "ids_dtype": ids_dtype,
            "kv_dtype": helper.tensor_dtype_to_np_dtype(kv_type).name, "mask_value": MASK_VALUE[kv_type]}
