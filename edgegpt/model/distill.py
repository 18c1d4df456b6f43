"""Distillation: a smaller GPT trained from a larger one, the DistilGPT-2 way.

The student learns from the teacher's next-token distribution as well as from the text:

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, text)
           + hidden * mean over mapped layers of (1 - cos(student block output, teacher block output))

where ``_T`` is a softmax at temperature T (the T^2 keeps the soft targets' gradients at the scale of the hard
ones, as in Hinton et al.). The teacher runs in eval mode under no_grad, on the fly: each step costs one more
forward pass of the teacher (docs/distillation.md measures it), where a cache on disk would store vocab floats
per training token and read them back every step.

The student keeps the teacher's tokenizer, vocabulary and positions (its logits must be comparable token for
token); ``init_from_teacher`` copies the embeddings, the final LayerNorm and evenly spaced blocks (the first
and the last included), which needs the teacher's width. The teacher is a checkpoint dir: a bundle holds an
inference graph, and a teacher's forward needs every position's logits and its hidden states in PyTorch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from edgegpt.errors import ArgumentError, CheckpointError
from edgegpt.model.gpt import GPT, GPTConfig

# Student dimensions that must be the teacher's: its logits are compared with the teacher's token for token.
SHARED = ("vocab_size",)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    teacher: str
    alpha: float = 0.5  # weight of the soft-target loss (1 - alpha: the text's cross-entropy)
    temperature: float = 2.0
    hidden: float = 0.0  # weight of the hidden-state cosine loss (needs the teacher's width)
    init_from_teacher: bool = False

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ArgumentError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0 or self.temperature != self.temperature:
            raise ArgumentError(f"temperature must be > 0, got {self.temperature}")
        if not self.hidden >= 0:
            raise ArgumentError(f"hidden must be >= 0, got {self.hidden}")


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher block each student block copies and is compared with: evenly spaced, first and last
    included (12 -> 6: 0, 2, 4, 7, 9, 11, as distilgpt2 was initialised)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def check_teacher_dir(path: str) -> Path:
    """A checkpoint dir to learn from; a bundle is named for what it is."""
    p = Path(path)
    if (p / "edgegpt.json").is_file():
        raise CheckpointError(f"--teacher {p} is an ONNX bundle; distillation needs the PyTorch checkpoint it was "
                              f"exported from (its edgegpt.json records source.checkpoint)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"--teacher {p} is not a checkpoint dir (no config.json)")
    return p


def student_config(teacher: GPTConfig, requested: dict, preset: Optional[dict]) -> GPTConfig:
    """The student's shape: the teacher's vocabulary, positions and width-related defaults, half its depth
    unless a preset or explicit dimensions say otherwise; never larger than the teacher."""
    for name in SHARED:
        if requested.get(name) is not None and requested[name] != getattr(teacher, name):
            raise ArgumentError(f"--{name.replace('_', '-')} {requested[name]} differs from the teacher's "
                                f"{getattr(teacher, name)}: a student keeps its teacher's vocabulary")
    if requested.get("n_positions") is not None and requested["n_positions"] > teacher.n_positions:
        raise ArgumentError(f"--n-positions {requested['n_positions']} exceeds the teacher's {teacher.n_positions}")
    dims = {"n_layer": max(1, teacher.n_layer // 2), "n_head": teacher.n_head, "n_embd": teacher.n_embd,
            "n_positions": teacher.n_positions, "n_inner": teacher.n_inner}
    if preset:
        dims.update({k: v for k, v in preset.items() if k not in ("vocab_size", "n_positions")})
        dims["n_inner"] = None
    dims.update({k: v for k, v in requested.items() if v is not None and k not in SHARED})
    cfg = dataclasses.replace(teacher, **dims)
    if cfg.n_layer > teacher.n_layer or cfg.n_embd > teacher.n_embd or cfg.inner_dim > teacher.inner_dim:
        raise ArgumentError(f"the student ({cfg.n_layer} layers x {cfg.n_embd}) is larger than its teacher "
                            f"({teacher.n_layer} x {teacher.n_embd}); choose a smaller --n-layer / --n-embd")
    return cfg


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


class Teacher:
    """The teacher model and the distillation loss over a student."""

    def __init__(self, model: GPT, tok, cfg: DistillConfig, student_cfg: GPTConfig):
        self.model, self.tok, self.cfg = model.eval(), tok, cfg
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.map = layer_map(student_cfg.n_layer, model.config.n_layer)
        same_width = student_cfg.n_embd == model.config.n_embd
        if cfg.hidden and not same_width:
            raise ArgumentError(f"the hidden-state loss compares block outputs: the student needs the teacher's width "
                                f"({model.config.n_embd}), not {student_cfg.n_embd}")
        if cfg.init_from_teacher and (not same_width or student_cfg.n_head != model.config.n_head
                                      or student_cfg.inner_dim != model.config.inner_dim):
            raise ArgumentError(f"--init-from-teacher copies the teacher's blocks: the student needs its width, heads "
                                f"and MLP width ({model.config.n_embd}, {model.config.n_head}, "
                                f"{model.config.inner_dim})")

    def init_student(self, student: GPT) -> None:
        """Copy the embeddings, ln_f and the mapped blocks into the student, in place."""
        t, s = self.model.transformer, student.transformer
        with torch.no_grad():
            s.wte.weight.copy_(t.wte.weight)
            s.wpe.weight.copy_(t.wpe.weight[: s.wpe.weight.shape[0]])
            s.ln_f.load_state_dict(t.ln_f.state_dict())
            for i, j in enumerate(self.map):
                s.h[i].load_state_dict(t.h[j].state_dict())
        student.lm_head.weight = student.transformer.wte.weight

    def loss(self, student: torch.nn.Module, inner: GPT, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The distillation loss of ``student`` (possibly DDP-wrapped; ``inner`` is the GPT inside) on a batch."""
        captured: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
        hooks = []
        if self.cfg.hidden:
            hooks += [b.register_forward_hook(lambda m, a, out: captured["s"].append(out[0])) for b in inner.transformer.h]
            hooks += [self.model.transformer.h[j].register_forward_hook(lambda m, a, out: captured["t"].append(out[0]))
                      for j in sorted(set(self.map))]
        needs_teacher = bool(self.cfg.alpha or self.cfg.hidden)  # alpha 0: the text alone, the teacher's tokenizer
        try:
            if needs_teacher:
                with torch.no_grad():
                    t_logits, _ = self.model(x)
            s_logits, _ = student(x)
        finally:
            for h in hooks:
                h.remove()
        V, T = s_logits.shape[-1], self.cfg.temperature
        ce = F.cross_entropy(s_logits.reshape(-1, V), y.reshape(-1))
        if not self.cfg.alpha:
            loss, parts = ce, {"ce": ce.item()}
        else:
            kd = F.kl_div(F.log_softmax(s_logits.reshape(-1, V) / T, -1), F.log_softmax(t_logits.reshape(-1, V) / T, -1),
                          log_target=True, reduction="batchmean") * T * T
            loss = self.cfg.alpha * kd + (1 - self.cfg.alpha) * ce
            parts = {"kd": kd.item(), "ce": ce.item()}
        if self.cfg.hidden:
            by_layer = dict(zip(sorted(set(self.map)), captured["t"]))
            cos = torch.stack([1 - F.cosine_similarity(h, by_layer[j], dim=-1).mean()
                               for h, j in zip(captured["s"], self.map)]).mean()
            loss = loss + self.cfg.hidden * cos
            parts["cos"] = cos.item()
        return loss, parts
