"""GPTQ for int4: the algorithm on synthetic layers, the MatMulNBits packing, and the recipe on trained weights."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegpt.errors import QuantizeError
from edgegpt.quantize.bundle import quantize_bundle
from edgegpt.quantize.gptq import gptq_matrix, pack_matmulnbits

EVAL_TOKENS = 1500


def _layer(k=256, n=64, rows=2000, seed=0):
    """A weight and correlated activations, like a LayerNorm output feeding a projection."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * 0.02
    x = rng.standard_normal((rows, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    return w, x, 2 * x.T @ x / rows


def _dequant(codes, scales, zeros, block):
    k, n = codes.shape
    c = codes.astype(np.float64).reshape(k // block, block, n)
    return ((c - zeros.astype(np.float64)[:, None]) * scales[:, None]).reshape(k, n)


def test_gptq_halves_the_output_error_of_round_to_nearest():
    w, x, h = _layer()
    q = _dequant(*gptq_matrix(w, h, block_size=64), 64)
    rtn = _dequant(*gptq_matrix(w, np.eye(len(w)), block_size=64), 64)  # no correlations: plain rounding
    # round to nearest: every weight within half a step of its grid
    codes, scales, zeros = gptq_matrix(w, np.eye(len(w)), block_size=64)
    assert np.all(np.abs(rtn - w) <= np.repeat(scales, 64, axis=0) / 2 + 1e-12)
    err_q, err_rtn = np.mean((x @ (q - w)) ** 2), np.mean((x @ (rtn - w)) ** 2)
    assert err_q < 0.6 * err_rtn, (err_q, err_rtn)
    # it buys the output error with (a little) weight error: it is not just a finer grid
    assert np.mean((q - w) ** 2) > np.mean((rtn - w) ** 2)


@pytest.mark.parametrize("k,block,symmetric", [(192, 64, False), (192, 64, True), (100, 32, False), (256, 128, False)])
def test_packing_is_what_matmulnbits_computes(k, block, symmetric):
    w, x, h = _layer(k=k, n=48, rows=300, seed=1)
    codes, scales, zeros = gptq_matrix(w, h, block_size=block, symmetric=symmetric)
    if symmetric:
        assert np.all(zeros == 8)
    b, s, z = pack_matmulnbits(codes, scales, zeros, block)
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(s, "s")]
    ins = ["x", "b", "s"]
    if not symmetric:  # MatMulNBits without zero points assumes 8, as the symmetric grid does
        inits.append(numpy_helper.from_array(z, "z"))
        ins.append("z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=48, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    xs = x[:8].astype(np.float32)
    want = xs.astype(np.float64) @ _dequant(codes, scales, zeros, block)[:k]
    np.testing.assert_allclose(sess.run(None, {"x": xs})[0], want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def int4_pair(trained_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    opts = {"block_size": 32}
    rtn = quantize_bundle(trained_bundle, root / "rtn", "int4", eval_tokens=EVAL_TOKENS,
                          options={**opts, "algorithm": "rtn"})
    gptq = quantize_bundle(trained_bundle, root / "gptq", "int4", eval_tokens=EVAL_TOKENS,
                           options={**opts, "algorithm": "gptq"})
    return root, rtn, gptq


def test_gptq_bundle_is_closer_to_fp32_than_round_to_nearest(int4_pair):
    _, rtn, gptq = int4_pair
    assert gptq["recipe"]["algorithm"] == "gptq" and gptq["recipe"]["calibration_tokens"] >= 1000
    assert gptq["recipe"]["gptq_matmuls"] == 2 * 4  # every block MatMul; the head stays 8-bit
    assert gptq["quality"]["kl_mean"] < 0.8 * rtn["quality"]["kl_mean"], (gptq["quality"], rtn["quality"])
    assert gptq["quality"]["ppl_increase_pct"] <= gptq["quality"]["budget_pct"]


def test_gptq_bundle_has_the_same_graph_as_round_to_nearest(int4_pair):
    root, rtn, gptq = int4_pair
    assert gptq["graph"]["op_counts"] == rtn["graph"]["op_counts"]

    def nbits(path):
        m = onnx.load(str(path / "model.onnx"))
        return sorted((n.name, tuple((a.name, a.i) for a in n.attribute)) for n in m.graph.node
                      if n.op_type == "MatMulNBits")

    assert [a for _, a in nbits(root / "gptq")] == [a for _, a in nbits(root / "rtn")]


def test_too_little_calibration_text_is_a_clear_error_and_writes_nothing(trained_bundle, tmp_path):
    from edgegpt.errors import QuantizeError

    with pytest.raises(QuantizeError, match="calibration text is .* tokens"):
        quantize_bundle(trained_bundle, tmp_path / "q", "int4", calibration="too short", eval_tokens=EVAL_TOKENS)
    assert not (tmp_path / "q").exists()
    with pytest.raises(QuantizeError, match="algorithm must be one of rtn, gptq"):
        quantize_bundle(trained_bundle, tmp_path / "q", "int4", options={"algorithm": "awq"})


def test_streamed_gptq_gives_the_same_weights_from_a_data_file_and_in_many_passes(trained_bundle, tmp_path):
    """Large models' graphs keep their weights in a data file, read one weight at a time, and compute their
    Hessians a group of layers per pass (memory): from a data file, and with a budget that puts every activation
    in a pass of its own, GPTQ must choose the same 4-bit blocks as from an inline graph in a single pass, and
    leave nothing but its output behind."""
    from edgegpt.corpus import calibration_text
    from edgegpt.graph.io import save_graph, save_model
    from edgegpt.quantize.calibration import calibration_feeds
    from edgegpt.quantize.gptq import _groups, gptq_file
    from edgegpt.quantize.heads import load_untied

    feeds = calibration_feeds(trained_bundle, calibration_text(None), windows=16, window=64)
    model, head = load_untied(trained_bundle / "model.onnx")
    (tmp_path / "inline").mkdir()
    (tmp_path / "external").mkdir()
    save_graph(model, tmp_path / "inline" / "untied.onnx")
    save_model(model, tmp_path / "external" / "untied.onnx", external=True)
    out = []
    for kind, budget in (("inline", 1 << 40), ("external", 1)):
        folder = tmp_path / kind
        assert gptq_file(folder / "untied.onnx", folder / "q.onnx", feeds, block_size=32, symmetric=False,
                         accuracy_level=4, exclude={head}, budget_bytes=budget) == 2 * 4
        q = onnx.load(str(folder / "q.onnx"))
        out.append({t.name: numpy_helper.to_array(t) for t in q.graph.initializer})
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["untied.onnx", "q.onnx"] + (["model.onnx.data"] if kind == "external" else []))
        assert {n.op_type for n in q.graph.node} >= {"MatMulNBits"}
        assert sum(n.op_type == "MatMul" and n.input[1] in out[-1] for n in q.graph.node) == 1  # the head
    assert out[0].keys() == out[1].keys() and any(k.endswith("_Q4") for k in out[0])
    assert [k for k in out[0] if k.endswith(".weight_t")] == ["lm_head.weight_t"]  # fp32 weights: the head only
    for k in out[0]:  # the same blocks: a pass that starts at a cut rounds a few float32 sums differently
        if out[0][k].dtype == np.float32:
            np.testing.assert_allclose(out[0][k], out[1][k], rtol=1e-5, atol=1e-7, err_msg=k)
        else:
            assert np.mean(out[0][k] != out[1][k]) <= 1e-3, k
    session = ort.InferenceSession(str(tmp_path / "external" / "q.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()
    cost = dict(zip("abcde", (3, 3, 3, 3, 10)))
    assert _groups(list(cost), cost, 100) == [list("abcde")]
    assert all(sum(cost[n] for n in g) <= 12 or len(g) == 1 for g in _groups(list(cost), cost, 12))
    assert _groups(list(cost), cost, 1) == [[n] for n in "abcde"]


def test_a_pass_after_the_first_starts_at_the_residual_stream_and_holds_only_the_layers_after_it(trained_bundle):
    """The Hessian passes of a large model run the graph once between them: a pass starts at the residual-stream
    tensor above its first activation, so its session holds (and runs) the layers from there on only."""
    from edgegpt.quantize.gptq import _cut, _view
    from edgegpt.quantize.heads import load_untied

    model, _ = load_untied(trained_bundle / "model.onnx")
    producers = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    start = _cut(model, producers, "/model/layers.1/attn/out")
    assert start == "/model/layers.1/ln_1/residual"
    assert _cut(model, producers, "/model/layers.1/mlp/act") == "/model/layers.1/ln_2/residual"
    view = _view(model, producers, ["/model/layers.1/mlp/act"], start)
    weights = {t.name for t in view.graph.initializer}
    assert "transformer.h.1.mlp.c_fc.weight_t" in weights and "transformer.h.1.attn.c_attn.weight_t" in weights
    assert not any(w.startswith(("transformer.h.0.", "transformer.w", "lm_head")) for w in weights), weights
    assert {i.name for i in view.graph.input} == {start, "attention_mask", "past_key_values.1.key",
                                                  "past_key_values.1.value"}
    # and it computes what the whole graph does from there
    full = _view(model, producers, [start, "/model/layers.1/mlp/act"], None)
    ids = np.arange(1, 17, dtype=np.int64)[None]
    feed = {"input_ids": ids, "position_ids": np.arange(16, dtype=np.int64)[None],
            "attention_mask": np.ones_like(ids), "logits_to_keep": np.array(1, np.int64)}
    for i in model.graph.input:
        if i.name.startswith("past_key_values"):
            dims = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
            feed[i.name] = np.zeros([1, dims[1], 0, dims[3]], np.float32)
    a = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(view.SerializeToString(), providers=["CPUExecutionProvider"])
    resid, act = a.run(None, {k: v for k, v in feed.items() if k in {x.name for x in a.get_inputs()}})
    got = b.run(None, {**{k: v for k, v in feed.items() if k in {x.name for x in b.get_inputs()}}, start: resid})[0]
    np.testing.assert_allclose(got, act, rtol=1e-5, atol=1e-5)


def test_a_graph_that_reads_a_tensor_nothing_gives_is_a_clear_error():
    from edgegpt.quantize.gptq import _view

    node = helper.make_node("Relu", ["ghost"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    with pytest.raises(QuantizeError, match="reads 'ghost'"):
        _view(model, {"y": 0}, ["y"], None)


def test_a_hessian_that_is_not_positive_definite_is_a_clear_error():
    with pytest.raises(QuantizeError, match="not positive definite"):
        gptq_matrix(np.ones((64, 8), np.float32), -np.eye(64, dtype=np.float32), block_size=32)
