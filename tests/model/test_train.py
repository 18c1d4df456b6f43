"""The trainer on real text: checkpoints transformers loads, resume, fine-tune, and refusals."""

import json

import pytest
import torch

from edgegpt.errors import CheckpointError, DataError, OutputExistsError
from edgegpt.model import load_checkpoint
from edgegpt.model.train import STATE_FILE, TrainConfig, lr_at, train

TINY = dict(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=512, block_size=32, batch_size=8,
            warmup_steps=1, eval_interval=0, eval_batches=2, progress=False)


def test_trained_model_learns_and_loads_in_transformers(trained_checkpoint):
    transformers = pytest.importorskip("transformers")
    state = torch.load(trained_checkpoint / STATE_FILE, weights_only=False)
    # uniform guessing over 1024 tokens is ln(1024) = 6.93; 500 steps on pydoc reach about 4.8
    assert state["val_loss"] < 5.2
    hf = transformers.GPT2LMHeadModel.from_pretrained(trained_checkpoint).eval()
    model, tok = load_checkpoint(trained_checkpoint)
    ids = torch.tensor([tok.encode("The for statement").ids])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() < 1e-5


def test_training_is_reproducible_with_a_seed(tmp_path):
    a = train(TrainConfig(data=["builtin:pydoc"], out=str(tmp_path / "a"), max_steps=6, **TINY))
    b = train(TrainConfig(data=["builtin:pydoc"], out=str(tmp_path / "b"), max_steps=6, **TINY))
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss


def test_resume_continues_and_existing_out_is_refused(tmp_path):
    out = tmp_path / "run"
    first = train(TrainConfig(data=["builtin:pydoc"], out=str(out), max_steps=4, **TINY))
    with pytest.raises(OutputExistsError, match="--resume"):
        train(TrainConfig(data=["builtin:pydoc"], out=str(out), max_steps=8, **TINY))
    resumed = train(TrainConfig(data=["builtin:pydoc"], out=str(out), max_steps=8, resume=True, **TINY))
    assert first.steps == 4 and resumed.steps == 8
    assert torch.load(out / STATE_FILE, weights_only=False)["step"] == 8
    train(TrainConfig(data=["builtin:pydoc"], out=str(out), max_steps=2, overwrite=True, **TINY))
    assert torch.load(out / STATE_FILE, weights_only=False)["step"] == 2


def test_init_fine_tunes_an_existing_checkpoint(hf_checkpoint, tmp_path):
    src = hf_checkpoint("small-vocab")
    res = train(TrainConfig(data=["builtin:pydoc"], out=str(tmp_path / "ft"), init=str(src), max_steps=3,
                            **{**TINY, "vocab_size": None}))
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["vocab_size"] == 300 and cfg["n_embd"] == 32 and res.steps == 3
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()


def test_bad_corpora_are_refused_and_leave_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        train(TrainConfig(data=[str(empty)], out=str(tmp_path / "o1"), max_steps=2, **TINY))
    short = tmp_path / "short.txt"
    short.write_text("a few words only. " * 5)
    with pytest.raises(DataError, match="too small"):
        train(TrainConfig(data=[str(short)], out=str(tmp_path / "o2"), max_steps=2, **TINY))
    with pytest.raises(DataError, match="does not exist"):
        train(TrainConfig(data=[str(tmp_path / "missing.txt")], out=str(tmp_path / "o3"), max_steps=2, **TINY))
    with pytest.raises(DataError, match="unknown built-in"):
        train(TrainConfig(data=["builtin:nope"], out=str(tmp_path / "o4"), max_steps=2, **TINY))
    with pytest.raises(CheckpointError, match="no training_state"):
        train(TrainConfig(data=["builtin:pydoc"], out=str(tmp_path / "o5"), max_steps=2, resume=True, **TINY))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "short.txt"]


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(data=[], out="x", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.slow
def test_torchrun_trains_with_two_processes(tmp_path):
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "edgegpt.cli",
           "train", "--data", "builtin:pydoc", "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
           "--n-positions", "64", "--vocab-size", "512", "--block-size", "32", "--batch-size", "4", "--max-steps", "4",
           "--warmup-steps", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.load(out / STATE_FILE, weights_only=False)["step"] == 4
