"""Numbers that ask for more than the machine has, and the Python API's arguments, are refused in one
line before any work (no thread storm, no out-of-memory kill, no bare TypeError)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.errors import ArgumentError
from edgegpt.limits import cpu_count
from edgegpt.runtime import Generator
from edgegpt.runtime.sampling import SamplingParams
from tests.hostile.conftest import one_line_error


@pytest.fixture(scope="module")
def gen(tiny_bundle):
    return Generator.load(tiny_bundle)


def test_threads_are_bounded_by_the_cpu_count(tiny_bundle):
    too_many = cpu_count() + 1
    with pytest.raises(ArgumentError, match=f"threads {too_many} exceeds this machine's {cpu_count()} CPUs"):
        Generator.load(tiny_bundle, threads=too_many)
    one_line_error(CliRunner().invoke(main, ["generate", str(tiny_bundle), "--prompt", "x", "--threads", "100000"]),
                   "--threads 100000 exceeds this machine's")
    one_line_error(CliRunner().invoke(main, ["chat", str(tiny_bundle), "--threads", "100000"], input="hi\n"),
                   "exceeds this machine's")
    res = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--threads", f"1,{too_many}"])
    assert res.exit_code == 2 and "exceeds this machine's" in res.output


def test_a_batch_bigger_than_memory_is_refused_before_allocating(gen, monkeypatch):
    import edgegpt.limits as limits

    monkeypatch.setattr(limits, "available_memory", lambda: 50 * 2**20)  # a 50 MB machine
    with pytest.raises(ArgumentError, match="GB of memory .* lower the batch size"):
        gen.generate_ids([[1, 2, 3]] * 4096, 4)


def test_export_and_quantize_refuse_up_front_what_memory_cannot_hold(hf_checkpoint, tiny_bundle, tmp_path, monkeypatch):
    """Each needs its measured peak (a multiple of the fp32 weights, export/bundle.py and the recipe cards) free
    before it starts: one line naming how much, nothing written, instead of an out-of-memory kill halfway."""
    import edgegpt.limits as limits

    ckpt = hf_checkpoint("small-vocab")
    monkeypatch.setattr(limits, "available_memory", lambda: 2**10)  # a 1 KB machine: the tiny model needs ~0.3 MB
    one_line_error(CliRunner().invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "b")]),
                   "exporting a 0.0M parameter model needs about 0.7 GB of memory")
    one_line_error(CliRunner().invoke(main, ["quantize", str(tiny_bundle), "--out", str(tmp_path / "q"),
                                             "--mode", "int8"]), "to int8 needs about 1.5 GB of memory")
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(limits, "available_memory", lambda: 2**40)
    res = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output


def test_bench_numbers_are_bounded(tiny_bundle):
    for flag, value in (("--runs", "1000000"), ("--warmup", "1000"), ("--batch", "100000"), ("--settle", "3600")):
        res = CliRunner().invoke(main, ["bench", str(tiny_bundle), flag, value])
        assert res.exit_code == 2 and flag in res.output, res.output


def test_fixed_past_is_checked_before_any_precision_pass(hf_checkpoint, tmp_path):
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions

    traced = tmp_path / "traced"
    export_bundle(hf_checkpoint("small-vocab"), traced, ExportOptions(graph="traced"))
    one_line_error(CliRunner().invoke(main, ["package", str(traced), "--target", "android", "--out",
                                             str(tmp_path / "p"), "--fixed-past", "1000000"]),
                   "--fixed-past must be from 1 to 63")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traced"]


@pytest.mark.parametrize("call, match", [
    (lambda g: g.generate(None), "prompt must be a string or a non-empty list of strings"),
    (lambda g: g.generate("x", 2.5), "max_new_tokens must be a whole number, got 2.5"),
    (lambda g: g.generate("x", 4, seed=-1, temperature=1.0), "seed must be a whole number >= 0"),
    (lambda g: g.generate("x", 4, seed="7", temperature=1.0), "seed must be a whole number >= 0"),
    (lambda g: g.generate("x", 4, temperature="hot"), "temperature must be a number"),
    (lambda g: g.generate_ids("abc", 4), "prompts must be a list of token-id lists"),
    (lambda g: g.generate_ids([[1, 2.5]], 4), "token ids must be whole numbers"),
    (lambda g: g.generate_ids([[1, 10**6]], 4), "token ids must be in"),
    (lambda g: g.generate(b"bytes"), "prompt must be a string"),
    (lambda g: g.generate("x", 4, stop=[1]), "stop must be a string or a list of strings"),
    (lambda g: g.encode("caf\udce9"), "the prompt is not valid UTF-8"),
])
def test_the_python_api_validates_its_arguments(gen, call, match):
    with pytest.raises(ArgumentError, match=match):
        call(gen)


def test_a_plain_stop_string_is_one_stop_string(gen):
    text = gen.generate("The", 24, ignore_eos=True)
    never = "\x00" + text[2]  # as one string it never occurs; split into characters, text[2] would cut early
    assert gen.generate("The", 24, ignore_eos=True, stop=never) == text
    assert gen.generate(["The"], 24, ignore_eos=True, stop=never)[0] == text
    cut = text[5:8]
    assert gen.generate("The", 24, ignore_eos=True, stop=cut) == text[:text.find(cut)]


def test_sampling_params_reject_non_numbers():
    with pytest.raises(ArgumentError, match="top_p must be a number"):
        SamplingParams(top_p=None)
    with pytest.raises(ArgumentError, match="repetition_penalty must be > 0"):
        SamplingParams(repetition_penalty=np.nan)


def test_cli_errors_name_flags_not_api_arguments(tiny_bundle):
    long_prompt = "word " * 200
    err = one_line_error(CliRunner().invoke(main, ["generate", str(tiny_bundle), "--prompt", long_prompt,
                                                   "--max-new-tokens", "8"]),
                         "pass --truncate-prompt to keep the last")
    assert "truncate_prompt" not in err and "max_new_tokens" not in err and "--max-new-tokens" in err


def test_workload_names_are_case_insensitive(tiny_bundle):
    one_line_error(CliRunner().invoke(main, ["bench", str(tiny_bundle), "--workload", "w9"]),
                   "unknown workload 'w9'; choose one of W1, W2, W3")
    from edgegpt.bench.bench import resolve_workload

    assert resolve_workload("w3", None, None, None).name == "W3"
