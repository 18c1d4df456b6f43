"""The streaming int8 MatMul rewrite writes what onnxruntime's quantize_dynamic writes, one weight at a time."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgegpt.graph.io import load_graph, save_graph
from edgegpt.graph.passes import weight_matmuls
from edgegpt.quantize.heads import load_untied
from edgegpt.quantize.matmul_int8 import quantize_matmuls


def _logits(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = ids
        elif i.name in ("attention_mask",):
            feed[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feed[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        else:  # an empty past: (batch, heads, 0, head_dim)
            shape = [1 if d == "batch" or d == "batch_size" else d if isinstance(d, int) else 0 for d in i.shape]
            feed[i.name] = np.zeros(shape, np.float32)
    return sess.run([sess.get_outputs()[0].name], feed)[0]


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_the_same_weights_and_logits_as_quantize_dynamic(trained_bundle, tmp_path, monkeypatch, reduce_range,
                                                         external):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import edgegpt.graph.io as gio

    model, head = load_untied(trained_bundle / "model.onnx")
    names = weight_matmuls(model, exclude=head)
    if external:  # GPT-2 large and up: the source graph's weights are in its data file, read one at a time
        monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", 0)
    src = tmp_path / "untied.onnx"
    save_graph(model, src)
    assert gio.data_file(src).is_file() == external
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", int(1.5 * 1024**3))
    quantize_dynamic(src, tmp_path / "ort.onnx", op_types_to_quantize=["MatMul"], nodes_to_quantize=names,
                     per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                     use_external_data_format=external,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    quantize_matmuls(src, tmp_path / "ours.onnx", names, reduce_range=reduce_range)
    ref, ours = (load_graph(tmp_path / f) for f in ("ort.onnx", "ours.onnx"))
    ref_w = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    our_w = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    quantized = [n for n in our_w if n.endswith("_quantized")]
    assert len(quantized) == len(names) and all(our_w[n].dtype == np.int8 for n in quantized)
    for name in set(ref_w) & set(our_w):
        np.testing.assert_array_equal(our_w[name], ref_w[name], err_msg=name)
    assert {n for n in our_w if not n.startswith("ortquant")} == {n for n in ref_w if not n.startswith("ortquant")}
    counts = lambda m: sorted(n.op_type for n in m.graph.node)  # noqa: E731
    assert counts(ours) == counts(ref)
    ids = np.array([[5, 17, 300, 2, 99, 41, 7, 12]], np.int64)
    np.testing.assert_array_equal(_logits(tmp_path / "ours.onnx", ids), _logits(tmp_path / "ort.onnx", ids))
    assert not np.allclose(_logits(src, ids), _logits(tmp_path / "ours.onnx", ids), atol=1e-6)  # it did quantize


def test_smoothing_factors_are_applied_as_each_weight_is_read(trained_bundle, tmp_path):
    """Factors given to the quantizer (smoothing's, folded into the LayerNorms and the weight rows) give the
    same graph as quantize_dynamic over the fp32 graph with the factors written in (quantize.smooth.apply)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgegpt.quantize.smooth import apply, find_sites

    model, head = load_untied(trained_bundle / "model.onnx")
    names = weight_matmuls(model, exclude=head)
    src = tmp_path / "untied.onnx"
    save_graph(model, src)
    rng = np.random.default_rng(0)
    factors = {}
    for site in find_sites(model, names + [head]):
        s = rng.uniform(0.5, 2.0, len(numpy_helper.to_array(next(t for t in model.graph.initializer
                                                                  if t.name == site.norm.input[1])))).astype(np.float32)
        factors.update({mm.input[1]: s[:, None] for mm in site.matmuls})
        factors[site.norm.input[1]] = factors[site.norm.input[2]] = 1.0 / s
    assert len(factors) > 2 * len(names) // 3
    apply(src, tmp_path / "smoothed.onnx", factors)
    quantize_dynamic(tmp_path / "smoothed.onnx", tmp_path / "ort.onnx", op_types_to_quantize=["MatMul"],
                     nodes_to_quantize=names, per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    quantize_matmuls(src, tmp_path / "ours.onnx", names, reduce_range=False, factors=factors)
    ids = np.array([[5, 17, 300, 2, 99, 41, 7, 12]], np.int64)
    np.testing.assert_array_equal(_logits(tmp_path / "ours.onnx", ids), _logits(tmp_path / "ort.onnx", ids))
    np.testing.assert_allclose(_logits(tmp_path / "smoothed.onnx", ids), _logits(src, ids), rtol=1e-4, atol=1e-4)
