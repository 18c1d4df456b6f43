"""Speculative decoding on real weights and real text: decode time per token of a trained model's fp32 bundle
plainly and with each drafter (prompt lookup, its own int4 bundle, smaller students), in one process with the
systems alternated, on prompts from builtin:pydoc's held-out tail:

    continue  a 128-token passage of held-out text, 64 new tokens (the model continues it)
    quote     a held-out passage, then its first 8 tokens again: the answer repeats text of the prompt

Every speculative output is checked against the plain one (greedy, token for token).

    python scripts/speculate_report.py TEACHER_CHECKPOINT [--draft STUDENT_CHECKPOINT ...] --out DIR
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def shared_bundle(checkpoint: Path, out: Path) -> Path:
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions

    if not (out / "edgegpt.json").is_file():
        export_bundle(checkpoint, out, ExportOptions(kv_cache="shared"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("--draft", action="append", default=[], help="a student checkpoint to draft with (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)

    from edgegpt.corpus import default_eval_text
    from edgegpt.quantize.bundle import quantize_bundle
    from edgegpt.runtime import Generator

    target = shared_bundle(Path(args.teacher), root / "target-fp32")
    if not (root / "target-int4" / "edgegpt.json").is_file():
        quantize_bundle(target, root / "target-int4", "int4", last_logits_only=True, force=True)
    drafts = {"lookup": "lookup", "int4 of the target": root / "target-int4"}
    for i, d in enumerate(args.draft):
        drafts[f"student {Path(d).name}"] = shared_bundle(Path(d), root / f"draft{i}")
    plain = Generator.load(target, threads=args.threads)
    systems = {"plain": plain, **{name: Generator.load(target, threads=args.threads, speculate=d)
                                  for name, d in drafts.items()}}
    ids = plain.encode(default_eval_text())
    step = max(1, (len(ids) - 160) // args.prompts)
    workloads = {"continue": [ids[s:s + 128] for s in range(0, step * args.prompts, step)],
                 "quote": [ids[s:s + 120] + ids[s:s + 8] for s in range(0, step * args.prompts, step)]}
    print(f"{plain.session.bundle.name}: ms per new token (median of {args.rounds} rounds over {args.prompts} "
          f"prompts, 64 new tokens, {args.threads} threads) and tokens per target step")
    print("| workload | " + " | ".join(systems) + " |")
    print("|---|" + "---:|" * len(systems))
    for wname, prompts in workloads.items():
        want = [plain.generate_ids([p], 64, ignore_eos=True)[0] for p in prompts]
        times = {name: [] for name in systems}
        per_step = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, gen in systems.items():
                t = time.perf_counter()
                for p, w in zip(prompts, want):
                    got = gen.generate_ids([p], 64, ignore_eos=True)[0]
                    assert got == w, f"{name} changed the output"
                    per_step[name].append(gen.last_tokens_per_step or 1.0)
                times[name].append((time.perf_counter() - t) / (64 * len(prompts)))
        base = statistics.median(times["plain"])
        cells = [f"{1e3 * statistics.median(times[n]):.2f} ({base / statistics.median(times[n]):.2f}x, "
                 f"{statistics.mean(per_step[n]):.2f} tok/step)" for n in systems]
        print(f"| {wname} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
