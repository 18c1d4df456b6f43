"""`edgegpt export`: a checkpoint dir -> a verified bundle dir (docs/design.md, "The bundle").

Everything is written into a temporary sibling of the output and renamed into place only when
complete and verified; a bundle that fails its tolerance is discarded unless keep_failed. The graph
is verified as a manifest.Draft, then the bundle is sealed (its manifest written once).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from edgegpt import __version__, contract
from edgegpt.atomic import atomic_dir, check_free_space, check_output_dir
from edgegpt.errors import ExportError, VerificationFailed
from edgegpt.export.onnx_export import ExportOptions, export_graph
from edgegpt.export.verify import torch_reference, verify_bundle
from edgegpt.limits import check_int, check_memory
from edgegpt.manifest import MODEL_FILE, TOKENIZER_FILE, Draft, read_manifest, seal, verify_files
from edgegpt.model.checkpoint import (checkpoint_hash, config_to_hf, distilled_from, generation_config, load_checkpoint,
                                     read_config, weight_files)
from edgegpt.model.gpt import GPTConfig, parameter_count
from edgegpt.model.tokenizer import tokenizer_config_files

log = logging.getLogger(__name__)
# export's peak RSS as (a multiple of the fp32 weights' bytes, a fixed part) (docs/benchmarks.md, the cost curve):
# what the up-front check asks for. fused-external (the default: the weights go to the data file as the graph is
# built): 1.03 GB at GPT-2 small, 2.22 at medium, 3.73 at large, 6.79 at XL, under 1.1x + 0.7 GB at each. fused
# with the weights inline: 3.3x at small and medium. traced: measured before export's memory was reworked.
EXPORT_PEAK_MEMORY = {"fused": (3.3, 0), "fused-external": (1.1, 700_000_000), "traced": (5.6, 0)}


def architecture(cfg: GPTConfig) -> dict:
    return {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "head_dim": cfg.head_dim, "n_inner": cfg.inner_dim, "n_positions": cfg.n_positions,
            "vocab_size": cfg.vocab_size, "activation_function": cfg.activation_function,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "scale_attn_weights": cfg.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx}


def genai_config(cfg: GPTConfig, kv_dtype: str = "float32") -> dict:
    """onnxruntime-genai's generic `decoder` model type, with our IO names (its legacy `gpt2` type
    expects the old combined past_%d layout)."""
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id,
            "context_length": cfg.n_positions, "vocab_size": cfg.vocab_size,
            "decoder": {
                "filename": MODEL_FILE, "session_options": {"log_id": "edgegpt", "provider_options": []},
                "head_size": cfg.head_dim, "hidden_size": cfg.n_embd, "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.n_head, "num_hidden_layers": cfg.n_layer,
                "inputs": {"input_ids": contract.INPUT_IDS, "attention_mask": contract.ATTENTION_MASK,
                           "position_ids": contract.POSITION_IDS,
                           "past_key_names": contract.PAST_KEY.format("%d"),
                           "past_value_names": contract.PAST_VALUE.format("%d")},
                "outputs": {"logits": contract.LOGITS, "present_key_names": contract.PRESENT_KEY.format("%d"),
                            "present_value_names": contract.PRESENT_VALUE.format("%d")},
            },
        },
        "search": {"do_sample": False, "max_length": cfg.n_positions, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_side_files(dest: Path, cfg: GPTConfig, tok, kv_dtype: str = "float32", shared_kv: bool = False) -> None:
    tok.save(str(dest / TOKENIZER_FILE))
    for name, text in tokenizer_config_files(tok, model_max_length=cfg.n_positions).items():
        (dest / name).write_text(text)
    (dest / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    (dest / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
    gc = genai_config(cfg, kv_dtype)
    gc["search"]["past_present_share_buffer"] = shared_kv
    (dest / "genai_config.json").write_text(json.dumps(gc, indent=2) + "\n")


def export_bundle(model_dir: str | Path, out: str | Path, options: ExportOptions = ExportOptions(), *,
                  overwrite: bool = False, keep_failed: bool = False, decode_steps: int = 32,
                  atol: Optional[float] = None) -> dict:
    """Export, verify and write the manifest. Returns the manifest; raises VerificationFailed."""
    model_dir, out = Path(model_dir), Path(out)
    if options.external_data not in ("auto", "always", "never"):
        raise ExportError(f"external_data must be auto, always or never, got {options.external_data!r}")
    check_int(decode_steps, "decode_steps", low=1, high=4096)
    check_output_dir(out, overwrite=overwrite, what="bundle", inputs=(model_dir,))
    # the fp32 weights: config.json's shape, but never more than twice the weight files (16-bit storage at the
    # least), so a config that claims more than its files hold meets the weight check below, not this one
    weights = min(4 * parameter_count(read_config(model_dir)),
                  2 * sum(f.stat().st_size for f in weight_files(model_dir)))
    from edgegpt.graph.io import EXTERNAL_DATA_THRESHOLD

    external = options.external_data == "always" or (
        options.external_data == "auto" and weights > EXTERNAL_DATA_THRESHOLD)
    kind = options.graph + ("-external" if external and options.graph == "fused" else "")
    times, fixed = EXPORT_PEAK_MEMORY.get(kind, EXPORT_PEAK_MEMORY["traced"])
    check_memory(int(times * weights + fixed),
                 f"exporting a {weights / 4e6:,.1f}M parameter model", "close other programs, or export on a machine "
                 "with more memory")
    model, tok = load_checkpoint(model_dir)
    cfg = model.config
    # the graph holds every fp32 weight once (the traced path stages two more copies inside the output's
    # temporary folder): refuse a disk that cannot take it before tracing
    check_free_space(out, 3 * model.num_params() * 4)
    failed = None
    with atomic_dir(out, replace=overwrite) as tmp:
        t0 = time.perf_counter()
        graph = export_graph(model, tmp, options)
        export_s = time.perf_counter() - t0
        # PyTorch's side of the parity check first, then the torch weights go: onnxruntime's session need not
        # load beside them (the check was export's peak memory)
        reference = torch_reference(model, tok, decode_steps)
        del model
        write_side_files(tmp, cfg, tok, shared_kv=options.kv_cache == "shared")
        manifest = {
            "created_by": f"edgegpt {__version__}",
            "architecture": architecture(cfg),
            "max_context": cfg.n_positions,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id,
            "precision": "fp32",
            "recipe": {"name": "fp32"},
            "graph": graph,
            "io": contract.io_spec(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size,
                                   last_logits_only=options.last_logits_only,
                                   kv_capacity=cfg.n_positions if options.kv_cache == "shared" else None),
            "source": {"checkpoint": str(model_dir.resolve()), "sha256": checkpoint_hash(model_dir),
                       **({"distilled_from": d} if (d := distilled_from(model_dir)) else {})},
            "export_seconds": round(export_s, 2),
        }
        manifest["verification"] = verify_bundle(Draft(tmp, manifest), None, tok, decode_steps=decode_steps,
                                                 atol=atol, reference=reference)
        sealed = seal(tmp, manifest)
        if not manifest["verification"]["passed"]:
            failed = failure_message(manifest["verification"])
            if not keep_failed:
                raise VerificationFailed(f"{failed}; the bundle was not written (pass --keep-failed to keep it)")
    if failed:
        raise VerificationFailed(f"{failed}; kept at {out} because of --keep-failed")
    return sealed


def failure_message(v: dict) -> str:
    return (f"parity check failed: max |logit diff| {v['max_abs_logit_diff']:.2e} (tolerance {v['tolerance']}), "
            f"greedy agreement {v['greedy_agreement']:.0%}")


def reverify(bundle: str | Path, model_dir: str | Path, *, decode_steps: int = 32, atol: Optional[float] = None,
             update: bool = False) -> dict:
    """`edgegpt verify`: re-run the parity check of a bundle against a checkpoint."""
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    model, tok = load_checkpoint(model_dir)
    arch = architecture(model.config)
    if any(manifest["architecture"].get(k) != arch[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")):
        raise ExportError(f"{bundle} was exported from a different architecture than {model_dir}")
    return verify_bundle(bundle, model, tok, decode_steps=decode_steps, atol=atol)
