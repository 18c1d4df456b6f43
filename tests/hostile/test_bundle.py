"""A bundle is untrusted input: nothing in it may make edgegpt read or write outside it or run code,
and a corrupt one is named in one line."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from edgegpt.cli import main
from edgegpt.errors import BundleError
from edgegpt.manifest import MANIFEST, read_manifest, verify_files
from edgegpt.runtime import Generator
from tests.hostile.conftest import one_line_error


def _edit(bundle, **changes):
    m = json.loads((bundle / MANIFEST).read_text())
    for path, value in changes.items():
        node = m
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (bundle / MANIFEST).write_text(json.dumps(m))


@pytest.fixture
def outside(tmp_path, tiny_bundle):
    """Another bundle beside the copy: what a manifest pointing out of its bundle would reach."""
    return shutil.copytree(tiny_bundle, tmp_path / "b")


@pytest.mark.parametrize("name", ["../b/model.onnx", "/etc/passwd", "..", "sub/model.onnx", "", 7])
def test_a_graph_path_out_of_the_bundle_is_refused_everywhere(bundle_copy, outside, tmp_path, name):
    _edit(bundle_copy, **{"graph.file": name})
    with pytest.raises(BundleError, match="not a file inside the bundle"):
        read_manifest(bundle_copy)
    for args in (["generate", str(bundle_copy), "--prompt", "x", "--max-new-tokens", "2"],
                 ["inspect", str(bundle_copy)],
                 ["quantize", str(bundle_copy), "--out", str(tmp_path / "q"), "--mode", "int8"]):
        one_line_error(CliRunner().invoke(main, args), "not a file inside the bundle")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("field", ["graph.external_data", "files"])
def test_other_paths_a_manifest_names_are_checked_too(bundle_copy, field):
    value = "../b/model.onnx" if field != "files" else {"../b/model.onnx": {"sha256": "0", "bytes": 1}}
    _edit(bundle_copy, **{field: value})
    with pytest.raises(BundleError, match="not a file inside the bundle"):
        read_manifest(bundle_copy)


def test_links_out_of_the_bundle_are_refused(bundle_copy, outside):
    (bundle_copy / "model.onnx").unlink()
    (bundle_copy / "model.onnx").symlink_to(outside / "model.onnx")
    with pytest.raises(BundleError, match="is a link to .* outside the bundle"):
        Generator.load(bundle_copy)
    (bundle_copy / "model.onnx").unlink()
    shutil.copy(outside / "model.onnx", bundle_copy / "model.onnx")
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(BundleError, match="tokenizer.json is a link to"):
        Generator.load(bundle_copy)


def test_onnx_external_data_outside_the_bundle_is_refused(bundle_copy, tmp_path):
    """onnx and onnxruntime refuse external data that escapes the model's folder; edgegpt keeps it so."""
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = onnx.load(str(bundle_copy / "model.onnx"))
    wte = next(t for t in model.graph.initializer if t.name == "transformer.wpe.weight")
    wte.ClearField("raw_data")
    wte.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = wte.external_data.add()
        entry.key, entry.value = k, v
    (bundle_copy / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(BundleError, match="onnxruntime cannot load"):
        Generator.load(bundle_copy)
    from edgegpt.graph.io import load_graph

    with pytest.raises(BundleError, match="points outside the directory"):
        load_graph(bundle_copy / "model.onnx")


def test_sha256_is_checked_where_files_are_trusted(bundle_copy, tmp_path):
    verify_files(bundle_copy)
    data = bytearray((bundle_copy / "tokenizer.json").read_bytes())
    data[-5] = ord("!") if data[-5] != ord("!") else ord("?")
    (bundle_copy / "tokenizer.json").write_bytes(bytes(data))  # same size, different bytes
    with pytest.raises(BundleError, match="tokenizer.json does not match the sha256"):
        verify_files(bundle_copy)
    with pytest.raises(BundleError, match="does not match the sha256"):
        Generator.load(bundle_copy, verify_files=True)
    one_line_error(CliRunner().invoke(main, ["generate", str(bundle_copy), "--prompt", "x", "--verify"]),
                   "tokenizer.json does not match the sha256")
    one_line_error(CliRunner().invoke(main, ["quantize", str(bundle_copy), "--out", str(tmp_path / "q"),
                                             "--mode", "int8"]), "does not match the sha256")
    one_line_error(CliRunner().invoke(main, ["package", str(bundle_copy), "--target", "cpu", "--out",
                                             str(tmp_path / "p")]), "does not match the sha256")
    one_line_error(CliRunner().invoke(main, ["bench", str(bundle_copy), "--runs", "1", "--prompt-tokens", "4",
                                             "--new-tokens", "2"]), "does not match the sha256")


def test_a_truncated_graph_is_named(bundle_copy, hf_checkpoint, tmp_path):
    data = (bundle_copy / "model.onnx").read_bytes()
    (bundle_copy / "model.onnx").write_bytes(data[: len(data) // 2])
    for args in (["verify", str(bundle_copy), "--against", str(hf_checkpoint("small-vocab"))],
                 ["quantize", str(bundle_copy), "--out", str(tmp_path / "q"), "--mode", "int4"],
                 ["package", str(bundle_copy), "--target", "cpu", "--out", str(tmp_path / "p")]):
        one_line_error(CliRunner().invoke(main, args), "truncated or edited")
    # without the file table, the graph itself is refused by the ONNX reader in one line
    _edit(bundle_copy, files={})
    from edgegpt.quantize.bundle import quantize_bundle

    m = json.loads((bundle_copy / MANIFEST).read_text())
    del m["files"]
    (bundle_copy / MANIFEST).write_text(json.dumps(m))
    one_line_error(CliRunner().invoke(main, ["generate", str(bundle_copy), "--prompt", "x"]), "cannot load")
    with pytest.raises(BundleError, match="no file table"):
        quantize_bundle(bundle_copy, tmp_path / "q", "int8")


def test_random_bytes_as_a_graph_are_named_by_the_onnx_reader(bundle_copy):
    from edgegpt.graph.io import load_graph

    (bundle_copy / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BundleError, match="model.onnx is not a readable ONNX model"):
        load_graph(bundle_copy / "model.onnx")


@pytest.mark.parametrize("changes, match", [
    ({"architecture.n_head": 1, "architecture.head_dim": 32}, "edgegpt.json says n_head 1"),
    ({"architecture.vocab_size": 500}, "logits cover 300 tokens"),
    ({"max_context": 1000, "architecture.n_positions": 1000}, "kv_capacity (64) is not its max_context (1000)"),
    ({"max_context": 1000, "architecture.n_positions": 1000, "graph.options.kv_capacity": 1000},
     "max_context (1000) may exceed what the graph holds"),
    ({"max_context": 100}, "no larger than n_positions"),
    ({"architecture.n_layer": "4"}, "n_layer must be a positive integer"),
    ({"architecture.n_head": 3}, "is not n_embd"),
])
def test_a_manifest_that_disagrees_with_its_graph_fails_at_load(bundle_copy, changes, match):
    _edit(bundle_copy, **changes)
    with pytest.raises(BundleError, match=re.escape(match)):
        Generator.load(bundle_copy)
    one_line_error(CliRunner().invoke(main, ["generate", str(bundle_copy), "--prompt", "x"]), match)


def test_a_folder_without_a_manifest_is_named_for_what_it_is(bundle_copy, tmp_path):
    (bundle_copy / MANIFEST).unlink()
    one_line_error(CliRunner().invoke(main, ["generate", str(bundle_copy), "--prompt", "x"]),
                   "has no edgegpt.json: not an edgegpt bundle though it holds a model.onnx")
    one_line_error(CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "x"]),
                   "is neither an edgegpt bundle (no edgegpt.json) nor a checkpoint dir (no config.json)")


def test_bench_refuses_to_follow_a_manifest_to_a_checkpoint(bundle_copy):
    from edgegpt.bench.bench import BenchConfig, run_bench
    from edgegpt.bench.workloads import Workload
    from edgegpt.errors import BenchError

    with pytest.raises(BenchError, match="pass --checkpoint DIR .the bundle records"):
        run_bench(BenchConfig([str(bundle_copy)], Workload("t", 4, 2), baselines=("torch",)))


@pytest.mark.parametrize("inputs", [[{"name": "past_key_values.0.key", "dtype": "object"}], []])
def test_calibration_refuses_a_kv_dtype_edgegpt_does_not_write(bundle_copy, tmp_path, inputs):
    """Calibration reads its feed shapes from the manifest (no session to validate them first)."""
    from edgegpt.quantize.calibration import calibration_feeds

    m = json.loads((bundle_copy / MANIFEST).read_text())
    m["io"]["inputs"] = inputs
    (bundle_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="KV cache dtype is not one edgegpt writes"):
        calibration_feeds(bundle_copy, "some text " * 200, windows=2, window=32)
