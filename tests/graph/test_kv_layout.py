"""graph.kv_layout: the default export's shared KV buffer rewritten to the concat layout, node for node."""

import onnx
import pytest

from edgegpt.errors import BundleError
from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.graph.kv_layout import shared_to_concat


def _graph(path):
    return onnx.load(str(path / "model.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("shape", ["gpt2-like", "mistral-like"])
def test_a_shared_graph_becomes_the_concat_export(hf_checkpoint, tmp_path, shape):
    """The rewritten graph has the concat export's nodes (attention scales included), IO and initializers."""
    export_bundle(hf_checkpoint(shape), tmp_path / "shared", ExportOptions(kv_cache="shared"))
    export_bundle(hf_checkpoint(shape), tmp_path / "concat", ExportOptions(kv_cache="concat"))
    model = onnx.load(str(tmp_path / "shared" / "model.onnx"), load_external_data=False)
    assert shared_to_concat(model) == len([n for n in _graph(tmp_path / "shared").node
                                           if n.op_type == "GroupQueryAttention"])
    got, want = model.graph, _graph(tmp_path / "concat")
    assert sorted(n.SerializeToString() for n in got.node) == sorted(n.SerializeToString() for n in want.node)
    assert (got.input, got.output) == (want.input, want.output)
    assert sorted(t.name for t in got.initializer) == sorted(t.name for t in want.initializer)
    assert not {v.name for v in got.value_info} - {o for n in got.node for o in n.output}


def test_a_graph_it_cannot_rewrite_is_refused(hf_checkpoint, tmp_path):
    from edgegpt.quantize.bundle import quantize_bundle

    export_bundle(hf_checkpoint("gpt2-like"), tmp_path / "concat", ExportOptions(kv_cache="concat"))
    with pytest.raises(BundleError, match="no plain GroupQueryAttention"):
        shared_to_concat(onnx.load(str(tmp_path / "concat" / "model.onnx"), load_external_data=False))
    export_bundle(hf_checkpoint("gpt2-like"), tmp_path / "shared")
    quantize_bundle(tmp_path / "shared", tmp_path / "kv8", "int8", kv_cache="int8", eval_tokens=256, force=True)
    with pytest.raises(BundleError, match="int8 KV cache"):
        shared_to_concat(onnx.load(str(tmp_path / "kv8" / "model.onnx"), load_external_data=False))
