"""graph.io's streamed writer: one initializer at a time, the same model as onnx's own save."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegpt.graph.io import save_model, write_streamed


def test_streamed_file_is_the_model_onnx_would_write(trained_bundle, tmp_path):
    model = onnx.load(str(trained_bundle / "model.onnx"))
    save_model(model, tmp_path / "a.onnx", external=False)
    onnx.save_model(model, str(tmp_path / "b.onnx"))
    assert onnx.load(str(tmp_path / "a.onnx")) == onnx.load(str(tmp_path / "b.onnx")) == model
    assert (tmp_path / "a.onnx").stat().st_size == (tmp_path / "b.onnx").stat().st_size


def test_tensors_without_raw_data_and_an_empty_graph(tmp_path):
    """Initializers held as typed fields (int64_data, float_data, a string), beside raw ones."""
    raw = numpy_helper.from_array(np.arange(300, dtype=np.float32).reshape(3, 100), "raw")
    typed = helper.make_tensor("typed", TensorProto.INT64, [4], [1, -2, 3, 2 ** 40])
    floats = helper.make_tensor("floats", TensorProto.FLOAT, [2], [0.5, -1.5])
    strings = helper.make_tensor("strings", TensorProto.STRING, [1], [b"x"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 100])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 100])
    graph = helper.make_graph([helper.make_node("Add", ["x", "raw"], ["y"])], "g", [x], [y],
                              [raw, typed, floats, strings])
    for m in (helper.make_model(graph), helper.make_model(helper.make_graph([], "empty", [], []))):
        write_streamed(m, tmp_path / "m.onnx")
        assert onnx.load(str(tmp_path / "m.onnx")) == m


def test_save_graph_goes_external_past_the_threshold_and_never_leaves_a_stale_data_file(trained_bundle, tmp_path,
                                                                                       monkeypatch):
    import edgegpt.graph.io as gio

    path = tmp_path / "m.onnx"
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", 0)
    for _ in range(2):  # a second save over the first: onnx would append to the data file already there
        gio.save_graph(onnx.load(str(trained_bundle / "model.onnx")), path)
        assert gio.external_data_name(path) == "m.onnx.data"
        # appended to the first file, it would hold the weights twice
        assert gio.data_file(path).stat().st_size < 1.5 * gio.data_file(trained_bundle / "model.onnx").stat().st_size
    assert onnx.load(str(path)).graph.node == onnx.load(str(trained_bundle / "model.onnx")).graph.node
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", int(1.5 * 1024**3))
    model = onnx.load(str(path))
    gio.save_graph(model, path)  # small enough to go inline again: the old data file must not stay behind
    assert gio.external_data_name(path) is None and onnx.load(str(path)) == model


def test_set_layout_moves_the_weights_between_a_data_file_and_the_graph(trained_bundle, tmp_path, monkeypatch):
    import edgegpt.graph.io as gio

    path = tmp_path / "model.onnx"
    gio.copy_graph(trained_bundle / "model.onnx", path)
    assert gio.external_data_name(path) == "model.onnx.data"
    want = onnx.load(str(trained_bundle / "model.onnx"))

    def same(model) -> bool:  # the same graph and weight values (onnx.load marks where each tensor was read from)
        return model.graph.node == want.graph.node and all(
            a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
            for a, b in zip(model.graph.initializer, want.graph.initializer, strict=True))

    gio.set_layout(path, external=False)
    assert not gio.data_file(path).exists() and same(onnx.load(str(path), load_external_data=False))
    gio.set_layout(path, external=False)  # already inline: unchanged
    assert same(onnx.load(str(path)))
    gio.set_layout(path, external=True)
    assert gio.external_data_name(path) == "model.onnx.data" and path.stat().st_size < 100_000
    assert same(onnx.load(str(path)))
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", 1000)
    with pytest.raises(ValueError, match="too large for one file"):
        gio.set_layout(path, external=False)
    assert same(onnx.load(str(path)))


def test_a_graph_with_a_data_file_is_copied_under_its_own_name(trained_bundle, tmp_path):
    import edgegpt.graph.io as gio

    with pytest.raises(ValueError, match="copy it under the same name"):
        gio.copy_graph(trained_bundle / "model.onnx", tmp_path / "other.onnx")
    assert not list(tmp_path.iterdir())
