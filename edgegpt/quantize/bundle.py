"""`edgegpt quantize`: an fp32 bundle -> a new bundle in another precision, with measured quality.

The input is never touched: the new bundle is assembled in a temporary sibling of --out and renamed
into place only when it is complete and within its perplexity budget (or --force).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

from edgegpt import __version__
from edgegpt.atomic import atomic_dir, check_output_dir
from edgegpt.errors import QuantizeError
from edgegpt.manifest import file_table, read_manifest, write_manifest
from edgegpt.quantize.evaluate import calibration_text, decode_path, default_eval_text, evaluate
from edgegpt.quantize.recipes import RECIPES

log = logging.getLogger(__name__)

SIDE_FILES = ("tokenizer.json", "config.json", "generation_config.json", "genai_config.json")
AGREEMENT_PROMPTS = ("The with statement", "A class definition defines", "def f(x):\n    return")


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
    mode fp32 keeps the weights and only quantizes the cache."""
    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    check_output_dir(out, overwrite=overwrite, what="bundle", inputs=(src,))
    recipe = make_recipe(mode, options)
    if manifest["precision"] != "fp32":
        raise QuantizeError(f"{src} is already {manifest['precision']}; quantizing it again to {mode} compounds the "
                            f"error. Quantize the fp32 bundle it came from instead")
    if any(x["dtype"] != "float32" for x in manifest["io"]["inputs"] if x["name"].startswith("past_key_values.")):
        raise QuantizeError(f"{src} already keeps a quantized KV cache; quantize the fp32 bundle it came from instead")
    if manifest["graph"].get("external_data"):
        raise QuantizeError(f"{src} keeps its weights in external data; quantizing > 1.5 GB graphs is not supported yet")
    if manifest["graph"]["options"].get("last_logits_only"):
        raise QuantizeError(f"{src} was exported with --last-logits-only; quality is measured by perplexity, which "
                            f"needs every position's logits. Export without --last-logits-only")
    if kv_cache not in (None, "fp32", "int8"):
        raise QuantizeError(f"kv_cache must be fp32 or int8, got {kv_cache!r}")
    kv_int8 = kv_cache == "int8"
    if kv_int8 and mode not in ("fp32", "int8", "int4"):
        raise QuantizeError(f"--kv-cache int8 goes with --mode fp32, int8 or int4, not {mode}")
    if mode == "fp32" and not kv_int8:
        raise QuantizeError("--mode fp32 keeps the weights as they are; it is only useful with --kv-cache int8")
    if kv_int8 and not manifest["graph"]["options"].get("shared_kv_buffer"):
        raise QuantizeError(f"{src} has a concat KV cache; an int8 cache needs the shared buffer: "
                            f"re-export with --kv-cache shared")
    text = eval_text if eval_text is not None else default_eval_text()
    budget = recipe.budget_pct if max_ppl_increase is None else max_ppl_increase
    with atomic_dir(out) as tmp:
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        t0 = time.perf_counter()
        info = recipe.apply(src / manifest["graph"]["file"], tmp / "model.onnx", calibration=calibration)
        kv_dtype = recipe.kv_dtype
        if kv_int8:
            from edgegpt.quantize.kvcache import MARGIN, apply_int8_kv, calibrate

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
