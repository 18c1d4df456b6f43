"""Checkpoints, training state and text from users (or attackers): no code runs, every mistake is one
line, and numbers are checked before work starts."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.errors import ArgumentError, CheckpointError
from edgegpt.model.train import STATE_FILE, TrainConfig, train
from tests.hostile.conftest import one_line_error

TINY = ["--data", "builtin:pydoc", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-positions", "64",
        "--vocab-size", "300", "--block-size", "16", "--batch-size", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    assert CliRunner().invoke(main, ["train", *TINY, "--out", str(out), "--max-steps", "2"]).exit_code == 0
    return out


class _Payload:
    """Unpickling this runs code (writes a marker file): what a crafted training_state.pt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_code(run_dir, tmp_path):
    out = shutil.copytree(run_dir, tmp_path / "run")
    marker = tmp_path / "pwned"
    with open(out / STATE_FILE, "wb") as f:
        torch.save({"step": 1, "payload": _Payload(str(marker))}, f)
    one_line_error(CliRunner().invoke(main, ["train", *TINY, "--out", str(out), "--max-steps", "4", "--resume"]),
                   "is not a training state edgegpt wrote")
    assert not marker.exists()
    with open(out / STATE_FILE, "wb") as f:  # a plain pickle, not even torch's zip format
        pickle.dump(_Payload(str(marker)), f)
    one_line_error(CliRunner().invoke(main, ["train", *TINY, "--out", str(out), "--max-steps", "4", "--resume"]),
                   "is not a training state edgegpt wrote")
    assert not marker.exists()


def test_a_truncated_or_foreign_training_state_is_one_line(run_dir, tmp_path):
    out = shutil.copytree(run_dir, tmp_path / "run")
    data = (out / STATE_FILE).read_bytes()
    (out / STATE_FILE).write_bytes(data[: len(data) // 3])
    one_line_error(CliRunner().invoke(main, ["train", *TINY, "--out", str(out), "--max-steps", "4", "--resume"]),
                   "is not a training state edgegpt wrote (truncated")
    torch.save({"step": 1}, out / STATE_FILE)
    one_line_error(CliRunner().invoke(main, ["train", *TINY, "--out", str(out), "--max-steps", "4", "--resume"]),
                   "lacks optimizer, torch_rng")


def test_the_real_training_state_loads_with_weights_only(run_dir):
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    assert state["step"] == 2


@pytest.mark.parametrize("config, match", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ('"gpt2"', "holds a JSON str"),
    ('{"model_type": "gpt2", "n_layer": "four"}', "n_layer must be a positive integer, got 'four'"),
    ('{"model_type": "gpt2", "n_layer": true}', "n_layer must be a positive integer, got True"),
    ('{"model_type": "gpt2", "architectures": "GPT2LMHeadModel"}', "architectures must be a list"),
    ('{"model_type": "gpt2", "add_cross_attention": true}', "add_cross_attention is not supported"),
    ('{"model_type": "gpt2", "scale_attn_weights": "no"}', "scale_attn_weights must be true or false, got 'no'"),
    ('{"model_type": "gpt2", "layer_norm_epsilon": -1}', "layer_norm_epsilon must be a small positive number"),
])
def test_a_bad_config_json_is_one_line(hf_checkpoint, tmp_path, config, match):
    ckpt = shutil.copytree(hf_checkpoint("small-vocab"), tmp_path / "ckpt")
    (ckpt / "config.json").write_text(config)
    for args in (["export", str(ckpt), "--out", str(tmp_path / "b")], ["generate", str(ckpt), "--prompt", "x"]):
        one_line_error(CliRunner().invoke(main, args), match)


def test_a_config_larger_than_its_weights_allocates_nothing(hf_checkpoint, tmp_path):
    ckpt = shutil.copytree(hf_checkpoint("small-vocab"), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(n_layer=100_000, n_embd=8192, n_head=64)  # ~80 TB of fp32 weights if it were built
    (ckpt / "config.json").write_text(json.dumps(cfg))
    one_line_error(CliRunner().invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "b")]),
                   "weights do not match config.json")


def test_training_a_model_bigger_than_memory_is_refused_up_front(tmp_path):
    one_line_error(CliRunner().invoke(main, ["train", "--data", "builtin:pydoc", "--out", str(tmp_path / "r"),
                                             "--n-layer", "2000", "--n-embd", "4096", "--n-head", "32"]),
                   "GB of memory")
    assert not (tmp_path / "r").exists()


def test_text_inputs_are_checked(tmp_path, tiny_bundle):
    (tmp_path / "d").mkdir()
    one_line_error(CliRunner().invoke(main, ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r")]),
                   "is a directory; pass the text files in it")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    one_line_error(CliRunner().invoke(main, ["quantize", str(tiny_bundle), "--out", str(tmp_path / "q"), "--mode",
                                             "int4", "--calibration", str(empty)]), "calibration text")
    one_line_error(CliRunner().invoke(main, ["package", str(tiny_bundle), "--target", "android", "--out",
                                             str(tmp_path / "p"), "--calibration", str(empty)]), "calibration text")
    one_line_error(CliRunner().invoke(main, ["eval", str(tiny_bundle), "--text", str(empty)]), "is empty")
    assert not (tmp_path / "q").exists() and not (tmp_path / "p").exists()


def test_warmup_defaults_to_a_share_of_a_short_run(tmp_path):
    res = CliRunner().invoke(main, ["train", *TINY, "--out", str(tmp_path / "r"), "--max-steps", "3"])
    assert res.exit_code == 0, res.output
    assert TrainConfig(data=[], out="x", max_steps=3).warmup == 0
    assert TrainConfig(data=[], out="x", max_steps=1000).warmup == 30
    one_line_error(CliRunner().invoke(main, ["train", *TINY, "--out", str(tmp_path / "s"), "--max-steps", "3",
                                             "--warmup-steps", "5"]),
                   "--warmup-steps (5) must not exceed --max-steps (3)")


@pytest.mark.parametrize("field, value, match", [
    ("max_steps", 0, "max_steps must be >= 1"), ("lr", float("nan"), "lr must be a finite number"),
    ("batch_size", 2.5, "batch_size must be a whole number"), ("val_fraction", 1.5, "val_fraction must be in"),
    ("seed", -1, "seed must be >= 0"),
])
def test_train_config_is_range_checked_before_work(tmp_path, field, value, match):
    with pytest.raises(ArgumentError, match=match):
        train(TrainConfig(data=["builtin:pydoc"], out=str(tmp_path / "r"), **{field: value}))
    assert not (tmp_path / "r").exists()


def test_a_non_utf8_prompt_and_chat_input_are_one_line(tiny_bundle):
    bad = b"caf\xe9 au lait"
    res = subprocess.run([sys.executable, "-m", "edgegpt.cli", "generate", str(tiny_bundle), "--prompt", bad],
                         capture_output=True)
    assert res.returncode == 1 and res.stderr.decode().strip().startswith("Error: the prompt is not valid UTF-8"), \
        res.stderr
    res = subprocess.run([sys.executable, "-m", "edgegpt.cli", "chat", str(tiny_bundle), "--max-new-tokens", "2"],
                         input=b"hello\n" + bad + b"\n", capture_output=True)
    assert res.returncode == 1 and res.stderr.decode().strip().splitlines()[-1] == \
        "Error: line 2 of the input is not UTF-8 text (byte 3); send UTF-8", res.stderr


def test_checkpoint_generation_refuses_bundle_only_flags(hf_checkpoint):
    one_line_error(CliRunner().invoke(main, ["generate", str(hf_checkpoint("small-vocab")), "--prompt", "x",
                                             "--provider", "cuda"]), "apply to bundles")


def test_a_bad_checkpoint_weights_file_is_one_line(hf_checkpoint, tmp_path):
    ckpt = shutil.copytree(hf_checkpoint("small-vocab"), tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot be read"):
        from edgegpt.model import load_model

        load_model(ckpt)
