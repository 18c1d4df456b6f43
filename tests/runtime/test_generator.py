"""edgegpt.runtime.Generator: parity with PyTorch, batches, streaming, stops, providers, bad input."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.errors import BundleError, ProviderError
from edgegpt.manifest import MANIFEST
from edgegpt.model import load_checkpoint
from edgegpt.model.generate import generate_ids
from edgegpt.runtime import Generator
from edgegpt.runtime.sampling import SamplingParams
from tests.conftest import run_without_torch

PROMPTS = ["The try statement", "Function definitions may be", "x"]


@pytest.fixture(scope="module")
def gen(fp32_bundle):
    return Generator.load(fp32_bundle[0], threads=2)


@pytest.fixture(scope="module")
def torch_model(fp32_bundle):
    return load_checkpoint(fp32_bundle[1])


def test_greedy_tokens_and_text_are_identical_to_pytorch(gen, torch_model):
    model, tok = torch_model
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        ref = generate_ids(model, ids, 48)
        assert gen.generate_ids([ids], 48, ignore_eos=True)[0] == ref
        assert gen.generate(prompt, 48, ignore_eos=True) == tok.decode(ref)


def test_seeded_sampling_matches_pytorch_and_repeats(gen, torch_model):
    model, tok = torch_model
    ids = tok.encode(PROMPTS[0]).ids
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=3)
    ref = generate_ids(model, ids, 24, params)
    kw = dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=3, ignore_eos=True)
    assert gen.generate_ids([ids], 24, **kw)[0] == ref
    assert gen.generate(PROMPTS[0], 24, **kw) == gen.generate(PROMPTS[0], 24, **kw)


def test_left_padded_batch_equals_each_prompt_alone(gen):
    ids = [gen.encode(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == 3
    batch = gen.generate_ids(ids, 20, ignore_eos=True)
    assert batch == [gen.generate_ids([i], 20, ignore_eos=True)[0] for i in ids]
    texts = gen.generate(PROMPTS, 20, ignore_eos=True)
    assert texts == [gen.generate(p, 20, ignore_eos=True) for p in PROMPTS]


def test_kv_cache_stays_in_ortvalues(gen):
    s = gen.session
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    logits, past = s.step(ids, np.ones((1, 3), np.int64), np.arange(3)[None], s.empty_past(1))
    assert logits.shape == (1, s.vocab_size) and all(isinstance(p, ort.OrtValue) for p in past)
    logits, past = s.step(np.array([[4]]), np.ones((1, 4), np.int64), np.array([[3]]), past)
    assert past[0].shape() == [1, s.n_head, 4, s.head_dim]


def test_stop_strings_and_stop_tokens(gen):
    full = gen.generate(PROMPTS[0], 40, ignore_eos=True)
    needle = full[10:14]
    cut = gen.generate(PROMPTS[0], 40, stop=[needle], ignore_eos=True)
    assert cut == full[: full.find(needle)]
    assert "".join(gen.stream(PROMPTS[0], 40, stop=[needle], ignore_eos=True)) == cut
    first = gen.generate_ids([gen.encode(PROMPTS[0])], 40, ignore_eos=True)[0]
    stopped = gen.generate_ids([gen.encode(PROMPTS[0])], 40, stop_token_ids=[first[5]], ignore_eos=True)[0]
    assert stopped == first[: first.index(first[5]) + 1]


def test_streaming_never_breaks_a_multibyte_character(trained_bundle):
    from edgegpt.runtime.text import IncrementalDecoder, StopStrings

    g = Generator.load(trained_bundle)
    text = "naïve café, 日本語のテキスト, emoji 🙂👍🏽 and more"
    ids = g.tokenizer.encode(text).ids
    assert len(ids) > len(text) // 2  # the tiny vocab splits these characters into byte tokens
    dec = IncrementalDecoder(g.tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    stops = StopStrings(["テキ"])
    assert "".join(stops.feed(p) for p in pieces) + stops.flush() == "naïve café, 日本語の"
    streamed = list(g.stream("The emoji 🙂", 30, temperature=1.0, seed=0, ignore_eos=True))
    assert all("\ufffd" not in p for p in streamed[:-1])


def test_context_limit_is_checked_before_running(gen):
    long = [1] * (gen.max_context - 10)
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        gen.generate_ids([long], 20)
    out = gen.generate_ids([long], 20, truncate_prompt=True, ignore_eos=True)
    assert len(out[0]) == 20


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-3), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_invalid_sampling_values(gen, kw, msg):
    with pytest.raises(ValueError, match=msg):
        gen.generate("x", 4, **kw)


def test_bad_prompts(gen):
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        gen.generate("", 4)
    with pytest.raises(ValueError, match="token ids must be in"):
        gen.generate_ids([[10**6]], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        gen.generate("x", 0)


def test_providers(fp32_bundle, caplog):
    with pytest.raises(ProviderError, match="unknown provider 'tpu'; choose one of cpu, cuda"):
        Generator.load(fp32_bundle[0], provider="tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the unavailable-provider path needs one that is absent")
    with pytest.raises(ProviderError, match="onnxruntime-gpu.*Available here: cpu"):
        Generator.load(fp32_bundle[0], provider="cuda")
    with caplog.at_level(logging.WARNING):
        g = Generator.load(fp32_bundle[0], provider="cuda", fallback=True)
    assert g.session.provider == "cpu" and "falling back to cpu" in caplog.text


def test_broken_bundles_are_clear_errors(fp32_bundle, tmp_path):
    b = shutil.copytree(fp32_bundle[0], tmp_path / "b")
    (b / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="cannot load model.onnx"):
        Generator.load(b)
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing its graph"):
        Generator.load(b)
    c = shutil.copytree(fp32_bundle[0], tmp_path / "c")
    m = json.loads((c / MANIFEST).read_text())
    m["io"]["inputs"][3]["dtype"] = "float16"
    (c / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="float16 in edgegpt.json"):
        Generator.load(c)
    m["io"]["inputs"][3]["name"] = "past.0.key"
    (c / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="do not match the edgegpt contract"):
        Generator.load(c)
    (c / "tokenizer.json").unlink()
    with pytest.raises(BundleError):
        Generator.load(c)
    with pytest.raises(BundleError, match="does not exist"):
        Generator.load(tmp_path / "nothing")


def test_runtime_imports_and_runs_without_torch_onnx_transformers(fp32_bundle):
    res = run_without_torch(f"""
        from edgegpt.runtime import Generator
        g = Generator.load({str(fp32_bundle[0])!r})
        print(len(g.generate_ids([[1, 2, 3]], 5, ignore_eos=True)[0]))
        assert not any(m.split(".")[0] in Block.BLOCKED for m in sys.modules)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "5"


def test_generate_command_uses_the_runtime_for_bundles(fp32_bundle):
    bundle, ckpt = fp32_bundle
    a = CliRunner().invoke(main, ["generate", str(bundle), "--prompt", "The", "--max-new-tokens", "12"])
    b = CliRunner().invoke(main, ["generate", str(ckpt), "--prompt", "The", "--max-new-tokens", "12"])
    s = CliRunner().invoke(main, ["generate", str(bundle), "--prompt", "The", "--max-new-tokens", "12", "--stream",
                                  "--threads", "1"])
    assert a.exit_code == b.exit_code == s.exit_code == 0
    assert a.output == b.output == s.output
    bad = CliRunner().invoke(main, ["generate", str(bundle), "--prompt", "The", "--provider", "nnapi"])
    assert bad.exit_code == 1 and "onnxruntime-android" in bad.output


def test_hugepages_enable_restarts_the_process_once_with_the_tunable():
    from edgegpt.runtime import hugepages

    if not hugepages.available():
        pytest.skip("needs Linux, glibc >= 2.35 and transparent huge pages")
    code = ("from edgegpt.runtime import hugepages; hugepages.enable(); import os; "
            "print(os.environ.get('GLIBC_TUNABLES'), hugepages.active())")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GLIBC_TUNABLES", "EDGEGPT_HUGEPAGES")}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert on.stdout.split() == ["glibc.malloc.hugetlb=1", "True"]
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "EDGEGPT_HUGEPAGES": "0"}, check=True)
    assert off.stdout.split() == ["None", "False"]


def test_the_cli_restarts_with_hugepages_only_for_commands_that_run_a_model(monkeypatch):
    import edgegpt.cli as cli
    from edgegpt import launch
    from edgegpt.runtime import hugepages

    calls = []
    monkeypatch.setattr(hugepages, "enable", lambda: calls.append("restart"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main"))
    for argv, want in ((["edgegpt", "generate", "b", "--prompt", "x"], ["restart", "main"]),
                       (["edgegpt", "-v", "chat", "b"], ["restart", "main"]),
                       (["edgegpt", "--no-hugepages", "eval", "b"], ["main"]),
                       (["edgegpt", "export", "m", "--out", "b"], ["main"])):
        calls.clear()
        monkeypatch.setattr(sys, "argv", argv)
        launch.main()
        assert calls == want, argv
