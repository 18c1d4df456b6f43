"""`edgegpt package --target web`: transformers.js's Hub layout (the graph under onnx/, named by its dtype)."""

import json

import pytest
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.errors import BundleError, PackageError
from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.manifest import MODEL_FILE, read_manifest, sha256_file
from edgegpt.package.bundle import package_bundle
from edgegpt.package.web import DTYPES


@pytest.fixture(scope="module")
def source(trained_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("web") / "fp32"
    export_bundle(trained_checkpoint, out, ExportOptions(kv_cache="concat"))  # transformers.js grows the cache
    return out


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_web_package_is_the_hub_layout(source, tmp_path, precision):
    out = tmp_path / "web"
    m = package_bundle(source, "web", out, precision=None if precision == "int8" else precision)
    dtype, name = DTYPES[precision]
    w = m["package"]["web"]
    assert m["package"]["precision"] == precision and w["dtype"] == dtype and w["model_file"] == f"onnx/{name}"
    assert sorted(p.name for p in (out / "onnx").iterdir()) == [name]
    assert not (out / MODEL_FILE).exists()  # one copy of the graph, where transformers.js looks
    # the source keeps its weights in a data file; the browser fetches one graph file that holds them
    assert read_manifest(source)["graph"]["external_data"] and not list(out.rglob("*.data"))
    assert sha256_file(out / "onnx" / name) == w["sha256"] and (out / "onnx" / name).stat().st_size == w["bytes"]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert f'dtype: "{dtype}"' in (out / "README.txt").read_text()
    # WebGPU's MultiHeadAttention takes the mask as one additive bias, in every layer
    assert w["attention_bias"] == read_manifest(source)["architecture"]["n_layer"]
    with pytest.raises(BundleError, match="is a web package .* loads the bundle it was packaged from"):
        read_manifest(out)


@pytest.fixture(scope="module")
def shared_source(trained_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("web-shared") / "fp32"
    export_bundle(trained_checkpoint, out)  # the default export: the shared KV buffer
    return out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_default_exports_shared_buffer_is_rewritten_for_transformers_js(source, shared_source, tmp_path,
                                                                            precision):
    """A bundle with the shared KV buffer packages for the web without its checkpoint: its graph is rewritten to
    the growing cache transformers.js drives, node for node the concat export's, so the package is the one the
    concat export gives."""
    import onnx

    assert read_manifest(shared_source)["graph"]["options"]["shared_kv_buffer"]
    got = package_bundle(shared_source, "web", tmp_path / "from-shared", precision=precision)
    want = package_bundle(source, "web", tmp_path / "from-concat", precision=precision)
    rewrite = got["package"]["web"]["kv_rewrite"]
    assert rewrite["layers"] == got["architecture"]["n_layer"] and rewrite["max_abs_logit_diff"] <= 1e-5
    assert "kv_rewrite" not in want["package"]["web"]
    graphs = [onnx.load(str(d / m["package"]["web"]["model_file"]))
              for d, m in ((tmp_path / "from-shared", got), (tmp_path / "from-concat", want))]
    assert not any(n.op_type == "GroupQueryAttention" for n in graphs[0].graph.node)
    a, b = (g.graph for g in graphs)  # the same nodes, IO and weights (in another order)
    assert sorted(n.SerializeToString() for n in a.node) == sorted(n.SerializeToString() for n in b.node)
    assert sorted(t.SerializeToString() for t in a.initializer) == sorted(t.SerializeToString() for t in b.initializer)
    assert (a.input, a.output) == (b.input, b.output)
    assert got["io"] == want["io"] and not got["graph"]["options"]["shared_kv_buffer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-concat", "from-shared"]  # no scratch left


def test_web_refusals_and_cli(source, shared_source, tmp_path):
    from edgegpt.quantize.bundle import quantize_bundle

    quantize_bundle(shared_source, tmp_path / "int8", "int8", eval_tokens=512, force=True)
    with pytest.raises(PackageError, match="is int8 with the shared KV buffer.*package the fp32 bundle"):
        package_bundle(tmp_path / "int8", "web", tmp_path / "x", precision="int8")
    with pytest.raises(PackageError, match="cannot run int8-static"):
        package_bundle(source, "web", tmp_path / "x", precision="int8-static")
    assert not (tmp_path / "x").exists()
    res = CliRunner().invoke(main, ["package", str(source), "--target", "web", "--out", str(tmp_path / "w"),
                                    "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert 'transformers.js layout: onnx/model.onnx' in res.output and 'dtype "fp32"' in res.output
    res = CliRunner().invoke(main, ["generate", str(tmp_path / "w"), "--prompt", "x", "--max-new-tokens", "2"])
    assert res.exit_code != 0 and "is a web package" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("options", [{}, {"lm_head": "int4", "embedding": "int8"}])
def test_web_graph_reads_the_embedding_with_standard_ops_and_the_same_rows(source, tmp_path, options):
    """onnxruntime-web's WASM backend has no GatherBlockQuantized: the web graph reads the same bytes with Gather,
    Cast, Sub and Mul (the head's shared blocks, or a blocked copy), and gives the same logits."""
    import shutil

    import numpy as np
    import onnx

    from edgegpt.manifest import seal
    from edgegpt.quality.evaluate import window_logits
    from edgegpt.quantize.bundle import quantize_bundle
    from edgegpt.runtime.session import ModelSession

    q = tmp_path / "int4"
    m = quantize_bundle(source, q, "int4", options=options, eval_tokens=512, force=True)
    assert m["recipe"]["embedding_table"] == ("shared" if not options else "copy")
    pkg = package_bundle(q, "web", tmp_path / "web", precision="int4")
    assert pkg["package"]["web"]["embedding_in_standard_ops"] is True
    graph = tmp_path / "web" / pkg["package"]["web"]["model_file"]
    assert "GatherBlockQuantized" not in {n.op_type for n in onnx.load(str(graph)).graph.node}
    check = tmp_path / "check"  # the web graph in a copy of the source bundle, to run it with the runtime
    shutil.copytree(q, check)
    shutil.copy2(graph, check / MODEL_FILE)
    seal(check, read_manifest(q))
    ids = np.arange(3, 40, dtype=np.int64)
    np.testing.assert_allclose(window_logits(ModelSession(check), ids), window_logits(ModelSession(q), ids),
                               rtol=1e-5, atol=1e-5)


def test_a_4bit_embedding_is_refused_for_the_web(source, tmp_path):
    from edgegpt.quantize.bundle import quantize_bundle

    q = tmp_path / "int4"
    quantize_bundle(source, q, "int4", options={"lm_head": "int4", "embedding": "int4"}, eval_tokens=512, force=True)
    with pytest.raises(PackageError, match="needs an 8-bit or fp32 embedding table"):
        package_bundle(q, "web", tmp_path / "web", precision="int4")
    assert not (tmp_path / "web").exists()


def test_web_graph_masks_with_an_attention_bias_and_gives_the_same_logits(source, tmp_path):
    """onnxruntime-web's WebGPU MultiHeadAttention implements neither key_padding_mask nor unidirectional: the web
    graph adds one bias built from attention_mask, and a left-padded batch with a past gives the bundle's logits."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgegpt import contract

    pkg = package_bundle(source, "web", tmp_path / "web", precision="fp32")
    graph = onnx.load(str(tmp_path / "web" / pkg["package"]["web"]["model_file"]))
    mha = [n for n in graph.graph.node if n.op_type == "MultiHeadAttention"]
    assert mha and all(n.input[4] == "" and n.input[5] for n in mha)
    assert not any(a.name == "unidirectional" for n in mha for a in n.attribute)
    a = read_manifest(source)["architecture"]
    web = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(source / MODEL_FILE), providers=["CPUExecutionProvider"])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)
    feed = {contract.INPUT_IDS: np.array([[0, 0, 5, 9, 2, 7], [4, 8, 15, 16, 23, 42]], np.int64),
            contract.ATTENTION_MASK: mask, contract.POSITION_IDS: np.clip(mask.cumsum(1) - 1, 0, None)}
    empty = np.zeros((2, a["n_head"], 0, a["head_dim"]), np.float32)
    feed.update({n: empty for n in contract.past_names(a["n_layer"])})
    got, want = web.run(None, feed), ref.run(None, feed)
    np.testing.assert_allclose(got[0][0, 2:], want[0][0, 2:], rtol=1e-4, atol=1e-4)  # the padded row's real tokens
    np.testing.assert_allclose(got[0][1], want[0][1], rtol=1e-4, atol=1e-4)
    step = {contract.INPUT_IDS: np.array([[11], [12]], np.int64),
            contract.ATTENTION_MASK: np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
            contract.POSITION_IDS: np.array([[4], [6]], np.int64)}
    step.update(zip(contract.past_names(a["n_layer"]), want[1:]))
    np.testing.assert_allclose(web.run(None, step)[0], ref.run(None, step)[0], rtol=1e-4, atol=1e-4)
