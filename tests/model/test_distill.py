"""edgegpt train --teacher: a student that keeps its teacher's tokenizer, learns its distribution, and is an
ordinary checkpoint afterwards; refusals before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.errors import ArgumentError, CheckpointError
from edgegpt.model import load_checkpoint
from edgegpt.model.distill import DistillConfig, Teacher, layer_map
from edgegpt.model.train import TrainConfig, train

BASE = dict(data=["builtin:pydoc"], block_size=64, batch_size=8, eval_interval=0, progress=False)


def test_layer_map_spreads_the_teachers_blocks():
    assert layer_map(6, 12) == [0, 2, 4, 7, 9, 11]
    assert layer_map(2, 4) == [0, 3] and layer_map(1, 4) == [3] and layer_map(3, 3) == [0, 1, 2]


@pytest.fixture(scope="module")
def students(trained_checkpoint, tmp_path_factory):
    """From scratch (the teacher's tokenizer, cross-entropy only) and distilled: same shape, data and steps."""
    root = tmp_path_factory.mktemp("distill")
    out = {}
    for name, extra in (("scratch", dict(alpha=0.0)), ("distilled", dict(alpha=1.0, temperature=1.0))):
        out[name] = root / name
        train(TrainConfig(out=str(out[name]), teacher=str(trained_checkpoint), n_layer=1, max_steps=80, lr=3e-3,
                          **BASE, **extra))
    return out


def _kl_to_teacher(teacher, student, ids):
    with torch.no_grad():
        t = torch.log_softmax(teacher(ids)[0], -1)
        s = torch.log_softmax(student(ids)[0], -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_a_distilled_student_is_closer_to_its_teacher_than_one_trained_from_scratch(trained_checkpoint, students):
    from edgegpt.corpus import default_eval_text

    teacher, tok = load_checkpoint(trained_checkpoint)
    ids = torch.tensor([tok.encode(default_eval_text()).ids[:120]])
    kl = {name: _kl_to_teacher(teacher, load_checkpoint(path)[0], ids) for name, path in students.items()}
    assert kl["distilled"] < 0.8 * kl["scratch"], kl


def test_the_student_keeps_the_teachers_tokenizer_and_records_it(trained_checkpoint, students):
    cfg = json.loads((students["distilled"] / "config.json").read_text())
    teacher_cfg = json.loads((trained_checkpoint / "config.json").read_text())
    assert cfg["vocab_size"] == teacher_cfg["vocab_size"] and cfg["n_positions"] == teacher_cfg["n_positions"]
    assert cfg["n_layer"] == 1 and cfg["n_embd"] == teacher_cfg["n_embd"]  # half the depth, the same width
    assert cfg["distilled_from"]["alpha"] == 1.0 and len(cfg["distilled_from"]["sha256"]) == 64
    assert (students["distilled"] / "tokenizer.json").read_text() == (trained_checkpoint / "tokenizer.json").read_text()


def test_the_student_is_an_ordinary_checkpoint_end_to_end(students, tmp_path):
    transformers = pytest.importorskip("transformers")
    src = students["distilled"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
    model, tok = load_checkpoint(src)
    ids = torch.tensor([tok.encode("The for statement").ids])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() < 1e-5
    runner = CliRunner()
    assert runner.invoke(main, ["export", str(src), "--out", str(tmp_path / "fp32")]).exit_code == 0
    m = json.loads((tmp_path / "fp32" / "edgegpt.json").read_text())
    assert m["source"]["distilled_from"]["sha256"] == json.loads((src / "config.json").read_text())[
        "distilled_from"]["sha256"]
    res = runner.invoke(main, ["quantize", str(tmp_path / "fp32"), "--out", str(tmp_path / "int8"), "--mode", "int8",
                               "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["package", str(tmp_path / "fp32"), "--target", "cpu", "--out", str(tmp_path / "pkg"),
                               "--force"])
    assert res.exit_code == 0, res.output
    gen = runner.invoke(main, ["generate", str(tmp_path / "int8"), "--prompt", "The", "--max-new-tokens", "4"])
    assert gen.exit_code == 0 and gen.output.startswith("The")
    bench = runner.invoke(main, ["bench", str(tmp_path / "fp32"), str(tmp_path / "int8"), "--prompt-tokens", "8",
                                 "--new-tokens", "4", "--runs", "1", "--warmup", "0", "--settle", "0"])
    assert bench.exit_code == 0 and "| edgegpt int8 (int8) |" in bench.output, bench.output


def test_init_from_teacher_copies_the_mapped_blocks(trained_checkpoint, tmp_path):
    out = tmp_path / "s"
    train(TrainConfig(out=str(out), teacher=str(trained_checkpoint), n_layer=1, max_steps=1, lr=1e-12,
                      init_from_teacher=True, **BASE))
    teacher, _ = load_checkpoint(trained_checkpoint)
    student, _ = load_checkpoint(out)
    t, s = teacher.state_dict(), student.state_dict()
    j = layer_map(1, teacher.config.n_layer)[0]
    close = lambda a, b: torch.allclose(a, b, atol=1e-6)  # noqa: E731 - one step at lr 1e-12
    assert close(s["transformer.h.0.mlp.c_fc.weight"], t[f"transformer.h.{j}.mlp.c_fc.weight"])
    assert close(s["transformer.wte.weight"], t["transformer.wte.weight"])


def test_the_loss_is_the_soft_target_kl_and_vanishes_for_the_teacher_itself(trained_checkpoint):
    teacher, tok = load_checkpoint(trained_checkpoint)
    twin, _ = load_checkpoint(trained_checkpoint)
    x = torch.tensor([tok.encode("The with statement is used to wrap").ids])
    y = torch.roll(x, -1, 1)
    t = Teacher(teacher, tok, DistillConfig("t", alpha=1.0, temperature=2.0, hidden=1.0), twin.config)
    loss, parts = t.loss(twin, twin, x, y)
    assert parts["kd"] == pytest.approx(0.0, abs=1e-6) and parts["cos"] == pytest.approx(0.0, abs=1e-5)
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and math.isfinite(parts["ce"])


def test_refusals_come_before_any_work(trained_checkpoint, trained_bundle, hf_checkpoint, tmp_path):
    def refused(match, err=ArgumentError, **kw):
        with pytest.raises(err, match=match):
            train(TrainConfig(out=str(tmp_path / "o"), max_steps=2, **{**BASE, **kw}))
        assert not (tmp_path / "o").exists()

    t = str(trained_checkpoint)
    refused("is an ONNX bundle; distillation needs the PyTorch checkpoint", CheckpointError, teacher=str(trained_bundle))
    refused("larger than its teacher", teacher=t, n_layer=3)
    refused("larger than its teacher", teacher=t, n_embd=128, n_head=2)
    refused("differs from the teacher's 1024", teacher=t, vocab_size=500)
    refused("exceeds the teacher's 128", teacher=t, n_positions=256)
    refused("needs its width", teacher=t, n_embd=32, n_head=2, init_from_teacher=True)
    refused("the student needs the teacher's width", teacher=t, n_embd=32, n_head=2, hidden_loss=1.0)
    refused("need a teacher", init_from_teacher=True)
    refused("alpha must be in", teacher=t, alpha=1.5)
    refused("another tokenizer or vocabulary", CheckpointError, teacher=t, init=str(hf_checkpoint("small-vocab")))
    res = CliRunner().invoke(main, ["train", "--data", "builtin:pydoc", "--out", str(tmp_path / "o"), "--teacher", t,
                                    "--n-layer", "9"])
    assert res.exit_code == 1 and "larger than its teacher" in res.output


def test_resume_continues_a_distillation(trained_checkpoint, tmp_path):
    out = tmp_path / "s"
    train(TrainConfig(out=str(out), teacher=str(trained_checkpoint), max_steps=3, **BASE))
    res = train(TrainConfig(out=str(out), teacher=str(trained_checkpoint), max_steps=5, resume=True, **BASE))
    assert res.steps == 5 and torch.load(out / "training_state.pt", weights_only=True)["step"] == 5


@pytest.mark.slow
def test_distillation_runs_under_torchrun(trained_checkpoint, tmp_path):
    import shutil
    import subprocess
    import sys

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "edgegpt.cli",
           "train", "--data", "builtin:pydoc", "--out", str(out), "--teacher", str(trained_checkpoint),
           "--init-from-teacher", "--hidden-loss", "0.5", "--block-size", "32", "--batch-size", "4", "--max-steps", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 4
    assert json.loads((out / "config.json").read_text())["distilled_from"]["init_from_teacher"] is True
