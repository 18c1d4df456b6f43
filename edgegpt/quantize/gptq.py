"""GPTQ for the int4 recipe: 4-bit blocks whose rounding error is corrected with calibration text.

GPTQ (Frantar et al., 2022) quantizes a weight's input rows one at a time and pushes each row's
rounding error into the rows not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction error, H = 2 X^T X over calibration activations X. The result is ordinary
MatMulNBits blocks (same format, same kernels, same speed as round-to-nearest), only better chosen.

onnxruntime ships a GPTQ (onnxruntime.quantization.neural_compressor.weight_only.gptq), but in
1.31 and 1.32 it reads the lower triangle of an upper-triangular Cholesky factor, so no error is
ever propagated and its output equals round-to-nearest bit for bit (checked on a synthetic layer
with correlated inputs, where this implementation halves the output error: tests/quantize/test_gptq.py).
Hence this implementation; the calibration pass and the graph rewrite use onnxruntime and onnx helpers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegpt import contract
from edgegpt.errors import QuantizeError

MAXQ = 15  # 4-bit codes 0..15
FEEDS_PER_PRODUCT = 8


def _grid(w: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per output column of a (rows, N) group, as MatMulNBits dequantizes:
    w = (q - zero) * scale. The range always includes 0, like onnxruntime's round-to-nearest."""
    lo = np.minimum(w.min(axis=0), 0.0)
    hi = np.maximum(w.max(axis=0), 0.0)
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = amax / 7  # codes 1..15 around MatMulNBits' default zero point 8
        zero = np.full_like(scale, 8.0)
    else:
        scale = (hi - lo) / MAXQ
        zero = np.zeros_like(scale)
        ok = scale > 0
        zero[ok] = np.clip(np.round(-lo[ok] / scale[ok]), 0, MAXQ)
    scale = np.where(scale > 0, scale, 1.0)
    return scale, zero


def gptq_matrix(w: np.ndarray, h: np.ndarray, *, block_size: int, symmetric: bool = False,
                damp: float = 0.01, step: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``w`` (K inputs x N outputs) in 4-bit blocks of ``block_size`` input rows with GPTQ
    under Hessian ``h`` (K x K). Returns codes (K padded to whole blocks, N) uint8, and scales and zero
    points (blocks, N)."""
    k0, n = w.shape
    k = -(-k0 // block_size) * block_size  # MatMulNBits pads K to whole blocks; padded inputs are dead
    # float32 throughout, as the reference implementation: float64 took 2.3x as long at GPT-2 XL's 6400 inputs
    w = np.pad(w.astype(np.float32), ((0, k - k0), (0, 0)))
    h = np.pad(h.astype(np.float32), ((0, k - k0), (0, k - k0)))
    dead = np.diag(h) == 0  # an input that never moved: its weights do not matter
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = _inverse_cholesky(h)
    codes = np.zeros((k, n), np.uint8)
    scales = np.zeros((k // block_size, n), np.float32)
    zeros = np.zeros_like(scales)
    step = max(block_size, step - step % block_size)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[i1:i2]  # a view: updated in place
        err = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:  # the group's grid, from its weights as updated so far
                s, z = _grid(w1[i:i + block_size], symmetric)
                scales[row // block_size], zeros[row // block_size] = s, z
            q = np.clip(np.round(w1[i] / s) + z, 0, MAXQ)
            codes[row] = q
            e = (w1[i] - (q - z) * s) / u1[i, i]
            w1[i + 1:] -= np.outer(u1[i, i + 1:], e)
            err[i] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    return codes, scales, zeros.astype(np.uint8)


def pack_matmulnbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                     block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' 4-bit layout: B (N, blocks, block_size/2) with the even element in the low
    nibble, scales (N * blocks), zero points (N, ceil(blocks/2)) packed the same way."""
    k, n = codes.shape
    blocks = k // block_size
    c = codes.T.reshape(n, blocks, block_size)
    b = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
    z = zeros.T  # (N, blocks)
    if blocks % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return b, np.ascontiguousarray(scales.T).reshape(-1), zp.reshape(-1)


def _groups(inputs: list[str], cost: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """``inputs`` in order, cut into the fewest runs whose summed ``cost`` fits ``budget_bytes``, of about equal
    cost each (a run holds one name at least). Equal runs, not full ones: a run's pass also holds the weights
    onnxruntime keeps for the layers up to it, so the early runs, which hold fewer, should not hold more."""
    total = sum(cost[n] for n in inputs)
    runs = max(1, -(-total // max(budget_bytes, 1)))
    while True:
        target, groups, cur, size = total / runs, [], [], 0
        for name in inputs:
            if cur and size + cost[name] > target * 1.0001:
                groups.append(cur)
                cur, size = [], 0
            cur.append(name)
            size += cost[name]
        groups += [cur] if cur else []
        if len(groups) <= runs or runs >= len(inputs):
            return groups
        runs += 1


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper factor u of inv(H) = u^T u, in H's precision, without forming inv(H): with P the reversal,
    P H P = L L^T gives u = P inv(L) P (LAPACK's potrf and trtri, through scipy: numpy has neither), a third of
    the work of inverting H and factoring the inverse (2.4x faster than torch's cholesky_inverse then cholesky at
    GPT-2 XL's 6400 inputs here, the same factor to 3e-7)."""
    from scipy.linalg import lapack

    potrf, trtri = lapack.get_lapack_funcs(("potrf", "trtri"), (h,))
    lower, info = potrf(np.ascontiguousarray(h[::-1, ::-1]), lower=1, clean=1, overwrite_a=1)
    if info == 0:
        lower, info = trtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise QuantizeError("GPTQ: the calibration Hessian is not positive definite; give more text")
    return np.ascontiguousarray(lower[::-1, ::-1])


def _cut(model: onnx.ModelProto, producers: dict[str, int], activation: str) -> Optional[str]:
    """The residual-stream tensor a pass that starts at ``activation`` can start from: the input of the nearest
    LayerNormalization up the chain of first inputs above it (GPT-2: a block's ln_1 or ln_2). Everything after
    that LayerNormalization depends on the layers before it through that one tensor only. None where the chain
    finds no LayerNormalization, or the graph has subgraphs (whose names a cut would not see)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return None
    name = activation
    for _ in range(len(model.graph.node)):
        i = producers.get(name)
        if i is None or not model.graph.node[i].input:
            return None
        node = model.graph.node[i]
        if node.op_type == "LayerNormalization":
            return node.input[0]
        name = node.input[0]
    return None


def _view(model: onnx.ModelProto, producers: dict[str, int], outputs: list[str],
          start: Optional[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from its inputs, its initializers and the tensor ``start``
    (None: from its inputs only), with only the initializers that part reads (their data stays where it is).
    onnxruntime prunes what no output needs, but only after loading every weight the graph names: a view that
    starts at a cut holds the weights of the layers after it only, and runs only those layers."""
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = {i.name: i for i in model.graph.input}
    stops = inits | set(graph_inputs) | {"", start}
    keep, seen, todo = set(), set(), list(outputs)
    while todo:
        name = todo.pop()
        if name in seen or name in stops:
            continue
        seen.add(name)
        if name not in producers:
            raise QuantizeError(f"the graph reads {name!r}, which no node, input or initializer gives")
        keep.add(producers[name])
        todo.extend(model.graph.node[producers[name]].input)
    nodes = [n for i, n in enumerate(model.graph.node) if i in keep]
    read = {name for n in nodes for name in n.input} | set(outputs)
    ins = [graph_inputs[n] for n in graph_inputs if n in read]
    if start is not None:
        ins.append(helper.make_tensor_value_info(start, onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, model.graph.name, ins,
                              [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs],
                              [t for t in model.graph.initializer if t.name in read])
    view = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    view.functions.extend(model.functions)
    return view


def hessians(probe: Path, model: onnx.ModelProto, producers: dict[str, int], inputs: list[str], dims: dict[str, int],
             feeds: list[dict], *, start: Optional[str] = None, stash: Optional[list[np.ndarray]] = None,
             cut: Optional[str] = None) -> tuple[dict[str, np.ndarray], Optional[list[np.ndarray]]]:
    """H = 2 X^T X / rows for each named activation over the prefill ``feeds``, one pass of ``model`` (the fp32
    graph at ``probe``, read without its weights, which the pass's view reads from ``probe``'s folder) with the
    activations as its only outputs, so onnxruntime prunes the LM head (a third of a GPT-2 small prefill).
    Accumulated in float32. The pass starts at the tensor ``start``, whose value for each feed is in ``stash``
    (None: at the graph's inputs), and also returns the values of the tensor ``cut`` for the next pass.
    ``producers``: each tensor's producing node, by index into ``model.graph.node``."""
    import onnxruntime as ort

    outputs = inputs + ([cut] if cut is not None and cut not in inputs and cut != start else [])
    view = probe.with_name(probe.stem + ".outputs.onnx")  # beside the data file its initializers name
    onnx.save_model(_view(model, producers, outputs, start), str(view))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
    try:
        sess = ort.InferenceSession(str(view), so, providers=["CPUExecutionProvider"])
    finally:
        view.unlink()
    from scipy.linalg import blas

    names = {i.name for i in sess.get_inputs()}
    # the upper triangles of X^T X (BLAS syrk through scipy, which numpy does not expose: half the products, 2x
    # the rate of numpy's x.T @ x at 6400 wide here), in Fortran order so that syrk adds into them in place
    acc = {name: np.zeros((dims[name], dims[name]), np.float32, order="F") for name in inputs}
    rows, pending, nxt = 0, {name: [] for name in inputs}, []
    for i, feed in enumerate(feeds):
        feed = {k: v for k, v in feed.items() if k in names}
        if start is not None:
            feed[start] = stash[i]
        values = dict(zip(outputs, sess.run(outputs, feed)))
        for name in inputs:
            pending[name].append(values[name].reshape(-1, values[name].shape[-1]))
        if cut is not None:
            nxt.append(values[cut] if cut in values else stash[i])
        rows += pending[inputs[0]][-1].shape[0]
        if (i + 1) % FEEDS_PER_PRODUCT == 0 or i + 1 == len(feeds):
            for name in inputs:  # one tall product: ~7x the GEMM rate of one per window
                x = np.concatenate(pending[name])
                acc[name] = blas.ssyrk(1.0, x.T, beta=1.0, c=acc[name], trans=0, lower=0, overwrite_c=1)
                pending[name] = []
    del sess
    return {name: _symmetric(acc.pop(name), 2.0 / rows) for name in inputs}, (nxt if cut is not None else None)


def _symmetric(upper: np.ndarray, scale: float) -> np.ndarray:
    """The full symmetric matrix times ``scale`` from its upper triangle (the lower one is not read)."""
    h = np.triu(upper)
    h += np.triu(upper, 1).T
    h *= np.float32(scale)
    return h


def _widths(model: onnx.ModelProto, inputs: list[str]) -> dict[str, int]:
    """The last dimension of each activation: from the MatMul weights that consume it."""
    inits = {t.name: t for t in model.graph.initializer}
    widths = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[0] in inputs and node.input[1] in inits:
            widths[node.input[0]] = int(inits[node.input[1]].dims[0])
    return widths


def gptq_file(src: Path, dst: Path, feeds: list[dict], *, block_size: int, symmetric: bool, accuracy_level: int,
              exclude: Optional[set[str]] = None, budget_bytes: Optional[int] = None) -> int:
    """The graph at ``src`` with every MatMul of a constant 2-D weight (except ``exclude``) as a GPTQ-quantized
    4-bit MatMulNBits, written to ``dst``. Returns the number of MatMuls replaced.

    The graph is read without its weights: onnxruntime runs ``src`` to measure the Hessians, each weight is
    read from the data file when its MatMul is quantized (graph.io.read_weight), and only the 4-bit blocks
    stay in memory; the fp32 weights still used are copied to ``dst`` one at a time at the end. So the
    process holds a session's copy of some weights and some Hessians, never also the graph's weights. The
    Hessians are computed in groups of activations of about equal size, in graph order, each at most
    ``budget_bytes`` (default: a quarter of the weights' size, or a third of the memory available if less, and
    640 MB at least); a group's MatMuls are quantized before the next group's pass. A pass starts where the one
    before it left the residual stream (_cut), so its session holds and runs only the layers from there to its
    last activation. A graph with no such cut (no LayerNormalization above a group) runs each pass from its
    inputs, in groups as large as the weights, or as half the memory left beside them. ``src``'s folder is
    scratch space: the pass writes its view of the graph there."""
    from tqdm.auto import tqdm

    from edgegpt.graph.io import load_graph, read_weight, save_rewritten, stored_bytes
    from edgegpt.limits import available_memory

    src = Path(src)
    model = load_graph(src, load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    targets = [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in (exclude or set())
               and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    inputs = list(dict.fromkeys(n.input[0] for n in targets))
    dims = _widths(model, inputs)
    rows = max((f[contract.INPUT_IDS].size for f in feeds), default=1)
    # a Hessian, and the activations of FEEDS_PER_PRODUCT windows waiting for their product
    cost = {name: dims[name] ** 2 * 4 + FEEDS_PER_PRODUCT * rows * dims[name] * 4 for name in inputs}
    weights = sum(stored_bytes(t) for t in model.graph.initializer)
    producers = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    avail = available_memory() or 0
    # each pass after the first starts where the one before left the residual stream, so the passes together run
    # the graph once, and small groups cost no more time than large ones (GPT-2 XL: 7 passes of a quarter of its
    # weights). A graph with no cut between two groups runs each pass from its inputs: there, the fewest passes
    # that fit beside the weights
    budgets = [budget_bytes] if budget_bytes is not None else [
        max(640 << 20, min(weights // 4, avail // 3)), max(640 << 20, min(weights, (avail - weights) // 2))]
    for budget in budgets:
        groups = _groups(inputs, cost, budget)
        cuts = [None] + [_cut(model, producers, g[0]) for g in groups[1:]] + [None]
        if None not in cuts[1:-1]:
            break
    replaced: dict[str, onnx.NodeProto] = {}
    blocks: dict[str, list[onnx.TensorProto]] = {}  # weight name -> its 4-bit tensors
    uses = Counter(n.input[0] for n in targets)
    bar = tqdm(total=len(targets), desc="gptq", unit="matmul", leave=False, disable=None)
    stash = None
    for k, group in enumerate(groups):
        start = cuts[k] if cuts[k] not in group else None  # (a cut that is itself an activation: from the inputs)
        hs, stash = hessians(src, model, producers, group, dims, feeds, start=start, stash=stash, cut=cuts[k + 1])
        for node in [n for n in targets if n.input[0] in hs]:
            w = read_weight(inits[node.input[1]], src.parent)
            uses[node.input[0]] -= 1  # free each Hessian after its last MatMul
            h = hs[node.input[0]] if uses[node.input[0]] else hs.pop(node.input[0])
            replaced[node.name], new = _quantized_node(node, w, h, block_size, symmetric, accuracy_level)
            blocks.setdefault(node.input[1], []).extend(new)
            bar.update()
        del hs
    bar.close()
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name in replaced:
            node.CopyFrom(replaced[node.name])
    still_used = {i for n in model.graph.node for i in n.input}

    def rewrite(name: str):  # the 4-bit tensors take the fp32 weight's place, beside it if still read
        if name not in still_used:
            return blocks[name]  # the fp32 weight is not read again
        return lambda values: [numpy_helper.from_array(values, name)] + blocks[name]

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_rewritten(model, src.parent, dst, {name: rewrite(name) for name in blocks})
    return len(targets)


def _quantized_node(node: onnx.NodeProto, w: np.ndarray, h: np.ndarray, block_size: int, symmetric: bool,
                    accuracy_level: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits for ``node`` with GPTQ's 4-bit blocks of ``w`` under ``h``, and its weights."""
    codes, scales, zeros = gptq_matrix(w, h, block_size=block_size, symmetric=symmetric)
    b, s, z = pack_matmulnbits(codes, scales, zeros, block_size)
    base = node.input[1]
    new = [numpy_helper.from_array(b, f"{base}_Q4"), numpy_helper.from_array(s, f"{base}_scales")]
    ins = [node.input[0], new[0].name, new[1].name]
    if not symmetric:
        new.append(numpy_helper.from_array(z, f"{base}_zero_points"))
        ins.append(new[2].name)
    k, n = w.shape
    return helper.make_node("MatMulNBits", ins, list(node.output), name=f"{node.name}_Q4", domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block_size,
                            **({"accuracy_level": accuracy_level} if accuracy_level else {})), new
