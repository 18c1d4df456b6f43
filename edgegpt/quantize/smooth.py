"""SmoothQuant-style scale migration, folded exactly into the fp32 graph before int8 quantization.

A trained GPT's LayerNorm outputs carry a few outlier channels, many times larger than the rest, and
onnxruntime's int8 GEMMs quantize an activation row (or, for quantize_dynamic, the whole tensor) with one
scale: the outliers set that scale and the other channels keep a handful of levels. For a MatMul fed by a
LayerNorm, y = LN(x) W = (LN(x) / s) (diag(s) W) for any positive per-channel s, and LN(x) / s is the
same LayerNorm with gamma / s and beta / s. So dividing the LayerNorm's affine weights by s and multiplying
the MatMul's weight rows by s moves the outliers from the activations into the weights, which are
quantized per output channel (or per block) and can take them, at no run-time cost. With
s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (Xiao et al., SmoothQuant, 2023), alpha chosen per MatMul
by the int8 output error measured on the calibration windows.

onnxruntime's quantization tools have no such pass for a graph without a calibration-based static
quantizer (its SmoothQuant option lives in the Intel Neural Compressor path, static QDQ only), hence this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegpt.errors import QuantizeError

ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85)  # 0 = no migration; the one with the least measured error wins
# Nodes that keep the channel axis last between a LayerNorm and the MatMul it feeds (the LM head reads
# the final LayerNorm through a Reshape to rows; --last-logits-only adds a Slice over positions).
CHANNEL_PRESERVING = {"Reshape", "Slice", "Squeeze", "Unsqueeze"}
# Rows of calibration activations kept per MatMul to score alphas on (evenly spaced over all rows).
SCORE_ROWS = 512


@dataclass
class Site:
    """A LayerNorm whose output reaches only weight MatMuls (through channel-preserving nodes)."""
    norm: onnx.NodeProto
    matmuls: list[onnx.NodeProto]
    tensor: str  # the activation the MatMuls read (its per-channel range is what is measured)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def find_sites(model: onnx.ModelProto, matmuls: Iterable[str]) -> list[Site]:
    """Each LayerNorm (constant gamma and beta of its own) whose output is read only by MatMuls in
    ``matmuls`` with constant weights, directly or through one chain of channel-preserving nodes."""
    wanted = set(matmuls)
    inits = {t.name for t in model.graph.initializer}
    users = _consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    sites = []

    def readers_of(tensor: str) -> list[onnx.NodeProto]:  # a Shape reads no values
        return [n for n in users.get(tensor, []) if n.op_type != "Shape"]

    for norm in model.graph.node:
        if norm.op_type != "LayerNormalization" or len(norm.input) < 3 or len(norm.output) < 1:
            continue
        gamma, beta = norm.input[1], norm.input[2]
        if gamma not in inits or beta not in inits or len(users.get(gamma, [])) != 1 or len(users.get(beta, [])) != 1:
            continue
        tensor = norm.output[0]
        while tensor not in graph_outputs and len(readers_of(tensor)) == 1 \
                and readers_of(tensor)[0].op_type in CHANNEL_PRESERVING and readers_of(tensor)[0].input[0] == tensor:
            tensor = readers_of(tensor)[0].output[0]
        readers = readers_of(tensor)
        if tensor in graph_outputs or not readers:
            continue
        if all(r.op_type == "MatMul" and r.name in wanted and r.input[0] == tensor and r.input[1] in inits
               for r in readers):
            sites.append(Site(norm, readers, tensor))
    return sites


def activation_samples(model_path: Path, tensors: list[str],
                       feeds: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor: the per-channel max |x| over every calibration row, and about SCORE_ROWS rows to score on.
    The graph with those tensors as extra outputs is written beside ``model_path`` and freed before
    onnxruntime loads it from there: a session built from the serialized bytes held the graph three times
    (the ModelProto, its bytes, onnxruntime's copy), 2.7 GB at GPT-2 small's 0.5 GB of weights."""
    import onnxruntime as ort

    from edgegpt.graph.io import load_graph, remove_graph, write_streamed
    from edgegpt.limits import release_freed

    # the graph alone: where its weights are in a data file, the taps graph written beside it reads the same file
    model = load_graph(model_path, load_external_data=False)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in have)
    taps = Path(model_path).with_name(Path(model_path).stem + ".taps.onnx")
    try:
        write_streamed(model, taps)
        del model
        release_freed()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3  # errors only, as every edgegpt session (no note on logits_to_keep)
        sess = ort.InferenceSession(str(taps), opts, providers=["CPUExecutionProvider"])
    finally:
        remove_graph(taps)
    names = [i.name for i in sess.get_inputs()]
    per_feed = max(1, SCORE_ROWS // max(len(feeds), 1))
    peak: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feed in feeds:  # a running max and a few evenly spaced rows per window: memory stays one window's
        outs = sess.run(tensors, {k: v for k, v in feed.items() if k in names})
        for t, x in zip(tensors, outs):
            x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            m = np.abs(x).max(0)
            peak[t] = m if t not in peak else np.maximum(peak[t], m)
            rows[t].append(x[np.linspace(0, len(x) - 1, min(per_feed, len(x))).astype(int)])
    return {t: (peak[t], np.concatenate(rows[t])) for t in tensors}


def _fake_int8_output(x: np.ndarray, w: np.ndarray, per_row: bool) -> np.ndarray:
    """x @ w with w quantized per output channel (symmetric int8, as quantize_dynamic writes it) and x
    quantized to uint8 with one scale per tensor (quantize_dynamic's DynamicQuantizeLinear) or per row."""
    ws = np.maximum(np.abs(w).max(0, keepdims=True), 1e-12) / 127.0
    wq = np.clip(np.round(w / ws), -127, 127) * ws
    axis = 1 if per_row else None
    lo = np.minimum(x.min(axis=axis, keepdims=True), 0.0)
    hi = np.maximum(x.max(axis=axis, keepdims=True), 0.0)
    xs = np.maximum(hi - lo, 1e-12) / 255.0
    zp = np.round(-lo / xs)
    xq = (np.clip(np.round(x / xs) + zp, 0, 255) - zp) * xs
    return xq @ wq


def _fake_blocks_output(x: np.ndarray, w: np.ndarray, block: int) -> np.ndarray:
    """x @ w as an 8-bit MatMulNBits at accuracy level 4 computes it: w in symmetric blocks of ``block``
    along K per output column, x quantized to int8 per row in blocks of ``block`` along K."""
    K = w.shape[0]
    pad = -K % block
    wb = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block, w.shape[1])
    ws = np.maximum(np.abs(wb).max(1, keepdims=True), 1e-12) / 127.0
    wq = (np.round(wb / ws) * ws).reshape(-1, w.shape[1])[:K]
    xb = np.pad(x, ((0, 0), (0, pad))).reshape(x.shape[0], -1, block)
    xs = np.maximum(np.abs(xb).max(2, keepdims=True), 1e-12) / 127.0
    xq = (np.round(xb / xs) * xs).reshape(x.shape[0], -1)[:, :K]
    return xq @ wq


def fake_output(x: np.ndarray, w: np.ndarray, scheme: int) -> list[np.ndarray]:
    """The int8 kernel's outputs for ``scheme``: 0 = quantize_dynamic (a prompt's rows under one scale, and a
    decode step's single row), else an 8-bit MatMulNBits with blocks of ``scheme``."""
    if scheme:
        return [_fake_blocks_output(x, w, scheme)]
    return [_fake_int8_output(x, w, per_row) for per_row in (False, True)]


def choose_scales(x_max: np.ndarray, rows: np.ndarray, weights: list[np.ndarray],
                  scheme: int = 0) -> tuple[np.ndarray, float]:
    """The migration scales (one per input channel) and their alpha: the one among ALPHAS whose simulated
    int8 output error (``fake_output``) over the sampled rows, summed over the site's MatMuls, is least."""
    w_max = np.max([np.abs(w).max(1) for w in weights], axis=0)
    ref = [rows @ w for w in weights]
    best = (np.inf, np.ones_like(x_max), 0.0)
    for alpha in ALPHAS:
        if alpha == 0.0:
            s = np.ones_like(x_max)
        else:
            s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1.0 - alpha)
            s = np.clip(s / np.exp(np.mean(np.log(s))), 1e-3, 1e3)  # only ratios matter; keep them near 1
        err = 0.0
        for w, r in zip(weights, ref):
            for y in fake_output(rows / s, w * s[:, None], scheme):
                err += float(((y - r) ** 2).sum() / max((r * r).sum(), 1e-30))
        if err < best[0]:
            best = (err, s.astype(np.float32), alpha)
    return best[1], best[2]


def smooth(model_path: Path, feeds: list[dict], schemes: dict[str, int]) -> tuple[dict, dict, dict]:
    """Choose the migration of every LayerNorm-fed MatMul in ``schemes`` (name -> the int8 kernel it will get,
    as ``fake_output`` takes it). Returns ({"sites": n, "alphas": {matmul: alpha}} for the manifest,
    {matmul: the scales its weight rows take}, {initializer: the factor its values are multiplied by}). The
    graph is not rewritten here: the quantizer applies the factors as it reads each weight
    (quantize.matmul_int8), and ``apply`` writes a smoothed fp32 graph."""
    from edgegpt.graph.io import load_graph, read_weight
    from edgegpt.limits import release_freed

    model = load_graph(model_path, load_external_data=False)  # weights stay on disk where the graph has a data file
    sites = find_sites(model, schemes)
    if not sites:
        return {"sites": 0, "alphas": {}}, {}, {}
    stats = activation_samples(model_path, sorted({s.tensor for s in sites}), feeds)
    release_freed()
    inits = {t.name: t for t in model.graph.initializer}

    def array(name: str) -> np.ndarray:
        return read_weight(inits[name], Path(model_path).parent).astype(np.float32)

    alphas, scales, factors = {}, {}, {}
    for site in sites:
        x_max, rows = stats.pop(site.tensor)
        weights = [array(mm.input[1]) for mm in site.matmuls]
        if any(w.ndim != 2 or w.shape[0] != x_max.shape[0] for w in weights):
            raise QuantizeError(f"{site.norm.name}: the MatMuls it feeds do not read its channels as rows")
        s, alpha = choose_scales(x_max, rows, weights, schemes[site.matmuls[0].name])
        del weights
        for mm in site.matmuls:
            factors[mm.input[1]] = s[:, None]
            alphas[mm.name], scales[mm.name] = alpha, s
        factors[site.norm.input[1]] = factors[site.norm.input[2]] = 1.0 / s
    return {"sites": len(sites), "alphas": alphas}, scales, factors


def apply(src: Path, dst: Path, factors: dict[str, np.ndarray]) -> None:
    """The graph at ``src`` with smoothing's ``factors`` applied (an fp32 graph the same function as before)."""
    from edgegpt.graph.io import load_graph, save_rewritten

    model = load_graph(src, load_external_data=False)

    def scaled(name: str, factor: np.ndarray):
        return lambda values: [numpy_helper.from_array((values * factor).astype(np.float32), name)]

    save_rewritten(model, Path(src).parent, dst, {name: scaled(name, f) for name, f in factors.items()})
