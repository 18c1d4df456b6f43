"""`edgegpt quantize` and `edgegpt eval` on a model with trained weights."""


import pytest
import torch
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.errors import DataError, QuantizeError
from edgegpt.manifest import file_table, read_manifest
from edgegpt.quantize.bundle import quantize_bundle
from edgegpt.corpus import default_eval_text
from edgegpt.quality.evaluate import evaluate
from edgegpt.runtime import Generator

EVAL_TOKENS = 1500  # keeps each quantize call to a second or two


@pytest.fixture(scope="module")
def quantized(trained_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    before = file_table(trained_bundle)
    out = {mode: quantize_bundle(trained_bundle, root / mode, mode, eval_tokens=EVAL_TOKENS)
           for mode in ("int8", "int4", "fp16")}
    out["int8-static"] = quantize_bundle(trained_bundle, root / "int8-static", "int8-static",
                                         calibration=default_eval_text()[:20000], eval_tokens=EVAL_TOKENS)
    assert file_table(trained_bundle) == before  # the input bundle is untouched
    return root, out


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16", "int8-static"])
def test_each_mode_is_within_budget_and_records_its_quality(quantized, trained_bundle, mode):
    root, manifests = quantized
    m = manifests[mode]
    q = m["quality"]
    assert m["precision"] == mode and q["ppl_increase_pct"] <= q["budget_pct"]
    assert 0 < q["kl_mean"] < 0.05 and q["top1_agreement"] > 0.85 and q["eval_tokens"] > 1000
    # and along the decode path, as generation runs it
    assert 0 < q["decode_path"]["kl_mean"] < 0.05 and q["decode_path"]["positions"] > 50
    assert q["source_perplexity"] == pytest.approx(evaluate(trained_bundle, default_eval_text(),
                                                            max_tokens=EVAL_TOKENS).perplexity, rel=1e-4)
    source = read_manifest(trained_bundle)
    graph_bytes = lambda m: sum(f["bytes"] for name, f in m["files"].items() if name.startswith("model.onnx"))  # noqa: E731
    assert graph_bytes(m) < graph_bytes(source)
    # the weights stay in a data file, as the source keeps them (onnxruntime maps it)
    assert m["graph"]["external_data"] == source["graph"]["external_data"] == "model.onnx.data"
    # runs in the runtime with no special casing by the caller
    text = Generator.load(root / mode).generate("The for statement", 12, ignore_eos=True)
    assert isinstance(text, str) and text


def test_kl_ranks_the_schemes(quantized):
    q = {mode: m["quality"] for mode, m in quantized[1].items()}
    assert q["fp16"]["kl_mean"] < q["int8"]["kl_mean"] < q["int4"]["kl_mean"]


def read_graph(bundle):
    import onnx

    return onnx.load(str(bundle / "model.onnx"))


def test_recipes_are_what_they_say(quantized):
    m = quantized[1]
    assert m["int8"]["graph"]["op_counts"]["MatMulInteger"] == 4 * 2  # 4 weight matmuls x 2 layers
    assert m["int4"]["graph"]["op_counts"]["com.microsoft.MatMulNBits"] == 4 * 2 + 1  # + the 8-bit LM head
    assert m["int4"]["recipe"]["block_size"] == 128 and m["int4"]["recipe"]["accuracy_level"] == 4
    assert m["int4"]["recipe"]["algorithm"] == "gptq"
    assert m["int4"]["recipe"]["symmetric"] is False
    for mode, block in (("int8", 64), ("int4", 128)):  # the 8-bit head: int8's in finer blocks
        heads = [n for n in read_graph(quantized[0] / mode).graph.node
                 if n.op_type == "MatMulNBits" and n.input[1].startswith("lm_head")]
        assert [a.i for a in heads[0].attribute if a.name == "block_size"] == [block]
        assert m[mode]["recipe"]["lm_head_block_size"] == block
    for mode in ("int8", "int4"):  # the embedding reads the 8-bit head's blocks: one table in the file
        assert m[mode]["recipe"]["embedding"] == "int8" and m[mode]["recipe"]["embedding_table"] == "shared"
        assert m[mode]["graph"]["op_counts"]["com.microsoft.GatherBlockQuantized"] == 1
    fp16_io = {x["name"]: x["dtype"] for x in m["fp16"]["io"]["inputs"] + m["fp16"]["io"]["outputs"]}
    assert fp16_io["past_key_values.0.key"] == "float16" and fp16_io["logits"] == "float32"
    assert m["int8-static"]["graph"]["op_counts"]["QuantizeLinear"] > 0


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_embedding_and_the_head_share_one_table(quantized, trained_bundle, mode):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(quantized[0] / mode / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("lm_head"))
    assert gather.input[0] == head.input[1]  # the same bytes
    attrs = {a.name: a.i for a in head.attribute}
    vocab, n_embd = attrs["N"], attrs["K"]
    tables = [t for t in inits.values() if t.size >= vocab * n_embd // 2]
    assert len(tables) == 1  # no second copy of the (vocab, n_embd) table, fp32 or quantized
    # the rows the Gather yields are the head's dequantized columns
    blocks = inits[head.input[1]].astype(np.float32)
    scales = inits[head.input[2]].reshape(blocks.shape[0], blocks.shape[1], 1)
    rows = ((blocks - 128) * scales).reshape(vocab, -1)[:, :n_embd]  # blocks pad n_embd to a whole block
    unsmooth = [v for k, v in inits.items() if k.endswith(".unsmooth")]  # int8 smooths the head's rows
    if unsmooth:
        rows = rows * unsmooth[0]
    import onnxruntime as ort

    nodes = [n for n in model.graph.node if n.name.startswith(gather.name.removesuffix("BlockQuantized"))]
    used = {i for n in nodes for i in n.input}
    g = onnx.helper.make_graph(nodes, "embed", [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 3])],
                               [onnx.helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
                               [t for t in model.graph.initializer if t.name in used])

    sess = ort.InferenceSession(onnx.helper.make_model(g, opset_imports=model.opset_import).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, vocab - 1]], np.int64)
    got = sess.run(None, {"input_ids": ids})[0][0]
    assert got.shape == (3, n_embd)
    np.testing.assert_allclose(got, rows[ids[0]], atol=1e-6)


def test_over_budget_is_an_error_unless_forced(trained_bundle, tmp_path):
    with pytest.raises(QuantizeError, match=r"over its budget of -5.0% by .* points; pass --force"):
        quantize_bundle(trained_bundle, tmp_path / "q", "int4", max_ppl_increase=-5.0, eval_tokens=EVAL_TOKENS)
    assert not (tmp_path / "q").exists()
    m = quantize_bundle(trained_bundle, tmp_path / "q", "int4", max_ppl_increase=-5.0, force=True,
                        eval_tokens=EVAL_TOKENS)
    assert m["quality"]["ppl_increase_pct"] > -5.0


def test_refusals(quantized, trained_bundle, tmp_path):
    root, _ = quantized
    with pytest.raises(QuantizeError, match="already int8; quantizing it again to int4"):
        quantize_bundle(root / "int8", tmp_path / "x", "int4")
    with pytest.raises(QuantizeError, match="needs calibration text"):
        quantize_bundle(trained_bundle, tmp_path / "x", "int8-static")
    with pytest.raises(QuantizeError, match="int8 does not take block_size"):
        quantize_bundle(trained_bundle, tmp_path / "x", "int8", options={"block_size": 64})
    with pytest.raises(QuantizeError, match="quantized embedding needs a quantized LM head"):
        quantize_bundle(trained_bundle, tmp_path / "x", "int4", options={"lm_head": "fp32", "embedding": "int8"})
    with pytest.raises(QuantizeError, match="block_size must be one of"):
        quantize_bundle(trained_bundle, tmp_path / "x", "int4", options={"block_size": 48})
    with pytest.raises(DataError, match="shorter than one window"):
        quantize_bundle(trained_bundle, tmp_path / "x", "int8", eval_text="too short")
    with pytest.raises(QuantizeError, match="unknown mode"):
        quantize_bundle(trained_bundle, tmp_path / "x", "int3")
    assert not (tmp_path / "x").exists()


def test_perplexity_matches_pytorch_on_one_window(trained_bundle, trained_checkpoint):
    from edgegpt.model import load_checkpoint

    model, tok = load_checkpoint(trained_checkpoint)
    text = default_eval_text()
    n = model.config.n_positions
    ids = torch.tensor([tok.encode(text).ids[:n]])
    with torch.no_grad():
        logits, _ = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    r = evaluate(trained_bundle, text, window=n, stride=n, max_tokens=n)
    assert r.tokens == n - 1 and r.windows == 1
    assert r.perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_strided_windows_score_every_token_once(trained_bundle):
    r = evaluate(trained_bundle, default_eval_text(), window=64, stride=16, max_tokens=500)
    assert r.tokens == 499 and r.windows > 20


def test_quantize_and_eval_commands(trained_bundle, tmp_path):
    cal = tmp_path / "cal.txt"
    cal.write_text(default_eval_text()[:5000])
    res = CliRunner().invoke(main, ["quantize", str(trained_bundle), "--out", str(tmp_path / "q"), "--mode", "int4",
                                    "--block-size", "32", "--symmetric", "--lm-head", "int4"])
    assert res.exit_code == 0, res.output
    recipe = read_manifest(tmp_path / "q")["recipe"]
    assert "ppl_increase_pct" in res.output and recipe["block_size"] == 32 and recipe["symmetric"] is True
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "q"), "--reference", str(trained_bundle),
                                    "--max-tokens", "600"])
    assert res.exit_code == 0 and "perplexity" in res.output and "top-1 agreement" in res.output
    again = CliRunner().invoke(main, ["quantize", str(trained_bundle), "--out", str(tmp_path / "q"), "--mode", "int8"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    static = CliRunner().invoke(main, ["quantize", str(trained_bundle), "--out", str(tmp_path / "s"), "--mode",
                                       "int8-static"])
    assert static.exit_code == 1 and "--calibration" in static.output


def test_last_logits_only_is_applied_after_measuring_quality(trained_checkpoint, tmp_path):
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions

    src = tmp_path / "shared"
    export_bundle(trained_checkpoint, src, ExportOptions(kv_cache="shared"))
    m = quantize_bundle(src, tmp_path / "q", "int8", eval_tokens=EVAL_TOKENS, last_logits_only=True)
    assert m["graph"]["options"]["last_logits_only"] and m["io"]["outputs"][0]["shape"][1] == 1
    assert m["quality"]["ppl_increase_pct"] <= 1.0
    full = quantize_bundle(src, tmp_path / "full", "int8", eval_tokens=EVAL_TOKENS)
    ids = Generator.load(src).encode("The while statement")
    assert Generator.load(tmp_path / "q").generate_ids([ids], 16, ignore_eos=True) == \
        Generator.load(tmp_path / "full").generate_ids([ids], 16, ignore_eos=True)
    assert full["quality"]["perplexity"] == m["quality"]["perplexity"]
    with pytest.raises(QuantizeError, match="last-logits-only"):
        evaluate(tmp_path / "q", default_eval_text())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_graph_with_external_data_quantizes_to_the_same_bundle(quantized, trained_checkpoint, tmp_path, mode,
                                                                 monkeypatch):
    """With the threshold at 0 every graph quantize writes on the way goes external too: the same quality and tokens
    as the default path. A source kept in one file (--external-data never) gives a bundle in one file."""
    import edgegpt.graph.io as gio
    from edgegpt.export.bundle import ExportOptions, export_bundle
    from edgegpt.manifest import verify_files

    src = tmp_path / "src"
    export_bundle(trained_checkpoint, src, ExportOptions(external_data="always", kv_cache="concat"))  # trained_bundle's
    root, inline = quantized
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", 0)
    m = quantize_bundle(src, tmp_path / mode, mode, eval_tokens=EVAL_TOKENS)
    assert m["graph"]["external_data"] == "model.onnx.data" and "model.onnx.data" in m["files"]
    assert sorted(p.name for p in (tmp_path / mode).iterdir() if "onnx" in p.name) == ["model.onnx",
                                                                                      "model.onnx.data"]
    verify_files(tmp_path / mode)
    assert m["quality"]["kl_mean"] == pytest.approx(inline[mode]["quality"]["kl_mean"], rel=1e-6)
    prompt = "The for statement"
    assert Generator.load(tmp_path / mode).generate(prompt, 12, ignore_eos=True) == \
        Generator.load(root / mode).generate(prompt, 12, ignore_eos=True)
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", int(1.5 * 1024**3))
    export_bundle(trained_checkpoint, tmp_path / "one-file", ExportOptions(external_data="never", kv_cache="concat"))
    assert read_manifest(tmp_path / "one-file")["graph"]["external_data"] is None
    m = quantize_bundle(tmp_path / "one-file", tmp_path / "inline", mode, eval_tokens=EVAL_TOKENS)
    assert m["graph"]["external_data"] is None and not (tmp_path / "inline" / "model.onnx.data").exists()
    assert m["quality"]["kl_mean"] == pytest.approx(inline[mode]["quality"]["kl_mean"], rel=1e-6)


def test_the_memory_check_follows_the_measured_lines_so_gpt2_xl_fits_24_gb():
    """Quantize's up-front check asks for the recipe's measured line (a multiple of the source plus a fixed part),
    not a multiple fitted at the smallest size alone: each line lies just above the peaks measured at each size
    (docs/benchmarks.md, the cost curve), so the check admits GPT-2 XL's 6.23 GB fp32 bundle to int8, int4,
    fp16 and fp32 on a 24 GB machine, and still refuses int8-static, measured at one size only."""
    from edgegpt.quantize.recipes import fp16, fp32, int4, int8, int8_static

    small, medium, large, xl = 0.498e9, 1.42e9, 3.097e9, 6.232e9
    measured = {int8: {small: 1.96e9, medium: 2.78e9, large: 4.14e9, xl: 7.52e9},
                int4: {small: 1.83e9, medium: 3.08e9, large: 4.13e9, xl: 7.69e9}, fp16: {small: 1.81e9, medium: 3.25e9, large: 5.80e9},
                fp32: {small: 1.60e9, medium: 2.98e9, large: 4.28e9, xl: 7.41e9}}
    for recipe, peaks in measured.items():
        for size, peak in peaks.items():
            assert peak <= recipe.CARD.memory_needed(size) < 1.2 * peak, (recipe.CARD.name, size)
        assert recipe.CARD.memory_needed(xl) < 20e9, recipe.CARD.name
    assert int8_static.CARD.memory_needed(xl) > 24e9
