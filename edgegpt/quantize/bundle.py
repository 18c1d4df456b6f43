"""`edgegpt quantize`: an fp32 bundle -> a new bundle in another precision, with measured quality.

The input is never touched: the new bundle is assembled in a temporary sibling of --out and renamed
into place only when it is complete and within its perplexity budget (or --force).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

from edgegpt import __version__
from edgegpt.atomic import atomic_dir, check_output_dir, scratch_dir
from edgegpt.errors import DataError, QuantizeError
from edgegpt.limits import check_int
from edgegpt.manifest import MODEL_FILE, bundle_file, bundle_size, file_table, read_manifest, verify_files, write_manifest
from edgegpt.quantize.evaluate import calibration_text, decode_path, decode_paths, default_eval_text, evaluate
from edgegpt.quantize.recipes import RECIPES

log = logging.getLogger(__name__)

SIDE_FILES = ("tokenizer.json", "config.json", "generation_config.json", "genai_config.json")
AGREEMENT_PROMPTS = ("The with statement", "A class definition defines", "def f(x):\n    return")
# --kv-cache auto keeps the int8 cache only if, along the decode path, it adds at most this much KL to
# what the quantized weights alone give: a relative share of that KL plus an absolute floor. On a
# trained 4x256 model it added 0.3-3% (int4) and 5-11% (int8), on prose, Python source and digits,
# and nothing measurable at positions past the calibration windows.
KV_AUTO_RELATIVE, KV_AUTO_ABSOLUTE = 0.25, 1e-4


def make_recipe(mode: str, options: Optional[dict] = None):
    if mode not in RECIPES:
        raise QuantizeError(f"unknown mode {mode!r}; choose one of {', '.join(RECIPES)}")
    cls = RECIPES[mode]
    valid = {f.name for f in fields(cls)}
    options = {k: v for k, v in (options or {}).items() if v is not None}
    bad = sorted(set(options) - valid)
    if bad:
        raise QuantizeError(f"{mode} does not take {', '.join(bad)}; its options are {', '.join(sorted(valid)) or 'none'}")
    return cls(**options)


def greedy_agreement(src: Path, dst: Path, new_tokens: int = 16) -> float:
    """Share of greedy tokens (teacher-free, per prompt, up to the first divergence counted as
    disagreement from there on) that the quantized bundle produces identically."""
    from edgegpt.runtime import Generator

    a, b = Generator.load(src), Generator.load(dst)
    same = total = 0
    for p in AGREEMENT_PROMPTS:
        ids = a.encode(p)
        x = a.generate_ids([ids], new_tokens, ignore_eos=True)[0]
        y = b.generate_ids([ids], new_tokens, ignore_eos=True)[0]
        lead = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
        same, total = same + lead, total + len(x)
    return same / total


def _io_for(manifest: dict, kv_dtype: str) -> dict:
    io = json.loads(json.dumps(manifest["io"]))
    for x in io["inputs"] + io["outputs"]:
        if x["name"].startswith(("past_key_values.", "present.")):
            x["dtype"] = kv_dtype
    return io


def quantize_bundle(src: str | Path, out: str | Path, mode: str, *, options: Optional[dict] = None,
                    eval_text: Optional[str] = None, calibration: Optional[str] = None,
                    max_ppl_increase: Optional[float] = None, force: bool = False, overwrite: bool = False,
                    eval_tokens: int = 4096, last_logits_only: bool = False, kv_cache: Optional[str] = None) -> dict:
    """Quantize ``src`` into ``out``. With ``last_logits_only`` the quality is measured on the full
    graph, then the LM head is restricted to the last position (faster prefill for generation).
    ``kv_cache="int8"`` (modes fp32 / int8 / int4 of a shared-KV bundle) also stores the KV cache in
    int8 with scales calibrated on ``calibration`` (default: builtin:pydoc less its held-out tail);
    mode fp32 keeps the weights and only quantizes the cache. ``kv_cache=None`` / ``"auto"`` (the
    default) does so for int8 / int4 on a shared-KV bundle when the decode-path check passes
    (``_check_int8_cache``); ``"fp32"`` never does."""
    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    recipe = make_recipe(mode, options)
    if manifest["precision"] != "fp32":
        raise QuantizeError(f"{src} is already {manifest['precision']}; quantizing it again to {mode} compounds the "
                            f"error. Quantize the fp32 bundle it came from instead")
    if manifest.get("recipe", {}).get("lm_head") == "screened":
        origin = manifest.get("source_bundle", {}).get("path", "the fp32 export it came from")
        raise QuantizeError(f"{src} has a screened LM head (a CPU decoding variant of fp32); start from {origin} instead")
    if any(x["dtype"] != "float32" for x in manifest["io"]["inputs"] if x["name"].startswith("past_key_values.")):
        raise QuantizeError(f"{src} already keeps a quantized KV cache; quantize the fp32 bundle it came from instead")
    if manifest["graph"].get("external_data"):
        raise QuantizeError(f"{src} keeps its weights in external data; quantizing > 1.5 GB graphs is not supported yet")
    if manifest["graph"]["options"].get("last_logits_only"):
        raise QuantizeError(f"{src} was exported with --last-logits-only; quality is measured by perplexity, which "
                            f"needs every position's logits. Export without --last-logits-only")
    if kv_cache not in (None, "auto", "fp32", "int8"):
        raise QuantizeError(f"kv_cache must be auto, fp32 or int8, got {kv_cache!r}")
    # auto: an int8 cache for int8 / int4 weights wherever the export keeps a shared buffer, checked below
    kv_auto = kv_cache in (None, "auto")
    shared = bool(manifest["graph"]["options"].get("shared_kv_buffer"))
    kv_int8 = kv_cache == "int8" or (kv_auto and shared and mode in ("int8", "int4"))
    if kv_int8 and mode not in ("fp32", "int8", "int4"):
        raise QuantizeError(f"--kv-cache int8 goes with --mode fp32, int8 or int4, not {mode}")
    if mode == "fp32" and not kv_int8 and getattr(recipe, "lm_head", "fp32") != "screened":
        raise QuantizeError("--mode fp32 keeps the weights as they are; it is only useful with --kv-cache int8 "
                            "or --lm-head screened")
    if kv_int8 and not shared:
        raise QuantizeError(f"{src} has a concat KV cache; an int8 cache needs the shared buffer: "
                            f"re-export with --kv-cache shared")
    if eval_text is not None and not eval_text.strip():
        raise DataError("the evaluation text is empty; give a text of a few thousand tokens (or none, for the "
                        "held-out tail of builtin:pydoc)")
    if calibration is not None and not calibration.strip():
        raise DataError("the calibration text is empty; give text like your prompts (or none, for builtin:pydoc)")
    check_int(eval_tokens, "eval_tokens", low=2)
    check_output_dir(out, overwrite=overwrite, what="bundle", inputs=(src,), need_bytes=bundle_size(src))
    verify_files(src, manifest)
    text = eval_text if eval_text is not None else default_eval_text()
    budget = recipe.budget_pct if max_ppl_increase is None else max_ppl_increase
    with atomic_dir(out, replace=overwrite) as tmp, contextlib.ExitStack() as stack:
        for name in SIDE_FILES:
            if bundle_file(src, name).is_file():
                shutil.copy2(src / name, tmp / name)
        t0 = time.perf_counter()
        info = recipe.apply(bundle_file(src, manifest["graph"]["file"]), tmp / MODEL_FILE, calibration=calibration)
        kv_dtype = recipe.kv_dtype
        if kv_int8:
            from edgegpt.quantize.kvcache import MARGIN, apply_int8_kv, calibrate

            # the weights alone, beside the output, to measure what the int8 cache adds on top of them
            weights_only = stack.enter_context(scratch_dir(out))
            shutil.copy2(tmp / "model.onnx", weights_only / "model.onnx")
            k_scale, v_scale, seen = calibrate(src, calibration_text(calibration))
            apply_int8_kv(tmp / "model.onnx", k_scale, v_scale)
            info["kv_cache"] = {"dtype": "int8", "scales": "per head and channel, static", "margin": MARGIN,
                                "calibration_tokens": seen,
                                "calibration_text": "user text" if calibration else "builtin:pydoc (training part)"}
            kv_dtype = "int8"
        quant_s = time.perf_counter() - t0
        import onnx

        from edgegpt.export.graph import infer_shapes, op_counts

        infer_shapes(tmp / "model.onnx")
        graph = dict(manifest["graph"], op_counts=op_counts(onnx.load(str(tmp / "model.onnx"))))
        new = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "verification", "files",
                                                              "size_bytes", "export_seconds")}
        new.update(created_by=f"edgegpt {__version__}", precision=mode, recipe=info, graph=graph,
                   io=_io_for(manifest, kv_dtype), targets=recipe.targets,
                   source_bundle={"path": str(src.resolve()), "precision": manifest["precision"],
                                  "model_sha256": manifest.get("files", {}).get("model.onnx", {}).get("sha256")},
                   quantize_seconds=round(quant_s, 2))
        write_manifest(tmp, new)
        ref = evaluate(src, text, max_tokens=eval_tokens)
        res = evaluate(tmp, text, max_tokens=eval_tokens, reference=src)
        increase = 100.0 * (res.perplexity / ref.perplexity - 1.0)
        new["quality"] = {
            "perplexity": round(res.perplexity, 4), "source_perplexity": round(ref.perplexity, 4),
            "ppl_increase_pct": round(increase, 3), "budget_pct": budget, "kl_mean": res.kl_mean,
            "top1_agreement": round(res.top1_agreement, 5), "eval_tokens": res.tokens,
            "eval_text": "builtin:pydoc held-out tail" if eval_text is None else "user text",
            "greedy_agreement": round(greedy_agreement(src, tmp), 4),
        }
        if kv_int8:  # strided perplexity prefills an empty cache and never reads the int8 one back
            _check_int8_cache(src, tmp, weights_only, manifest, new, text, kv_auto)
        elif info.get("lm_head") == "screened":  # perplexity's many rows run the fp32 head; decode steps screen
            new["quality"]["decode_path"] = decode_path(tmp, src, text)
        new["files"] = file_table(tmp)
        new["size_bytes"] = sum(f["bytes"] for f in new["files"].values())
        new["source_size_bytes"] = manifest.get("size_bytes")
        if last_logits_only:
            _restrict_to_last_position(tmp, new)
        write_manifest(tmp, new)
        if increase > budget and not force:
            raise QuantizeError(f"{mode} raises perplexity by {increase:.2f}% ({ref.perplexity:.3f} -> "
                                f"{res.perplexity:.3f}), over its budget of {budget}% by {increase - budget:.2f} points; "
                                f"pass --force to keep it or --max-ppl-increase to change the budget")
    return read_manifest(out)


def _check_int8_cache(src: Path, tmp: Path, weights_only: Path, manifest: dict, new: dict, text: str,
                      auto: bool) -> None:
    """Measure the int8 cache in ``tmp`` along the decode path against the same weights with an fp32
    cache (``weights_only``), and record both. With ``auto``, an int8 cache that adds more than its
    allowance is dropped: ``tmp`` goes back to the fp32 cache, and the manifest says why."""
    import onnx

    from edgegpt.export.graph import infer_shapes, op_counts

    # a session needs only the graph and a manifest (its graph section is only read for the options)
    fp32_io = _io_for(manifest, "float32")
    write_manifest(weights_only, {**new, "io": fp32_io})
    dp, fp32_dp = decode_paths([tmp, weights_only], src, text)
    added = dp["kl_mean"] - fp32_dp["kl_mean"]
    allowance = KV_AUTO_RELATIVE * fp32_dp["kl_mean"] + KV_AUTO_ABSOLUTE
    dp.update(fp32_cache_kl_mean=fp32_dp["kl_mean"], fp32_cache_top1_agreement=fp32_dp["top1_agreement"])
    kv = new["recipe"]["kv_cache"]
    kv["chosen_by"] = "auto" if auto else "--kv-cache int8"
    kv["added_kl"], kv["auto_allowance_kl"] = round(added, 6), round(allowance, 6)
    if auto and added > allowance:
        log.warning("the int8 KV cache adds %.2e KL along the decode path, over auto's allowance of %.2e: "
                    "keeping the fp32 cache (--kv-cache int8 forces it)", added, allowance)
        shutil.copy2(weights_only / "model.onnx", tmp / "model.onnx")
        infer_shapes(tmp / "model.onnx")
        fp32_graph = dict(new["graph"], op_counts=op_counts(onnx.load(str(tmp / "model.onnx"))))
        new["recipe"]["kv_cache"] = {"dtype": "float32", "chosen_by": "auto", "rejected_int8": {**kv, "decode_path": dp}}
        new.update(io=fp32_io, graph=fp32_graph)
        write_manifest(tmp, new)
        new["quality"]["greedy_agreement"] = round(greedy_agreement(src, tmp), 4)
        return
    new["quality"]["decode_path"] = dp


def _restrict_to_last_position(tmp: Path, manifest: dict) -> None:
    import onnx

    from edgegpt.export.graph import slice_last_position
    from edgegpt.runtime import Generator

    full = Generator.load(tmp)
    ids = full.encode(AGREEMENT_PROMPTS[0])
    before = full.generate_ids([ids], 8, ignore_eos=True)[0]
    del full
    model = onnx.load(str(tmp / "model.onnx"))
    if not slice_last_position(model):
        raise QuantizeError("--last-logits-only needs a bundle exported with --graph fused")
    onnx.save_model(model, str(tmp / "model.onnx"))
    manifest["graph"] = dict(manifest["graph"], options=dict(manifest["graph"]["options"], last_logits_only=True))
    manifest["io"]["outputs"][0]["shape"][1] = 1
    manifest["files"] = file_table(tmp)
    manifest["size_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    write_manifest(tmp, manifest)
    if Generator.load(tmp).generate_ids([ids], 8, ignore_eos=True)[0] != before:
        raise QuantizeError("restricting the logits to the last position changed the greedy tokens; "
                            "quantize without --last-logits-only")
