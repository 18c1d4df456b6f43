"""`edgegpt package`: a bundle -> a deployable package for one target (cpu, cuda, android, ios).

A separate command rather than options on export/quantize: packaging is a pure function of a
finished bundle, may need a precision pass first, and produces target-specific artifacts (ORT
format, operator configs, fixed-shape variants, a provider report) that desktop bundles do not want.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edgegpt.atomic import atomic_dir, check_output_dir, scratch_dir
from edgegpt.errors import PackageError
from edgegpt.limits import check_int
from edgegpt.manifest import bundle_size, file_table, read_manifest, verify_files, write_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    name: str
    default_precision: str
    precisions: tuple[str, ...]
    providers: tuple[str, ...]  # in the order an app should try them
    mobile: bool
    why: str


TARGETS = {
    "cpu": Target("cpu", "int8", ("fp32", "int8", "int4"), ("cpu",), False,
                  "int8 (dynamic, VNNI) is the fastest with the least quality cost on laptop CPUs; fp16 has no fast "
                  "CPU kernels"),
    "cuda": Target("cuda", "fp16", ("fp32", "fp16", "int4"), ("cuda", "cpu"), False,
                   "fp16 halves memory traffic and uses tensor cores; MatMulInteger (int8 dynamic) has no CUDA kernel"),
    "android": Target("android", "int8-static", ("fp32", "int8", "int8-static", "int4"), ("nnapi", "xnnpack", "cpu"),
                      True, "NNAPI and QNN accelerate static (QDQ) int8; dynamic int8 and int4 run on the CPU EP"),
    "ios": Target("ios", "fp16", ("fp32", "fp16", "int8", "int4"), ("coreml", "xnnpack", "cpu"), True,
                  "CoreML's ML Program runs fp16 natively on the GPU / Neural Engine"),
}


def _target(name: str) -> Target:
    if name not in TARGETS:
        raise PackageError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def choose_precision(target: Target, requested: Optional[str]) -> str:
    p = requested or target.default_precision
    if p not in target.precisions:
        hint = " (fp16 has no fast CPU kernels: it runs slower than fp32 there)" if p == "fp16" else ""
        raise PackageError(f"target {target.name} cannot run {p} bundles{hint}; choose one of "
                          f"{', '.join(target.precisions)}")
    return p


def package_bundle(bundle: str | Path, target_name: str, out: str | Path, *, precision: Optional[str] = None,
                   calibration: Optional[str] = None, fixed_past: Optional[int] = None, overwrite: bool = False,
                   force: bool = False) -> dict:
    bundle, out = Path(bundle), Path(out)
    target = _target(target_name)
    manifest = read_manifest(bundle)
    want = choose_precision(target, precision)
    if fixed_past is not None and target.mobile:
        check_int(fixed_past, "fixed_past", low=1, high=manifest["max_context"] - 1)
    have = manifest["precision"]
    if have != want and have != "fp32":
        raise PackageError(f"{bundle} is {have}; the {target.name} package needs {want}: package the fp32 bundle it "
                          f"came from (or pass --precision {have})")
    graph_kind = manifest["graph"].get("options", {}).get("graph", "traced")
    if target.mobile and graph_kind == "fused":
        raise PackageError(f"{target.name} packages need a bundle with standard ONNX ops that NNAPI / CoreML / XNNPACK "
                          f"can take: export with `edgegpt export MODEL --graph traced --out BUNDLE` and package that")
    if manifest["graph"].get("external_data") and target.mobile:
        raise PackageError(f"{bundle} keeps its weights in external data; ORT-format mobile packages need a model "
                          f"under 2 GB in one file")
    check_output_dir(out, overwrite=overwrite, what="package", inputs=(bundle,), need_bytes=bundle_size(bundle))
    verify_files(bundle, manifest)
    with scratch_dir(out) as work:
        src = bundle
        if have != want:
            from edgegpt.quantize.bundle import quantize_bundle
            from edgegpt.quantize.evaluate import default_eval_text

            src = Path(work) / "quantized"
            cal = calibration if calibration is not None or want != "int8-static" else default_eval_text(20_000)
            # an int8 KV cache runs on onnxruntime's CPU kernel: other targets keep fp32
            quantize_bundle(bundle, src, want, calibration=cal, force=force,
                            kv_cache=None if target.name == "cpu" else "fp32")
        with atomic_dir(out, replace=overwrite) as tmp:
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            m = {k: v for k, v in read_manifest(tmp).items() if k not in ("format", "format_version")}
            m["package"] = {"target": target.name, "precision": want, "precision_reason": target.why,
                            "providers": list(target.providers), "source_bundle": str(bundle.resolve())}
            if target.mobile:
                # fp16 from an fp32 bundle: fix the fp32 graph's shapes first, then convert (folding
                # the fp16 graph's Casts would store fp32 copies of the weights)
                fp32_graph = bundle / "model.onnx" if want == "fp16" and have == "fp32" else None
                m["package"].update(_mobile(tmp, m, fixed_past, fp32_graph))
                m["graph"] = dict(m["graph"], file=m["package"]["ort_format"]["file"])
                (tmp / "model.onnx").unlink()
                write_manifest(tmp, m)
                m["package"]["verification"] = _same_greedy(src, tmp)
            m["files"] = file_table(tmp)
            m["size_bytes"] = sum(f["bytes"] for f in m["files"].values())
            write_manifest(tmp, m)
            (tmp / "README.txt").write_text(_readme(m))
    return read_manifest(out)


def _mobile(tmp: Path, manifest: dict, fixed_past: Optional[int], fp32_graph: Optional[Path] = None) -> dict:
    from edgegpt.export.mobile import ep_coverage, make_fixed_decode, to_ort_format

    onnx_path = tmp / "model.onnx"
    onnx_size = onnx_path.stat().st_size
    dynamic_cov = ep_coverage(onnx_path, fixed=False)
    ort_path, cfg_path = to_ort_format(onnx_path, tmp, runtime_optimizations=True)
    past = fixed_past or manifest["max_context"] - 1
    if not 1 <= past < manifest["max_context"]:
        raise PackageError(f"--fixed-past must be in 1..{manifest['max_context'] - 1}, got {past}")
    fixed_onnx = tmp / "model_decode_fixed.onnx"
    if fp32_graph is not None:
        from edgegpt.quantize.recipes import Fp16

        fixed_fp32 = tmp / "model_decode_fixed.fp32.onnx"
        make_fixed_decode(fp32_graph, fixed_fp32, past)
        Fp16().apply(fixed_fp32, fixed_onnx)
        fixed_fp32.unlink()
    else:
        make_fixed_decode(onnx_path, fixed_onnx, past)
    fixed_cov = ep_coverage(fixed_onnx, fixed=True)
    fixed_ort, fixed_cfg = to_ort_format(fixed_onnx, tmp, runtime_optimizations=True)
    fixed_onnx.unlink()
    report = _report(manifest, dynamic_cov, fixed_cov, past)
    (tmp / "mobile_usability.md").write_text(report)
    return {
        "ort_format": {"file": ort_path.name, "bytes": ort_path.stat().st_size, "onnx_bytes": onnx_size,
                       "required_operators": cfg_path.name},
        "fixed_shape_variants": [{"file": fixed_ort.name, "required_operators": fixed_cfg.name,
                                  "use": "decode step", "batch_size": 1, "sequence_length": 1,
                                  "past_sequence_length": past,
                                  "kv_layout": "left-padded sliding window: unused past slots are zeros with "
                                               "attention_mask 0; drop present's oldest slot after each step"}],
        "coverage": {"dynamic": [c.as_dict() for c in dynamic_cov], "fixed_decode": [c.as_dict() for c in fixed_cov]},
        "report": "mobile_usability.md",
    }


def _report(manifest: dict, dynamic, fixed, past: int) -> str:
    a = manifest["architecture"]
    lines = [f"# Mobile usability: GPT-2 family, {a['n_layer']} layers x {a['n_embd']}, {manifest['precision']}", "",
             "Produced by onnxruntime's usability checker (NNAPI, CoreML ML Program) and, for XNNPACK, by op type "
             "against its documented operator list. Nodes not taken by a provider run on the CPU EP.", ""]
    for title, cov in (("Dynamic-shape graph (model.ort)", dynamic),
                       (f"Fixed-shape decode graph (model_decode_fixed.ort: batch 1, 1 token, past {past})", fixed)):
        lines += [f"## {title}", "", "| provider | nodes supported | partitions | suitability | falls back to CPU |",
                  "|---|---|---|---|---|"]
        for c in cov:
            reasons = []
            if c.dynamic_shape_nodes:
                reasons.append(f"{c.dynamic_shape_nodes} nodes have dynamic input shapes")
            if c.unsupported_ops:
                reasons.append("unsupported ops: " + ", ".join(c.unsupported_ops))
            lines.append(f"| {c.provider} | {c.supported}/{c.nodes} ({100 * c.supported / max(1, c.nodes):.0f}%) | "
                         f"{c.partitions} | {c.suitability} | {'; '.join(reasons) or '-'} |")
        lines.append("")
    lines += ["Many partitions mean a copy between the accelerator and the CPU at every boundary, every step: "
              "measure against the CPU EP (or XNNPACK) before choosing an accelerator.", ""]
    return "\n".join(lines)


def _same_greedy(src: Path, pkg: Path, new_tokens: int = 16) -> dict:
    """The .ort model must give the same greedy tokens as the .onnx it came from (CPU provider)."""
    from edgegpt.export.verify import VERIFY_PROMPT
    from edgegpt.runtime import Generator
    from edgegpt.runtime.generator import common_prefix

    a, b = Generator.load(src), Generator.load(pkg)
    ids = a.encode(VERIFY_PROMPT)[:32]
    x = a.generate_ids([ids], new_tokens, ignore_eos=True)[0]
    y = b.generate_ids([ids], new_tokens, ignore_eos=True)[0]
    if x != y:
        at = common_prefix(x, y)
        raise PackageError(f"the ORT-format model's greedy tokens part from the ONNX model's at token {at} of "
                           f"{new_tokens} ({y[at:at + 4]} vs {x[at:at + 4]}, after {x[:at][-3:]})")
    return {"greedy_identical": True, "tokens": new_tokens, "provider": "cpu"}


def _readme(m: dict) -> str:
    p = m["package"]
    files = [m["graph"]["file"], "tokenizer.json", "edgegpt.json"]
    if "fixed_shape_variants" in p:
        files += [v["file"] for v in p["fixed_shape_variants"]]
    return (f"edgegpt package for {p['target']} ({p['precision']}: {p['precision_reason']}).\n"
            f"Providers to try, in order: {', '.join(p['providers'])}.\n"
            f"Files the app needs: {', '.join(files)}.\n"
            "See docs/deploy.md in the edgegpt repository for the calling code and the reduced onnxruntime build.\n")
