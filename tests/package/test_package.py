"""`edgegpt package`: precision per target, ORT format, operator configs, usability report,
fixed-shape decode variants, and refusals."""

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgegpt import contract
from edgegpt.cli import main
from edgegpt.errors import PackageError
from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.package.bundle import package_bundle
from edgegpt.manifest import read_manifest
from edgegpt.runtime import Generator


@pytest.fixture(scope="module")
def traced(trained_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "traced"
    export_bundle(trained_checkpoint, out, ExportOptions(graph="traced"))
    return out


@pytest.fixture(scope="module")
def android(traced, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "android"
    return out, package_bundle(traced, "android", out, precision="int8")


def test_android_package_is_ort_format_with_operator_configs_and_a_report(android):
    out, m = android
    p = m["package"]
    assert p["target"] == "android" and p["precision"] == "int8" and p["providers"][0] == "nnapi"
    assert m["graph"]["file"] == "model.ort" and not (out / "model.onnx").exists()
    cfg = (out / "model.required_operators.config").read_text()
    assert "ai.onnx;" in cfg and "MatMulInteger" in cfg
    assert p["ort_format"]["bytes"] > 0 and p["ort_format"]["onnx_bytes"] > 0
    report = (out / "mobile_usability.md").read_text()
    for provider in ("nnapi", "coreml", "xnnpack"):
        assert f"| {provider} |" in report
    cov = {c["provider"]: c for c in p["coverage"]["fixed_decode"]}
    dyn = {c["provider"]: c for c in p["coverage"]["dynamic"]}
    assert cov["nnapi"]["supported_pct"] > dyn["nnapi"]["supported_pct"]  # static shapes help NNAPI
    assert dyn["nnapi"]["dynamic_shape_nodes"] > 0 and cov["nnapi"]["dynamic_shape_nodes"] == 0
    assert p["verification"]["greedy_identical"]


def test_packaged_ort_model_generates_like_its_source(android, traced, tmp_path):
    """The ORT-format model gives the greedy tokens of the ONNX model of the same precision (the int8
    bundle the package was built from, rebuilt here the same way)."""
    from edgegpt.quantize.bundle import quantize_bundle

    out, _ = android
    pkg = Generator.load(out)
    assert pkg.session.manifest["graph"]["file"] == "model.ort"
    quantize_bundle(traced, tmp_path / "int8", "int8", kv_cache="fp32", force=True)
    onnx_int8 = Generator.load(tmp_path / "int8")
    for prompt in ("The for statement is used", "class C:\n    def"):
        ids = onnx_int8.encode(prompt)
        want = onnx_int8.generate_ids([ids], 12, ignore_eos=True)
        assert pkg.generate_ids([ids], 12, ignore_eos=True) == want and len(set(want[0])) > 1


def test_fixed_shape_decode_variant_with_a_sliding_window(android, traced):
    """The documented app contract: past is a left-padded window of fixed length; unused slots are
    zeros with attention_mask 0; the logits equal the dynamic graph's."""
    out, m = android
    variant = m["package"]["fixed_shape_variants"][0]
    P = variant["past_sequence_length"]
    fixed = ort.InferenceSession(str(out / variant["file"]), providers=["CPUExecutionProvider"])
    dyn = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"])
    a = m["architecture"]
    L, H, D = a["n_layer"], a["n_head"], a["head_dim"]
    ids = np.array([[11, 12, 13, 14, 15]], np.int64)
    n = ids.shape[1]
    empty = {k: np.zeros((1, H, 0, D), np.float32) for k in contract.past_names(L)}
    pre = dyn.run(None, {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones((1, n), np.int64),
                         contract.POSITION_IDS: np.arange(n)[None], **empty})
    step = {contract.INPUT_IDS: np.array([[16]]), contract.POSITION_IDS: np.array([[n]])}
    ref = dyn.run(None, {**step, contract.ATTENTION_MASK: np.ones((1, n + 1), np.int64),
                         **dict(zip(contract.past_names(L), pre[1:]))})
    window = [np.concatenate([np.zeros((1, H, P - n, D), np.float32), kv], axis=2) for kv in pre[1:]]
    mask = np.concatenate([np.zeros((1, P - n), np.int64), np.ones((1, n + 1), np.int64)], axis=1)
    got = fixed.run(None, {**step, contract.ATTENTION_MASK: mask, **dict(zip(contract.past_names(L), window))})
    assert np.abs(got[0] - ref[0]).max() < 1e-3  # int8 dynamic quantization sees the same values
    assert got[1].shape == (1, H, P + 1, D)


def test_precision_defaults_and_checks(traced, tmp_path):
    from edgegpt.package.targets import TARGETS, choose_precision

    assert {t: choose_precision(TARGETS[t], None) for t in TARGETS} == {
        "cpu": "int8", "cuda": "fp16", "android": "int8-static", "ios": "fp16", "web": "int8"}
    with pytest.raises(PackageError, match="target cpu cannot run fp16 bundles .*slower than fp32"):
        package_bundle(traced, "cpu", tmp_path / "x", precision="fp16")
    with pytest.raises(PackageError, match="unknown target 'tpu'"):
        package_bundle(traced, "tpu", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cpu_and_cuda_packages_pick_their_precision(traced, tmp_path):
    cpu = package_bundle(traced, "cpu", tmp_path / "cpu")
    assert cpu["precision"] == "int8" and cpu["package"]["providers"] == ["cpu"] and cpu["quality"]["ppl_increase_pct"] < 1
    cuda = package_bundle(traced, "cuda", tmp_path / "cuda")
    kv = {x["name"]: x["dtype"] for x in cuda["io"]["inputs"]}
    assert cuda["precision"] == "fp16" and kv["past_key_values.0.key"] == "float16"
    assert Generator.load(tmp_path / "cuda").generate("The", 4, ignore_eos=True)  # runs on CPU too, slowly


def test_ios_package_defaults_to_fp16_with_a_float16_cache(traced, tmp_path):
    m = package_bundle(traced, "ios", tmp_path / "ios")
    assert m["precision"] == "fp16" and m["io"]["inputs"][3]["dtype"] == "float16"
    # the fixed-shape variant stays fp16 too (no folded fp32 copies of the weights)
    fixed = m["package"]["fixed_shape_variants"][0]["file"]
    assert (tmp_path / "ios" / fixed).stat().st_size <= (tmp_path / "ios" / "model.ort").stat().st_size
    assert m["package"]["verification"]["greedy_identical"] and m["graph"]["file"] == "model.ort"


def test_refusals(traced, android, hf_checkpoint, tmp_path):
    out, _ = android
    fused = tmp_path / "fused"
    export_bundle(hf_checkpoint("small-vocab"), fused)
    with pytest.raises(PackageError, match="--graph traced"):
        package_bundle(fused, "android", tmp_path / "x")
    with pytest.raises(PackageError, match="is int8; the ios package needs fp16: package the fp32 bundle"):
        package_bundle(out, "ios", tmp_path / "x")
    res = CliRunner().invoke(main, ["package", str(traced), "--target", "ios", "--out", str(tmp_path / "ios"),
                                    "--precision", "int8"])
    assert res.exit_code == 0, res.output
    assert "ORT format: model.ort" in res.output and "| coreml |" in res.output
    assert read_manifest(tmp_path / "ios")["package"]["providers"][0] == "coreml"
