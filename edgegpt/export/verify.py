"""Parity of a bundle against the PyTorch model: a prompt plus cached decode steps.

Teacher-forced on PyTorch's greedy tokens: at every step both models see the same ids, so the
max |logit difference| is measured on identical inputs, and greedy agreement is the share of
steps whose argmax matches. All steps matching means free-running greedy output is identical.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from edgegpt import contract
from edgegpt.errors import BundleError
from edgegpt.manifest import bundle_file, read_manifest

# Our own text (not third-party): mixed prose, code and punctuation to exercise the tokenizer.
VERIFY_PROMPT = (
    "The loop below walks a list of numbers and keeps a running total; when the total passes "
    "the limit it stops early and reports where it stopped.\n\n"
    "def running_total(values, limit):\n    total = 0\n    for i, v in enumerate(values):\n"
    "        total += v\n        if total > limit:\n            return i, total\n    return None, total\n"
)

# Per-precision tolerance on max |logit difference| (fp32: docs/design.md, "Quality"). Quantized bundles are
# judged by perplexity / KL budgets instead; their figure here is informational.
TOLERANCE = {"fp32": 1e-4}


def verify_prompt_ids(tok, n_positions: int, decode_steps: int) -> tuple[list[int], int]:
    ids = tok.encode(VERIFY_PROMPT).ids
    steps = min(decode_steps, max(1, n_positions // 2))
    return ids[: max(1, min(len(ids), n_positions - steps - 1))], steps


def _np_dtype(name: str):
    return {"float32": np.float32, "float16": np.float16}[name]


def onnx_step(sess, manifest: dict, ids: np.ndarray, past: Optional[list], past_len: int):
    """One run of the bundle's graph for batch 1; returns last-position logits and present."""
    arch = manifest["architecture"]
    n_layer = arch["n_layer"]
    kv_dtype = _np_dtype(contract.kv_dtype(manifest["io"]))
    T = ids.shape[1]
    if past is None:
        opts = manifest["graph"].get("options", {})
        slots = opts.get("kv_capacity") if opts.get("shared_kv_buffer") else 0
        past = [np.zeros((1, arch["n_head"], slots, arch["head_dim"]), kv_dtype) for _ in range(2 * n_layer)]
    feed = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: np.ones((1, past_len + T), np.int64),
            contract.POSITION_IDS: np.arange(past_len, past_len + T, dtype=np.int64)[None]}
    feed.update(zip(contract.past_names(n_layer), past))
    out = sess.run(None, feed)
    return out[0][:, -1].astype(np.float32), out[1:]


@torch.no_grad()
def torch_reference(model, tok, decode_steps: int = 32) -> tuple[list[int], list[np.ndarray]]:
    """The verification prompt and PyTorch's last-position logits after it and after each of its greedy steps.
    Computed before the bundle's session loads, so a caller can free the torch model first (export's peak
    memory: the torch weights and onnxruntime's copy of them need not be held at once)."""
    prompt, steps = verify_prompt_ids(tok, model.config.n_positions, decode_steps)
    x, past, logits = torch.tensor([prompt]), None, []
    for _ in range(steps + 1):
        lt, past = model(x, past)
        logits.append(lt[:, -1].numpy().copy())
        x = torch.tensor([[int(logits[-1].argmax())]])
    return prompt, logits


def verify_bundle(bundle: str | Path, model, tok, *, decode_steps: int = 32, atol: Optional[float] = None,
                  reference: Optional[tuple[list[int], list[np.ndarray]]] = None) -> dict:
    """Run the bundle against PyTorch's logits (``reference`` from torch_reference, else computed from
    ``model``, teacher-forced on PyTorch's greedy tokens); return the manifest's verification section."""
    import onnxruntime as ort

    manifest = read_manifest(bundle)
    precision = manifest["precision"]
    atol = TOLERANCE.get(precision) if atol is None else atol
    t0 = time.perf_counter()
    prompt, ref = reference if reference is not None else torch_reference(model, tok, decode_steps)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(bundle_file(bundle, manifest["graph"]["file"])), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's Fail / InvalidProtobuf / ... types
        raise BundleError(f"{bundle}: onnxruntime cannot load {manifest['graph']['file']} "
                          f"({str(e).splitlines()[0][:200]}); re-run `edgegpt export`") from None

    past_o, past_len = None, 0
    ids = np.array([prompt], dtype=np.int64)
    diffs, agree = [], 0
    for lt in ref:
        lo, past_o = onnx_step(sess, manifest, ids, past_o, past_len)
        past_len += ids.shape[1]
        diffs.append(float(np.abs(lt - lo).max()))
        tok_t = int(lt.argmax())
        agree += int(lo.argmax()) == tok_t
        ids = np.array([[tok_t]], dtype=np.int64)
    max_diff = max(diffs)
    result = {
        "prompt_tokens": len(prompt),
        "decode_steps": len(ref) - 1,
        "max_abs_logit_diff": max_diff,
        "prefill_max_abs_logit_diff": diffs[0],
        "greedy_agreement": agree / len(diffs),
        "greedy_identical": agree == len(diffs),
        "tolerance": atol,
        "passed": bool((atol is None or max_diff <= atol) and (precision != "fp32" or agree == len(diffs))),
        "seconds": round(time.perf_counter() - t0, 3),
        "onnxruntime": ort.__version__,
    }
    return result
