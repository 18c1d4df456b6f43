"""The fp16 recipe converts a graph whose weights lie in a data file one weight at a time, to exactly what
onnxruntime's float16 converter makes of the same graph in memory."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgegpt.graph.io import load_graph
from edgegpt.quantize.recipes.fp16 import build, convert


@pytest.mark.parametrize("stored", ["data file", "inline"])
def test_a_graph_converts_one_weight_at_a_time_to_what_the_converter_makes_in_memory(trained_bundle, tmp_path,
                                                                                     stored, monkeypatch):
    from edgegpt.quantize.recipes import fp16

    seen = []  # the largest weight the converter was given in memory: none, wherever the graph kept them
    monkeypatch.setattr(fp16, "convert", lambda m, folder=None: seen.append(
        max(len(t.raw_data) for t in m.graph.initializer)) or convert(m, folder))
    failed = []  # the shape inference reads the values it needs (biases) from the data file, and succeeds
    monkeypatch.setattr(fp16.log, "debug", lambda *a: failed.append(a))
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    src = trained_bundle / "model.onnx"
    if stored == "data file":
        src = tmp_path / "src" / "model.onnx"
        # every tensor in the file, the shapes and biases the shape inference reads included
        onnx.save_model(load_graph(trained_bundle / "model.onnx"), str(src), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    build(src, tmp_path / "out" / "model.onnx", {}, None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]  # the scratch copy is gone
    assert seen and seen[0] < 1024 and not failed
    want = convert(load_graph(trained_bundle / "model.onnx"))
    got = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in want.graph.node]
    assert [(t.name, t.data_type) for t in got.graph.initializer] == [(t.name, t.data_type) for t in want.graph.initializer]
    halves = [t for t in want.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) > 4
    for a, b in zip(got.graph.initializer, want.graph.initializer):
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)), a.name
    ids = np.arange(1, 9, dtype=np.int64)[None]
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([d if isinstance(d, int) else 0 for d in i.shape], np.float16) for i in session.get_inputs()
            if i.name.startswith("past")}
    feed.update(input_ids=ids, attention_mask=np.ones_like(ids), position_ids=np.arange(8, dtype=np.int64)[None])
    feed = {k: v.reshape([1, *v.shape[1:]]) if k.startswith("past") else v for k, v in feed.items()}
    assert np.isfinite(session.run(["logits"], feed)[0]).all()
