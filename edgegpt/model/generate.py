"""Generation with the PyTorch model and its KV cache: the reference the ONNX runtime is held to.

Token selection is the runtime's own numpy sampler, so the two differ only in the forward pass.
``generate_ids`` is the plain reference loop the parity tests compare against; ``TorchSession`` lets the
runtime's Generator (text, stop strings, streaming, truncation) run a checkpoint for `edgegpt generate`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from edgegpt.errors import ArgumentError
from edgegpt.model.gpt import GPT
from edgegpt.runtime.sampling import SamplingParams, select_next


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_token_id: Optional[int] = None,
) -> list[int]:
    """New token ids after ``prompt_ids`` (batch 1), stopping at eos when one is given."""
    if not prompt_ids:
        raise ArgumentError("the prompt is empty: it tokenizes to no tokens")
    n_pos = model.config.n_positions
    if len(prompt_ids) + max_new_tokens > n_pos:
        raise ArgumentError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {n_pos} tokens; shorten the prompt or lower max_new_tokens"
        )
    rng = np.random.default_rng(params.seed)
    seen = np.zeros((1, model.config.vocab_size), dtype=bool)
    seen[0, list(prompt_ids)] = True
    x = torch.tensor([list(prompt_ids)], dtype=torch.long)
    past = None
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits, past = model(x, past)
        nxt = int(select_next(logits[:, -1].float().numpy(), params, rng, seen)[0])
        out.append(nxt)
        seen[0, nxt] = True
        if eos_token_id is not None and nxt == eos_token_id:
            break
        x = torch.tensor([[nxt]], dtype=torch.long)
    return out


class _TorchCache:
    """One generation's KV cache for TorchSession: the model's own (key, value) tensors."""

    def __init__(self, model: GPT):
        self.model, self.past = model, None

    def set_screen_margin(self, margin: float) -> None:  # the PyTorch head is always exact
        pass

    @torch.no_grad()
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        logits, self.past = self.model(torch.from_numpy(input_ids), self.past, torch.from_numpy(attention_mask),
                                       torch.from_numpy(position_ids), last_logits_only=True)
        return logits[:, -1].float().numpy()


class TorchSession:
    """The runtime's session interface (edgegpt.runtime.session.ModelSession) over edgegpt's PyTorch GPT,
    so that the runtime's Generator drives a checkpoint exactly as it drives a bundle: one code path for
    prompt checks and truncation, eos, stop strings, streaming and padded batches."""

    kv_capacity = None  # a growing cache: padded batches are fine
    last_logits_only = True
    screened = False

    def __init__(self, model: GPT, name: str = "checkpoint"):
        cfg = model.config
        self.model, self.bundle = model.eval(), name
        self.n_layer, self.n_head, self.head_dim = cfg.n_layer, cfg.n_head, cfg.head_dim
        self.vocab_size, self.max_context = cfg.vocab_size, cfg.n_positions
        self.eos_token_id = self.pad_token_id = cfg.eos_token_id

    def check_memory(self, batch: int, slots: Optional[int] = None, prompt_tokens: int = 0) -> None:
        from edgegpt.limits import check_memory

        need = 2 * self.n_layer * batch * (slots or self.max_context) * self.n_head * self.head_dim * 4
        check_memory(need + 4 * batch * self.vocab_size, f"a KV cache of {batch} rows",
                     "lower the batch size or max_new_tokens")

    def start(self, batch: int, slots: Optional[int] = None) -> _TorchCache:
        return _TorchCache(self.model)


def checkpoint_generator(model_dir, threads: Optional[int] = None):
    """A runtime Generator over a checkpoint dir, run by PyTorch (``threads``: torch's intra-op threads)."""
    from edgegpt.limits import check_threads
    from edgegpt.model.checkpoint import load_checkpoint
    from edgegpt.runtime.generator import Generator

    if check_threads(threads) is not None:
        torch.set_num_threads(threads)
    model, tok = load_checkpoint(model_dir)
    return Generator(TorchSession(model, str(model_dir)), tok)


@torch.no_grad()
def draft_acceptance(target: GPT, draft: GPT, prompt_ids: Sequence[int], new_tokens: int, k: int) -> dict:
    """How many tokens a greedy speculative step would yield with ``draft`` proposing ``k`` tokens for
    ``target``: the target's greedy continuation is computed once; at each verification point the draft
    continues greedily from the same prefix, the longest prefix that matches is accepted, and the target adds
    one token of its own (its correction, or the next token after k accepted). Returns the mean tokens per
    verification step and the acceptance rate of drafted tokens."""
    want = generate_ids(target, prompt_ids, new_tokens)
    steps, drafted, accepted, p = 0, 0, 0, 0
    while p < len(want):
        ctx = list(prompt_ids) + want[:p]
        n = min(k, len(want) - p)
        proposal = generate_ids(draft, ctx, n) if n else []
        a = next((i for i, (u, v) in enumerate(zip(proposal, want[p:p + n])) if u != v), len(proposal))
        steps, drafted, accepted = steps + 1, drafted + n, accepted + a
        p += a + 1
    return {"tokens_per_step": len(want) / steps, "acceptance": accepted / max(1, drafted), "steps": steps,
            "tokens": len(want)}
