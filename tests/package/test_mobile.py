"""Mobile packages on models with odd shapes: the default precision of each mobile target succeeds, and the
package's own check compares the ORT-format model with the ONNX model it came from like with like."""

import numpy as np
import pytest
import torch

from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.manifest import read_manifest
from edgegpt.package.bundle import _check_one_file, package_bundle
from tests.conftest import make_hf_checkpoint, run_without_torch


@pytest.fixture(scope="module")
def odd_traced(tokenizers_by_vocab, tmp_path_factory):
    """3 heads, vocab 777, 96 positions, attention weights scaled up 8x (peaked attention, near-tied logits).
    With this seed the int8-static graph's QDQ nodes fused into int8 kernels (onnxruntime's "all" level) give
    other greedy tokens than the unfused QDQ graph that an ORT-format model runs in onnxruntime's full build."""
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("odd")
    ckpt = make_hf_checkpoint(root / "ckpt", tokenizers_by_vocab(777), seed=1, n_layer=4, n_head=3, n_embd=192,
                              n_positions=96, vocab_size=777)
    model = GPT2LMHeadModel.from_pretrained(ckpt)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)
    model.save_pretrained(ckpt)
    out = root / "traced"
    export_bundle(ckpt, out, ExportOptions(graph="traced"))
    return out


@pytest.mark.parametrize("target", ["android", "ios"])
def test_default_mobile_package_succeeds_on_an_odd_model(odd_traced, target, tmp_path):
    m = package_bundle(odd_traced, target, tmp_path / target)
    v = m["package"]["verification"]
    assert v["greedy_identical"] and "basic" in v["reference"] and v["static_graphs"]["greedy_agreement"] > 0
    assert m["package"]["precision"] == {"android": "int8-static", "ios": "fp16"}[target]


@pytest.mark.parametrize("target", ["cpu", "cuda", "web"])
def test_default_desktop_and_web_packages_succeed_on_an_odd_model(odd_traced, target, tmp_path):
    m = package_bundle(odd_traced, target, tmp_path / target)
    assert m["package"]["precision"] == {"cpu": "int8", "cuda": "fp16", "web": "int8"}[target]


def test_a_mobile_package_from_a_bundle_with_a_data_file(trained_checkpoint, tmp_path):
    """A bundle keeps its weights in a data file; an ORT-format package holds them in its one file, at the
    package's precision or the source's own."""
    export_bundle(trained_checkpoint, tmp_path / "traced", ExportOptions(graph="traced", external_data="always"))
    assert read_manifest(tmp_path / "traced")["graph"]["external_data"]
    m = package_bundle(tmp_path / "traced", "ios", tmp_path / "ios", prefill_buckets=[16])
    assert m["package"]["precision"] == "fp16" and m["package"]["verification"]["greedy_identical"]
    assert not m["graph"].get("external_data") and not list((tmp_path / "ios").glob("*.data"))
    m = package_bundle(tmp_path / "traced", "ios", tmp_path / "fp32", precision="fp32", prefill_buckets=[16])
    assert m["package"]["precision"] == "fp32" and m["package"]["verification"]["greedy_identical"]
    assert not m["graph"].get("external_data") and not list((tmp_path / "fp32").glob("*.data"))


def test_a_mobile_package_that_would_not_fit_one_file_is_refused_before_any_work(odd_traced, tmp_path, monkeypatch):
    from edgegpt.errors import PackageError

    size = sum(f.stat().st_size for f in odd_traced.iterdir())
    monkeypatch.setattr("edgegpt.graph.io.EXTERNAL_DATA_THRESHOLD", int(size * 0.4))  # fp16: half the fp32 bytes
    with pytest.raises(PackageError, match=r"fp16 graph would be about .* GB; .* one file"):
        package_bundle(odd_traced, "ios", tmp_path / "ios")
    assert not (tmp_path / "ios").exists()
    monkeypatch.setattr("edgegpt.graph.io.EXTERNAL_DATA_THRESHOLD", int(size * 0.6))
    _check_one_file(odd_traced, read_manifest(odd_traced), "fp16")  # fits: no error
    with pytest.raises(PackageError, match="fp32 graph would be about"):
        _check_one_file(odd_traced, read_manifest(odd_traced), "fp32")


@pytest.fixture(scope="module")
def static_android(trained_checkpoint, tmp_path_factory):
    """The default android package (int8-static) of a trained model, with two prefill buckets."""
    root = tmp_path_factory.mktemp("static")
    export_bundle(trained_checkpoint, root / "traced", ExportOptions(graph="traced"))
    package_bundle(root / "traced", "android", root / "pkg", prefill_buckets=[8, 32])
    return root / "traced", root / "pkg"


def _coverage(graph: dict) -> dict:
    return {c["provider"]: c for c in graph["coverage"]}


def test_static_graphs_go_whole_to_nnapi(static_android):
    _, pkg = static_android
    m = read_manifest(pkg)
    p, q = m["package"], m["quality"]  # int8-static keeps its measured quality on the trained model
    assert m["precision"] == "int8-static" and q["top1_agreement"] > 0.8 and q["decode_path"]["kl_mean"] < 0.05
    assert 0 < q["greedy_agreement"] <= 1 and q["ppl_increase_pct"] < q["budget_pct"]
    graphs = {g["sequence_length"]: g for g in p["static_graphs"]}
    assert sorted(graphs) == [1, 8, 32] and graphs[1]["use"] == "decode step" and graphs[32]["ids_dtype"] == "int32"
    for g in graphs.values():
        nnapi = _coverage(g)["nnapi"]
        assert (nnapi["supported_pct"], nnapi["partitions"], nnapi["suitability"]) == (100, 1, "YES"), nnapi
        assert (pkg / g["file"]).exists() and (pkg / g["required_operators"]).exists()
    assert "| nnapi | " in (pkg / "mobile_usability.md").read_text()
    assert p["verification"]["static_graphs"]["greedy_identical"]


def test_static_graphs_go_whole_to_coreml(odd_traced, tmp_path):
    p = package_bundle(odd_traced, "ios", tmp_path / "ios", prefill_buckets=[16])["package"]
    for g in p["static_graphs"]:
        coreml = _coverage(g)["coreml"]
        assert (coreml["supported_pct"], coreml["partitions"], coreml["suitability"]) == (100, 1, "YES"), coreml
        assert g["kv_dtype"] == "float16" and g["ids_dtype"] == "int64"


PROMPTS = ["The for statement is used", "class C:\n    def", "x",
           "Changed in version 3.8: the walrus operator assigns values to variables as part of a larger expression. "
           "The with statement is used to wrap the execution of a block with methods defined by a context manager."]


def test_app_loop_over_the_static_graphs_gives_the_dynamic_graphs_tokens(static_android):
    """Greedy tokens from the static pair (bucketed, left-padded prefill; the fixed decode step writing its row
    into the app's cache) equal the package's dynamic graph's, for prompts shorter than a bucket, between
    buckets and longer than the largest (chunked)."""
    from edgegpt.runtime import Generator
    from edgegpt.runtime.static import StaticGenerator

    _, pkg = static_android
    dyn, st = Generator.load(pkg), StaticGenerator.load(pkg)
    lengths, distinct = set(), 0
    for prompt in PROMPTS:
        ids = dyn.encode(prompt)
        lengths.add(len(ids))
        want = dyn.generate_ids([ids], 20, ignore_eos=True)[0]
        assert st.generate_ids(ids, 20, ignore_eos=True) == want, prompt
        distinct = max(distinct, len(set(want)))
    assert distinct > 3
    assert min(lengths) <= 8 and max(lengths) > 32  # one prompt in the small bucket, one chunked
    text = st.generate("The for statement", 8, temperature=0.8, top_k=20, seed=3)
    assert text == st.generate("The for statement", 8, temperature=0.8, top_k=20, seed=3) and text


def test_app_loop_runs_to_the_end_of_the_context(static_android):
    from edgegpt.errors import ArgumentError
    from edgegpt.runtime import Generator
    from edgegpt.runtime.static import StaticGenerator

    _, pkg = static_android
    dyn, st = Generator.load(pkg), StaticGenerator.load(pkg)
    ids = (dyn.encode(PROMPTS[3]) * 10)[:120]
    n = st.max_context - len(ids)
    assert st.generate_ids(ids, n, ignore_eos=True) == dyn.generate_ids([ids], n, ignore_eos=True)[0]
    with pytest.raises(ArgumentError, match="exceeds the model's context"):
        st.generate_ids(ids, n + 1)


def test_static_package_entries_are_checked(static_android, tmp_path):
    """A package is untrusted: a static graph entry pointing outside it, or with a mask value that would not
    hide a key, is refused before onnxruntime loads anything."""
    import json
    import shutil

    from edgegpt.errors import BundleError
    from edgegpt.runtime.static import StaticGenerator

    _, pkg = static_android
    for k, (field, value, match) in enumerate((
            ("file", "../outside.ort", "not a file inside the bundle"),
            ("mask_value", 0.0, "mask_value 0.0 is not a large negative number"),
            ("sequence_length", 10 ** 9, "sequence_length must be from 1 to 127"))):
        bad = tmp_path / f"bad{k}"
        shutil.copytree(pkg, bad)
        m = json.loads((bad / "edgegpt.json").read_text())
        for entry in m["package"]["static_graphs"]:
            entry[field] = value
        (bad / "edgegpt.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=match):
            StaticGenerator.load(bad)


def test_prefill_buckets_are_checked_before_any_work(static_android, tmp_path):
    from click.testing import CliRunner

    from edgegpt.cli import main

    traced, _ = static_android
    res = CliRunner().invoke(main, ["package", str(traced), "--target", "android", "--out", str(tmp_path / "p"),
                                    "--prefill-buckets", "16,4096"])
    assert res.exit_code != 0 and "prefill bucket must be from 2 to 127" in res.output, res.output
    assert not (tmp_path / "p").exists()


def test_static_loop_needs_only_the_runtime(static_android):
    """The app-side loop is part of edgegpt.runtime: it runs with torch, onnx and transformers unimportable."""
    _, pkg = static_android
    res = run_without_torch(f"""
        from edgegpt.runtime import StaticGenerator
        print(len(StaticGenerator.load({str(pkg)!r}).generate_ids([1, 2, 3], 5, ignore_eos=True)))
        assert not any(m.split(".")[0] in Block.BLOCKED for m in sys.modules)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "5"


def test_int8_static_logits_are_not_rounded_to_256_levels(static_android):
    """quantize_static's Q/DQ pair on the LM head's output is dropped: the logits keep their float values."""
    from edgegpt.runtime.static import StaticGenerator

    _, pkg = static_android
    st = StaticGenerator.load(pkg)
    rows = st.score_ids(st.encode(PROMPTS[0]), st.encode(" to iterate over"))
    assert min(len(np.unique(r)) for r in rows) > 256
    assert read_manifest(pkg)["recipe"]["logits"] == "float"


def test_qnn_htp_compiles_the_static_graphs(static_android, odd_traced, tmp_path):
    """onnxruntime-qnn's HTP compiler, offline on this machine: one partition for every static graph; at fp32
    every node, at int8-static all but the LM head's weight DequantizeLinear (its logits stay float)."""
    pytest.importorskip("onnxruntime_qnn")
    _, pkg = static_android
    fp32 = package_bundle(odd_traced, "android", tmp_path / "fp32", precision="fp32")["package"]["static_graphs"]
    for graphs, left in ((read_manifest(pkg)["package"]["static_graphs"], 1), (fp32, 0)):
        for g in graphs:
            qnn = _coverage(g)["qnn-htp"]
            assert qnn["partitions"] == 1 and qnn["nodes"] - qnn["supported"] == left, qnn
            assert qnn["suitability"] == ("YES" if left == 0 else "MAYBE")
