"""SmoothQuant-style migration (quantize/smooth.py): exact in fp32, and it lowers int8 error where outliers are."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegpt.quantize.smooth import apply, choose_scales, fake_output, find_sites, smooth

C, N = 64, 48


def _graph(path, outlier: float = 30.0, shape_reader: bool = True):
    """x -> LayerNorm -> Reshape -> MatMul (+ a Shape of the LayerNorm output, as the LM head's graph has)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(C, np.float32)
    gamma[[3, 17]] = outlier  # two outlier channels, as trained GPTs' LayerNorms have
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(rng.normal(0, 0.1, C).astype(np.float32), "b"),
             numpy_helper.from_array((rng.standard_normal((C, N)) * 0.05).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, C], np.int64), "rows")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
             helper.make_node("Reshape", ["ln", "rows"], ["flat"], name="flat"),
             helper.make_node("MatMul", ["flat", "w"], ["y"], name="mm")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shape_reader:
        nodes.append(helper.make_node("Shape", ["ln"], ["s"], name="shape"))
        outputs.append(helper.make_tensor_value_info("s", TensorProto.INT64, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", C])], outputs, inits)
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return [{"x": rng.standard_normal((1, 40, C)).astype(np.float32)} for _ in range(4)]


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def test_migration_is_exact_in_fp32_and_moves_the_outliers(tmp_path):
    feeds = _graph(tmp_path / "m.onnx")
    before = _run(tmp_path / "m.onnx", feeds[0]["x"])
    info, scales, factors = smooth(tmp_path / "m.onnx", feeds, {"mm": 0})
    apply(tmp_path / "m.onnx", tmp_path / "s.onnx", factors)
    assert info["sites"] == 1 and info["alphas"]["mm"] > 0
    np.testing.assert_allclose(_run(tmp_path / "s.onnx", feeds[0]["x"]), before, rtol=1e-4, atol=1e-5)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "s.onnx")).graph.initializer}
    s = scales["mm"]
    assert s[3] > 3 * np.median(s) and s[17] > 3 * np.median(s)  # the outlier channels got the large factors
    np.testing.assert_allclose(inits["g"] * s, np.where(np.isin(np.arange(C), [3, 17]), 30.0, 1.0), rtol=1e-5)


def test_the_chosen_scales_lower_the_simulated_int8_error():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, C)).astype(np.float32)
    x[:, 5] *= 40.0
    w = (rng.standard_normal((C, N)) * 0.05).astype(np.float32)
    for scheme in (0, 32):
        s, alpha = choose_scales(np.abs(x).max(0), x, [w], scheme)
        assert alpha > 0

        def err(scale):
            return sum(float(((y - x @ w) ** 2).sum()) for y in fake_output(x / scale, w * scale[:, None], scheme))

        assert err(s) < 0.5 * err(np.ones(C, np.float32))


def test_only_layernorms_read_by_weight_matmuls_alone_are_sites(tmp_path):
    _graph(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [s.norm.name for s in find_sites(model, ["mm"])] == ["ln"]  # a Shape reads no values
    assert find_sites(model, []) == []  # not a MatMul it was asked to smooth
    model.graph.node.append(helper.make_node("Relu", ["ln"], ["r"], name="other"))  # a second value reader
    assert find_sites(model, ["mm"]) == []


@pytest.fixture(scope="module")
def smoothed(trained_bundle, tmp_path_factory):
    from edgegpt.quantize.bundle import quantize_bundle

    out = tmp_path_factory.mktemp("smooth") / "int8"
    return out, quantize_bundle(trained_bundle, out, "int8", options={"smooth": True}, eval_tokens=1500)


def test_int8_with_smoothing_keeps_the_shared_embedding_exact(smoothed, trained_bundle):
    out, m = smoothed
    assert m["recipe"]["smooth"] is True and m["recipe"]["smoothing"]["sites"] >= 3
    assert m["recipe"]["embedding_table"] == "shared"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".onnx") == ["model.onnx"]  # no tapped copy left
    model = onnx.load(str(out / "model.onnx"))
    assert any(n.name.endswith("/Unsmooth") for n in model.graph.node)
    # the embedding rows the bundle reads are the fp32 table's, to int8 precision, not the smoothed head's
    src = onnx.load(str(trained_bundle / "model.onnx"))
    wte = next(numpy_helper.to_array(t) for t in src.graph.initializer if t.name.endswith("transformer.wte.weight"))
    gather_out = next(n.output[0] for n in model.graph.node if n.name.endswith("/Unsmooth"))
    model.graph.output.append(helper.make_tensor_value_info(gather_out, TensorProto.FLOAT, None))
    from edgegpt.quantize.calibration import calibration_feeds
    from edgegpt.corpus import default_eval_text

    feed = calibration_feeds(trained_bundle, default_eval_text(), windows=1, window=16)[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = sess.run([gather_out], {i.name: feed[i.name] for i in sess.get_inputs()})[0][0]
    ids = feed["input_ids"][0]
    assert np.abs(rows - wte[ids]).max() < 0.02 * np.abs(wte).max()
    assert m["quality"]["kl_mean"] < 0.05 and m["quality"]["decode_path"]["kl_mean"] < 0.05
