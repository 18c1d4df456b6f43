"""The `edgegpt` executable. The commands that run a model (generate, chat, eval) restart once with glibc's
huge pages for onnxruntime's weights (runtime/hugepages.py) before anything heavy is imported: the restart
costs one interpreter start. --no-hugepages or EDGEGPT_HUGEPAGES=0 turns it off."""

from __future__ import annotations

import sys

RUNS_A_MODEL = ("generate", "chat", "eval")


def main() -> None:
    args = sys.argv[1:]
    command = next((a for a in args if not a.startswith("-")), None)
    if command in RUNS_A_MODEL and "--no-hugepages" not in args:
        from edgegpt.runtime.hugepages import enable

        enable()
    from edgegpt.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
