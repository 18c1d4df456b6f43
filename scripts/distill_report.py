"""Does distillation pay? Trains a teacher on builtin:pystdlib (the standard library's source, a few packages
held out), then students of one shape on the same data and steps: from scratch (the teacher's tokenizer,
cross-entropy only) and distilled (edgegpt train --teacher), and prints docs/distillation.md's table: held-out
perplexity, KL and top-1 agreement to the teacher (the bundles' own evaluator on builtin:pystdlib-heldout),
training time per step, and greedy tokens per verification step with the student as the teacher's draft.

    python scripts/distill_report.py out/distill [--teacher-steps 1500] [--student-steps 600]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEACHER = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--n-positions", "256", "--vocab-size", "4096"]
STUDENTS = {
    "scratch (teacher's tokenizer, cross-entropy only)": ["--alpha", "0"],
    "distilled (alpha 0.5, T 2)": [],
    "distilled + init from teacher": ["--init-from-teacher"],
    "distilled + init + hidden-state loss 1.0": ["--init-from-teacher", "--hidden-loss", "1.0"],
    "distilled + init, alpha 0.9, T 1": ["--init-from-teacher", "--alpha", "0.9", "--temperature", "1"],
}
COMMON = ["--data", "builtin:pystdlib", "--block-size", "128", "--batch-size", "16", "--eval-interval", "0"]


def edgegpt(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "edgegpt.cli", *args], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"edgegpt {' '.join(args)} failed: {res.stderr.strip().splitlines()[-1]}")
    return res.stdout


def trained(out: Path, args: list[str]) -> float:
    """Train into out unless it is there already; returns seconds per step (nan when reused)."""
    if (out / "model.safetensors").is_file():
        return float("nan")
    text = edgegpt("train", *COMMON, "--out", str(out), *args)
    m = re.search(r"for (\d+) steps in ([\d.]+)s", text)
    return float(m.group(2)) / int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--student-steps", type=int, default=600)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per verification step")
    ap.add_argument("--only", default=None, help="comma-separated student numbers to train (default: all)")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    trained(root / "teacher", [*TEACHER, "--max-steps", str(args.teacher_steps)])
    print(f"teacher ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    per_step = {}
    chosen = [int(x) for x in args.only.split(",")] if args.only else list(range(len(STUDENTS)))
    students = {name: extra for i, (name, extra) in enumerate(STUDENTS.items()) if i in chosen}
    for i, (name, extra) in zip(chosen, students.items()):
        per_step[name] = trained(root / f"student{i}", ["--teacher", str(root / "teacher"), "--n-layer",
                                                        str(args.student_layers), "--max-steps",
                                                        str(args.student_steps), *extra])
        print(f"{name} ready", file=sys.stderr)
    for d in ["teacher", *[f"student{i}" for i in chosen]]:
        if not (root / f"{d}-bundle" / "edgegpt.json").is_file():
            edgegpt("export", str(root / d), "--out", str(root / f"{d}-bundle"))

    from edgegpt.corpus import read_text
    from edgegpt.model import load_checkpoint
    from edgegpt.model.generate import draft_acceptance
    from edgegpt.quality.evaluate import evaluate

    text = read_text("builtin:pystdlib-heldout")[:60_000]
    teacher, tok = load_checkpoint(root / "teacher")
    ids = tok.encode(text).ids
    prompts = [ids[s:s + 64] for s in range(0, len(ids) - 64, max(1, (len(ids) - 64) // 8))][:8]
    ref = evaluate(root / "teacher-bundle", text)
    print(f"| model | held-out perplexity | vs scratch | KL to teacher | top-1 agreement | s / step | "
          f"tokens per verification step (k={args.k}) | draft acceptance |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| teacher ({args.teacher_steps} steps) | {ref.perplexity:.2f} | - | - | - | - | - | - |")
    base_ppl = base_tps = None
    for i, name in zip(chosen, students):
        r = evaluate(root / f"student{i}-bundle", text, reference=root / "teacher-bundle")
        draft, _ = load_checkpoint(root / f"student{i}")
        acc = [draft_acceptance(teacher, draft, p, 64, args.k) for p in prompts]
        tps = statistics.mean(a["tokens_per_step"] for a in acc)
        rate = statistics.mean(a["acceptance"] for a in acc)
        base_ppl, base_tps = base_ppl or r.perplexity, base_tps or tps
        print(f"| {name} | {r.perplexity:.2f} | {r.perplexity / base_ppl:.3f}x | {r.kl_mean:.4f} | "
              f"{r.top1_agreement:.3f} | {per_step[name]:.3f} | {tps:.2f} ({tps / base_tps:.2f}x) | {rate:.3f} |")


if __name__ == "__main__":
    main()
