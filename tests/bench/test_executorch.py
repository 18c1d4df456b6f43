"""ExecuTorch as a bench peer: scripts/peers/executorch_from_checkpoint.py on the checkpoint a bundle came from,
then `bench --executorch` beside the bundle in one interleaved run."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from edgegpt.bench.bench import BenchConfig, run_bench
from edgegpt.bench.workloads import Workload
from edgegpt.errors import BenchError

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="executorch not installed")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def programs(hf_checkpoint, tmp_path_factory):
    sys.path.insert(0, str(ROOT / "scripts" / "peers"))
    try:
        import executorch_from_checkpoint as script
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("et")
    assert script.main([str(hf_checkpoint("distil-like")), str(out / "m"), "--types", "fp32,8da4w"]) == 0
    return {k: out / f"m-{k}.pte" for k in ("fp32", "8da4w")}


@pytest.fixture(scope="module")
def bundle(hf_checkpoint, tmp_path_factory):
    from edgegpt.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("etb") / "b"
    export_bundle(hf_checkpoint("distil-like"), out)
    return out


def test_executorch_peer_runs_the_same_weights_interleaved(bundle, programs):
    fp32, int4 = str(programs["fp32"]), str(programs["8da4w"])
    rep = run_bench(BenchConfig([str(bundle)], Workload("t", 16, 8), threads=1, warmup=0, runs=1,
                                executorch=(fp32, int4)))
    ours, et32, et4 = rep.results
    assert et32.kind == et4.kind == "executorch" and not et32.error and not et4.error
    assert et32.runs[0].decode_tok_s > 0 and et4.runs[0].decode_tok_s > 0
    assert et32.tokens == ours.tokens  # same weights at fp32: the same greedy tokens
    assert rep.data["precision"][et32.label] == "fp32" and rep.data["precision"][et4.label] == "int4"
    rep = run_bench(BenchConfig([str(bundle)], Workload("t", 16, 8, batch=2), threads=1, warmup=0, runs=1,
                                executorch=(fp32,)))
    assert "batch 1 only" in (rep.results[1].error or "")


def test_a_program_whose_linears_are_not_quantized_is_not_counted_as_int4(bundle, programs, tmp_path):
    """The size check: the exporter's int4 program passes it; the fp32 program under an int4 name (what a
    recipe that quantizes nn.Linear only makes of GPT-2's Conv1D blocks) is refused with the fix."""
    from edgegpt.bench.engines import pte_precision
    from edgegpt.manifest import read_manifest

    arch = read_manifest(bundle)["architecture"]
    assert pte_precision(programs["fp32"], arch) == "fp32"
    assert pte_precision(programs["8da4w"], arch) == "int4"
    fake = tmp_path / "m-8da4w.pte"
    shutil.copy(programs["fp32"], fake)
    with pytest.raises(BenchError, match="linear layers are not quantized.*executorch_from_checkpoint"):
        pte_precision(fake, arch)


def test_the_program_refuses_a_generation_past_its_cache(programs):
    from edgegpt.bench.engines import ExecuTorch

    s = ExecuTorch(str(programs["fp32"]), threads=1)
    s.load()
    with pytest.raises(BenchError, match="exceed the program's cache of 128"):
        s.run([[1] * 100], 40)
    assert len(s.run([[1] * 100], 28)) == 28  # exactly the cache: fine
