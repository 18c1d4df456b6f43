"""The command line: help lists the commands; bad input is one line and a non-zero exit."""

import subprocess
import sys

from click.testing import CliRunner

from edgegpt.cli import main


def test_help_lists_the_commands():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "generate", "export", "verify", "inspect"):
        assert cmd in res.output


def test_the_cli_module_imports_no_heavy_library():
    """`edgegpt --help` and the argument checks stay fast: the CLI module (with every recipe card) imports
    none of torch, onnx, onnxruntime or transformers; each command imports what it uses."""
    code = ("import sys; from edgegpt.cli import main; heavy = {'torch', 'onnx', 'onnxruntime', 'transformers'}; "
            "loaded = heavy & {m.split('.')[0] for m in sys.modules}; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_checkpoint_is_one_line_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "edgegpt.cli", "generate", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip() == (f"Error: {tmp_path} is neither an edgegpt bundle (no edgegpt.json) nor a "
                                  f"checkpoint dir (no config.json)")


def test_train_then_generate_from_the_cli(tmp_path):
    out = tmp_path / "m"
    args = ["train", "--data", "builtin:pydoc", "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--n-positions", "64", "--vocab-size", "400", "--block-size", "32", "--batch-size", "4", "--max-steps", "3",
            "--warmup-steps", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "val loss" in res.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "already holds a checkpoint" in again.output
    gen = CliRunner().invoke(main, ["generate", str(out), "--prompt", "The", "--max-new-tokens", "5"])
    assert gen.exit_code == 0 and gen.output.startswith("The")
    bad = CliRunner().invoke(main, ["generate", str(out), "--prompt", "The", "--top-p", "2"])
    assert bad.exit_code == 1 and "--top-p must be in (0, 1]" in bad.output
    long = CliRunner().invoke(main, ["generate", str(out), "--prompt", "The", "--max-new-tokens", "100"])
    assert long.exit_code == 1 and "--max-new-tokens (100) must be below the model's context of 64" in long.output
