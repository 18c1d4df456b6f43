"""Generation with the PyTorch model and its KV cache: the reference the ONNX runtime is held to.

Token selection is the runtime's own numpy sampler, so the two differ only in the forward pass.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

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
        raise ValueError("the prompt is empty: it tokenizes to no tokens")
    n_pos = model.config.n_positions
    if len(prompt_ids) + max_new_tokens > n_pos:
        raise ValueError(
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
