"""`edgegpt package`: precision per target, ORT format, operator configs, usability report,
static graphs, and refusals."""

import pytest
from click.testing import CliRunner

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
    dyn = {c["provider"]: c for c in p["coverage"]["dynamic"]}
    assert dyn["nnapi"]["dynamic_shape_nodes"] > 0
    for g in p["static_graphs"]:
        cov = {c["provider"]: c for c in g["coverage"]}
        assert cov["nnapi"]["dynamic_shape_nodes"] == 0 and cov["nnapi"]["supported_pct"] > dyn["nnapi"]["supported_pct"]
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
    distinct = 0
    for prompt in ("The for statement is used", "class C:\n    def"):
        ids = onnx_int8.encode(prompt)
        want = onnx_int8.generate_ids([ids], 12, ignore_eos=True)
        assert pkg.generate_ids([ids], 12, ignore_eos=True) == want
        distinct = max(distinct, len(set(want[0])))
    assert distinct > 1


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
    # the static graphs stay fp16 too (no folded fp32 copies of the weights)
    for g in m["package"]["static_graphs"]:
        assert g["kv_dtype"] == "float16"
        assert (tmp_path / "ios" / g["file"]).stat().st_size <= (tmp_path / "ios" / "model.ort").stat().st_size
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
