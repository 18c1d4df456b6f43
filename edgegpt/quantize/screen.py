"""A screened LM head: the fp32 bundle's logits where they decide the token, read at int8 cost.

GPT-2's tied LM head is 31% of the bytes an fp32 decode step reads (154 of 496 MB for GPT-2 small),
and an fp32 decode step is bandwidth-bound. The screened head reads an 8-bit copy of it instead and
recomputes in fp32 only the tokens that can still win:

    approx  = MatMulNBits(h, 8-bit head)                        (R, V)  38.6 MB read instead of 154
    bound   = a worst-case |fp32 logit - approx| for row h, any token (below)
    keep    = approx >= max(approx) - 2 * bound - margin        (a superset of the possible argmaxes)
    logits  = approx, with keep's tokens replaced by fp32 dot products with the fp32 embedding rows
              (NonZero, Gather, Gemm, GatherElements, ScatterND)

and runs the plain fp32 Gemm instead (If nodes) when the margin is wide (over 10: sampling at a
temperature over 0.4, a repetition penalty), when the graph has more than 8 rows (a prompt's every
position) or when more than 1/16 of the vocabulary is kept.

With margin 0, every token whose fp32 logit could be the largest is recomputed in fp32, so greedy
decoding picks exactly the fp32 bundle's token. The margin is an overridable initializer
(contract.SCREEN_MARGIN): the runtime widens it for sampling and sets it to infinity under a
repetition penalty (runtime.sampling.screen_margin), so those stay exact too. A runtime that never
feeds it (onnxruntime-genai) gets margin 0: exact greedy, the other logits within the bound.
Perplexity, computed over every position of a prompt, runs the fp32 head.

The bound, from the head's weight error E = W - dequant(Q) (known exactly when the head is written)
and the int8 rounding of the activations in MatMulNBits' accuracy_level 4 kernel (per block of the
weights' 128 input channels, round to nearest, scale max|h_b| / 127), summed over those blocks b:

    bound = sum_b |h_b|_2 * max_j |E_jb|_2                     (the weights' error: Cauchy-Schwarz)
          + sum_b max_i |h_bi| * (1/127 + 1e-4) * max_j |dequant(Q_jb)|_1
                                      (the activations': twice the half step, plus float rounding)

Per block, a block of large activations widens only its own share: GPT-2's residual stream has a few
channels far larger than the rest, and a whole-row bound would let them dominate every token's window
(rows without such blocks get a bound within a few percent of the whole-row one).

One bound per row, with the largest per-token constants, costs two fewer passes over the vocabulary
than a bound per token and recomputes 2-3x the tokens: 2 -> 7 on a trained 4x256 model, 170 -> 340
on GPT-2 small's shape with random weights (medians), and the recompute is the cheaper part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegpt.contract import SCREEN_MARGIN
from edgegpt.errors import QuantizeError
from edgegpt.graph.io import read_weight
from edgegpt.quantize.heads import HEAD_BLOCK  # the int8 recipes' 8-bit head: the same kernel, measured there

# the share of the vocabulary (per row) above which the head falls back to the fp32 Gemm: a kept token
# costs about three times its share of the Gemm's reads (gather, write, read)
FALLBACK_SHARE = 1 / 16
# margins above this skip the screen for the fp32 head (sampling at temperatures over 0.4 keeps most of a
# trained model's vocabulary within 25 x T anyway), and so do graphs of more rows than MAX_ROWS (the
# recompute multiplies every row by every kept token: fine for a batch of decode steps, not a prompt)
FULL_HEAD_MARGIN = 10.0
MAX_ROWS = 8
ACT_ROUNDING = 1 / 127 + 1e-4
_P = "/model/lm_head/screen/"


def _head_gemm(model: onnx.ModelProto, inits: dict) -> onnx.NodeProto:
    for node in model.graph.node:
        if (node.op_type == "Gemm" and node.input[1] in inits and node.input[1].endswith("transformer.wte.weight")
                and any(a.name == "transB" and a.i for a in node.attribute)):
            return node
    raise QuantizeError("found no tied LM head (Gemm with the token embedding, transB=1) to screen; "
                        "re-export the bundle with this edgegpt")


def quantize_head(wte: np.ndarray, block_size: int = HEAD_BLOCK) -> tuple[dict, dict, np.ndarray]:
    """8-bit symmetric MatMulNBits weights for h @ wte.T, written by onnxruntime's quantizer.
    Returns the node's attributes, its weight initializers and the dequantized head (V, C)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    vocab, width = wte.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["y"], name="head")], "head",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, vocab])],
        [numpy_helper.from_array(np.ascontiguousarray(wte.T), "w")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
                             bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4)
    q.process()
    node = next(n for n in q.model.model.graph.node if n.op_type == "MatMulNBits")
    weights = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("bits") != 8 or attrs.get("K") != width or attrs.get("N") != vocab:
        raise QuantizeError(f"onnxruntime's quantizer wrote an unexpected head ({attrs}); the screen needs 8-bit weights")
    block = attrs["block_size"]
    blocks = -(-width // block)
    packed = weights[node.input[1]].reshape(vocab, blocks * block).astype(np.float32)
    zero = weights[node.input[3]].reshape(vocab, blocks, 1).astype(np.float32) \
        if len(node.input) > 3 and node.input[3] else np.float32(128.0)
    scales = weights[node.input[2]].reshape(vocab, blocks, 1).astype(np.float32)
    deq = ((packed.reshape(vocab, blocks, block) - zero) * scales).reshape(vocab, blocks * block)[:, :width]
    ordered = {"B": weights[node.input[1]], "scales": weights[node.input[2]]}
    if len(node.input) > 3 and node.input[3]:
        ordered["zero_points"] = weights[node.input[3]]
    return attrs, ordered, deq


def head_bounds(wte: np.ndarray, deq: np.ndarray, block: int, chunk: int = 4096) -> dict[str, np.ndarray]:
    """The bound's constants per block of ``block`` input channels, the largest over the vocabulary
    (float64 sums, rounded up to float32): the weight error's L2 norm, and |dequant(Q_j)|_1 times the
    activations' rounding. One block spanning the row when the width is not a multiple of ``block``
    (still a bound: no activation block's largest value exceeds the row's). In chunks of rows, so the
    float64 copies stay small for large vocabularies."""
    vocab, width = wte.shape
    blocks = width // block if width % block == 0 else 1
    err_l2, act = np.zeros(blocks, np.float64), np.zeros(blocks, np.float64)
    for i in range(0, vocab, chunk):
        w = wte[i:i + chunk].astype(np.float64).reshape(-1, blocks, width // blocks)
        d = deq[i:i + chunk].astype(np.float64).reshape(-1, blocks, width // blocks)
        err_l2 = np.maximum(err_l2, np.sqrt(((w - d) ** 2).sum(2)).max(0))
        act = np.maximum(act, np.abs(d).sum(2).max(0) * ACT_ROUNDING)
    up = lambda x: np.nextafter(x.astype(np.float32), np.float32(np.inf))  # noqa: E731
    return {"err_l2": up(err_l2), "act": up(act)}


def screen_lm_head(model: onnx.ModelProto, *, block_size: int = HEAD_BLOCK, folder: Optional[Path] = None) -> dict:
    """Replace the tied fp32 head of ``model`` (in place) with the screened head. Returns the
    recipe's description of it. ``folder``: where the data file of a graph loaded without its weights is
    (the embedding is read from it)."""
    inits = {t.name: t for t in model.graph.initializer}
    gemm = _head_gemm(model, inits)
    h, wte_name, logits2d = gemm.input[0], gemm.input[1], gemm.output[0]
    wte = read_weight(inits[wte_name], folder) if folder is not None else numpy_helper.to_array(inits[wte_name])
    vocab = wte.shape[0]
    attrs, qweights, deq = quantize_head(wte, block_size)
    bounds = head_bounds(wte, deq, int(attrs["block_size"]))
    blocks = len(bounds["err_l2"])

    # (2 x blocks, 1): twice the bound's constants, for a token's upper end against the best lower end
    consts = {"bound_x2": 2 * np.concatenate([bounds["err_l2"], bounds["act"]])[:, None].astype(np.float32),
              "block_shape": np.array([-1, blocks, wte.shape[1] // blocks], np.int64),
              "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": np.array([0], np.int64),
              "limit": np.array([max(1, int(vocab * FALLBACK_SHARE))], np.int64),
              "full_margin": np.array(FULL_HEAD_MARGIN, np.float32), "max_rows": np.array([MAX_ROWS], np.int64)}
    new_inits = [numpy_helper.from_array(v, _P + k) for k, v in {**qweights, **consts}.items()]
    new_inits.append(numpy_helper.from_array(np.array(0.0, np.float32), SCREEN_MARGIN))

    def fp32_head(out: str) -> onnx.GraphProto:  # named fallback*: the roofline's byte count skips it
        return helper.make_graph([helper.make_node("Gemm", [h, wte_name], [_P + out], name=_P + out, transB=1)],
                                 f"fallback_{out}", [], [helper.make_tensor_value_info(_P + out, TensorProto.FLOAT, None)])

    class Ops(list):
        def __call__(self, kind: str, inputs: list[str], out: str, **kw) -> str:
            self.append(helper.make_node(kind, inputs, [_P + out], name=_P + out, **kw))
            return _P + out

    # recompute the kept (row, token) pairs in fp32 and write them over the approximation
    exact_ops = Ops()
    rows = exact_ops("Unsqueeze", [exact_ops("Gather", [_P + "pairs", _P + "i0"], "rows", axis=0), _P + "ax0"], "rows_1n")
    tokens = exact_ops("Gather", [_P + "pairs", _P + "i1"], "tokens", axis=0)
    w_rows = exact_ops("Gather", [wte_name, tokens], "w_rows", axis=0)
    # (R, n) fp32 dot products of every row with every kept token, then each pair's own row: one pass over
    # the kept embedding rows for a decode step's one row (hence MAX_ROWS)
    dots = exact_ops("Gemm", [h, w_rows], "dots", transB=1)
    exact = exact_ops("Squeeze", [exact_ops("GatherElements", [dots, rows], "exact_1n", axis=0), _P + "ax0"], "exact")
    index = exact_ops("Transpose", [_P + "pairs"], "index", perm=[1, 0])
    exact_ops("ScatterND", [_P + "approx", index, exact], "screened")
    recompute = helper.make_graph(exact_ops, "recompute", [],
                                  [helper.make_tensor_value_info(_P + "screened", TensorProto.FLOAT, None)])

    # the screen: the 8-bit head, the bound, the kept pairs; too many of them: the fp32 head after all
    screen_ops = Ops()
    screen_ops.append(helper.make_node(
        "MatMulNBits", [h, _P + "B", _P + "scales"] + ([_P + "zero_points"] if "zero_points" in qweights else []),
        [_P + "approx"], name=_P + "MatMulNBits", domain="com.microsoft", **attrs))
    # per row and block of channels: |h_b|_2 and max |h_b|, against the bound's constants -> (R, 1)
    hb = screen_ops("Reshape", [h, _P + "block_shape"], "h_blocks")
    norms = screen_ops("Concat", [screen_ops("ReduceL2", [hb], "h_l2", axes=[2], keepdims=0),
                                  screen_ops("ReduceMax", [screen_ops("Abs", [hb], "h_abs")], "h_max", axes=[2],
                                             keepdims=0)], "h_norms", axis=1)
    width = screen_ops("Add", [screen_ops("MatMul", [norms, _P + "bound_x2"], "width2"), SCREEN_MARGIN], "width")
    threshold = screen_ops("Sub", [screen_ops("ReduceMax", [_P + "approx"], "best", axes=[1]), width], "threshold")
    screen_ops("NonZero", [screen_ops("GreaterOrEqual", [_P + "approx", threshold], "keep")], "pairs")  # (2, n)
    limit = screen_ops("Mul", [_P + "row_count", _P + "limit"], "limit_rows")
    many = screen_ops("Greater", [screen_ops("Shape", [_P + "pairs"], "kept", start=1, end=2), limit], "many")
    screen_ops("If", [many], "screen_out", then_branch=fp32_head("full_many"), else_branch=recompute)
    screen = helper.make_graph(screen_ops, "screen", [],
                               [helper.make_tensor_value_info(_P + "screen_out", TensorProto.FLOAT, None)])

    # the main graph: the fp32 head outright for a wide margin (sampling at a temperature over
    # FULL_HEAD_MARGIN / 25, a repetition penalty) or for many rows (a prompt's every position)
    nodes = Ops()
    rows_count = nodes("Shape", [h], "row_count", start=0, end=1)
    wide = nodes("Or", [nodes("Greater", [SCREEN_MARGIN, _P + "full_margin"], "wide_margin"),
                        nodes("Greater", [rows_count, _P + "max_rows"], "many_rows")], "wide")
    nodes.append(helper.make_node("If", [wide], [logits2d], name=_P + "If", then_branch=fp32_head("full"),
                                  else_branch=screen))

    at = list(model.graph.node).index(gemm)
    model.graph.node.remove(gemm)
    for k, node in enumerate(nodes):
        model.graph.node.insert(at + k, node)
    model.graph.initializer.extend(new_inits)
    # an initializer that is also a graph input can be fed at run time; onnxruntime lists it among
    # get_overridable_initializers(), not get_inputs(), so the bundle's input contract is unchanged
    model.graph.input.append(helper.make_tensor_value_info(SCREEN_MARGIN, TensorProto.FLOAT, []))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"lm_head": "screened", "screen": {
        "approx": "8-bit MatMulNBits", "block_size": int(attrs["block_size"]), "accuracy_level": 4,
        "margin_input": SCREEN_MARGIN, "fallback_share": FALLBACK_SHARE, "full_head_margin": FULL_HEAD_MARGIN,
        "max_rows": MAX_ROWS,
        "approx_bytes": int(sum(v.nbytes for v in qweights.values())),
        # the bound's constants per block of channels: |h_b|_2 and max|h_b| times these (module docstring)
        "bound": {"channels_per_block": wte.shape[1] // blocks, "h_l2_times": [float(x) for x in bounds["err_l2"]],
                  "h_max_times": [float(x) for x in bounds["act"]]}}}
