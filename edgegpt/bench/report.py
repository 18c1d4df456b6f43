"""Benchmark output: a markdown table to paste into an issue, JSON, and the context-sweep plot."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Optional

from edgegpt.bench.harness import Result
from edgegpt.runtime.generator import common_prefix

WIDE_SPREAD = 0.10  # (max - min) / median above this: the machine was noisy during the runs


def machine() -> dict:
    import onnxruntime as ort

    from edgegpt import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "edgegpt": __version__}


def _fmt_spread(res: Result, attr: str, scale: float = 1.0, digits: int = 1) -> str:
    lo, hi = res.spread(attr)
    return f"{res.median(attr) * scale:.{digits}f} ({lo * scale:.{digits}f}-{hi * scale:.{digits}f})"


def table(results: list[Result], sizes: dict[str, Optional[int]], pct: dict[str, float]) -> str:
    """pct: per system, the median percentage of the decode bound its runs reached (--roofline)."""
    ok = [r for r in results if r.runs]
    base = ok[0] if ok else None
    head = ("| system | size MB | load s | TTFT ms | decode tok/s (min-max) | step p50 / p90 ms | e2e s | peak RSS MB "
            "| decode x first | TTFT x first | tokens = first |" + (" % of BW bound |" if pct else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if not r.runs:
            lines.append(f"| {r.label} |" + " - |" * (head.count("|") - 2))
            continue
        size = sizes.get(r.label)
        row = (f"| {r.label} | {size / 1e6:.1f} | " if size else f"| {r.label} | - | ") + (
            f"{r.load_s:.2f} | {r.median('ttft_ms'):.1f} | {_fmt_spread(r, 'decode_tok_s')} | "
            f"{r.step_percentile(0.5):.2f} / {r.step_percentile(0.9):.2f} | {r.median('e2e_s'):.3f} | "
            f"{r.peak_rss_mb:.0f} | {r.median('decode_tok_s') / base.median('decode_tok_s'):.2f} | "
            f"{r.median('ttft_ms') / base.median('ttft_ms'):.2f} | {same_prefix(r.tokens, base.tokens)} |")
        if pct:
            row += f" {pct[r.label]:.0f}% |" if r.label in pct else " - |"
        lines.append(row)
    return "\n".join(lines)


def same_prefix(tokens: list[int], ref: list[int]) -> str:
    """How many leading tokens match the first system's, as "k/n" ("-" where a system gave none)."""
    if not tokens or not ref:
        return "-"
    return f"{common_prefix(tokens, ref)}/{len(tokens)}"


def notes(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r.error:
            out.append(f"{r.label}: not measured ({r.error})")
        elif r.runs:
            lo, hi = r.spread("decode_tok_s")
            if (hi - lo) / r.median("decode_tok_s") > WIDE_SPREAD:
                out.append(f"{r.label}: decode spread {100 * (hi - lo) / r.median('decode_tok_s'):.0f}% of the median: "
                           f"the machine was noisy; use more --runs")
    return out


def peer_notes(results: list[Result], systems: list) -> list[str]:
    """Per edgegpt system, its decode and TTFT as ratios to every peer of the same precision and thread
    count in the run (llama.cpp q4_0 for int4, q8_0 for int8, f32 for fp32; genai; PyTorch; Optimum)."""
    out = []
    for s, r in zip(systems, results):
        if s.kind != "edgegpt" or not r.runs or not s.precision:
            continue
        peers = [q for p, q in zip(systems, results) if p.kind != "edgegpt" and p.precision == s.precision
                 and p.threads == s.threads and q.runs]
        if peers:
            dec = r.median("decode_tok_s")
            ttft = r.median("ttft_ms")
            out.append(f"{r.label} against the {s.precision} peers: decode " + ", ".join(
                f"{dec / q.median('decode_tok_s'):.2f}x {q.label}" for q in peers) + "; TTFT " + ", ".join(
                f"{ttft / q.median('ttft_ms'):.2f}x {q.label}" for q in peers))
    return out


def thread_notes(results: list[Result], bases: list[tuple[str, Optional[int]]]) -> list[str]:
    """For a thread sweep: per system, the thread count with the fastest decode and the one with the
    fastest TTFT (they can differ: prefill is compute, decode is memory), with every count's figures."""
    groups: dict[str, list[tuple[Optional[int], Result]]] = {}
    for (base, t), r in zip(bases, results):
        if r.runs:
            groups.setdefault(base, []).append((t, r))
    out = []
    for base, rs in groups.items():
        if len(rs) < 2:
            continue
        dec = max(rs, key=lambda x: x[1].median("decode_tok_s"))[0]
        ttft = min(rs, key=lambda x: x[1].median("ttft_ms"))[0]
        out.append(f"{base}: fastest decode at {_threads(dec)}, fastest TTFT at {_threads(ttft)} (" + "; ".join(
            f"{_threads(t)}: {r.median('decode_tok_s'):.1f} tok/s, TTFT {r.median('ttft_ms'):.1f} ms" for t, r in rs) + ")")
    return out


def _threads(t: Optional[int]) -> str:
    return "onnxruntime's default threads" if t is None else f"{t} thread" + ("" if t == 1 else "s")


def to_json(results: list[Result], meta: dict) -> dict:
    return {**meta, "results": [{
        "label": r.label, "kind": r.kind, "error": r.error, "load_s": r.load_s, "peak_rss_mb": r.peak_rss_mb,
        "ttft_ms": r.median("ttft_ms") if r.runs else None,
        "decode_tok_s": r.median("decode_tok_s") if r.runs else None,
        "e2e_s": r.median("e2e_s") if r.runs else None,
        "step_ms_p50": r.step_percentile(0.5) if r.runs else None,
        "step_ms_p90": r.step_percentile(0.9) if r.runs else None,
        "tokens": r.tokens,
        "runs": [{"ttft_ms": x.ttft_ms, "decode_tok_s": x.decode_tok_s, "e2e_s": x.e2e_s,
                  **({"bandwidth_gb_s": x.bandwidth_gb_s} if x.bandwidth_gb_s else {})} for x in r.runs],
        "sweep_ms_per_token": {str(k): v for k, v in r.sweep.items()},
    } for r in results]}


def plot(results: list[Result], path: str | Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from edgegpt.errors import BenchError

        raise BenchError("--plot needs matplotlib: pip install 'edgegpt[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in results:
        if r.sweep:
            xs = sorted(r.sweep)
            ax.plot(xs, [r.sweep[x] for x in xs], marker="o", label=r.label)
    ax.set_xlabel("context length (tokens already in the KV cache)")
    ax.set_ylabel("decode latency, ms / token (median)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def render(rep, counts: tuple, provider: str, runs: int, warmup: int, settle: float, hugepages_setting: str) -> str:
    """Everything `edgegpt bench` prints for a report (bench.BenchReport), as text."""
    w, d = rep.workload, rep.data
    lines = [f"{w.name}: batch {w.batch}, {w.prompt_tokens}-token prompt, exactly {w.new_tokens} new tokens (greedy, "
             f"EOS ignored), {'/'.join(map(str, counts))} threads, {provider}; median of {runs} runs after {warmup} "
             f"warm-up, {settle:g} s idle before each, interleaved; {d['machine']['cpu']}, onnxruntime "
             f"{d['machine']['onnxruntime']}", rep.table]
    for t, bw in d["bandwidth_by_threads"].items():
        lines.append(f"bandwidth {bw['gb_per_s']} GB/s: the median of {bw['probes']} probes, one before each run "
                     f"({bw['min']}-{bw['best']}; {bw['method']})")
    if d["bound_tok_s"]:
        lines.append("decode bound tok/s (weights + KV cache at the mean decode context): " + ", ".join(
            f"{k} {v:.0f} ({d['bytes_per_token'][k]['weights'] / 1e6:.0f} + "
            f"{d['bytes_per_token'][k]['kv_cache'] / 1e6:.1f} MB)" for k, v in d["bound_tok_s"].items()))
    for r in rep.results:
        if r.sweep:
            lines.append(f"context sweep, {r.label}: " + ", ".join(f"{c}: {ms:.2f} ms/token"
                                                                   for c, ms in sorted(r.sweep.items())))
    huge = d["hugepages"]
    lines.append("huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) for: " + (", ".join(huge) if huge else "none") + (
        "" if huge or hugepages_setting == "none" else " (needs Linux, glibc >= 2.35 and transparent huge pages)"))
    lines += [f"note: {n}" for n in rep.notes]
    return "\n".join(lines)
