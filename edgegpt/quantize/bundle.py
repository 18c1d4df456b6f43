"""`edgegpt quantize`: an fp32 bundle -> a new bundle in another precision, with measured quality.

Plan (quantize/plan.py: every refusal, before any work), build (the recipe's graph and, where planned,
an int8 KV cache), measure (quantize/measure.py), seal (manifest.seal: the file table and the manifest,
written once). The input is never touched: the new bundle is assembled in a temporary sibling of --out
and renamed into place only when it is complete and within its perplexity budget (or --force).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Optional

from edgegpt import __version__
from edgegpt.atomic import atomic_dir, check_output_dir, scratch_dir
from edgegpt.corpus import calibration_text, default_eval_text
from edgegpt.errors import DataError, QuantizeError
from edgegpt.limits import check_int, check_memory
from edgegpt.manifest import (MODEL_FILE, TOKENIZER_FILE, Draft, bundle_file, bundle_size, read_manifest, seal,
                              verify_files)
from edgegpt.quantize.measure import io_with_kv, measure
from edgegpt.quantize.plan import QuantizePlan, plan_quantize
from edgegpt.quality.evaluate import AGREEMENT_PROMPTS

SIDE_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "config.json",
              "generation_config.json", "genai_config.json")
# Manifest sections that describe the source's own files and export, not the new bundle.
SOURCE_ONLY = ("format", "format_version", "verification", "files", "size_bytes", "export_seconds")


def quantize_bundle(src: str | Path, out: str | Path, mode: str, *, options: Optional[dict] = None,
                    eval_text: Optional[str] = None, calibration: Optional[str] = None,
                    max_ppl_increase: Optional[float] = None, force: bool = False, overwrite: bool = False,
                    eval_tokens: int = 4096, last_logits_only: bool = False, kv_cache: Optional[str] = None,
                    one_file: bool = False) -> dict:
    """Quantize ``src`` into ``out`` with the recipe ``mode`` (quantize/recipes/). With ``last_logits_only``
    the quality is measured on the full graph, then the LM head is restricted to the last position (faster
    prefill for generation). ``kv_cache``: ``"int8"`` stores the KV cache of a shared-KV bundle in int8
    with scales calibrated on ``calibration`` (default: builtin:pydoc less its held-out tail); ``None`` /
    ``"auto"`` does so where the recipe's card says so, keeping it only if the decode-path check passes;
    ``"fp32"`` never does. The graph keeps its weights in a data file as ``src`` does (or where they are too large
    for one file); ``one_file`` puts them inline wherever they fit (the source of an ORT-format or browser
    package)."""
    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    plan = plan_quantize(manifest, mode, options, kv_cache=kv_cache, max_ppl_increase=max_ppl_increase,
                         last_logits_only=last_logits_only, name=str(src))
    for what, text in (("evaluation", eval_text), ("calibration", calibration)):
        if text is not None and not text.strip():
            raise DataError(f"the {what} text is empty; give text of a few thousand tokens (or none, for the "
                            f"built-in default)")
    check_int(eval_tokens, "eval_tokens", low=2)
    check_output_dir(out, overwrite=overwrite, what="bundle", inputs=(src,), need_bytes=bundle_size(src))
    check_memory(plan.card.memory_needed(bundle_size(src)), f"quantizing {src} ({bundle_size(src) / 1e9:.2f} GB) "
                 f"to {mode}", "close other programs, or quantize on a machine with more memory")
    verify_files(src, manifest)
    text = eval_text if eval_text is not None else default_eval_text()
    with atomic_dir(out, replace=overwrite) as tmp, contextlib.ExitStack() as stack:
        draft, weights_only = _build(plan, src, manifest, tmp, calibration,
                                     lambda: stack.enter_context(scratch_dir(out)))
        q = measure(src, draft, text, eval_tokens=eval_tokens, budget_pct=plan.budget_pct,
                    user_text=eval_text is not None, weights_only=weights_only, kv_auto=plan.kv_auto,
                    scratch=stack.enter_context(scratch_dir(out)))
        if q["ppl_increase_pct"] > plan.budget_pct and not force:
            raise QuantizeError(f"{mode} raises perplexity by {q['ppl_increase_pct']:.2f}% ({q['source_perplexity']:.3f}"
                                f" -> {q['perplexity']:.3f}), over its budget of {plan.budget_pct}% by "
                                f"{q['ppl_increase_pct'] - plan.budget_pct:.2f} points; pass --force to keep it or "
                                f"--max-ppl-increase to change the budget")
        if plan.last_logits_only:
            _restrict_to_last_position(draft)
        _lay_out(draft, external=not one_file and bool(manifest["graph"].get("external_data")))
        sealed = seal(tmp, draft.manifest)
    return sealed


def _build(plan: QuantizePlan, src: Path, manifest: dict, tmp: Path, calibration: Optional[str],
           scratch) -> tuple[Draft, Optional[Path]]:
    """The new graph and side files in ``tmp``, and its manifest as a Draft; with an int8 KV cache, also a
    scratch folder holding the same weights with the fp32 cache (what measure compares it with)."""
    from edgegpt.graph.io import copy_graph, external_data_name, shaped_op_counts

    for name in SIDE_FILES:
        if bundle_file(src, name).is_file():
            shutil.copy2(src / name, tmp / name)
    t0 = time.perf_counter()
    graph = tmp / MODEL_FILE
    info = plan.card.apply(bundle_file(src, manifest["graph"]["file"]), graph, plan.options, calibration)
    kv_dtype, weights_only = plan.card.kv_dtype, None
    if plan.kv_int8:
        from edgegpt.quantize.kvcache import MARGIN, apply_int8_kv, calibrate

        weights_only = scratch()
        copy_graph(graph, weights_only / MODEL_FILE)
        k_scale, v_scale, seen = calibrate(src, calibration_text(calibration))
        apply_int8_kv(graph, k_scale, v_scale)
        info["kv_cache"] = {"dtype": "int8", "scales": "per head and channel, static", "margin": MARGIN,
                            "calibration_tokens": seen,
                            "calibration_text": "user text" if calibration else "builtin:pydoc (training part)"}
        kv_dtype = "int8"
    quantize_s = time.perf_counter() - t0
    new = {k: v for k, v in manifest.items() if k not in SOURCE_ONLY}
    new.update(created_by=f"edgegpt {__version__}", precision=plan.card.name, recipe=info,
               graph=dict(manifest["graph"], file=MODEL_FILE, external_data=external_data_name(graph),
                          op_counts=shaped_op_counts(graph)),
               io=io_with_kv(manifest, kv_dtype), targets=list(plan.card.targets),
               source_bundle={"path": str(src.resolve()), "precision": manifest["precision"],
                              "model_sha256": manifest.get("files", {}).get(manifest["graph"]["file"], {}).get("sha256")},
               source_size_bytes=manifest.get("size_bytes"), quantize_seconds=round(quantize_s, 2))
    return Draft(tmp, new), weights_only


def _lay_out(draft: Draft, *, external: bool) -> None:
    """The recipes write a graph inline up to EXTERNAL_DATA_THRESHOLD: give the bundle the layout asked for, where
    its weights fit it (graph.io.set_layout)."""
    from edgegpt.graph.io import external_data_name, set_layout

    path = draft.path / MODEL_FILE
    try:
        set_layout(path, external=external)
    except ValueError:  # too large for one file: the data file stays
        pass
    draft.manifest["graph"] = dict(draft.manifest["graph"], external_data=external_data_name(path))


def _restrict_to_last_position(draft: Draft) -> None:
    """Slice the LM head's input to the last position, in place, checking the greedy tokens stay the same."""
    import onnx

    from edgegpt.graph.io import save_graph
    from edgegpt.graph.passes import slice_last_position
    from edgegpt.runtime import Generator

    full = Generator.load(draft)
    ids = full.encode(AGREEMENT_PROMPTS[0])
    before = full.generate_ids([ids], 8, ignore_eos=True)[0]
    del full
    path = draft.path / MODEL_FILE
    model = onnx.load(str(path))
    if not slice_last_position(model):
        raise QuantizeError("--last-logits-only needs a bundle exported with --graph fused")
    save_graph(model, path)
    m = draft.manifest
    m["graph"] = dict(m["graph"], options=dict(m["graph"]["options"], last_logits_only=True))
    m["io"]["outputs"][0]["shape"][1] = 1
    if Generator.load(draft).generate_ids([ids], 8, ignore_eos=True)[0] != before:
        raise QuantizeError("restricting the logits to the last position changed the greedy tokens; "
                            "quantize without --last-logits-only")
