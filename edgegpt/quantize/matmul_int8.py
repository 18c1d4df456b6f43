"""The block MatMuls in int8 as onnxruntime's quantize_dynamic writes them, one weight at a time.

quantize_dynamic (IntegerOps, per channel, MatMulConstBOnly) turns ``y = x W`` into DynamicQuantizeLinear(x)
-> MatMulInteger(x_q, W_q, x_zp, W_zp) -> Cast -> Mul(x_scale * W_scale), with W symmetric int8 per output
channel; onnxruntime fuses the chain into DynamicQuantizeMatMul at session start. It holds the whole fp32
model several times while doing so (its shape-inference save-and-reload, then every fp32 weight beside its
int8 copy until the end): 3.3x GPT-2 large's 3.1 GB of weights at the peak of `edgegpt quantize`. Here the
graph is read without its weights, each weight is read from the data file, quantized by onnxruntime's own
``quantize_data`` (so its values are quantize_dynamic's, bit for bit) and dropped, and only the int8 weights
and the few fp32 tensors left (embedding, head, norms, biases) are in memory at the end. onnxruntime's
quantizer has no such streaming mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegpt.graph.io import load_graph, save_rewritten
from edgegpt.graph.passes import replace_node


def quantize_weight(w: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 weight, fp32 scale per output channel, int8 zero point per channel) of a (K, N) MatMul weight:
    onnxruntime's quantize_data over each column, symmetric, as its per-channel MatMul quantizer calls it."""
    from onnxruntime.quantization.quant_utils import quantize_data

    q = np.empty(w.shape, np.int8)
    scales = np.empty(w.shape[1], np.float32)
    zps = np.empty(w.shape[1], np.int8)
    for j in range(w.shape[1]):
        zp, scale, q[:, j] = quantize_data(w[:, j], onnx.TensorProto.INT8, True, reduce_range=reduce_range)
        scales[j], zps[j] = scale, zp
    return q, scales, zps


def quantize_matmuls(src: Path, dst: Path, names: list[str], *, reduce_range: bool,
                     factors: Optional[dict[str, np.ndarray]] = None) -> None:
    """The graph at ``src`` with the MatMuls named ``names`` (constant B) in dynamic int8, written to ``dst``.
    ``factors``: initializer name -> what its values are multiplied by first (smoothing's migration,
    quantize.smooth), broadcast against them."""
    factors = factors or {}
    model = load_graph(src, load_external_data=False)
    wanted = set(names)
    targets = [n for n in model.graph.node if n.op_type == "MatMul" and n.name in wanted]
    activations: set[str] = set()
    for node in targets:
        x, w = node.input[0], node.input[1]
        new = []
        if x not in activations:  # one DynamicQuantizeLinear per activation, shared by its MatMuls
            new.append(helper.make_node("DynamicQuantizeLinear", [x], [x + "_quantized", x + "_scale",
                                                                      x + "_zero_point"], x + "_QuantizeLinear"))
            activations.add(x)
        base, out = node.name + "_quant", node.output[0]
        new += [
            helper.make_node("MatMulInteger", [x + "_quantized", w + "_quantized", x + "_zero_point",
                                               w + "_zero_point"], [out + "_output_quantized"], base),
            helper.make_node("Cast", [out + "_output_quantized"], [out + "_output_quantized_cast_output"],
                             out + "_output_quantized_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [x + "_scale", w + "_scale"], [base + "_scales_mul:0"], base + "_scales_mul"),
            helper.make_node("Mul", [out + "_output_quantized_cast_output", base + "_scales_mul:0"], [out],
                             base + "_output_scale_mul"),
        ]
        replace_node(model, node, new)

    def scaled(name: str, values: np.ndarray) -> np.ndarray:
        return (values * factors[name]).astype(values.dtype) if name in factors else values

    def quantized(name: str):
        def rewrite(values: np.ndarray) -> list[onnx.TensorProto]:
            q, scales, zps = quantize_weight(scaled(name, values.astype(np.float32, copy=False)), reduce_range)
            return [numpy_helper.from_array(a, name + suffix)
                    for a, suffix in ((q, "_quantized"), (scales, "_scale"), (zps, "_zero_point"))]
        return rewrite

    def smoothed(name: str):
        return lambda values: [numpy_helper.from_array(scaled(name, values), name)]

    rewrite = {name: smoothed(name) for name in factors}
    rewrite.update({n.input[1]: quantized(n.input[1]) for n in targets})
    save_rewritten(model, Path(src).parent, dst, rewrite)
