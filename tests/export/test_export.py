"""`edgegpt export`: verified bundles, the IO contract, padding, interop, and refusals."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from edgegpt import contract
from edgegpt.cli import main
from edgegpt.errors import BundleError, CheckpointError, ExportError, OutputExistsError
from edgegpt.export.bundle import VerificationFailed, export_bundle, reverify
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.manifest import MANIFEST, read_manifest, sha256_file
from edgegpt.model import load_checkpoint


@pytest.fixture(scope="module")
def bundle(hf_checkpoint, tmp_path_factory):
    """The fused graph with the concat cache: Optimum's and transformers.js's contract."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    export_bundle(hf_checkpoint("gpt2-like"), out, ExportOptions(kv_cache="concat"))
    return out


@pytest.fixture(scope="module")
def traced_bundle(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "traced"
    export_bundle(hf_checkpoint("gpt2-like"), out, ExportOptions(graph="traced"))
    return out


def _session(bundle):
    return ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])


def _feed(cfg, ids, mask, pos, past=None):
    n = cfg.n_layer
    if past is None:
        past = [np.zeros((ids.shape[0], cfg.n_head, 0, cfg.head_dim), np.float32)] * (2 * n)
    return {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask, contract.POSITION_IDS: pos,
            **dict(zip(contract.past_names(n), past))}


@pytest.mark.parametrize("graph", ["fused", "traced"])
@pytest.mark.parametrize("shape", ["distil-like", "odd-heads", "small-vocab"])
def test_export_verifies_and_describes_itself(hf_checkpoint, tmp_path, shape, graph):
    m = export_bundle(hf_checkpoint(shape), tmp_path / "b", ExportOptions(graph=graph))
    assert m["graph"]["options"]["graph"] == graph
    v = m["verification"]
    assert v["passed"] and v["greedy_identical"] and v["max_abs_logit_diff"] < 1e-4 and v["decode_steps"] >= 16
    assert set(json.loads((tmp_path / "b" / "genai_config.json").read_text())["model"]) >= {"decoder", "type"}
    for name in ("model.onnx", "tokenizer.json", "config.json", "generation_config.json", "genai_config.json"):
        assert m["files"][name]["sha256"] == sha256_file(tmp_path / "b" / name)
    assert [i["name"] for i in m["io"]["inputs"]] == contract.input_names(m["architecture"]["n_layer"])
    assert not list(tmp_path.glob(".b.tmp-*"))


@pytest.mark.parametrize("shape", ["mistral-like", "unscaled"])
def test_attention_scaling_options_export_to_transformers_tokens(hf_checkpoint, tmp_path, shape):
    """Every graph kind carries a checkpoint's own attention scale (per layer for Stanford CRFM's Mistral GPT-2s,
    none for scale_attn_weights=false): logits and greedy tokens are transformers' eager attention's."""
    from edgegpt.model.tokenizer import load_tokenizer
    from edgegpt.runtime import Generator

    src = hf_checkpoint(shape)
    hf = transformers_eager(src)
    cfg = load_checkpoint(src)[0].config
    prompt = load_tokenizer(src).encode("The with statement").ids
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want_logits = hf(ids).logits.numpy()
        want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(ids))[0, len(prompt):].tolist()
    for name, options in (("concat", ExportOptions(kv_cache="concat")), ("shared", ExportOptions()),
                          ("traced", ExportOptions(graph="traced"))):
        out = tmp_path / name
        assert export_bundle(src, out, options)["verification"]["passed"]
        if name == "concat":
            n = len(prompt)
            got = _session(out).run([contract.LOGITS], _feed(cfg, ids.numpy(), np.ones((1, n), np.int64),
                                                              np.arange(n)[None]))[0]
            assert np.abs(got - want_logits).max() < 1e-4
            scales = [a.f for node in onnx.load(out / "model.onnx", load_external_data=False).graph.node
                      for a in node.attribute if a.name == "scale"]
            assert scales == pytest.approx([cfg.attn_scale(i) for i in range(cfg.n_layer)])
        assert Generator.load(out).generate_ids([prompt], 12)[0] == want, name


def test_the_default_export_keeps_the_shared_kv_buffer_where_the_graph_takes_it(hf_checkpoint, tmp_path):
    """--kv-cache auto (the default): the fused graph's shared buffer, updated in place, unless GroupQueryAttention
    cannot take the model (head_dim not a multiple of 8) or the graph is traced; then the concat cache."""
    from edgegpt.runtime.session import ModelSession

    cases = (("distil-like", "fused", True), ("distil-like", "traced", False), ("odd-heads", "fused", True))
    for shape, graph, shared in cases:
        out = tmp_path / f"{shape}-{graph}"
        m = export_bundle(hf_checkpoint(shape), out, ExportOptions(graph=graph))
        assert m["graph"]["options"]["shared_kv_buffer"] is shared and bool(ModelSession(out).kv_capacity) is shared
    ck = shutil.copytree(hf_checkpoint("small-vocab"), tmp_path / "hd12")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "n_head": 8}))  # head_dim 32 / 8 = 4
    assert not export_bundle(ck, tmp_path / "hd4")["graph"]["options"]["shared_kv_buffer"]
    with pytest.raises(ExportError, match="head_dim divisible by 8"):
        export_bundle(ck, tmp_path / "hd4-shared", ExportOptions(kv_cache="shared"))


def transformers_eager(path):
    """transformers' SDPA path ignores scale_attn_weights and scale_attn_by_inverse_layer_idx
    (huggingface/transformers#44380); its eager path is GPT-2's definition."""
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()


def test_the_bundle_tokenizer_loads_in_transformers_like_the_runtimes(bundle, tmp_path):
    """tokenizer_config.json and special_tokens_map.json beside tokenizer.json name the tokenizer's class and
    special tokens, as transformers.js needs: AutoTokenizer loads from those three files alone (no
    config.json to guess the class from) and gives the runtime's ids and eos."""
    transformers = pytest.importorskip("transformers")
    from edgegpt.runtime import Generator

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundle / name, tmp_path / name)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    gen = Generator.load(bundle)
    text = "The with statement wraps a block: ünïcode too."
    assert tok(text)["input_ids"] == gen.encode(text)
    assert tok.eos_token_id == gen.eos_token_id and type(tok).__name__.startswith("GPT2Tokenizer")


def _no_dead_nodes(g):
    produced = {o for n in g.graph.node for o in n.output if o}
    consumed = {i for n in g.graph.node for i in n.input} | {o.name for o in g.graph.output}
    return produced <= consumed


def test_the_fused_graph_computes_the_logits_of_as_many_last_positions_as_asked(bundle):
    """logits_to_keep is an overridable initializer: a runtime that does not know it (Optimum, onnxruntime-genai,
    transformers.js) sees the same inputs as before and gets every position; edgegpt's runtime asks a prefill for
    one, and the LM head runs once instead of once per prompt token."""
    from edgegpt.runtime.session import ModelSession

    s = ModelSession(bundle)
    assert s.keeps_logits
    assert contract.LOGITS_TO_KEEP not in {i.name for i in s.session.get_inputs()}
    ids = np.arange(5, 17, dtype=np.int64)[None]
    feed = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones_like(ids),
            contract.POSITION_IDS: np.arange(12, dtype=np.int64)[None]}
    feed.update({n: s.empty_past_numpy(1) for n in contract.past_names(s.n_layer)})
    every = s.session.run([contract.LOGITS], feed)[0]
    assert every.shape == (1, 12, s.vocab_size)
    for n in (1, 3):
        kept = s.session.run([contract.LOGITS], {**feed, contract.LOGITS_TO_KEEP: np.array([n], np.int64)})[0]
        assert kept.shape == (1, n, s.vocab_size)
        np.testing.assert_allclose(kept, every[:, -n:], atol=1e-5)
    cache = s.start(1)  # the runtime's prefill: the last row, as the full graph computes it
    np.testing.assert_allclose(cache.step(ids, feed[contract.ATTENTION_MASK], feed[contract.POSITION_IDS]),
                               every[:, -1], atol=1e-5)
    assert cache._keep[0] == 1
    rows = s.start(1).step(ids, feed[contract.ATTENTION_MASK], feed[contract.POSITION_IDS], all_rows=True)
    np.testing.assert_allclose(rows, every, atol=1e-5)  # speculative verification: every row


def test_fused_graph_is_made_of_contrib_kernels(bundle):
    g = onnx.load(str(bundle / "model.onnx"))
    m = read_manifest(bundle)
    counts, L = m["graph"]["op_counts"], m["architecture"]["n_layer"]
    assert counts["com.microsoft.MultiHeadAttention"] == L and counts["LayerNormalization"] == 2 * L + 1
    assert "com.microsoft.SkipLayerNormalization" not in counts  # slow on CPU: Add, Add, LayerNormalization instead
    assert counts["com.microsoft.FastGelu"] == L and counts["MatMul"] == 4 * L and counts["Gemm"] == 1
    assert sum(counts.values()) < 16 * L + 2  # vs ~50 per layer traced (+ logits_to_keep's two, once per graph)
    assert m["graph"]["options"]["fused_attention"] == "com.microsoft.MultiHeadAttention"
    assert len([t for t in g.graph.initializer if 1000 in t.dims]) == 1 and _no_dead_nodes(g)


def test_traced_graph_is_clean_and_stores_the_tied_embedding_once(traced_bundle):
    bundle = traced_bundle
    g = onnx.load(str(bundle / "model.onnx"))
    onnx.checker.check_model(g)
    V, C = 1000, 96
    big = [t for t in g.graph.initializer if V in t.dims]
    assert len(big) == 1 and list(big[0].dims) == [V, C]  # the LM head Gemm reads wte itself
    assert any(n.op_type == "Gemm" and n.attribute[0].i == 1 for n in g.graph.node)
    assert _no_dead_nodes(g)
    assert all(vi.type.tensor_type.elem_type for vi in g.graph.value_info)  # shapes were inferred
    assert {o.domain for o in g.opset_import} == {""}
    assert read_manifest(bundle)["graph"]["op_counts"]["Gemm"] == 1


@pytest.mark.parametrize("which", ["bundle", "traced_bundle"])
def test_left_padded_batch_gives_the_same_logits_for_real_tokens(which, hf_checkpoint, request):
    bundle = request.getfixturevalue(which)
    model, _ = load_checkpoint(hf_checkpoint("gpt2-like"))
    cfg, sess = model.config, _session(bundle)
    rng = np.random.default_rng(0)
    short, long = rng.integers(0, cfg.vocab_size, (1, 5)), rng.integers(0, cfg.vocab_size, (1, 9))
    ids = np.concatenate([np.concatenate([np.zeros((1, 4), np.int64), short], 1), long]).astype(np.int64)
    mask = np.array([[0] * 4 + [1] * 5, [1] * 9], np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    out = sess.run(None, _feed(cfg, ids, mask, pos))
    alone = sess.run(None, _feed(cfg, short.astype(np.int64), np.ones((1, 5), np.int64), np.arange(5)[None]))
    assert np.abs(out[0][0, 4:] - alone[0][0]).max() < 1e-4
    # and one cached step on top of the padded batch
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    step = sess.run(None, _feed(cfg, np.array([[7], [7]]), step_mask, np.array([[5], [9]]), out[1:]))
    step_alone = sess.run(None, _feed(cfg, np.array([[7]]), np.ones((1, 6), np.int64), np.array([[5]]), alone[1:]))
    assert np.abs(step[0][0] - step_alone[0][0]).max() < 1e-4
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    assert np.abs(ref.numpy()[:, -1] - out[0][:, -1]).max() < 1e-4


def test_last_logits_only_is_recorded_and_honoured(hf_checkpoint, tmp_path):
    m = export_bundle(hf_checkpoint("distil-like"), tmp_path / "b", ExportOptions(last_logits_only=True))
    assert m["graph"]["options"]["last_logits_only"] and m["io"]["outputs"][0]["shape"][1] == 1
    model, _ = load_checkpoint(hf_checkpoint("distil-like"))
    ids = np.arange(1, 8, dtype=np.int64)[None]
    out = _session(tmp_path / "b").run(None, _feed(model.config, ids, np.ones_like(ids), np.arange(7)[None]))
    assert out[0].shape == (1, 1, model.config.vocab_size)
    assert m["verification"]["passed"]


def test_external_data_keeps_weights_beside_the_graph(hf_checkpoint, tmp_path):
    m = export_bundle(hf_checkpoint("small-vocab"), tmp_path / "b", ExportOptions(external_data="always"))
    assert m["graph"]["external_data"] == "model.onnx.data" and (tmp_path / "b" / "model.onnx.data").is_file()
    # readable like the graph beside it (onnx alone would leave the data file 0600)
    mode = lambda name: (tmp_path / "b" / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.onnx.data") == mode("model.onnx")
    assert (tmp_path / "b" / "model.onnx").stat().st_size < 100_000 and m["verification"]["passed"]
    # the weights went to the file as the graph was built: the same tensors as an inline export's, each at a
    # page-aligned offset (onnxruntime maps them), and the same logits
    export_bundle(hf_checkpoint("small-vocab"), tmp_path / "inline", ExportOptions(external_data="never"))
    import onnx
    from onnx import numpy_helper

    inline, ext = (onnx.load(str(tmp_path / b / "model.onnx")) for b in ("inline", "b"))
    assert [t.name for t in ext.graph.initializer] == [t.name for t in inline.graph.initializer]
    assert all(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(inline.graph.initializer, ext.graph.initializer))
    offsets = [int({e.key: e.value for e in t.external_data}["offset"])
               for t in onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False).graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(offsets) >= 4 and all(o % 4096 == 0 for o in offsets)
    model, _ = load_checkpoint(hf_checkpoint("small-vocab"))
    ids = np.arange(1, 8, dtype=np.int64)[None]
    feed = _feed(model.config, ids, np.ones_like(ids), np.arange(7)[None])
    assert np.array_equal(_session(tmp_path / "b").run(None, feed)[0], _session(tmp_path / "inline").run(None, feed)[0])


def test_too_big_for_protobuf_without_external_data_is_refused(hf_checkpoint, tmp_path, monkeypatch):
    from edgegpt.graph import io as graph

    monkeypatch.setattr(graph, "PROTOBUF_LIMIT", 1000)
    with pytest.raises(ExportError, match="over protobuf's 2 GB limit; use --external-data always"):
        export_bundle(hf_checkpoint("small-vocab"), tmp_path / "b", ExportOptions(external_data="never"))
    assert not (tmp_path / "b").exists()


def test_failed_verification_leaves_nothing_unless_kept(hf_checkpoint, tmp_path):
    src = hf_checkpoint("small-vocab")
    with pytest.raises(VerificationFailed, match="not written"):
        export_bundle(src, tmp_path / "b", atol=0.0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VerificationFailed, match="kept at"):
        export_bundle(src, tmp_path / "b", atol=0.0, keep_failed=True)
    assert read_manifest(tmp_path / "b")["verification"]["passed"] is False


def test_refusals(hf_checkpoint, tmp_path, bundle):
    src = hf_checkpoint("small-vocab")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_bundle(src, bundle)
    with pytest.raises(OutputExistsError, match="is the input"):
        export_bundle(src, src, overwrite=True)
    with pytest.raises(ExportError, match="opset 9 cannot be written"):
        export_bundle(src, tmp_path / "b", ExportOptions(opset=9))
    llama = shutil.copytree(src, tmp_path / "llama")
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM"):
        export_bundle(llama, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_verify_and_inspect_commands(bundle, hf_checkpoint, tmp_path):
    res = CliRunner().invoke(main, ["verify", str(bundle), "--against", str(hf_checkpoint("gpt2-like"))])
    assert res.exit_code == 0 and "PASSED" in res.output
    res = CliRunner().invoke(main, ["inspect", str(bundle)])
    assert res.exit_code == 0 and "parity      PASSED" in res.output and "4 layers" in res.output
    other = CliRunner().invoke(main, ["verify", str(bundle), "--against", str(hf_checkpoint("small-vocab"))])
    assert other.exit_code == 1 and "different architecture" in other.output
    corrupt = shutil.copytree(bundle, tmp_path / "corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(BundleError, match=r"model.onnx is 9 bytes, its manifest says .* \(truncated or edited\)"):
        reverify(corrupt, hf_checkpoint("gpt2-like"))
    (corrupt / MANIFEST).write_text("{}")
    res = CliRunner().invoke(main, ["inspect", str(corrupt)])
    assert res.exit_code == 1 and "not an edgegpt manifest" in res.output


def test_optimum_loads_the_bundle_and_generates_our_greedy_tokens(bundle, hf_checkpoint):
    optimum_ort = pytest.importorskip("optimum.onnxruntime")
    from edgegpt.model.generate import generate_ids

    model, tok = load_checkpoint(hf_checkpoint("gpt2-like"))
    ids = tok.encode("The import statement").ids
    m = optimum_ort.ORTModelForCausalLM.from_pretrained(bundle)
    out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert out[0, len(ids):].tolist() == generate_ids(model, ids, 24)


def test_onnxruntime_genai_runs_the_bundle(bundle, hf_checkpoint):
    og = pytest.importorskip("onnxruntime_genai")
    from edgegpt.model.generate import generate_ids

    model, tok = load_checkpoint(hf_checkpoint("gpt2-like"))
    ids = tok.encode("The import statement").ids
    og_model = og.Model(str(bundle))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(ids) + 24, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens(ids)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == generate_ids(model, ids, 24)


def test_cpu_sessions_keep_layer_norm_unfused(bundle, monkeypatch):
    """onnxruntime would fuse Add + Add + LayerNormalization back into its slower CPU
    SkipLayerNormalization; the runtime turns that one fusion off on CPU."""
    import onnxruntime as ort

    from edgegpt.runtime.session import ModelSession

    seen = {}
    real = ort.InferenceSession

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    ModelSession(bundle)
    assert seen["disabled_optimizers"] == ["SkipLayerNormFusion"]
