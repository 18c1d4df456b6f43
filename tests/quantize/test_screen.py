"""The screened LM head (`quantize --mode fp32 --lm-head screened`): an 8-bit head that recomputes in
fp32 every token that could be picked, so generation gives the fp32 bundle's tokens."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgegpt import contract
from edgegpt.bench.roofline import weight_bytes_per_token
from edgegpt.cli import main
from edgegpt.errors import QuantizeError
from edgegpt.manifest import file_table, read_manifest
from edgegpt.quantize.bundle import quantize_bundle
from edgegpt.quantize.screen import head_bounds, quantize_head, screen_lm_head
from edgegpt.runtime import Generator
from edgegpt.runtime.sampling import SamplingParams, screen_margin
from edgegpt.runtime.session import ModelSession

PROMPTS = ("The with statement", "A class definition defines", "def f(x):\n    return")


@pytest.fixture(scope="module")
def screened(trained_bundle, tmp_path_factory):
    before = file_table(trained_bundle)
    out = tmp_path_factory.mktemp("screen") / "fp32-screened"
    m = quantize_bundle(trained_bundle, out, "fp32", options={"lm_head": "screened"}, eval_tokens=1500)
    assert file_table(trained_bundle) == before
    return out, m


def _steps(bundle, ids, n, margin=None):
    """Greedy-feed the same ids through a bundle; the logits of every step."""
    s = ModelSession(bundle, threads=1)
    cache = s.start(1, slots=len(ids) + n)
    if margin is not None:
        cache.set_screen_margin(margin)
    logits = [cache.step(np.asarray([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None]).copy()[0]]
    for t in range(len(ids), len(ids) + n - 1):
        tok = int(logits[-1].argmax())
        logits.append(cache.step(np.asarray([[tok]]), np.ones((1, t + 1), np.int64), np.asarray([[t]])).copy()[0])
    return np.stack(logits)


def test_screened_bundle_records_what_it_is(screened, trained_bundle):
    out, m = screened
    assert m["precision"] == "fp32" and m["recipe"]["lm_head"] == "screened"
    assert m["recipe"]["screen"]["margin_input"] == contract.SCREEN_MARGIN
    ops = m["graph"]["op_counts"]
    assert ops["If"] == 1 and "Gemm" not in ops  # the heads live in the If's branches
    q = m["quality"]
    assert q["greedy_agreement"] == 1.0 and q["top1_agreement"] == 1.0
    # perplexity (every position at once) runs the fp32 head; the decode path runs the screen
    assert q["kl_mean"] == 0 and q["ppl_increase_pct"] == 0
    assert q["decode_path"]["top1_agreement"] == 1.0 and 0 < q["decode_path"]["kl_mean"] < 1e-3
    # what a decode step reads: the 8-bit copy instead of the fp32 head (the embedding table is only gathered)
    a = read_manifest(trained_bundle)["architecture"]
    fewer = a["vocab_size"] * a["n_embd"] * 4 - m["recipe"]["screen"]["approx_bytes"]
    assert abs(weight_bytes_per_token(trained_bundle) - fewer - weight_bytes_per_token(out)) < 1000
    # the graph's inputs are still the contract's: the margin is an overridable initializer
    s = ModelSession(out)
    assert s.screened and contract.SCREEN_MARGIN not in {x.name for x in s.session.get_inputs()}


def test_greedy_steps_keep_the_fp32_argmax_and_top_logits(screened, trained_bundle):
    out, m = screened
    ids = Generator.load(trained_bundle).encode(PROMPTS[0])
    ref, got = _steps(trained_bundle, ids, 48), _steps(out, ids, 48)
    assert (ref.argmax(1) == got.argmax(1)).all()
    diff = np.abs(ref - got)
    # the screen is live (a prompt of up to 8 tokens, then every decode step): the tail is the 8-bit
    # approximation, not the fp32 head run anyway
    assert len(ids) <= 8 and (diff > 1e-4).sum(1).min() > 0
    # every token within the proven bound of the top is exact
    for r, d in zip(ref, diff):
        assert d[r >= r.max() - 0.05].max() < 1e-4
    assert diff.max() < 0.5


def test_margin_widens_the_exact_set_up_to_the_whole_head(screened, trained_bundle):
    out, _ = screened
    ids = Generator.load(trained_bundle).encode(PROMPTS[1])
    ref = _steps(trained_bundle, ids, 8)
    wide = _steps(out, ids, 8, margin=3.0)
    for r, w in zip(ref, wide):
        assert np.abs(r - w)[r >= r.max() - 3.0].max() < 1e-4
    for margin in (12.0, screen_margin(SamplingParams(repetition_penalty=1.2))):  # the If's fp32 branch
        np.testing.assert_allclose(_steps(out, ids, 8, margin=margin), ref, atol=1e-4)


@pytest.mark.parametrize("kw", [{}, dict(temperature=0.8, seed=3), dict(temperature=1.0, top_p=0.9, seed=4),
                                dict(repetition_penalty=1.3), dict(temperature=0.7, top_k=20, repetition_penalty=1.2, seed=5)])
def test_generation_matches_the_fp32_bundle(screened, trained_bundle, kw):
    a, b = Generator.load(trained_bundle), Generator.load(screened[0])
    for p in PROMPTS:
        assert b.generate(p, 32, ignore_eos=True, **kw) == a.generate(p, 32, ignore_eos=True, **kw)


def test_batched_generation_matches_the_fp32_bundle(screened, trained_bundle):
    """A left-padded batch: every row of a decode step is screened on its own."""
    a, b = Generator.load(trained_bundle), Generator.load(screened[0])
    assert not b.session.kv_capacity  # a concat cache, so one padded batch
    assert b.generate(list(PROMPTS), 24, ignore_eos=True) == a.generate(list(PROMPTS), 24, ignore_eos=True)


@pytest.mark.parametrize("options", [dict(graph="traced"), dict(graph="fused", kv_cache="shared")])
def test_other_export_layouts_screen_too(trained_checkpoint, tmp_path, options):
    """The traced graph (torch.onnx) and the shared-KV fused graph: the same head, the same tokens."""
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions

    src = tmp_path / "fp32"
    export_bundle(trained_checkpoint, src, ExportOptions(**options))
    m = quantize_bundle(src, tmp_path / "s", "fp32", options={"lm_head": "screened"}, eval_tokens=600)
    assert m["quality"]["greedy_agreement"] == 1.0 and m["quality"]["decode_path"]["top1_agreement"] == 1.0
    a, b = Generator.load(src), Generator.load(tmp_path / "s")
    for p in PROMPTS:
        assert b.generate(p, 24, ignore_eos=True) == a.generate(p, 24, ignore_eos=True)


def test_runtime_margins():
    assert screen_margin(SamplingParams()) == 0.0
    assert screen_margin(SamplingParams(temperature=0.5)) == 12.5
    assert screen_margin(SamplingParams(temperature=0.5, repetition_penalty=0.9)) == np.finfo(np.float32).max


def _head_model(wte: np.ndarray) -> onnx.ModelProto:
    vocab, width = wte.shape
    g = helper.make_graph([helper.make_node("Gemm", ["h", "transformer.wte.weight"], ["logits"], transB=1)], "head",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, width])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, vocab])],
                          [numpy_helper.from_array(wte, "transformer.wte.weight")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_the_bound_holds_on_rows_with_outliers():
    """The worst-case bound against onnxruntime's own 8-bit kernel, on rows built to stress it:
    heavy-tailed weights, outlier activations, a few large channels."""
    rng = np.random.default_rng(0)
    vocab, width = 2000, 256
    wte = (rng.standard_t(3, (vocab, width)) * 0.02).astype(np.float32)
    wte[:, :3] *= 20
    h = rng.standard_normal((64, width)).astype(np.float32)
    h[::4, 7] = 60.0
    h[1::4] *= 10
    h[2::4, :128] = 0.01
    exact = h.astype(np.float64) @ wte.T.astype(np.float64)
    # the 8-bit head alone, as the screen runs it
    attrs, weights, _ = quantize_head(wte)
    g = helper.make_graph([helper.make_node("MatMulNBits", ["h", "B", "scales"], ["approx"], domain="com.microsoft",
                                            **attrs)], "approx",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, width])],
                          [helper.make_tensor_value_info("approx", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(weights["B"], "B"), numpy_helper.from_array(weights["scales"], "scales")])
    approx = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(
        "com.microsoft", 1)], ir_version=9)).run(None, {"h": h})[0]
    model = _head_model(wte)
    info = screen_lm_head(model)
    b = info["screen"]["bound"]
    hb = h.reshape(len(h), -1, b["channels_per_block"])
    assert hb.shape[1] == len(b["h_l2_times"]) == 2  # 256 channels in blocks of 128
    bound = (np.linalg.norm(hb, axis=2) @ np.array(b["h_l2_times"]) + np.abs(hb).max(2) @ np.array(b["h_max_times"]))[:, None]
    # against one bound over the whole row: within a few percent, and far tighter when the blocks differ
    whole = (np.linalg.norm(h, axis=1) * max(b["h_l2_times"]) + np.abs(h).max(1) * max(b["h_max_times"]))[:, None]
    assert (bound <= 1.05 * whole).all() and (bound[2::4] < 0.2 * whole[2::4]).all()
    err = np.abs(approx - exact)
    assert (err <= bound).all() and err.max() > 0
    # decode-step rows (one at a time) through the screened head: the fp32 argmax, the top tokens recomputed
    s = _session(model)
    for i in range(len(h)):
        logits = s.run(None, {"h": h[i:i + 1]})[0][0]
        assert logits.argmax() == exact[i].argmax()
        top = exact[i] >= exact[i].max() - 1e-3
        np.testing.assert_allclose(logits[top], exact[i][top], rtol=1e-5, atol=1e-4)
        assert (np.abs(logits - exact[i]) <= bound[i] + 1e-4).all()
    # many rows at once (a prompt) run the fp32 head
    np.testing.assert_allclose(s.run(None, {"h": h})[0], exact, rtol=1e-4, atol=1e-3)


def test_the_kernel_rounds_activations_per_block():
    """The per-block bound's premise: MatMulNBits scales the activations of each block of 128 input
    channels on its own, so a huge value in one block does not coarsen another's rounding."""
    rng = np.random.default_rng(2)
    wte = np.zeros((64, 256), np.float32)
    wte[:, :128] = rng.standard_normal((64, 128)) * 0.02  # the tokens read only the first block
    attrs, weights, deq = quantize_head(wte)
    g = helper.make_graph([helper.make_node("MatMulNBits", ["h", "B", "scales"], ["y"], domain="com.microsoft",
                                            **attrs)], "g",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(weights["B"], "B"), numpy_helper.from_array(weights["scales"], "scales")])
    s = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                                   ir_version=9))
    h = np.zeros((1, 256), np.float32)
    h[0, :128] = rng.standard_normal(128) * 0.01
    quiet = np.abs(s.run(None, {"h": h})[0][0] - h[0] @ deq.T).max()
    h[0, 200] = 100.0  # with one scale for the row, the first block would round to zeros (error ~5e-3)
    loud = np.abs(s.run(None, {"h": h})[0][0] - h[0] @ deq.T).max()
    assert quiet < 2e-4 and loud < 2e-4


def test_quantize_head_reads_back_what_onnxruntime_wrote():
    rng = np.random.default_rng(1)
    wte = (rng.standard_normal((300, 128)) * 0.05).astype(np.float32)
    attrs, weights, deq = quantize_head(wte)
    assert attrs["bits"] == 8 and deq.shape == wte.shape
    # onnxruntime's symmetric 8-bit blocks: scale max|w| / 128, the largest magnitude at -128, so the
    # other sign clips at 127 (one step); the rest rounds to nearest (a quarter step on average)
    step = np.abs(wte).max(1, keepdims=True) / 128
    err = np.abs(wte - deq) / step
    assert err.max() <= 1 + 1e-5 and 0.2 < err.mean() < 0.3
    bounds = head_bounds(wte, deq, 64)
    assert bounds["err_l2"].shape == bounds["act"].shape == (2,) and (bounds["err_l2"] > 0).all()
    err = (wte.astype(np.float64) - deq).reshape(300, 2, 64)
    np.testing.assert_allclose(bounds["err_l2"], np.sqrt((err ** 2).sum(2)).max(0), rtol=1e-6)
    assert head_bounds(wte, deq, 96)["act"].shape == (1,)  # 128 channels are not a multiple of 96: one block


def test_bad_requests_fail_clearly(screened, trained_bundle, tmp_path):
    out, _ = screened
    with pytest.raises(QuantizeError, match="screened LM head"):
        quantize_bundle(out, tmp_path / "again", "int8")
    with pytest.raises(QuantizeError, match="lm_head must be one of fp32, int8"):
        quantize_bundle(trained_bundle, tmp_path / "x", "int8", options={"lm_head": "screened"})
    r = CliRunner().invoke(main, ["quantize", str(trained_bundle), "--out", str(tmp_path / "y"), "--mode", "fp32",
                                  "--kv-cache", "fp32"])
    assert r.exit_code != 0 and "--lm-head screened" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_writes_a_screened_bundle(trained_bundle, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(trained_bundle), "--out", str(tmp_path / "s"), "--mode", "fp32",
                                  "--lm-head", "screened", "--last-logits-only"])
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "s")
    assert m["recipe"]["lm_head"] == "screened" and m["graph"]["options"]["last_logits_only"]
    a, b = Generator.load(trained_bundle), Generator.load(tmp_path / "s")
    assert b.generate(PROMPTS[2], 24, ignore_eos=True) == a.generate(PROMPTS[2], 24, ignore_eos=True)


def test_a_graph_in_a_data_file_gets_the_same_screened_head_one_weight_at_a_time(trained_bundle, tmp_path):
    """GPT-2 large and up keep their weights in a data file: the embedding the screen quantizes is read from it,
    the other weights are copied one at a time, and the result is the one from the inline graph."""
    import onnx

    from edgegpt.graph.io import load_graph
    from edgegpt.quantize.recipes.fp32 import build

    for kind in ("inline", "external", "out-inline", "out-external"):
        (tmp_path / kind).mkdir()
    onnx.save_model(load_graph(trained_bundle / "model.onnx"), str(tmp_path / "external" / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=0)
    out = {}
    for kind, src in (("inline", trained_bundle / "model.onnx"), ("external", tmp_path / "external" / "model.onnx")):
        info = build(src, tmp_path / f"out-{kind}" / "model.onnx", {"lm_head": "screened"}, None)
        m = onnx.load(str(tmp_path / f"out-{kind}" / "model.onnx"))
        out[kind] = (info, [n.op_type for n in m.graph.node],
                     {t.name: numpy_helper.to_array(t) for t in m.graph.initializer})
    assert out["inline"][0] == out["external"][0] and out["inline"][1] == out["external"][1]
    assert "screen" in out["external"][0] and len(out["external"][1]) > len(onnx.load(str(trained_bundle / "model.onnx")).graph.node)
    a, b = out["inline"][2], out["external"][2]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
