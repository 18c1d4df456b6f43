"""Runs systems interleaved (A B A B ...) in worker processes and reduces the timings.

Each system lives in its own process so that its peak RSS and load time are its own, and the
runs rotate between systems so a drift of the (noisy, shared) machine hits all of them alike.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

from edgegpt.bench.systems import System
from edgegpt.runtime.hugepages import hugepage_env

SWEEP_NEW_TOKENS = 16  # decode steps timed at each --sweep-context point


@contextmanager
def _tunables(value: Optional[str]):
    """GLIBC_TUNABLES set to value for the duration (None: unchanged), for a child about to start."""
    if value is None:
        yield
        return
    saved = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = saved


def _worker(system: System, conn) -> None:
    try:
        t = time.perf_counter()
        system.load()
        conn.send(("loaded", time.perf_counter() - t))
    except Exception as e:  # report any load failure to the parent as one line
        conn.send(("error", f"{system.label}: {type(e).__name__}: {e}".splitlines()[0]))
        return
    while True:
        cmd, args = conn.recv()
        if cmd == "quit":
            return
        try:
            t0 = time.perf_counter()
            stamps = system.run(*args)
            conn.send(("ok", (t0, stamps, list(system.tokens))))
        except Exception as e:
            conn.send(("error", f"{system.label}: {type(e).__name__}: {e}".splitlines()[0]))


@dataclass
class RunStats:
    ttft_ms: float
    decode_tok_s: float
    e2e_s: float
    step_ms: list[float]
    bandwidth_gb_s: Optional[float] = None  # read bandwidth probed right before this run (--roofline)


def reduce_run(t0: float, stamps: list[float]) -> RunStats:
    steps = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return RunStats(1000 * (stamps[0] - t0), decode, stamps[-1] - t0, steps)


@dataclass
class Result:
    label: str
    kind: str
    load_s: float = 0.0
    runs: list[RunStats] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    error: Optional[str] = None
    sweep: dict[int, float] = field(default_factory=dict)  # context -> decode ms/token
    tokens: list[int] = field(default_factory=list)  # the first prompt's new tokens (first timed run)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    def spread(self, attr: str) -> tuple[float, float]:
        vals = [getattr(r, attr) for r in self.runs]
        return min(vals), max(vals)

    def step_percentile(self, q: float) -> float:
        steps = sorted(s for r in self.runs for s in r.step_ms)
        return steps[min(len(steps) - 1, int(q * len(steps)))] if steps else float("nan")


class Pool:
    """One worker process per system."""

    def __init__(self, systems: list[System]):
        ctx = mp.get_context("spawn")
        self.systems, self.conns, self.procs = systems, [], []
        self.results = [Result(s.label, s.kind) for s in systems]
        for s in systems:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(s, child), daemon=True)
            with _tunables(hugepage_env()["GLIBC_TUNABLES"] if s.hugepages else None):
                p.start()  # a fresh interpreter: glibc reads GLIBC_TUNABLES as it starts
            self.conns.append(parent)
            self.procs.append(p)
        for res, conn in zip(self.results, self.conns):  # loads run in parallel; fine, they are not timed
            status, value = conn.recv()
            if status == "error":
                res.error = value
            else:
                res.load_s = value

    def run(self, i: int, prompts: list[list[int]],
            new_tokens: int) -> Optional[tuple[float, list[float], list[int]]]:
        if self.results[i].error:
            return None
        self.conns[i].send(("run", (prompts, new_tokens)))
        status, value = self.conns[i].recv()
        if status == "error":
            self.results[i].error = value
            return None
        return value

    def close(self) -> None:
        for conn, p in zip(self.conns, self.procs):
            try:
                conn.send(("quit", None))
            except (BrokenPipeError, OSError):
                pass
            p.join(timeout=10)


def peak_rss_of(pid: int) -> float:
    """Peak RSS (VmHWM) of a live process, MB; 0 where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(systems: list[System], prompts: list[list[int]], new_tokens: int, *, warmup: int, runs: int,
            sweep: Optional[dict[int, list[list[int]]]] = None, sweep_new_tokens: int = SWEEP_NEW_TOKENS,
            progress: Optional[Callable[[str], None]] = None, settle_s: float = 0.25,
            probe: Optional[Callable[[System], Optional[float]]] = None) -> list[Result]:
    """settle_s: idle time before every run, so the previous system's worker threads (onnxruntime
    and llama.cpp both spin-wait after a run) have gone to sleep and each run starts on an idle
    machine, as a request in an interactive app does. Without it, the first few ms of a run (the
    prefill: TTFT) compete with the last system's spinning threads on a 2-core machine.

    probe: called before each timed run of a system (after the idle time; the probe itself never
    spins); its bandwidth is kept with the run, so each run is judged against the machine as it was
    at that moment."""
    pool = Pool(systems)
    try:
        rounds = [("warmup", r) for r in range(warmup)] + [("run", r) for r in range(runs)]
        for phase, _ in rounds:
            for i, res in enumerate(pool.results):
                time.sleep(settle_s)  # before the probe too: the last system's threads may still spin
                bw = probe(systems[i]) if probe and phase == "run" and not res.error else None
                out = pool.run(i, prompts, new_tokens)
                if progress:
                    progress(res.label)
                if out is not None and phase == "run":
                    res.runs.append(reduce_run(*out[:2]))
                    res.runs[-1].bandwidth_gb_s = bw
                    res.tokens = res.tokens or out[2]
        # the context sweep rotates contexts inside every round (192, 960, 192, 960, ... for each system in
        # turn), so the host's drift over minutes hits every point alike: run one context after the other and
        # a slow minute lands on one point (plain fp32 once read faster at 960 tokens than at 192)
        times: dict[tuple[int, int], list[float]] = {}
        failed: set[int] = set()
        for _ in range(max(1, runs) if sweep else 0):
            for ctx_len, sweep_prompt in sweep.items():
                for i, res in enumerate(pool.results):
                    if i not in failed:
                        time.sleep(settle_s)
                        out = pool.run(i, sweep_prompt, sweep_new_tokens)
                        if out is None:
                            failed.add(i)
                        else:
                            times.setdefault((ctx_len, i), []).append(1000 / reduce_run(*out[:2]).decode_tok_s)
                    if progress:
                        progress(res.label)
        for (ctx_len, i), t in sorted(times.items()):
            pool.results[i].sweep[ctx_len] = statistics.median(t)
        for res, p in zip(pool.results, pool.procs):
            res.peak_rss_mb = peak_rss_of(p.pid)
    finally:
        pool.close()
    return pool.results
