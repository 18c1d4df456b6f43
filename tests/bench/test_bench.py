"""`edgegpt bench` on a tiny bundle: every figure present, interleaving, baselines, plot, refusals."""

import json

import pytest
from click.testing import CliRunner

from edgegpt.bench.bench import BenchConfig, run_bench
from edgegpt.bench.harness import reduce_run
from edgegpt.bench.roofline import BandwidthProbe, weight_bytes_per_token
from edgegpt.errors import BenchError
from edgegpt.bench.workloads import WORKLOADS, Workload
from edgegpt.cli import main
from edgegpt.errors import BundleError


@pytest.fixture(scope="module")
def bundle(hf_checkpoint, tmp_path_factory):
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions

    out = tmp_path_factory.mktemp("bench") / "b"
    export_bundle(hf_checkpoint("distil-like"), out, ExportOptions(kv_cache="concat"))  # the peers' contract
    return out


def test_reduce_run_separates_prefill_and_decode():
    s = reduce_run(10.0, [10.1, 10.2, 10.4])
    assert s.ttft_ms == pytest.approx(100.0) and s.decode_tok_s == pytest.approx(2 / 0.3)
    assert s.step_ms == pytest.approx([100.0, 200.0]) and s.e2e_s == pytest.approx(0.4)


def test_token_agreement_is_the_matching_prefix():
    from edgegpt.bench.report import same_prefix

    assert same_prefix([1, 2, 3], [1, 2, 4]) == "2/3" and same_prefix([1, 2], [1, 2]) == "2/2"
    assert same_prefix([9, 2], [1, 2]) == "0/2" and same_prefix([], [1]) == "-"


def test_workloads_match_design_and_prompts_are_fixed():
    assert (WORKLOADS["W1"].prompt_tokens, WORKLOADS["W1"].new_tokens) == (128, 128)
    assert (WORKLOADS["W2"].prompt_tokens, WORKLOADS["W3"].new_tokens) == (896, 64)
    assert WORKLOADS["W1"].prompt_ids(50257) == WORKLOADS["W1"].prompt_ids(50257)


@pytest.mark.slow
def test_bench_measures_bundles_and_torch_baseline(bundle, hf_checkpoint):
    pytest.importorskip("transformers")
    cfg = BenchConfig([str(bundle), str(bundle)], Workload("t", 16, 12), threads=1, warmup=1, runs=2,
                      baselines=("torch",), checkpoint=str(hf_checkpoint("distil-like")), sweep=[16, 48])
    rep = run_bench(cfg)
    assert [r.kind for r in rep.results] == ["edgegpt", "edgegpt", "torch"]
    for r in rep.results:
        assert r.error is None and len(r.runs) == 2 and r.peak_rss_mb > 0 and r.load_s > 0
        assert all(x.decode_tok_s > 0 and x.ttft_ms > 0 and len(x.step_ms) == 11 for x in r.runs)
        assert set(r.sweep) == {16, 48}
    assert rep.table.count("\n") == 4 and "decode x first" in rep.table
    # the same fp32 graph twice and PyTorch on its checkpoint: the same 12 greedy tokens
    assert rep.results[0].tokens == rep.results[1].tokens == rep.results[2].tokens and len(rep.results[0].tokens) == 12
    assert rep.table.count("| 12/12 |") == 3 and rep.data["results"][2]["tokens"] == rep.results[0].tokens
    assert rep.data["machine"]["onnxruntime"] and rep.data["results"][0]["decode_tok_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("baseline, module", [("optimum", "optimum.onnxruntime"), ("genai", "onnxruntime_genai")])
def test_peer_baselines_when_installed(bundle, baseline, module):
    pytest.importorskip(module)
    rep = run_bench(BenchConfig([str(bundle)], Workload("t", 8, 6), threads=1, warmup=0, runs=1, baselines=(baseline,)))
    assert rep.results[1].error is None and rep.results[1].runs[0].decode_tok_s > 0


def test_genai_on_any_bundle_including_shared_kv(hf_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions

    shared = tmp_path / "shared"
    export_bundle(hf_checkpoint("distil-like"), shared, ExportOptions(kv_cache="shared", last_logits_only=True))
    res = CliRunner().invoke(main, ["bench", str(shared), "--genai", str(shared), "--prompt-tokens", "8",
                                    "--new-tokens", "6", "--runs", "1", "--warmup", "0", "--threads", "1",
                                    "--settle", "0"])
    assert res.exit_code == 0, res.output
    assert "| onnxruntime-genai (shared) |" in res.output and "error" not in res.output.lower()


@pytest.mark.slow
def test_roofline_pieces(bundle):
    bw = BandwidthProbe(1)(reps=2)
    assert bw > 0.5
    wb = weight_bytes_per_token(bundle)
    # every matrix of the blocks plus the tied head, but not the position table (read a row a step)
    assert 64 * 192 * 4 * 2 < wb < 1000 * 64 * 4 + 2 * (64 * 64 * 12 * 4) + 100_000


@pytest.mark.slow
def test_bench_command_writes_json_and_plot(bundle, tmp_path):
    pytest.importorskip("matplotlib")
    res = CliRunner().invoke(main, ["bench", str(bundle), "--prompt-tokens", "8", "--new-tokens", "6", "--runs", "1",
                                    "--warmup", "0", "--threads", "1", "--sweep-context", "8,32", "--plot",
                                    str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json"), "--roofline"])
    assert res.exit_code == 0, res.output
    assert "| edgegpt fp32 (b) |" in res.output and "% of BW bound" in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["results"][0]["sweep_ms_per_token"].keys() == {"8", "32"} and data["bandwidth"]["gb_per_s"] > 0
    # bandwidth is probed before every run; the median run is set against the median probe
    (run,) = data["results"][0]["runs"]
    assert run["bandwidth_gb_s"] > 0 and data["bandwidth"]["probes"] == 1
    assert data["bandwidth"]["gb_per_s"] == pytest.approx(run["bandwidth_gb_s"], abs=0.01)
    wb = weight_bytes_per_token(bundle)
    # the bytes a step reads: the weights, plus the cache at the mean decode context (8 + 6/2 tokens)
    kv = 2 * 2 * 4 * 16 * 11 * 4  # K and V, 2 layers, 4 heads x 16, fp32 (the distil-like shape)
    assert data["bytes_per_token"]["edgegpt fp32 (b)"] == {"weights": wb, "kv_cache": kv}
    assert data["pct_of_bound"]["edgegpt fp32 (b)"] == pytest.approx(
        100 * run["decode_tok_s"] * (wb + kv) / (data["bandwidth"]["gb_per_s"] * 1e9), rel=1e-3)
    assert f"| {data['pct_of_bound']['edgegpt fp32 (b)']:.0f}% |" in res.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_thread_sweep_runs_every_system_at_each_count(bundle, tmp_path):
    from edgegpt.bench.bench import _systems, thread_counts

    res = CliRunner().invoke(main, ["bench", str(bundle), "--prompt-tokens", "8", "--new-tokens", "6", "--runs", "2",
                                    "--warmup", "0", "--threads", "1,2", "--settle", "0", "--roofline",
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "| edgegpt fp32 (b) @1t |" in res.output and "| edgegpt fp32 (b) @2t |" in res.output
    assert "1/2 threads" in res.output and "note: edgegpt fp32 (b): fastest decode at " in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["threads"] == [1, 2] and set(data["bandwidth_by_threads"]) == {"1", "2"}
    assert [r["label"] for r in data["results"]] == ["edgegpt fp32 (b) @1t", "edgegpt fp32 (b) @2t"]
    assert all(v["bandwidth_gb_s"] > 0 for r in data["results"] for v in r["runs"])
    by = data["bandwidth_by_threads"]
    assert by["1"]["probes"] == by["2"]["probes"] == 2 and by["1"]["best"] >= by["1"]["gb_per_s"] >= by["1"]["min"]
    # each count reaches the onnxruntime session the worker builds
    cfg = BenchConfig([str(bundle)], Workload("t", 8, 6))
    for t in (1, 2):
        (s,) = _systems(cfg, [json.loads((bundle / "edgegpt.json").read_text())], ["x"], t, 512)
        s.load()
        assert s.gen.session.session.get_session_options().intra_op_num_threads == t
    assert thread_counts(2) == (2,) and thread_counts((1, 2)) == (1, 2)
    for bad in ((1, 1), (0, 2), ()):
        with pytest.raises(BenchError, match="threads"):
            thread_counts(bad)
    for bad in ("1,1", "0", "two"):
        res = CliRunner().invoke(main, ["bench", str(bundle), "--threads", bad])
        assert res.exit_code == 2 and "--threads" in res.output


def test_refusals(bundle, hf_checkpoint):
    with pytest.raises(BundleError, match="is a checkpoint, not a bundle; build one first: edgegpt export"):
        run_bench(BenchConfig([str(hf_checkpoint("distil-like"))], WORKLOADS["W3"]))
    with pytest.raises(BenchError, match="exceed"):
        run_bench(BenchConfig([str(bundle)], WORKLOADS["W2"]))
    res = CliRunner().invoke(main, ["bench", str(bundle), "--plot", "x.png"])
    assert res.exit_code == 2 and "--sweep-context" in res.output


def test_llamacpp_peer_on_a_gguf_of_the_same_weights(bundle, hf_checkpoint, tmp_path):
    """Runs where llama-cpp-python and gguf are installed (a developer's benchmarking setup)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import runpy

    conv = runpy.run_path("scripts/peers/gguf_from_checkpoint.py")
    out = tmp_path / "m-f32.gguf"
    conv["write_f32"](hf_checkpoint("distil-like"), out)
    # the GGUF holds the same weights: llama.cpp's next-token logits match PyTorch's
    import llama_cpp
    import numpy as np
    import torch

    from edgegpt.model import load_model

    ids = [5, 17, 300, 42, 7]
    with torch.no_grad():
        ref = load_model(hf_checkpoint("distil-like"))(torch.tensor([ids]))[0][0, -1].numpy()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False)
    llm.eval(ids)
    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
    assert np.abs(got - ref).max() < 1e-2 and got.argmax() == ref.argmax()
    del llm
    rep = run_bench(BenchConfig([str(bundle)], Workload("t", 16, 8), threads=1, warmup=0, runs=1, gguf=(str(out),)))
    assert rep.results[1].kind == "llama.cpp" and rep.results[1].error is None
    assert rep.results[1].runs[0].decode_tok_s > 0
    assert rep.results[1].tokens == rep.results[0].tokens  # same weights, same greedy tokens


def test_quality_script_scores_bundles_and_ggufs_on_the_same_windows(bundle, hf_checkpoint, tmp_path, capsys):
    """scripts/peers/kl_vs_llama.py: bundles always; a GGUF of the same weights where llama-cpp-python is installed."""
    import runpy

    script = runpy.run_path("scripts/peers/kl_vs_llama.py")
    models = [str(bundle)]
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401

        conv = runpy.run_path("scripts/peers/gguf_from_checkpoint.py")
        conv["write_f32"](hf_checkpoint("distil-like"), tmp_path / "m-f32.gguf")
        models.append(str(tmp_path / "m-f32.gguf"))
    except ImportError:
        pass
    assert script["main"]([str(bundle), *models, "--max-tokens", "600", "--window", "64", "--threads", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    kl = {r[1].strip(): r[2].strip() for r in rows[1:]}
    assert kl[f"reference {bundle.name}"] == "-"
    assert float(kl[f"edgegpt {bundle.name}"]) < 1e-9  # the reference against itself
    if len(models) > 1:  # the same weights in llama.cpp: the same distribution
        assert float(kl["llama.cpp m-f32.gguf"]) < 1e-3


@pytest.mark.slow
def test_genai_peer_on_optimum_exports(hf_checkpoint, bundle, tmp_path):
    """scripts/peers/optimum_for_genai.py: the graphs a genai user gets for GPT-2 (Optimum export + a hand-written
    genai_config.json), which `bench --genai` then runs beside edgegpt; fp32 reproduces PyTorch's greedy tokens."""
    pytest.importorskip("optimum.onnxruntime")
    og = pytest.importorskip("onnxruntime_genai")
    import runpy

    import onnx
    import torch

    from edgegpt.model import load_checkpoint
    from edgegpt.model.generate import generate_ids

    ckpt = hf_checkpoint("distil-like")
    script = runpy.run_path("scripts/peers/optimum_for_genai.py")
    assert script["main"]([str(ckpt), str(tmp_path / "opt"), "--precisions", "fp32,int4"]) == 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt-int4" / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "Gemm" not in ops
    assert not (tmp_path / "opt-int8").exists() and not list(tmp_path.glob(".opt-*"))

    ids = [5, 17, 300, 42, 7]
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        ref = generate_ids(model, ids, 12)
    m = og.Model(str(tmp_path / "opt-fp32"))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(ids) + len(ref), do_sample=False)
    g = og.Generator(m, params)
    g.append_tokens([ids])
    while not g.is_done():
        g.generate_next_token()
    assert list(g.get_sequence(0))[len(ids):] == ref
    del g, m

    res = CliRunner().invoke(main, ["bench", str(bundle), "--genai", str(tmp_path / "opt-fp32"), "--genai",
                                    str(tmp_path / "opt-int4"), "--prompt-tokens", "8", "--new-tokens", "6",
                                    "--runs", "1", "--warmup", "0", "--threads", "1", "--settle", "0"])
    assert res.exit_code == 0, res.output
    assert "| onnxruntime-genai (opt-int4) |" in res.output and "error" not in res.output.lower()
    fp32_row = next(line for line in res.output.splitlines() if line.startswith("| onnxruntime-genai (opt-fp32) |"))
    assert "| 6/6 |" in fp32_row  # Optimum's fp32 graph under genai: edgegpt's greedy tokens
    res = CliRunner().invoke(main, ["bench", str(bundle), "--genai", str(tmp_path), "--prompt-tokens", "8",
                                    "--new-tokens", "6"])
    assert res.exit_code != 0 and "genai_config.json" in res.output and "Traceback" not in res.output


def test_hugepages_env_reaches_only_the_chosen_workers(bundle, monkeypatch):
    import os

    from edgegpt.bench.harness import Pool
    from edgegpt.bench.systems import EdgeGPT
    from edgegpt.runtime import hugepages

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    env = hugepages.hugepage_env()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and hugepages.active(env)
    assert hugepages.hugepage_env(env) == env and not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    try:
        madvise_mode = "[madvise]" in open(hugepages.THP_ENABLED).read()
    except OSError:
        madvise_mode = False
    if not (hugepages.available() and madvise_mode):
        pytest.skip("needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
    a, b = EdgeGPT(str(bundle), 1, "cpu", "a"), EdgeGPT(str(bundle), 1, "cpu", "b")
    a.hugepages = True
    pool = Pool([a, b])
    try:
        assert not any(r.error for r in pool.results)
        huge_kb = [int(next(line.split()[1] for line in open(f"/proc/{p.pid}/smaps_rollup") if "AnonHugePages" in line))
                   for p in pool.procs]
    finally:
        pool.close()
    assert huge_kb[0] > 0 and huge_kb[1] == 0  # glibc gave huge pages to the chosen worker only
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # the parent's environment is restored


def test_each_system_knows_its_precision_and_notes_compare_matching_peers(bundle, tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgegpt.bench.harness import Result, RunStats
    from edgegpt.bench.report import peer_notes
    from edgegpt.bench.engines import LlamaCpp, gguf_precision
    from edgegpt.bench.systems import EdgeGPT, onnx_precision

    # GGUF: general.file_type when gguf-py can read the file, else the name's tag
    assert [gguf_precision(tmp_path / n) for n in ("m-f32.gguf", "m-q8_0.gguf", "m-Q4_K_M.gguf", "m.gguf")] == \
        ["fp32", "int8", "int4", None]
    # genai directories: an edgegpt manifest, else the decoder graph's ops
    assert onnx_precision(bundle) == "fp32"
    for bits, want in ((4, "int4"), (8, "int8")):
        d = tmp_path / f"g{bits}"
        d.mkdir()
        (d / "genai_config.json").write_text('{"model": {"decoder": {"filename": "m.onnx"}}}')
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=32, N=8, bits=bits,
                                block_size=32)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(np.zeros((8, 1, 16), np.uint8), "w"),
                               numpy_helper.from_array(np.ones(8, np.float32), "s")])
        onnx.save(helper.make_model(g), str(d / "m.onnx"))
        assert onnx_precision(d) == want
    assert onnx_precision(tmp_path) is None  # no genai_config.json: unknown

    def sys_(cls, label, precision, threads=2):
        s = EdgeGPT(label, threads, "cpu", label) if cls is EdgeGPT else LlamaCpp(f"{label}.gguf", threads, 512)
        s.label, s.precision = label, precision  # as bench._systems sets them
        return s

    def res(label, tok_s, ttft):
        return Result(label, "", runs=[RunStats(ttft, tok_s, 1.0, [])])

    systems = [sys_(EdgeGPT, "e4", "int4"), sys_(EdgeGPT, "e8", "int8"), sys_(LlamaCpp, "q4", "int4"),
               sys_(LlamaCpp, "q4 @1t", "int4", threads=1), sys_(LlamaCpp, "f32", "fp32")]
    results = [res("e4", 250.0, 60.0), res("e8", 200.0, 30.0), res("q4", 200.0, 80.0), res("q4 @1t", 100.0, 90.0),
               res("f32", 70.0, 140.0)]
    assert peer_notes(results, systems) == ["e4 against the int4 peers: decode 1.25x q4; TTFT 0.75x q4"]


def test_ctranslate2_peer_on_a_conversion_of_the_same_checkpoint(bundle, hf_checkpoint, tmp_path):
    """CTranslate2's own converter on the checkpoint the bundle came from: same greedy tokens at fp32, its
    precision read from the converted model, batch 1 only."""
    pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    from edgegpt.bench.engines import ct2_precision

    out = TransformersConverter(str(hf_checkpoint("distil-like"))).convert(str(tmp_path / "ct2"))
    assert ct2_precision(out) == "fp32"
    rep = run_bench(BenchConfig([str(bundle)], Workload("t", 16, 8), threads=1, warmup=0, runs=1, ct2=(out,)))
    peer = rep.results[1]
    assert peer.kind == "ctranslate2" and peer.error is None and peer.runs[0].decode_tok_s > 0
    assert peer.tokens == rep.results[0].tokens  # same weights, same greedy tokens
    rep = run_bench(BenchConfig([str(bundle)], Workload("t", 16, 8, batch=2), threads=1, warmup=0, runs=1, ct2=(out,)))
    assert "batch 1 only" in (rep.results[1].error or "")
    with pytest.raises(BenchError, match="not a CTranslate2 model"):
        run_bench(BenchConfig([str(bundle)], Workload("t", 16, 8), ct2=(str(tmp_path),)))
