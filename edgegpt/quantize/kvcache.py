"""An int8 KV cache for shared-buffer bundles (GroupQueryAttention), with calibrated scales.

onnxruntime's GroupQueryAttention can keep its cache in int8 (``k_quant_type`` / ``v_quant_type``
PER_CHANNEL, ``kv_cache_bit_width`` 8) while the graph stays fp32: the kernel quantizes each new
K/V row into the in-place buffer and reads the cache back through per-channel scales. A decode
step then reads a quarter of the fp32 cache's bytes, which is what long contexts pay for: on the
GPT-2 small shape with an 896-token prompt (W2) the cache is 75 MB per step in fp32.

The scales are static (one per head and channel, for K and V of every layer), so they are
calibrated here: the fp32 source bundle runs over calibration text and the largest magnitude
each channel reaches, times a safety margin, maps to 127. The runtime treats the cache as opaque
bytes of the manifest's dtype; nothing outside the kernel reads it.

The kernel's attention over an int8 cache is slow at prefill (5x fp32's at 896 tokens), so a first
prefill, into an empty cache, takes an fp32 path instead (``_fp32_prefill``): TTFT is that of the
fp32 cache. Strided perplexity only ever prefills an empty cache, so ``quantize`` also records the
KL along the decode path (``quality.decode_path``), where the int8 cache is read back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegpt import contract
from edgegpt.errors import QuantizeError
from edgegpt.graph.io import save_graph

MARGIN = 1.25  # headroom over the calibrated max: prompts unlike the calibration text saturate later
GQA_K_SCALE, GQA_V_SCALE = 12, 13  # GroupQueryAttention input slots


def calibrate(bundle: str | Path, text: str, *, windows: int = 8, window: int = 256,
              margin: float = MARGIN) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-layer, per-head, per-channel K and V scales (n_layer, n_head, head_dim) from the fp32
    shared-KV ``bundle`` run over ``text``; returns (k_scale, v_scale, tokens seen)."""
    from edgegpt.quantize.calibration import calibration_windows
    from edgegpt.runtime.session import ModelSession

    s = ModelSession(bundle)  # quantize_bundle has checked that it keeps a shared buffer
    chunks = calibration_windows(bundle, text, windows=windows, window=window, max_context=s.max_context)
    k_max = np.zeros((s.n_layer, s.n_head, s.head_dim), np.float32)
    v_max = np.zeros_like(k_max)
    for chunk in chunks:
        cache = s.start(1, slots=len(chunk))
        x = chunk[None]
        cache.step(x, np.ones_like(x), np.arange(len(chunk), dtype=np.int64)[None])
        for i in range(s.n_layer):  # shared buffers: (1, H, slots, D), filled in place
            k_max[i] = np.maximum(k_max[i], np.abs(cache.past[2 * i].numpy()[0]).max(axis=1))
            v_max[i] = np.maximum(v_max[i], np.abs(cache.past[2 * i + 1].numpy()[0]).max(axis=1))
    floor = 1e-6  # a channel that never moved still needs a positive scale
    return (np.maximum(k_max, floor) * margin / 127, np.maximum(v_max, floor) * margin / 127,
            sum(len(c) for c in chunks))


def apply_int8_kv(path: str | Path, k_scale: np.ndarray, v_scale: np.ndarray) -> int:
    """Rewrite model.onnx at ``path`` in place: every GroupQueryAttention keeps an int8 cache with
    the given scales, and the past/present graph IO becomes int8. Returns the nodes rewritten."""
    model = onnx.load(str(path))
    n_layer = k_scale.shape[0]
    done = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        past_key = node.input[3]
        if not past_key.startswith(contract.PAST_PREFIX):
            raise QuantizeError(f"unexpected GroupQueryAttention input {past_key!r}; re-export the bundle")
        i = int(past_key.split(".")[1])
        if any(a.name in ("k_quant_type", "kv_cache_bit_width") for a in node.attribute):
            raise QuantizeError("this graph's KV cache is already quantized")
        ks, vs = f"/model/layers.{i}/attn/k_scale", f"/model/layers.{i}/attn/v_scale"
        model.graph.initializer.extend([numpy_helper.from_array(k_scale[i][:, None, :].astype(np.float32), ks),
                                        numpy_helper.from_array(v_scale[i][:, None, :].astype(np.float32), vs)])
        inputs = list(node.input) + [""] * (GQA_V_SCALE + 1 - len(node.input))
        inputs[GQA_K_SCALE], inputs[GQA_V_SCALE] = ks, vs
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        done += 1
    if done != n_layer:
        raise QuantizeError(f"found {done} GroupQueryAttention nodes for {n_layer} layers; an int8 KV cache needs a "
                            f"bundle exported with --kv-cache shared")
    _fp32_prefill(model)
    names = set(contract.past_names(n_layer)) | set(contract.present_names(n_layer))
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in names:
            value.type.tensor_type.elem_type = TensorProto.INT8
    save_graph(model, path)
    return done


def _fp32_prefill(model: onnx.ModelProto) -> None:
    """Route a first prefill (an empty cache) around the int8 kernel, in place.

    onnxruntime's GroupQueryAttention over an int8 cache is slow at prefill (9.9 vs 51 ms per layer
    for 896 tokens of GPT-2 small). With nothing in the cache yet, attention needs only the prompt's
    own K/V, so each layer becomes If(the cache is empty): then fp32 GroupQueryAttention without a
    past, whose K/V are quantized with the same scales and padded into the buffer; else the int8
    kernel (decode steps, and prompts that continue a cache). onnxruntime hands the bound in-place
    buffers through If to the kernel, so a decode step costs ~3 us more per layer, not a copy.
    """
    nodes = list(model.graph.node)
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    first = gqa[0]
    total = first.input[6]  # int32 scalar: tokens in the cache after this step
    p = "/model/kv8"
    shared = [
        helper.make_node("Shape", [contract.INPUT_IDS], [f"{p}/S64"], f"{p}/ShapeS", start=1, end=2),
        helper.make_node("Cast", [f"{p}/S64"], [f"{p}/S32"], f"{p}/CastS", to=TensorProto.INT32),
        helper.make_node("Squeeze", [f"{p}/S32"], [f"{p}/S"], f"{p}/SqueezeS"),
        helper.make_node("Equal", [f"{p}/S", total], [f"{p}/empty"], f"{p}/Empty"),
        helper.make_node("Shape", [first.input[3]], [f"{p}/slots"], f"{p}/ShapeSlots", start=2, end=3),
        helper.make_node("Sub", [f"{p}/slots", f"{p}/S64"], [f"{p}/free"], f"{p}/Free"),
        helper.make_node("Concat", [f"{p}/zeros6", f"{p}/free", f"{p}/zero1"], [f"{p}/pads"], f"{p}/Pads", axis=0),
    ]
    model.graph.initializer.extend([numpy_helper.from_array(np.zeros(6, np.int64), f"{p}/zeros6"),
                                    numpy_helper.from_array(np.zeros(1, np.int64), f"{p}/zero1"),
                                    numpy_helper.from_array(np.array(-128, np.float32), f"{p}/qmin"),
                                    numpy_helper.from_array(np.array(127, np.float32), f"{p}/qmax")])
    replaced = {}
    for node in gqa:
        name = node.name
        attrs = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
        out, k_out, v_out = node.output
        ks, vs = node.input[GQA_K_SCALE], node.input[GQA_V_SCALE]
        t = f"{name}/prefill"
        fp32 = helper.make_node("GroupQueryAttention", [node.input[0], "", "", "", "", node.input[5], node.input[6]],
                                [f"{t}/out", f"{t}/k", f"{t}/v"], f"{t}/GroupQueryAttention", domain=node.domain)
        fp32.attribute.extend(attrs)
        then_nodes = [fp32]
        for kind, scale in (("k", ks), ("v", vs)):
            x = f"{t}/{kind}"
            then_nodes += [
                helper.make_node("Div", [x, scale], [f"{x}/scaled"], f"{x}/Div"),
                helper.make_node("Round", [f"{x}/scaled"], [f"{x}/rounded"], f"{x}/Round"),
                helper.make_node("Clip", [f"{x}/rounded", f"{p}/qmin", f"{p}/qmax"], [f"{x}/clipped"], f"{x}/Clip"),
                helper.make_node("Cast", [f"{x}/clipped"], [f"{x}/q"], f"{x}/Cast", to=TensorProto.INT8),
                helper.make_node("Pad", [f"{x}/q", f"{p}/pads"], [f"{x}/buffer"], f"{x}/Pad"),
            ]
        then_g = helper.make_graph(then_nodes, f"{t}/then", [], [
            helper.make_tensor_value_info(f"{t}/out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{t}/k/buffer", TensorProto.INT8, None),
            helper.make_tensor_value_info(f"{t}/v/buffer", TensorProto.INT8, None)])
        e = f"{name}/decode"
        int8 = helper.make_node("GroupQueryAttention", list(node.input), [f"{e}/out", f"{e}/k", f"{e}/v"],
                                f"{e}/GroupQueryAttention", domain=node.domain)
        int8.attribute.extend(node.attribute)
        else_g = helper.make_graph([int8], f"{e}/else", [], [
            helper.make_tensor_value_info(f"{e}/out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{e}/k", TensorProto.INT8, None),
            helper.make_tensor_value_info(f"{e}/v", TensorProto.INT8, None)])
        replaced[name] = helper.make_node("If", [f"{p}/empty"], [out, k_out, v_out], f"{name}/If",
                                          then_branch=then_g, else_branch=else_g)
    new_nodes = []
    for n in nodes:
        if n.name == first.name:
            new_nodes += shared
        new_nodes.append(replaced.get(n.name, n) if n.op_type == "GroupQueryAttention" else n)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
