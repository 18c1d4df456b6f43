"""The cost curve of the GPT-2 family: every command at each size, its wall time and peak RSS, the bundles'
sizes, and W1 beside llama.cpp at the same shape (one bench invocation per size).

Each size is a random-weight model made here (scripts/peers/make_w1_model.py --size). Each step runs as its own
process under /usr/bin/time, so its peak RSS is its own. A step whose output exists is not run again, which lets
an interrupted curve resume. The JSON holds every figure; the table is printed.

    python scripts/cost_curve.py small medium [--out DIR] [--json curve.json] [--steps export,quantize-int8,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# (layers, width, heads) as in make_w1_model.py; parameters counted with the tied head once
SIZES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20), "xl": (48, 1600, 25)}
EDGEGPT = [sys.executable, "-m", "edgegpt.launch"]


def steps(d: Path) -> dict[str, tuple[list[str], Path]]:
    """name -> (command, the output that says it is done)."""
    e = EDGEGPT
    return {
        "checkpoint": ([sys.executable, "scripts/peers/make_w1_model.py", str(d / "ckpt"), "--size", d.name],
                       d / "ckpt" / "config.json"),
        # the default export: the fused graph with the shared KV buffer (its int8 and int4 keep an int8 KV cache)
        "export": ([*e, "export", str(d / "ckpt"), "--out", str(d / "fp32")], d / "fp32"),
        "export-traced": ([*e, "export", str(d / "ckpt"), "--graph", "traced", "--out", str(d / "traced")],
                          d / "traced"),
        "export-concat": ([*e, "export", str(d / "ckpt"), "--kv-cache", "concat", "--out", str(d / "concat")],
                          d / "concat"),
        "quantize-int8": ([*e, "quantize", str(d / "fp32"), "--mode", "int8", "--out", str(d / "int8"), "--force"],
                          d / "int8"),
        "quantize-int4": ([*e, "quantize", str(d / "fp32"), "--mode", "int4", "--out", str(d / "int4"), "--force"],
                          d / "int4"),
        "quantize-fp16": ([*e, "quantize", str(d / "fp32"), "--mode", "fp16", "--out", str(d / "fp16"), "--force"],
                          d / "fp16"),
        "quantize-screened": ([*e, "quantize", str(d / "fp32"), "--mode", "fp32", "--lm-head", "screened", "--out",
                               str(d / "screened"), "--force"], d / "screened"),
        "quantize-int8-concat": ([*e, "quantize", str(d / "concat"), "--mode", "int8", "--out", str(d / "int8-concat"),
                                  "--force"], d / "int8-concat"),
        "package-cpu": ([*e, "package", str(d / "fp32"), "--target", "cpu", "--out", str(d / "pkg-cpu"), "--force"],
                        d / "pkg-cpu"),
        "package-android": ([*e, "package", str(d / "traced"), "--target", "android", "--out", str(d / "pkg-android"),
                             "--force"], d / "pkg-android"),
        "generate": ([*e, "generate", str(d / "int8"), "--prompt", "The", "--max-new-tokens", "16"], d / "generate.ok"),
        "gguf": ([sys.executable, "scripts/peers/gguf_from_checkpoint.py", str(d / "ckpt"), str(d / "g"), "--types",
                  "f32,q8_0,q4_0"], d / "g-q4_0.gguf"),
        # the bundles and GGUFs made so far (a curve run with --steps may leave some out)
        "bench": ([*e, "bench", *[str(d / b) for b in ("fp32", "int8", "int4", "int8-concat") if (d / b).exists()],
                   "--workload", "W1", "--runs", "3",
                   *[a for t in ("f32", "q8_0", "q4_0") if (d / f"g-{t}.gguf").exists()
                     for a in ("--gguf", str(d / f"g-{t}.gguf"))],
                   "--json", str(d / "bench.json")], d / "bench.json"),
    }


def timed(cmd: list[str], log: Path) -> dict:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        res = subprocess.run(["/usr/bin/time", "-f", "COSTCURVE %e %M", *cmd], stdout=f, stderr=subprocess.PIPE,
                             text=True)
        f.write(res.stderr)
    last = [line for line in res.stderr.splitlines() if line.startswith("COSTCURVE ")]
    wall, rss = (float(x) for x in last[-1].split()[1:]) if last else (float("nan"), float("nan"))
    return {"rc": res.returncode, "wall_s": round(wall, 1), "peak_rss_mb": round(rss / 1024), "error":
            next((line for line in res.stderr.splitlines() if line.startswith("Error")), None)}


def folder_mb(p: Path) -> float:
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6, 1) if p.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="+", choices=sorted(SIZES))
    ap.add_argument("--out", default="cost-curve")
    ap.add_argument("--json", default=None, help="where to write every figure [OUT/curve.json]")
    ap.add_argument("--steps", default=None, help="comma-separated subset of the steps, in their order")
    args = ap.parse_args()
    root = Path(args.out)
    out_json = Path(args.json) if args.json else root / "curve.json"
    curve = json.loads(out_json.read_text()) if out_json.exists() else {}
    for size in args.sizes:
        d = root / size
        d.mkdir(parents=True, exist_ok=True)
        layers, width, _ = SIZES[size]
        params = 50257 * width + 1024 * width + layers * (12 * width * width + 13 * width) + 2 * width
        entry = curve.setdefault(size, {"parameters": params, "fp32_weights_mb": round(4 * params / 1e6), "steps": {}})
        chosen = args.steps.split(",") if args.steps else list(steps(d))
        for name in chosen:
            cmd, done = steps(d)[name]  # planned now: the bench times what exists by then
            if done.exists():
                continue
            print(f"{size} {name} ...", flush=True)
            r = timed(cmd, d / "log.txt")
            if name == "generate" and r["rc"] == 0:
                done.write_text("ok\n")
            entry["steps"][name] = r
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(curve, indent=1))
            print(f"  {r}", flush=True)
        entry["bundle_mb"] = {n: folder_mb(d / n) for n in ("fp32", "int8", "int4", "fp16", "screened", "int8-concat")
                              if (d / n).exists()}
        if (d / "bench.json").exists():
            b = json.loads((d / "bench.json").read_text())
            entry["w1"] = {r["label"]: {"decode_tok_s": r.get("decode_tok_s"), "ttft_ms": r.get("ttft_ms")}
                           for r in b["results"]}
        out_json.write_text(json.dumps(curve, indent=1))
    print("| size | step | wall s | peak RSS MB | x fp32 weights |\n|---|---|---:|---:|---:|")
    for size, e in curve.items():
        for name, r in e["steps"].items():
            print(f"| {size} | {name} | {r['wall_s']} | {r['peak_rss_mb']} | "
                  f"{r['peak_rss_mb'] / e['fp32_weights_mb']:.2f} |" + (f" rc {r['rc']}: {r['error']}" if r["rc"] else ""))


if __name__ == "__main__":
    main()
