"""A fused GPT-2 graph built directly from our weights with onnxruntime's contrib ops.

The onnxruntime-genai builder approach: instead of tracing ~50 small ops per layer and hoping
pattern fusions fire, emit the fused kernels ourselves. Same IO contract as the traced graph,
verified against PyTorch the same way. Per layer:

      x ──────────────────────────────┐ (residual)
      │                               │
   LayerNorm(x + bias + residual) ◀───┘   (Add, Add, LayerNormalization: the sum is the new
      │                                     residual; see _skip_layer_norm for why not SkipLayerNorm)
   MatMul c_attn ─▶ Split q,k,v            (shared KV: + c_attn.b, packed q|k|v, no Split)
      │
   MultiHeadAttention(q, k, v, bias=c_attn.b, key_padding_mask, past_key, past_value)
      │            └──▶ present.{i}.key / .value   (shared KV: GroupQueryAttention in place)
   MatMul c_proj
      │
   LayerNorm(+ c_proj.b, + residual)  ─▶ new residual
      │
   MatMul c_fc ─▶ FastGelu(+ c_fc.b)  (BiasGelu for the erf GELU)
      │
   MatMul mlp.c_proj  ─▶ (next layer's first LayerNorm adds mlp.c_proj.b and the residual)

Attention is causal by absolute position (unidirectional with past, bottom-right aligned) and
masks left padding through key_padding_mask; positions come from the position_ids input.
"""

from __future__ import annotations

from typing import BinaryIO, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegpt import contract
from edgegpt.model.gpt import GPT

MS = "com.microsoft"


class _Graph:
    """Nodes, and the weights written straight into the model's own graph: each is copied once, into the
    protobuf (make_graph(initializer=...) and make_model would each copy all of them again; GPT-2 small's
    export peaked at 5.7x its fp32 weights with three copies alive at once). With ``data``, a weight of
    EXTERNAL_MIN_BYTES or more goes to that file instead as it is made, and the graph only says where
    (onnx's external-data layout, each offset page-aligned as onnxruntime maps them): no copy of the weights
    in memory beside the torch model's (GPT-2 large: export's peak, 2.2x its weights, down to 1.1x)."""

    EXTERNAL_MIN_BYTES = 1024  # onnx's save_model(size_threshold=1024): the same tensors go to the file
    ALIGN = 4096

    def __init__(self, data: Optional[BinaryIO] = None, location: str = ""):
        self.nodes, self.model = [], onnx.ModelProto()
        self.data, self.location = data, location

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if self.data is None or array.nbytes < self.EXTERNAL_MIN_BYTES:
            self.model.graph.initializer.add().CopyFrom(numpy_helper.from_array(array, name))
            return name
        offset = -(-self.data.tell() // self.ALIGN) * self.ALIGN
        self.data.write(b"\0" * (offset - self.data.tell()))
        self.data.write(memoryview(array).cast("B"))
        t = self.model.graph.initializer.add()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL  # onnx's set_external_data wants the bytes in the proto first
        for key, value in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def _skip_layer_norm(g: _Graph, x: str, bias: str, residual: str, gamma: str, beta: str, out: str, prefix: str,
                     eps: float) -> str:
    """out = LayerNorm(x + bias + residual); returns the new residual (the sum). Emitted as two Adds
    and a LayerNormalization rather than com.microsoft.SkipLayerNormalization: onnxruntime 1.31's
    CPU SkipLayerNormalization kernel measured 223 us for a 128 x 768 tensor against 41 us for this
    sequence (4.0 vs 1.7 us at one row), 19% of an int8 prefill. The runtime disables onnxruntime's
    SkipLayerNormFusion on CPU so the sequence is not fused back."""
    g.node("Add", [x, bias], [f"{prefix}/biased"], f"{prefix}/AddBias")
    g.node("Add", [f"{prefix}/biased", residual], [f"{prefix}/residual"], f"{prefix}/AddResidual")
    g.node("LayerNormalization", [f"{prefix}/residual", gamma, beta], [out], f"{prefix}/LayerNorm", epsilon=eps, axis=-1)
    return f"{prefix}/residual"


def build_fused(model: GPT, *, last_logits_only: bool = False, opset: int = 17, shared_kv: bool = False,
                data: Optional[BinaryIO] = None, location: str = "") -> onnx.ModelProto:
    """shared_kv: GroupQueryAttention over a fixed-capacity KV buffer (n_positions slots) that is
    both the past input and the present output: each step writes only its new K/V in place instead
    of copying the whole cache into a fresh present (MultiHeadAttention's concat semantics).
    data, location: the weights go to this open file, which the graph names ``location`` (its external data)."""
    cfg = model.config
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    g = _Graph(data, location)
    n_layer, eps = cfg.n_layer, cfg.layer_norm_epsilon

    wte = g.init("transformer.wte.weight", sd["transformer.wte.weight"])
    wpe = g.init("transformer.wpe.weight", sd["transformer.wpe.weight"])
    g.node("Gather", [wte, contract.INPUT_IDS], ["/model/wte/out"], "/model/wte/Gather")
    g.node("Gather", [wpe, contract.POSITION_IDS], ["/model/wpe/out"], "/model/wpe/Gather")
    g.node("Add", ["/model/wte/out", "/model/wpe/out"], ["/model/embed/out"], "/model/embed/Add")
    if shared_kv:
        # GroupQueryAttention reads lengths, not a mask: seqlens_k = tokens so far - 1, and the total
        # length is the mask's width. Prompts are never padded on this path (the runtime runs
        # prompts of different lengths one at a time).
        g.node("ReduceSum", [contract.ATTENTION_MASK, g.init("/model/mask/axis", np.array([1], np.int64))],
               ["/model/mask/len"], "/model/mask/ReduceSum", keepdims=0)
        g.node("Sub", ["/model/mask/len", g.init("/model/mask/one", np.array(1, np.int64))], ["/model/mask/len_m1"],
               "/model/mask/Sub")
        g.node("Cast", ["/model/mask/len_m1"], ["/model/mask/seqlens_k"], "/model/mask/Cast_seqlens",
               to=TensorProto.INT32)
        g.node("Shape", [contract.ATTENTION_MASK], ["/model/mask/total64"], "/model/mask/Shape", start=1, end=2)
        g.node("Cast", ["/model/mask/total64"], ["/model/mask/total1"], "/model/mask/Cast_total", to=TensorProto.INT32)
        g.node("Squeeze", ["/model/mask/total1"], ["/model/mask/total"], "/model/mask/Squeeze")
    else:
        g.node("Cast", [contract.ATTENTION_MASK], ["/model/mask/int32"], "/model/mask/Cast", to=TensorProto.INT32)
    gelu = "FastGelu" if cfg.activation_function != "gelu" else "BiasGelu"

    def w(name: str) -> np.ndarray:  # nn.Linear (out, in) -> MatMul B (in, out)
        return sd[name].T

    residual, pending_bias = "/model/embed/out", None  # pending: the previous MLP output and its bias
    for i in range(n_layer):
        p, h = f"transformer.h.{i}.", f"/model/layers.{i}"
        ln1_g, ln1_b = g.init(p + "ln_1.weight", sd[p + "ln_1.weight"]), g.init(p + "ln_1.bias", sd[p + "ln_1.bias"])
        if pending_bias is None:
            g.node("LayerNormalization", [residual, ln1_g, ln1_b], [f"{h}/ln_1/out"], f"{h}/ln_1/LayerNorm",
                   epsilon=eps, axis=-1)
        else:
            residual = _skip_layer_norm(g, *pending_bias, residual, ln1_g, ln1_b, f"{h}/ln_1/out", f"{h}/ln_1", eps)
        qkv_w = g.init(p + "attn.c_attn.weight_t", w(p + "attn.c_attn.weight"))
        qkv_b = g.init(p + "attn.c_attn.bias", sd[p + "attn.c_attn.bias"])
        g.node("MatMul", [f"{h}/ln_1/out", qkv_w], [f"{h}/attn/qkv"], f"{h}/attn/c_attn/MatMul")
        qkv = f"{h}/attn/qkv"
        if shared_kv:  # GroupQueryAttention takes no bias input
            g.node("Add", [qkv, qkv_b], [f"{h}/attn/qkv_b"], f"{h}/attn/c_attn/Add")
            qkv = f"{h}/attn/qkv_b"
        present = [f"{h}/attn/out", contract.PRESENT_KEY.format(i), contract.PRESENT_VALUE.format(i)]
        # the kernels' scale attribute defaults to 1/sqrt(head_dim); written only where the config says otherwise
        scale = {} if cfg.default_attn_scale else {"scale": cfg.attn_scale(i)}
        if shared_kv:  # packed QKV: GroupQueryAttention splits q, k, v itself (no Split node)
            g.node("GroupQueryAttention",
                   [qkv, "", "", contract.PAST_KEY.format(i), contract.PAST_VALUE.format(i),
                    "/model/mask/seqlens_k", "/model/mask/total"],
                   present, f"{h}/attn/GroupQueryAttention", domain=MS, num_heads=cfg.n_head, kv_num_heads=cfg.n_head,
                   **scale)
        else:
            split = g.init(f"{h}/attn/split_sizes", np.array([cfg.n_embd] * 3, np.int64))
            g.node("Split", [qkv, split], [f"{h}/attn/q", f"{h}/attn/k", f"{h}/attn/v"], f"{h}/attn/Split", axis=-1)
            g.node("MultiHeadAttention",
                   [f"{h}/attn/q", f"{h}/attn/k", f"{h}/attn/v", qkv_b, "/model/mask/int32", "",
                    contract.PAST_KEY.format(i), contract.PAST_VALUE.format(i)],
                   present, f"{h}/attn/MultiHeadAttention", domain=MS, num_heads=cfg.n_head, unidirectional=1,
                   **scale)
        proj_w = g.init(p + "attn.c_proj.weight_t", w(p + "attn.c_proj.weight"))
        g.node("MatMul", [f"{h}/attn/out", proj_w], [f"{h}/attn/proj"], f"{h}/attn/c_proj/MatMul")
        ln2_g, ln2_b = g.init(p + "ln_2.weight", sd[p + "ln_2.weight"]), g.init(p + "ln_2.bias", sd[p + "ln_2.bias"])
        proj_b = g.init(p + "attn.c_proj.bias", sd[p + "attn.c_proj.bias"])
        residual = _skip_layer_norm(g, f"{h}/attn/proj", proj_b, residual, ln2_g, ln2_b, f"{h}/ln_2/out", f"{h}/ln_2", eps)
        fc_w = g.init(p + "mlp.c_fc.weight_t", w(p + "mlp.c_fc.weight"))
        fc_b = g.init(p + "mlp.c_fc.bias", sd[p + "mlp.c_fc.bias"])
        g.node("MatMul", [f"{h}/ln_2/out", fc_w], [f"{h}/mlp/fc"], f"{h}/mlp/c_fc/MatMul")
        g.node(gelu, [f"{h}/mlp/fc", fc_b], [f"{h}/mlp/act"], f"{h}/mlp/{gelu}", domain=MS)
        out_w = g.init(p + "mlp.c_proj.weight_t", w(p + "mlp.c_proj.weight"))
        g.node("MatMul", [f"{h}/mlp/act", out_w], [f"{h}/mlp/out"], f"{h}/mlp/c_proj/MatMul")
        pending_bias = (f"{h}/mlp/out", g.init(p + "mlp.c_proj.bias", sd[p + "mlp.c_proj.bias"]))

    lnf_g = g.init("transformer.ln_f.weight", sd["transformer.ln_f.weight"])
    lnf_b = g.init("transformer.ln_f.bias", sd["transformer.ln_f.bias"])
    _skip_layer_norm(g, *pending_bias, residual, lnf_g, lnf_b, "/model/ln_f/out", "/model/ln_f", eps)
    hidden = "/model/ln_f/out"
    if last_logits_only:  # (B, T, C) -> (B, 1, C): skip the LM head for every prompt position but the last
        g.node("Slice", [hidden, g.init("/model/last/starts", np.array([-1], np.int64)),
                         g.init("/model/last/ends", np.array([np.iinfo(np.int64).max], np.int64)),
                         g.init("/model/last/axes", np.array([1], np.int64))], ["/model/last/out"], "/model/last/Slice")
        hidden = "/model/last/out"
    else:  # the last logits_to_keep positions (all by default): a prefill for generation asks for one
        keep = g.init(contract.LOGITS_TO_KEEP, np.array([contract.KEEP_ALL_LOGITS], np.int64))
        g.node("Neg", [keep], ["/model/keep/starts"], "/model/keep/Neg")
        g.node("Slice", [hidden, "/model/keep/starts",
                         g.init("/model/keep/ends", np.array([np.iinfo(np.int64).max], np.int64)),
                         g.init("/model/keep/axes", np.array([1], np.int64))], ["/model/keep/out"], "/model/keep/Slice")
        hidden = "/model/keep/out"
    # (B, T, C) -> (B*T, C) -> Gemm with the tied embedding (transB) -> (B, T, V)
    g.node("Shape", [hidden], ["/model/lm_head/shape"], "/model/lm_head/Shape", end=2)
    g.node("Concat", ["/model/lm_head/shape", g.init("/model/lm_head/vocab", np.array([cfg.vocab_size], np.int64))],
           ["/model/lm_head/out_shape"], "/model/lm_head/Concat", axis=0)
    g.node("Reshape", [hidden, g.init("/model/lm_head/flat", np.array([-1, cfg.n_embd], np.int64))],
           ["/model/lm_head/flat_out"], "/model/lm_head/Reshape")
    g.node("Gemm", ["/model/lm_head/flat_out", wte], ["/model/lm_head/logits2d"], "/model/lm_head/Gemm", transB=1)
    g.node("Reshape", ["/model/lm_head/logits2d", "/model/lm_head/out_shape"], [contract.LOGITS],
           "/model/lm_head/Reshape_out")

    spec = contract.io_spec(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size, last_logits_only=last_logits_only,
                            kv_capacity=cfg.n_positions if shared_kv else None)
    types = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}
    inputs = [helper.make_tensor_value_info(x["name"], types[x["dtype"]], x["shape"]) for x in spec["inputs"]]
    outputs = [helper.make_tensor_value_info(x["name"], types[x["dtype"]], x["shape"]) for x in spec["outputs"]]
    model = g.model
    model.graph.name = "edgegpt_gpt2_fused"
    model.graph.node.extend(g.nodes)
    model.graph.input.extend(inputs)
    if not last_logits_only:  # an initializer that is also a graph input: overridable at run time
        model.graph.input.append(helper.make_tensor_value_info(contract.LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    model.graph.output.extend(outputs)
    model.ir_version, model.producer_name = 9, "edgegpt"
    model.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    return model
