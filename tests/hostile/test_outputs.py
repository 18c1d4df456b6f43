"""Nothing is lost: outputs never destroy inputs or a user's files, a crash leaves the previous output
intact and no partial one, and two writers of one output cannot silently replace each other."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgegpt import atomic
from edgegpt.atomic import atomic_dir, check_output_dir, clean_stale
from edgegpt.cli import main
from edgegpt.errors import OutputError, OutputExistsError
from tests.hostile.conftest import one_line_error


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_an_output_around_or_inside_its_input_is_refused(hf_checkpoint, tiny_bundle, tmp_path):
    home = tmp_path / "home"
    ckpt = home / "models" / "ckpt"
    ckpt.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(hf_checkpoint("small-vocab"), ckpt)
    (home / "notes.txt").write_text("keep me")
    before = _tree(home)
    for out, why in ((home, "contains the input"), (ckpt.parent, "contains the input"), (ckpt, "is the input"),
                     (ckpt / "sub", "lies inside the input")):
        one_line_error(CliRunner().invoke(main, ["export", str(ckpt), "--out", str(out), "--overwrite"]), why)
    bundle = home / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = _tree(home)
    one_line_error(CliRunner().invoke(main, ["quantize", str(bundle), "--out", str(home), "--mode", "int8",
                                             "--overwrite"]), "contains the input")
    one_line_error(CliRunner().invoke(main, ["package", str(bundle), "--target", "cpu", "--out", str(home),
                                             "--overwrite"]), "contains the input")
    assert _tree(home) == before


def test_overwrite_replaces_only_an_output_of_the_same_kind(hf_checkpoint, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work")
    one_line_error(CliRunner().invoke(main, ["export", str(hf_checkpoint("small-vocab")), "--out", str(docs),
                                             "--overwrite"]), "holds files that are not an edgegpt bundle (thesis.tex)")
    assert (docs / "thesis.tex").read_text() == "years of work"


def test_train_says_what_is_in_a_folder_and_never_replaces_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.csv").write_text("a,b\n")
    args = ["train", "--data", "builtin:pydoc", "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--n-positions", "64", "--vocab-size", "300", "--block-size", "16", "--max-steps", "2"]
    one_line_error(CliRunner().invoke(main, args), "is not empty and holds no checkpoint (data.csv)")
    one_line_error(CliRunner().invoke(main, args + ["--overwrite"]),
                   "holds files that are not an edgegpt checkpoint (data.csv)")
    assert (out / "data.csv").read_text() == "a,b\n"


def test_train_refuses_a_data_file_inside_the_output_it_would_replace(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "builtin:pydoc", "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--n-positions", "64", "--vocab-size", "300", "--block-size", "16", "--max-steps", "2"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (out / "corpus.txt").write_text("The quick brown fox. " * 400)
    one_line_error(CliRunner().invoke(main, args[:2] + [str(out / "corpus.txt")] + args[3:] + ["--overwrite"]),
                   "contains the input")
    assert (out / "corpus.txt").exists()


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(CliRunner().invoke(main, ["train", "--data", "builtin:pydoc", "--out", str(blocker / "run")]),
                   "is not a directory")
    calls = []

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
    import edgegpt.model.train as train_mod

    monkeypatch.setattr(train_mod, "read_corpus", lambda *a: calls.append("read") or ["x"])
    one_line_error(CliRunner().invoke(main, ["train", "--data", "builtin:pydoc", "--out", str(tmp_path / "run")]),
                   "Read-only file system")
    assert calls == []  # refused before the corpus was even read, let alone a step trained


def test_a_full_disk_is_one_line_and_leaves_nothing(hf_checkpoint, tiny_bundle, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "q"
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    one_line_error(CliRunner().invoke(main, ["quantize", str(tiny_bundle), "--out", str(out), "--mode", "int8"]),
                   "has 0 MB free")
    monkeypatch.undo()
    # ENOSPC halfway through writing: one line, no partial output, no temporary left
    from edgegpt.graph import io as gio

    def full(model, path, **kwargs):
        Path(path).write_bytes(b"part of a graph")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(gio, "write_streamed", full)
    one_line_error(CliRunner().invoke(main, ["export", str(hf_checkpoint("small-vocab")), "--out",
                                             str(tmp_path / "e")]), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_final_rename_refuses_an_output_another_process_created(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(OutputExistsError, match="created by another process while this one ran"):
        with atomic_dir(out, replace=False) as tmp:
            (tmp / "mine.txt").write_text("mine")
            out.mkdir()  # the other writer finishes first
            (out / "theirs.txt").write_text("theirs")
    assert _tree(out) == {"theirs.txt": b"theirs"}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.slow
def test_two_exports_to_one_new_output_do_not_silently_replace_each_other(hf_checkpoint, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "edgegpt.cli", "export", str(hf_checkpoint("small-vocab")), "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert "already exists" in loser or "created by another process" in loser
    assert json.loads((out / "edgegpt.json").read_text())["verification"]["passed"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgegpt.atomic import atomic_dir
    with atomic_dir(Path(sys.argv[1])) as tmp:
        (tmp / "model.onnx").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
""")


def test_a_killed_writer_leaves_no_temporary_behind_the_next_run(tmp_path):
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [x.name for x in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".b.tmp-{p.pid}-")
    with atomic_dir(out) as tmp:
        (tmp / "edgegpt.json").write_text("{}")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b"]


def test_a_kill_between_the_two_renames_of_a_replacement_restores_the_previous_output(tmp_path):
    out = tmp_path / "b"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    old = tmp_path / f".b.old-{pid}"
    old.mkdir()
    (old / "edgegpt.json").write_text("previous")
    clean_stale(out)
    assert (out / "edgegpt.json").read_text() == "previous" and not old.exists()


def test_temporaries_of_live_processes_are_left_alone(tmp_path):
    out = tmp_path / "b"
    mine = tmp_path / f".b.tmp-{os.getpid()}-abc"
    mine.mkdir()
    clean_stale(out)
    assert mine.exists()


def test_checkpoint_files_get_the_umask_mode(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--data", "builtin:pydoc", "--out", str(out), "--n-layer", "1",
                                    "--n-head", "2", "--n-embd", "32", "--n-positions", "64", "--vocab-size", "300",
                                    "--block-size", "16", "--max-steps", "2"])
    assert res.exit_code == 0, res.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_check_output_dir_refuses_a_file_and_a_link(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputExistsError, match="is not a directory"):
        check_output_dir(tmp_path / "f", overwrite=True, what="bundle")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputExistsError, match="is not a directory"):
        check_output_dir(tmp_path / "link", overwrite=True, what="bundle")
    with pytest.raises(OutputError, match="cannot create"):
        check_output_dir(tmp_path / "f" / "x", overwrite=False, what="bundle")
