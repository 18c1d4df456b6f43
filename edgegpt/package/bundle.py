"""`edgegpt package`: a bundle -> a deployable package for one target (cpu, cuda, android, ios, web).

A separate command rather than options on export/quantize: packaging is a pure function of a
finished bundle, may need a precision pass first, and produces target-specific artifacts (ORT
format, operator configs, static graphs, a provider report) that desktop bundles do not want.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

from edgegpt.atomic import atomic_dir, check_output_dir, scratch_dir
from edgegpt.errors import ArgumentError, PackageError
from edgegpt.limits import check_int
from edgegpt.manifest import MODEL_FILE, Draft, bundle_file, bundle_size, read_manifest, seal, verify_files
from edgegpt.package.targets import choose_precision, target as get_target

log = logging.getLogger(__name__)


def package_bundle(bundle: str | Path, target_name: str, out: str | Path, *, precision: Optional[str] = None,
                   calibration: Optional[str] = None, fixed_past: Optional[int] = None,
                   prefill_buckets: Optional[Sequence[int]] = None, overwrite: bool = False,
                   force: bool = False) -> dict:
    """prefill_buckets (mobile): the prompt lengths of the static prefill graphs [128, or the cache's slots when
    fewer]; fixed_past (mobile): the static graphs' cache slots [the context - 1]."""
    bundle, out = Path(bundle), Path(out)
    target = get_target(target_name)
    manifest = read_manifest(bundle)
    want = choose_precision(target, precision)
    past, buckets = manifest["max_context"] - 1, ()
    if target.mobile:
        past = past if fixed_past is None else check_int(fixed_past, "fixed_past", low=1, high=past)
        buckets = _buckets(prefill_buckets, past)
    have = manifest["precision"]
    if have != want and have != "fp32":
        raise PackageError(f"{bundle} is {have}; the {target.name} package needs {want}: package the fp32 bundle it "
                           f"came from (or pass --precision {have})")
    graph_kind = manifest["graph"].get("options", {}).get("graph", "traced")
    if target.mobile and graph_kind == "fused":
        raise PackageError(f"{target.name} packages need a bundle with standard ONNX ops that NNAPI / CoreML / "
                           f"XNNPACK can take: export with `edgegpt export MODEL --graph traced --out BUNDLE` and "
                           f"package that")
    # transformers.js grows the KV cache itself: a shared-buffer fp32 graph is rewritten to that layout first
    rewrite = target.name == "web" and bool(manifest["graph"].get("options", {}).get("shared_kv_buffer"))
    if rewrite and have != "fp32":
        raise PackageError(f"{bundle} is {have} with the shared KV buffer, which transformers.js does not drive: "
                           f"package the fp32 bundle it came from (its graph is rewritten to a growing cache)")
    if target.name == "web" and have == "int8" and not manifest.get("recipe", {}).get("reduce_range"):
        raise PackageError(f"{bundle} has 8-bit int8 weights, on which onnxruntime-web's WASM kernels give other "
                           f"results than this runtime: package the fp32 bundle it came from (web int8 uses 7-bit "
                           f"weights)")
    if target.mobile:
        _check_one_file(bundle, manifest, want)
    # mobile: the .onnx, the .ort, the decode and prefill graphs; web: the graph (and its rewrite's copy)
    copies = 3 + len(buckets) if target.mobile else 2 + rewrite
    check_output_dir(out, overwrite=overwrite, what="package", inputs=(bundle,),
                     need_bytes=copies * bundle_size(bundle))
    verify_files(bundle, manifest)
    # an ORT-format model is one flatbuffer, and the browser fetches one graph file
    one_file = target.mobile or target.name == "web"
    with scratch_dir(out) as work:
        src, src_manifest = bundle, manifest
        if rewrite:
            from edgegpt.package.web import concat_source

            src = Path(work) / "concat"
            src_manifest, kv_rewrite = concat_source(bundle, manifest, src)
        if have != want:
            from edgegpt.corpus import calibration_text
            from edgegpt.quantize.bundle import quantize_bundle

            source, src = src, Path(work) / "quantized"
            # int8-static needs calibration text: the user's, or builtin:pydoc's training part
            cal = calibration_text(calibration) if want == "int8-static" else calibration
            # an int8 KV cache runs on onnxruntime's CPU kernel: other targets keep fp32
            src_manifest = quantize_bundle(source, src, want, calibration=cal, force=force,
                                           kv_cache=None if target.name == "cpu" else "fp32",
                                           options=_web_options(want) if target.name == "web" else None,
                                           one_file=one_file)
        if target.mobile and src_manifest["graph"].get("external_data") and have != want:
            raise PackageError(f"{bundle}'s {want} graph is {bundle_size(src) / 1e9:.2f} GB, too large for one file; "
                               f"an ORT-format mobile package needs one: choose a smaller --precision")
        with atomic_dir(out, replace=overwrite) as tmp:
            for name in src_manifest["files"]:
                shutil.copy2(bundle_file(src, name), tmp / name)
            m = {k: v for k, v in src_manifest.items() if k not in ("format", "format_version", "files", "size_bytes")}
            if one_file and m["graph"].get("external_data"):  # the source's own precision, from its data file
                from edgegpt.graph.io import set_layout

                set_layout(tmp / MODEL_FILE, external=False)
                m["graph"] = dict(m["graph"], external_data=None)
            m["package"] = {"target": target.name, "precision": want, "precision_reason": target.why,
                            "providers": list(target.providers), "source_bundle": str(bundle.resolve())}
            if target.mobile:
                from edgegpt.package.mobile import mobile_artifacts

                # fp16 from an fp32 bundle: fix the fp32 graph's shapes first, then convert (folding
                # the fp16 graph's Casts would store fp32 copies of the weights)
                fp32_graph = bundle_file(bundle, manifest["graph"]["file"]) if want == "fp16" and have == "fp32" \
                    else None
                m["package"].update(mobile_artifacts(tmp, m, target.name, past, buckets, fp32_graph))
                m["graph"] = dict(m["graph"], file=m["package"]["ort_format"]["file"])
                (tmp / MODEL_FILE).unlink()
                m["package"]["verification"] = _same_greedy(src, Draft(tmp, m))
                m["package"]["verification"]["static_graphs"] = _static_check(Draft(tmp, m))
            if target.name == "web":  # transformers.js's layout: the graph under onnx/, unchanged
                from edgegpt.package import web

                m["package"]["web"] = web.web_layout(tmp, want)
                if rewrite:
                    m["package"]["web"]["kv_rewrite"] = kv_rewrite
                m["graph"] = dict(m["graph"], file=None)
            (tmp / "README.txt").write_text(web.readme(m) if target.name == "web" else _readme(m))
            sealed = seal(tmp, m)
    return sealed


def _check_one_file(bundle: Path, manifest: dict, want: str) -> None:
    """An ORT-format model is one flatbuffer (at most 2 GB), and this project's writers keep a graph in one file
    up to EXTERNAL_DATA_THRESHOLD: refuse, before any work, a mobile package whose graph would be larger. The
    package moves weights out of its source's data file into the one file wherever they fit."""
    from edgegpt.graph.io import EXTERNAL_DATA_THRESHOLD
    from edgegpt.quantize.recipes import card

    have = manifest["precision"]
    size = bundle_size(bundle) * (card(want).size_ratio if have != want else 1.0)
    if size > EXTERNAL_DATA_THRESHOLD:
        raise PackageError(f"{bundle}'s {want} graph would be about {size / 1e9:.2f} GB; an ORT-format mobile package "
                           f"holds its weights in one file of at most {EXTERNAL_DATA_THRESHOLD / 1e9:.2f} GB: choose "
                           f"a smaller --precision or a smaller model")


def _buckets(requested: Optional[Sequence[int]], past: int) -> tuple[int, ...]:
    if requested is None:
        return (min(128, past),) if past >= 2 else ()
    if not requested:
        raise ArgumentError("prefill_buckets is empty: give at least one prompt length (the decode step alone "
                            "prefills one token a step)")
    return tuple(sorted({check_int(b, "a prefill bucket", low=2, high=past) for b in requested}))


def _web_options(precision: str) -> Optional[dict]:
    """onnxruntime-web's WASM int8 kernels, like x86's without VNNI, saturate u8 x s8 products of 8-bit weights
    (the browser's greedy tokens part from the native runtime's); 7-bit weights (reduce_range) give the same."""
    return {"reduce_range": True} if precision == "int8" else None


def _same_greedy(src: Path, pkg, new_tokens: int = 16) -> dict:
    """The .ort model must give the same greedy tokens as the .onnx it came from, on the CPU provider, with
    like compared to like: onnxruntime's full build runs an ORT-format model at the basic level it was
    converted at (the runtime optimizations it records, such as QDQ -> int8 kernel fusion, are for the
    device's build), so the ONNX model runs at the basic level too. At "all" it would fuse the QDQ nodes into
    int8 kernels, whose rounding differs: a model with near-tied logits then parts on a tie."""
    from edgegpt.export.verify import VERIFY_PROMPT
    from edgegpt.runtime import Generator
    from edgegpt.runtime.generator import common_prefix

    a, b = Generator.load(src, optimization="basic"), Generator.load(pkg)
    ids = a.encode(VERIFY_PROMPT)[:32]
    x = a.generate_ids([ids], new_tokens, ignore_eos=True)[0]
    y = b.generate_ids([ids], new_tokens, ignore_eos=True)[0]
    if x != y:
        at = common_prefix(x, y)
        raise PackageError(f"the ORT-format model's greedy tokens part from the ONNX model's at token {at} of "
                           f"{new_tokens} ({y[at:at + 4]} vs {x[at:at + 4]}, after {x[:at][-3:]})")
    return {"greedy_identical": True, "tokens": new_tokens, "provider": "cpu",
            "reference": "the source ONNX model at onnxruntime's basic optimization level, as the ORT format runs"}


def _static_check(pkg, new_tokens: int = 16) -> dict:
    """The static graphs, driven as an app drives them (runtime.static), against the package's dynamic graph:
    the same greedy tokens, or a parting on a near tie only (the token the static loop took within the largest
    logit difference measured along the dynamic graph's tokens)."""
    import numpy as np

    from edgegpt.export.verify import VERIFY_PROMPT
    from edgegpt.runtime import Generator
    from edgegpt.runtime.generator import common_prefix
    from edgegpt.runtime.session import KVCache
    from edgegpt.runtime.static import StaticGenerator

    dyn, st = Generator.load(pkg), StaticGenerator.load(pkg)
    ids = dyn.encode(VERIFY_PROMPT)[:32]
    x = dyn.generate_ids([ids], new_tokens, ignore_eos=True)[0]
    y = st.generate_ids(ids, new_tokens, ignore_eos=True)
    seq = np.array([ids + x[:-1]], np.int64)
    ref = KVCache(dyn.session, 1).step(seq, np.ones_like(seq), np.arange(seq.shape[1])[None], all_rows=True)
    ref = ref[0, len(ids) - 1:]
    diff = float(np.abs(ref - st.score_ids(ids, x)).max())
    at = common_prefix(x, y)
    if x != y and ref[at, x[at]] - ref[at, y[at]] > 2 * diff:
        raise PackageError(f"the static graphs' greedy tokens part from the dynamic graph's at token {at} of "
                           f"{new_tokens} ({y[at:at + 4]} vs {x[at:at + 4]}) by more than their logits differ")
    return {"greedy_identical": x == y, "greedy_agreement": at / new_tokens, "max_logit_diff": float(f"{diff:.3g}"),
            "tokens": new_tokens, "provider": "cpu", "loop": "edgegpt.runtime.static.StaticGenerator"}


def _readme(m: dict) -> str:
    p = m["package"]
    files = [m["graph"]["file"], "tokenizer.json", "edgegpt.json"]
    if "static_graphs" in p:
        files += [v["file"] for v in p["static_graphs"]]
    return (f"edgegpt package for {p['target']} ({p['precision']}: {p['precision_reason']}).\n"
            f"Providers to try, in order: {', '.join(p['providers'])}.\n"
            f"Files the app needs: {', '.join(files)}.\n"
            "See docs/deploy.md in the edgegpt repository for the calling code and the reduced onnxruntime build.\n")


def summary(out: Path, m: dict) -> str:
    """What `edgegpt package` prints about a package it wrote."""
    p, lines = m["package"], []
    if "ort_format" in p:
        o = p["ort_format"]
        lines.append(f"ORT format: {o['file']} {o['bytes'] / 1e6:.1f} MB (ONNX {o['onnx_bytes'] / 1e6:.1f} MB), "
                     f"operators in {o['required_operators']}; static graphs "
                     f"{', '.join(g['file'] for g in p['static_graphs'])}")
        lines.append(bundle_file(out, p["report"]).read_text())
    size = m["size_bytes"]
    if "web" in p:
        w = p["web"]
        size += w["bytes"]
        lines.append(f"transformers.js layout: {w['model_file']} {w['bytes'] / 1e6:.1f} MB, dtype \"{w['dtype']}\"")
    lines.append(f"wrote {out} ({size / 1e6:.1f} MB)")
    return "\n".join(lines)
