"""edgegpt's own GPT-2 family model: a small module we export, instead of tracing library code.

Read top-down: config -> attention -> MLP -> block -> GPT. Parameter names follow Hugging Face
GPT-2 (``transformer.h.{i}.attn.c_attn`` ...) so HF checkpoints load key for key; HF stores its
linear layers as ``Conv1D`` with the weight transposed, which ``checkpoint.py`` undoes in one place.

The KV cache is explicit plain tensors: ``forward(input_ids, past) -> logits, present`` where
``past``/``present`` is a tuple of ``(key, value)`` per layer, each ``(B, n_head, T, head_dim)``.
Attention never uses ``is_causal=True``: with one query over a longer cached past that masks
against the wrong (top-left) corner. The mask is built from absolute positions instead:
key j is visible to the query at position p iff ``j <= p`` and key j is not padding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgegpt.errors import ArgumentError, CheckpointError

KV = tuple[torch.Tensor, torch.Tensor]

# activation_function values of GPT2Config we implement, mapped to F.gelu's `approximate`.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd, as in GPT2Config
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    # GPT2Config's attention scaling: scores times 1/sqrt(head_dim) unless scale_attn_weights is false, and
    # times 1/(layer index + 1) with scale_attn_by_inverse_layer_idx (Stanford CRFM's Mistral GPT-2s set it, with
    # reorder_and_upcast_attn). reorder_and_upcast_attn only moves where the scale is applied and computes the
    # scores in fp32, which every edgegpt graph does already; it is kept so the config round-trips.
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"config {name} must be a positive integer, got {v!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool)
                                         or self.n_inner <= 0):
            raise CheckpointError(f"config n_inner must be a positive integer or null, got {self.n_inner!r}")
        eps = self.layer_norm_epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise CheckpointError(f"config layer_norm_epsilon must be a small positive number, got {eps!r}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if not isinstance(getattr(self, name), bool):
                raise CheckpointError(f"config {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise CheckpointError(f"config {name} must be a token id (a whole number >= 0) or null, got {v!r}")
        if self.n_embd % self.n_head:
            raise CheckpointError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise CheckpointError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"use one of {sorted(ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def attn_scale(self, layer_idx: int) -> float:
        """The factor layer ``layer_idx``'s attention scores are multiplied by before the softmax."""
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        return scale / (layer_idx + 1) if self.scale_attn_by_inverse_layer_idx else scale

    @property
    def default_attn_scale(self) -> bool:
        """Every layer scales its scores by 1/sqrt(head_dim), the attention kernels' own default."""
        return self.scale_attn_weights and not self.scale_attn_by_inverse_layer_idx

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of GPT(cfg) by name (the tied lm_head left out), computed without building the
    model: a checkpoint is checked against these before anything is allocated."""
    C, inner = cfg.n_embd, cfg.inner_dim
    shapes = {"transformer.wte.weight": (cfg.vocab_size, C), "transformer.wpe.weight": (cfg.n_positions, C)}
    block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (inner, C), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (C, inner),
             "mlp.c_proj.bias": (C,)}
    for i in range(cfg.n_layer):
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in block.items()})
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def parameter_count(cfg: GPTConfig) -> int:
    """Parameters of a GPT of this shape (the tied head counted once), without building it."""
    return sum(math.prod(s) for s in parameter_shapes(cfg).values())


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.head_dim, self.scale = cfg.n_head, cfg.head_dim, cfg.attn_scale(layer_idx)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: Optional[KV]) -> tuple[torch.Tensor, KV]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, past+T, hs)
            v = torch.cat([past[1], v], dim=2)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, past+T)
        # finfo.min rather than -inf: a fully padded query row then softmaxes to uniform, not NaN.
        att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
        y = F.softmax(att, dim=-1) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.inner_dim)
        self.c_proj = nn.Linear(cfg.inner_dim, cfg.n_embd)
        self.approximate = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: Optional[KV]) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), mask, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class Transformer(nn.Module):
    """Holds the parameters under HF's ``transformer.`` prefix."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)


def attention_mask_4d(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, past+T) 0/1 padding mask -> (B, 1, T, past+T) bool, causal by absolute position.

    Query i (absolute index past+i in the key axis) sees key j iff j <= past+i and key j is real.
    """
    kv_len = attention_mask.shape[1]
    q_idx = torch.arange(kv_len - q_len, kv_len, device=attention_mask.device).unsqueeze(1)  # (T, 1)
    k_idx = torch.arange(kv_len, device=attention_mask.device).unsqueeze(0)  # (1, past+T)
    causal = k_idx <= q_idx  # (T, past+T)
    return causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)


def position_ids_from_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0, for the last q_len keys."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos[:, -q_len:]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: GPT-2's LM head is the token embedding (saves vocab*n_embd params and is
        # what HF checkpoints assume: they store only transformer.wte.weight).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: 0.02 / sqrt(2 * n_layer) keeps the
        # residual stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        past: Optional[list[KV]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV]]:
        """input_ids (B, T); past: per layer (key, value) each (B, nh, past_len, hs) or None.

        attention_mask (B, past_len + T) of 0/1 (defaults to all ones); position_ids (B, T)
        default to cumsum(attention_mask) - 1. Returns logits (B, T, vocab), or (B, 1, vocab)
        with ``last_logits_only`` (all generation needs), and present.
        """
        B, T = input_ids.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        if not torch.jit.is_tracing() and past_len + T > self.config.n_positions:
            raise ArgumentError(
                f"context of {past_len + T} tokens exceeds the model's n_positions={self.config.n_positions}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, T)
        mask = attention_mask_4d(attention_mask, T)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        present: list[KV] = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, mask, None if past is None else past[i])
            present.append(kv)
        if last_logits_only:
            x = x[:, -1:, :]  # (B, 1, C): the LM head is the largest matmul; skip it for the prompt
        x = self.transformer.ln_f(x)
        # The tied head as a 2-D linear: torch.onnx writes it as Gemm(transB=1) on the same wte
        # initializer the Gather reads, instead of a constant-folded transposed copy (+vocab*n_embd*4 bytes).
        logits = F.linear(x.reshape(-1, x.shape[-1]), self.transformer.wte.weight)
        return logits.view(B, x.shape[1], -1), present
