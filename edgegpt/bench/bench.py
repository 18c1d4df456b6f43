"""`edgegpt bench`: time bundles (and baselines) on a workload, interleaved, and report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Callable, Optional

from edgegpt.bench import report
from edgegpt.bench.harness import SWEEP_NEW_TOKENS, Result, measure
from edgegpt.bench.roofline import BandwidthProbe, kv_bytes_per_token, weight_bytes_per_token
from edgegpt.bench.engines import CTranslate2, ExecuTorch, LlamaCpp, ct2_precision, gguf_precision, pte_precision
from edgegpt.bench.systems import EdgeGPT, GenAI, Optimum, System, TorchEager, onnx_precision
from edgegpt.bench.workloads import WORKLOADS, Workload
from edgegpt.errors import BenchError, BundleError
from edgegpt.limits import check_int, check_threads
from edgegpt.manifest import MANIFEST, bundle_size, read_manifest, verify_files
from edgegpt.runtime import hugepages

BASELINES = ("torch", "optimum", "genai")
HUGEPAGES = ("edgegpt", "all", "none")
MAX_RUNS = 1000  # a benchmark of more runs than this is a typo, not a measurement
MAX_BATCH = 256


@dataclass
class BenchConfig:
    bundles: list[str]
    workload: Workload
    threads: Optional[int] | tuple[int, ...] = 2  # several counts: every system runs at each (a thread sweep)
    provider: str = "cpu"
    warmup: int = 1
    runs: int = 3
    baselines: tuple[str, ...] = ()
    checkpoint: Optional[str] = None
    sweep: list[int] = field(default_factory=list)
    roofline: bool = False
    gguf: tuple[str, ...] = ()  # llama.cpp peers on GGUF files of the same weights
    ct2: tuple[str, ...] = ()  # CTranslate2 peers on models converted from the same checkpoint
    executorch: tuple[str, ...] = ()  # ExecuTorch peers on .pte programs exported from the same checkpoint
    settle_s: float = 0.25  # idle time before each run (see harness.measure)
    genai: tuple[str, ...] = ()  # onnxruntime-genai's loop on these bundles (same graphs, its generator)
    hugepages: str = "edgegpt"  # whose workers start with glibc's huge pages: edgegpt | all | none
    speculate: Optional[str] = None  # "lookup" or a draft bundle: each eligible bundle also runs speculating


@dataclass
class BenchReport:
    results: list[Result]
    table: str
    notes: list[str]
    data: dict
    workload: Workload

    @property
    def failures(self) -> list[str]:
        """One line per system that could not be measured."""
        return [r.error or f"{r.label}: no run completed" for r in self.results if r.error or not r.runs]


def check_bundles(paths: list[str]) -> list[dict]:
    manifests = []
    for p in paths:
        if not (Path(p) / MANIFEST).is_file() and (Path(p) / "config.json").is_file():
            raise BundleError(f"{p} is a checkpoint, not a bundle; build one first: edgegpt export {p} --out BUNDLE "
                              f"(then edgegpt quantize BUNDLE --out ... --mode int8|int4 for the quantized ones)")
        m = read_manifest(p)
        verify_files(p, m)  # a corrupt bundle fails here, in one line, not in a worker mid-benchmark
        manifests.append(m)
    return manifests


def _check_genai_dir(path: str, tokens: int) -> None:
    """An edgegpt bundle, or any directory onnxruntime-genai loads (e.g. an Optimum export with a hand-written
    genai_config.json: scripts/peers/optimum_for_genai.py), with room for ``tokens``."""
    cfg_path = Path(path) / "genai_config.json"
    if (Path(path) / MANIFEST).is_file():
        ctx = check_bundles([path])[0]["max_context"]
    elif not cfg_path.is_file():
        raise BenchError(f"--genai {path}: neither an edgegpt bundle nor an onnxruntime-genai model (no "
                         f"genai_config.json); write one with scripts/peers/optimum_for_genai.py")
    else:
        try:
            ctx = json.loads(cfg_path.read_text())["model"]["context_length"]
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"--genai {path}: genai_config.json has no model.context_length") from None
    if tokens > ctx:
        raise BenchError(f"--genai {path}: {tokens} tokens exceed its context of {ctx}")


def resolve_workload(name: Optional[str], prompt_tokens: Optional[int], new_tokens: Optional[int],
                     batch: Optional[int]) -> Workload:
    if name:
        if name.upper() not in WORKLOADS:
            raise BenchError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
        w = WORKLOADS[name.upper()]
    else:
        w = Workload("custom", 128, 128)
    return Workload(w.name if not (prompt_tokens or new_tokens or batch) else "custom",
                    prompt_tokens or w.prompt_tokens, new_tokens or w.new_tokens, batch or w.batch, w.model, w.text)


def run_bench(cfg: BenchConfig, start: Optional[Callable[[int], Callable[[str], None]]] = None) -> BenchReport:
    """Measure every system of ``cfg``. ``start``, once every check has passed and before the first run,
    gets the number of runs to come and returns the callback each finished run calls with its label
    (a progress bar)."""
    if not cfg.bundles:
        raise BenchError("give at least one bundle dir")
    check_int(cfg.runs, "runs", low=1, high=MAX_RUNS)
    check_int(cfg.warmup, "warmup", low=0, high=MAX_RUNS)
    check_int(cfg.workload.batch, "batch", low=1, high=MAX_BATCH)
    manifests = check_bundles(cfg.bundles)
    vocab = min(m["architecture"]["vocab_size"] for m in manifests)
    w = cfg.workload
    for p, m in zip(cfg.bundles, manifests):
        if w.prompt_tokens + w.new_tokens > m["max_context"]:
            raise BenchError(f"{w.name}: {w.prompt_tokens} + {w.new_tokens} tokens exceed {p}'s context of "
                             f"{m['max_context']}")
    bad = [b for b in cfg.baselines if b not in BASELINES]
    if bad:
        raise BenchError(f"unknown baseline {bad[0]!r}; choose from {', '.join(BASELINES)}")
    if cfg.hugepages not in HUGEPAGES:
        raise BenchError(f"unknown --hugepages {cfg.hugepages!r}; choose from {', '.join(HUGEPAGES)}")
    labels = _labels(cfg.bundles, manifests)
    counts = thread_counts(cfg.threads)
    n_ctx = max(512, -(-(w.prompt_tokens + w.new_tokens + max(cfg.sweep or [0])) // 256) * 256)
    systems: list[System] = []
    bases: list[tuple[str, Optional[int]]] = []  # (label without the thread count, threads) per system
    precisions: dict[str, Optional[str]] = {}
    for t in counts:
        for s in _systems(cfg, manifests, labels, t, n_ctx, precisions):
            bases.append((s.label, t))
            if len(counts) > 1:
                s.label = f"{s.label} @{t}t"
            systems.append(s)
    huge = hugepages.available() and cfg.hugepages != "none"
    for s in systems:
        s.hugepages = huge and (cfg.hugepages == "all" or isinstance(s, EdgeGPT))
    sizes = {s.label: _size(s) for s in systems}
    sweep = {}
    for c in cfg.sweep:
        if c + SWEEP_NEW_TOKENS > min(m["max_context"] for m in manifests):
            raise BenchError(f"--sweep-context {c}: context + {SWEEP_NEW_TOKENS} decode tokens exceeds the model's "
                             f"context")
        sweep[c] = Workload("sweep", c, SWEEP_NEW_TOKENS).prompt_ids(vocab)
    probes: dict[Optional[int], BandwidthProbe] = {}
    weights: dict[str, Optional[int]] = {}
    if cfg.roofline:
        for t in counts:
            probes[t] = BandwidthProbe(t, x=next(iter(probes.values())).x if probes else None)
        weights = {b: weight_bytes_per_token(b) for b in cfg.bundles}
        # a decode step of this workload reads, on average, the cache of the prompt and half the new tokens
        mean_context = w.prompt_tokens + w.new_tokens / 2
        cache = {b: kv_bytes_per_token(m, mean_context, w.batch) for b, m in zip(cfg.bundles, manifests)}

    def probe(s: System) -> Optional[float]:
        return probes[s.threads]() if isinstance(s, EdgeGPT) and weights.get(s.bundle) else None
    progress = start(len(systems) * (cfg.warmup + cfg.runs + len(sweep) * max(1, cfg.runs))) if start else None
    results = measure(systems, _prompts(w, cfg.bundles, manifests, vocab), w.new_tokens, warmup=cfg.warmup, runs=cfg.runs, sweep=sweep,
                      progress=progress, settle_s=cfg.settle_s, probe=probe if probes else None)
    bws = {}
    for t, p in probes.items():
        got = [x.bandwidth_gb_s for s, r in zip(systems, results) if s.threads == t for x in r.runs if x.bandwidth_gb_s]
        got = got or [p(7)]
        # the median probe, like the median run it is set against: both sample the same minutes
        bws[t] = {"gb_per_s": round(median(got), 2), "best": round(max(got), 2), "min": round(min(got), 2),
                  "probes": len(got), "method": p.method}
    bounds, pct, per_token = {}, {}, {}
    for s, r in zip(systems, results):
        wb = weights.get(s.bundle) if isinstance(s, EdgeGPT) else None
        if wb and r.runs:
            per_token[s.label] = {"weights": wb, "kv_cache": cache[s.bundle]}
            bounds[s.label] = bws[s.threads]["gb_per_s"] * 1e9 / (wb + cache[s.bundle])
            pct[s.label] = 100 * r.median("decode_tok_s") / bounds[s.label]
    meta = {"workload": w.__dict__, "threads": counts[0] if len(counts) == 1 else list(counts),
            "provider": cfg.provider, "warmup": cfg.warmup, "runs": cfg.runs, "settle_s": cfg.settle_s,
            "hugepages": [s.label for s in systems if s.hugepages], "machine": report.machine(),
            "bandwidth": bws[counts[0]] if len(counts) == 1 and bws else None,
            "bandwidth_by_threads": {str(t): bw for t, bw in bws.items()},
            "bound_tok_s": bounds, "pct_of_bound": pct, "bytes_per_token": per_token, "precision": {s.label: s.precision for s in systems},
            "bundles": dict(zip(labels, cfg.bundles))}
    notes = report.notes(results) + report.peer_notes(results, systems) + (
        report.thread_notes(results, bases) if len(counts) > 1 else [])
    return BenchReport(results, report.table(results, sizes, pct), notes, report.to_json(results, meta), w)


def thread_counts(threads: Optional[int] | tuple[int, ...]) -> tuple[Optional[int], ...]:
    """The thread counts to run every system at: one (an int, or None for onnxruntime's default) or several."""
    counts = (threads,) if threads is None or isinstance(threads, int) else tuple(threads)
    if not counts or any(t is not None and (not isinstance(t, int) or t < 1) for t in counts):
        raise BenchError(f"threads must be whole numbers >= 1, got {threads!r}")
    for t in counts:
        check_threads(t)
    if len(set(counts)) != len(counts):
        raise BenchError(f"threads: {threads!r} repeats a count")
    return counts


# draft tokens per step of the peers' own prompt lookup: transformers' documented example and llama-cpp-python's
# LlamaPromptLookupDecoding default
PEER_LOOKUP_TOKENS = 10


def _systems(cfg: BenchConfig, manifests: list[dict], labels: list[str], threads: Optional[int],
             n_ctx: int, precisions: Optional[dict[str, Optional[str]]] = None) -> list[System]:
    """Every system the config asks for, at one thread count, each with its precision (``precisions``
    caches the peers' across thread counts)."""
    precisions = {} if precisions is None else precisions
    systems: list[System] = [EdgeGPT(b, threads, cfg.provider, label) for b, label in zip(cfg.bundles, labels)]
    for s, m in zip(systems, manifests):
        s.precision = m["precision"]
    if cfg.speculate:
        name = "lookup" if cfg.speculate == "lookup" else f"draft {Path(cfg.speculate).name}"
        for b, label, m in zip(cfg.bundles, labels, manifests):
            o = m["graph"]["options"]
            # what verification needs; int8's per-step activation scale would make it inexact (runtime refuses)
            if o.get("shared_kv_buffer") and not o.get("last_logits_only") and m["precision"] != "int8":
                systems.append(EdgeGPT(b, threads, cfg.provider, f"{label} +{name}", speculate=cfg.speculate))
                systems[-1].precision = m["precision"]
    # Optimum needs the plain contract (a growing past, every position's logits): the first such bundle.
    plain = next((b for b, m in zip(cfg.bundles, manifests)
                  if not m["graph"]["options"].get("shared_kv_buffer") and not m["graph"]["options"].get("last_logits_only")),
                 None)
    for b in cfg.baselines:
        if b == "torch":
            # the manifest's record of its source is only named, never followed: a bundle must not make us
            # read outside it
            src = cfg.checkpoint
            if not src:
                recorded = manifests[0].get("source", {}).get("checkpoint")
                raise BenchError("--baseline torch needs the checkpoint the bundle came from: pass --checkpoint DIR"
                                 + (f" (the bundle records {recorded})" if isinstance(recorded, str) else ""))
            systems.append(TorchEager(src, threads))
            systems[-1].precision = "fp32"
            if cfg.speculate == "lookup":  # transformers' prompt_lookup_num_tokens
                systems.append(TorchEager(src, threads, lookup=PEER_LOOKUP_TOKENS))
                systems[-1].precision = "fp32"
        elif b == "optimum" or b == "genai":
            if plain is None:
                raise BenchError(f"--baseline {b} runs the standard contract: add a bundle exported with "
                                 f"--kv-cache concat and without --last-logits-only")
            systems.append(Optimum(plain, threads) if b == "optimum" else GenAI(plain, threads))
            systems[-1].precision = read_manifest(plain)["precision"]
    for path in cfg.genai:
        _check_genai_dir(path, cfg.workload.prompt_tokens + cfg.workload.new_tokens)
        systems.append(GenAI(path, threads, label=f"onnxruntime-genai ({Path(path).name})"))
        if path not in precisions:
            precisions[path] = onnx_precision(path)
        systems[-1].precision = precisions[path]
    for path in cfg.gguf:
        if not Path(path).is_file():
            raise BenchError(f"GGUF file {path} does not exist; write one with scripts/peers/gguf_from_checkpoint.py")
        if path not in precisions:
            precisions[path] = gguf_precision(path)
        for lookup in (None, PEER_LOOKUP_TOKENS) if cfg.speculate == "lookup" else (None,):
            systems.append(LlamaCpp(path, threads, n_ctx, lookup=lookup))  # lookup: LlamaPromptLookupDecoding
            systems[-1].precision = precisions[path]
    for path in cfg.ct2:
        if not Path(path, "model.bin").is_file():
            raise BenchError(f"{path} is not a CTranslate2 model (no model.bin); write one with "
                             f"scripts/peers/ct2_from_checkpoint.py")
        systems.append(CTranslate2(path, threads))
        if path not in precisions:
            precisions[path] = ct2_precision(path)
        systems[-1].precision = precisions[path]
    for path in cfg.executorch:
        if not Path(path).is_file():
            raise BenchError(f"ExecuTorch program {path} does not exist; write one with "
                             f"scripts/peers/executorch_from_checkpoint.py")
        if path not in precisions:
            precisions[path] = pte_precision(path, manifests[0]["architecture"])
        systems.append(ExecuTorch(path, threads))
        systems[-1].precision = precisions[path]
    return systems


def _prompts(w: Workload, bundles: list[str], manifests: list[dict], vocab: int) -> list[list[int]]:
    """The workload's prompts; a text workload's are tokenized once, so every bundle must share the tokenizer."""
    if w.text is None:
        return w.prompt_ids(vocab)
    from edgegpt.runtime.text import load_bundle_tokenizer

    tables = {m["files"].get("tokenizer.json", {}).get("sha256") for m in manifests}
    if len(tables) != 1 or None in tables:
        raise BenchError(f"{w.name} prompts with text: every bundle needs the same tokenizer.json")
    return w.prompt_ids(vocab, load_bundle_tokenizer(bundles[0]))


def _size(s: System) -> Optional[int]:
    if isinstance(s, (EdgeGPT, GenAI)):
        return bundle_size(s.bundle)
    if isinstance(s, LlamaCpp):
        return Path(s.gguf).stat().st_size
    if isinstance(s, CTranslate2):
        return Path(s.path, "model.bin").stat().st_size
    if isinstance(s, ExecuTorch):
        return Path(s.path).stat().st_size
    return None


def _labels(paths: list[str], manifests: list[dict]) -> list[str]:
    labels = []
    for p, m in zip(paths, manifests):
        label = f"edgegpt {m['precision']} ({Path(p).name})"
        while label in labels:
            label += "'"
        labels.append(label)
    return labels
