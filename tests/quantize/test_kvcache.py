"""`quantize --kv-cache auto|int8`: GroupQueryAttention's int8 cache with calibrated scales, on trained weights."""

import numpy as np
import pytest

from edgegpt.errors import QuantizeError
from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.quantize.bundle import quantize_bundle
from edgegpt.corpus import default_eval_text
from edgegpt.quality.evaluate import decode_path
from edgegpt.runtime import Generator
from edgegpt.runtime.session import ModelSession
from edgegpt.runtime.text import load_bundle_tokenizer

EVAL_TOKENS = 1500


@pytest.fixture(scope="module")
def shared_bundles(trained_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("kv8")
    export_bundle(trained_checkpoint, root / "fp32", ExportOptions(kv_cache="shared"))
    fp32kv = quantize_bundle(root / "fp32", root / "int4", "int4", eval_tokens=EVAL_TOKENS, kv_cache="fp32")
    int8kv = quantize_bundle(root / "fp32", root / "int4-kv8", "int4", eval_tokens=EVAL_TOKENS, kv_cache="int8")
    return root, fp32kv, int8kv


def test_int8_cache_is_recorded_with_its_calibration(shared_bundles):
    root, _, m = shared_bundles
    io = {x["name"]: x["dtype"] for x in m["io"]["inputs"] + m["io"]["outputs"]}
    assert io["past_key_values.0.key"] == "int8" and io["present.1.value"] == "int8" and io["logits"] == "float32"
    kv = m["recipe"]["kv_cache"]
    assert kv["dtype"] == "int8" and kv["calibration_tokens"] >= 128
    assert ModelSession(root / "int4-kv8").kv_dtype == np.int8
    dp = m["quality"]["decode_path"]  # the cache read back, which strided perplexity never does
    assert dp["positions"] >= 64 and dp["kl_mean"] < 0.05 and dp["top1_agreement"] > 0.8
    assert ModelSession(root / "int4-kv8").empty_past(1, slots=8)[0].numpy().dtype == np.int8


def test_int8_cache_costs_no_measurable_quality_on_the_decode_path(shared_bundles):
    root, fp32kv, int8kv = shared_bundles
    assert int8kv["quality"]["ppl_increase_pct"] <= int8kv["quality"]["budget_pct"]
    # 16 tokens prefilled, then 103 fed one at a time through each bundle's own cache
    kl = {name: decode_path(root / name, root / "fp32", default_eval_text()[:6000], prompt=16, tokens=104)["kl_mean"]
          for name in ("int4", "int4-kv8")}
    # int4 weights dominate the error; the int8 cache adds at most a sliver on top
    assert kl["int4-kv8"] < kl["int4"] * 1.2 + 1e-3, kl


def test_auto_takes_the_int8_cache_on_shared_exports_and_measures_what_it_adds(shared_bundles, trained_bundle,
                                                                               tmp_path):
    root, fp32kv, _ = shared_bundles
    assert fp32kv["recipe"].get("kv_cache") is None and ModelSession(root / "int4").kv_dtype == np.float32
    m = quantize_bundle(root / "fp32", tmp_path / "auto", "int8", eval_tokens=EVAL_TOKENS)  # auto is the default
    kv, dp = m["recipe"]["kv_cache"], m["quality"]["decode_path"]
    assert kv["dtype"] == "int8" and kv["chosen_by"] == "auto" and ModelSession(tmp_path / "auto").kv_dtype == np.int8
    # the same tokens through the same weights with an fp32 cache: what the int8 cache adds is within allowance
    assert kv["added_kl"] == pytest.approx(dp["kl_mean"] - dp["fp32_cache_kl_mean"], abs=2e-6)
    assert kv["added_kl"] <= kv["auto_allowance_kl"] and 0 < dp["fp32_cache_kl_mean"] < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto"]  # the weights-only copy is gone
    # a concat export has no shared buffer: auto keeps fp32 there, without a word
    c = quantize_bundle(trained_bundle, tmp_path / "concat", "int8", eval_tokens=EVAL_TOKENS)
    assert "kv_cache" not in c["recipe"] and ModelSession(tmp_path / "concat").kv_dtype == np.float32


def test_auto_falls_back_to_the_fp32_cache_when_int8_adds_too_much(shared_bundles, tmp_path, monkeypatch):
    from edgegpt.quantize import measure as qb

    root, _, _ = shared_bundles
    monkeypatch.setattr(qb, "KV_AUTO_ABSOLUTE", -1.0)  # an allowance no cache can meet
    m = quantize_bundle(root / "fp32", tmp_path / "q", "int8", eval_tokens=EVAL_TOKENS)
    kv = m["recipe"]["kv_cache"]
    assert kv["dtype"] == "float32" and kv["chosen_by"] == "auto" and kv["rejected_int8"]["dtype"] == "int8"
    assert kv["rejected_int8"]["added_kl"] > kv["rejected_int8"]["auto_allowance_kl"]
    assert all(x["dtype"] != "int8" for x in m["io"]["inputs"])
    assert m["quality"]["decode_path"]["kl_mean"] == kv["rejected_int8"]["decode_path"]["fp32_cache_kl_mean"]
    s = ModelSession(tmp_path / "q")
    assert s.kv_dtype == np.float32 and not any(n.op_type == "If" for n in __import__("onnx").load(
        str(tmp_path / "q" / "model.onnx")).graph.node)
    assert Generator.load(tmp_path / "q").generate("The for statement", 8, ignore_eos=True)
    # asked for by name, int8 stays whatever it adds (the manifest still records it)
    forced = quantize_bundle(root / "fp32", tmp_path / "f", "int8", eval_tokens=EVAL_TOKENS, kv_cache="int8")
    assert forced["recipe"]["kv_cache"]["dtype"] == "int8" and forced["recipe"]["kv_cache"]["chosen_by"] == "--kv-cache int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "q"]


def test_int8_cache_generates_through_the_runtime(shared_bundles):
    """A generator that keeps its int8 cache between calls (prompt_cache) reads back, for a prompt that shares a
    prefix with the last one, that prefix and nothing stale: two kept caches that hold the same prefix and
    different leftovers past it (30 and 3 generated tokens) give the same tokens. (A fresh cache is no exact
    reference: its prompt runs the fp32 prefill path, a continued prompt the int8 kernel over the kept prefix.)"""
    root, _, _ = shared_bundles
    first, second = "class C:\n    def f(self, x):\n        return x", "class C:\n    def g(self):"
    outs = []
    for leftover in (30, 3):
        kept = Generator.load(root / "int4-kv8", prompt_cache=True)
        kept.generate_ids([kept.encode(first)], leftover, ignore_eos=True)
        outs.append(kept.generate_ids([kept.encode(second)], 30, ignore_eos=True))
        assert kept.last_reused_tokens > 0  # the kept cache was read, not rebuilt
    assert outs[0] == outs[1] and len(set(outs[0][0])) > 1
    fresh = Generator.load(root / "int4-kv8").generate_ids([kept.encode(second)], 30, ignore_eos=True)
    assert len(fresh[0]) == len(outs[0][0]) == 30


def test_int8_cache_refuses_concat_bundles_and_other_modes(shared_bundles, trained_bundle, tmp_path):
    root, _, _ = shared_bundles
    with pytest.raises(QuantizeError, match="--kv-cache shared"):
        quantize_bundle(trained_bundle, tmp_path / "x", "int4", kv_cache="int8")
    with pytest.raises(QuantizeError, match="only useful with --kv-cache int8"):
        quantize_bundle(root / "fp32", tmp_path / "z", "fp32")
    with pytest.raises(QuantizeError, match="goes with --mode int8, int4 or fp32, not"):
        quantize_bundle(root / "fp32", tmp_path / "y", "fp16", kv_cache="int8")
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_fp32_weights_with_an_int8_cache(shared_bundles, tmp_path):
    root, _, _ = shared_bundles
    m = quantize_bundle(root / "fp32", tmp_path / "f", "fp32", eval_tokens=EVAL_TOKENS, kv_cache="int8")
    assert m["precision"] == "fp32" and m["recipe"]["kv_cache"]["dtype"] == "int8"
    assert m["quality"]["kl_mean"] < 2e-3 and m["quality"]["ppl_increase_pct"] <= 1.0
    with pytest.raises(QuantizeError, match="already keeps a quantized KV cache"):
        quantize_bundle(tmp_path / "f", tmp_path / "g", "int4")


def test_first_prefill_takes_the_fp32_path_and_writes_what_the_int8_kernel_would(shared_bundles, tmp_path):
    """An empty cache's prefill runs fp32 attention and quantizes its K/V into the buffer itself (the
    int8 kernel is slow at prefill); the buffer must hold what the kernel writes token by token."""
    import onnx

    root, _, _ = shared_bundles
    quantize_bundle(root / "fp32", tmp_path / "f", "fp32", eval_tokens=EVAL_TOKENS, kv_cache="int8")
    g = onnx.load(str(tmp_path / "f" / "model.onnx")).graph
    s = ModelSession(tmp_path / "f")
    assert sum(n.op_type == "If" for n in g.node) == s.n_layer
    assert not any(n.op_type == "GroupQueryAttention" for n in g.node)
    tok = load_bundle_tokenizer(root / "fp32")
    ids = tok.encode(default_eval_text()[:3000]).ids[:40]
    n = len(ids)
    whole = s.start(1, slots=64)  # the whole prompt at once: the fp32 path
    x = np.asarray(ids)[None]
    first = whole.step(x, np.ones_like(x), np.arange(n)[None]).copy()
    steps = s.start(1, slots=64)  # one token, then the rest one at a time through the int8 kernel
    for t in range(n):
        last = steps.step(np.asarray([[ids[t]]]), np.ones((1, t + 1), np.int64), np.asarray([[t]])).copy()
    # layer 0's K and V come from the same fp32 projections on both paths: the same int8 codes, bar
    # rounding ties. (Later layers see attention over exact vs quantized K/V, so they differ a little.)
    for a, b in zip(whole.past[:2], steps.past[:2]):
        qa, qb = a.numpy()[0, :, :n].astype(int), b.numpy()[0, :, :n].astype(int)
        assert np.abs(qa - qb).max() <= 1 and (qa != qb).mean() < 0.01
    assert np.abs(first - last).max() < 0.05 * np.abs(first).max()
    # a prompt that continues a cache (8 tokens at once after 40) takes the int8 kernel: same as one at a time
    more = tok.encode(default_eval_text()[3000:4000]).ids[:8]
    y = np.asarray(more)[None]
    chunk = whole.step(y, np.ones((1, n + 8), np.int64), np.arange(n, n + 8)[None]).copy()
    for t, tid in enumerate(more):
        last = steps.step(np.asarray([[tid]]), np.ones((1, n + t + 1), np.int64), np.asarray([[n + t]])).copy()
    assert np.abs(chunk - last).max() < 0.05 * np.abs(chunk).max()
