"""Train a GPT from plain text: byte-level BPE, AdamW with warmup + cosine decay, gradient clipping,
held-out validation, periodic atomic checkpoints in the HF GPT-2 layout, resume, fine-tuning from
an existing checkpoint, and DistributedDataParallel when launched by ``torchrun``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from edgegpt.atomic import KIND_MARKERS, atomic_dir, check_output_dir, check_writable, describe_contents
from edgegpt.errors import ArgumentError, CheckpointError, DataError, OutputExistsError
from edgegpt.limits import check_int, check_memory
from edgegpt.model.checkpoint import load_checkpoint, write_checkpoint_files
from edgegpt.corpus import BUILTIN_PREFIX, HELD_OUT_FRACTION, read_corpus
from edgegpt.model.gpt import GPT, GPTConfig, parameter_count
from edgegpt.model.tokenizer import eos_id, train_tokenizer

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"

# Model size presets. tiny trains in about a minute on 2 CPU cores (README quickstart);
# gpt2 is the GPT-2 small shape (124M parameters).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=4096),
    "small": dict(n_layer=6, n_head=6, n_embd=384, n_positions=512, vocab_size=8192),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
}
DIMS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
DEFAULT_WARMUP = 30
# What training holds per parameter: fp32 weights, gradients and AdamW's two moments.
TRAIN_BYTES_PER_PARAM = 16


@dataclass
class TrainConfig:
    data: Sequence[str]
    out: str
    preset: Optional[str] = None  # tiny; with a teacher, half the teacher's depth at its width
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    n_positions: Optional[int] = None
    vocab_size: Optional[int] = None
    block_size: Optional[int] = None  # training sequence length; default min(n_positions, 128)
    batch_size: int = 16
    max_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: Optional[int] = None  # default: min(30, max_steps // 10)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = HELD_OUT_FRACTION
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 0  # 0: only at the end
    seed: int = 0
    init: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)
    teacher: Optional[str] = None  # distil from this checkpoint (model/distill.py)
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_loss: float = 0.0
    init_from_teacher: bool = False

    def model_config(self) -> GPTConfig:
        dims = dict(self.preset_dims() or PRESETS["tiny"])
        dims.update({k: getattr(self, k) for k in DIMS if getattr(self, k) is not None})
        return GPTConfig(**dims)

    def preset_dims(self) -> Optional[dict]:
        if self.preset is None:
            return None
        if self.preset not in PRESETS:
            raise DataError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[self.preset]

    def distill_config(self):
        from edgegpt.model.distill import DistillConfig

        return DistillConfig(self.teacher, self.alpha, self.temperature, self.hidden_loss, self.init_from_teacher)

    @property
    def warmup(self) -> int:
        """Warmup steps: as given, or 10% of the run up to 30."""
        return self.warmup_steps if self.warmup_steps is not None else min(DEFAULT_WARMUP, self.max_steps // 10)

    def validate(self) -> None:
        """Every number in range and every combination valid, before any work starts."""
        check_int(self.max_steps, "max_steps", low=1)
        check_int(self.batch_size, "batch_size", low=1, high=65536)
        check_int(self.seed, "seed", low=0)
        for name in ("eval_interval", "checkpoint_interval", "eval_batches"):
            check_int(getattr(self, name), name, low=0 if name != "eval_batches" else 1)
        if self.warmup_steps is not None:
            check_int(self.warmup_steps, "warmup_steps", low=0)
            if self.warmup_steps > self.max_steps:
                raise ArgumentError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        for k in DIMS + ("block_size",):
            if getattr(self, k) is not None:
                check_int(getattr(self, k), k, low=2 if k in ("n_positions", "block_size") else 1)
        for name, low in (("lr", 0.0), ("min_lr", 0.0), ("weight_decay", 0.0), ("grad_clip", 0.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < low:
                raise ArgumentError(f"{name} must be a finite number >= {low:g}, got {v!r}")
        if not self.lr > 0:
            raise ArgumentError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ArgumentError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.resume and self.overwrite:
            raise ArgumentError("resume and overwrite contradict each other; pick one")
        if self.resume and self.init:
            raise ArgumentError("resume continues the run in out; init starts a new one from a checkpoint: pick one")
        if self.teacher is not None:
            self.distill_config().validate()
        elif self.init_from_teacher or self.hidden_loss:
            raise ArgumentError("init_from_teacher and hidden_loss need a teacher")


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float
    val_loss: float
    seconds: float
    tokens_per_s: float
    n_params: int


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    warmup = cfg.warmup
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _distributed() -> tuple[int, int]:
    """(rank, world_size); initialises the process group when torchrun launched us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), world


def _tokenize(texts: list[str], tok, block_size: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    eos = eos_id(tok)
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t).ids)
        if eos is not None:
            ids.append(eos)  # documents are separated by <|endoftext|>, as in GPT-2's training data
    data = np.asarray(ids, dtype=np.int64)
    n_val = int(len(data) * val_fraction)
    need = block_size + 1
    if len(data) - n_val < need or n_val < need:
        raise DataError(
            f"the corpus has {len(data)} tokens: too small for one training block of {block_size} tokens plus a "
            f"held-out validation block ({val_fraction:.0%} of the text); give more text or lower --block-size"
        )
    return data[: len(data) - n_val], data[len(data) - n_val:]


def _batch(data: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.stack([data[o: o + block_size] for o in offsets])
    y = np.stack([data[o + 1: o + 1 + block_size] for o in offsets])
    return torch.from_numpy(x), torch.from_numpy(y)


def _loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, _ = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: GPT, val: np.ndarray, block_size: int, batch_size: int, n_batches: int) -> float:
    """Mean loss over evenly spaced, fixed validation blocks (comparable across evaluations)."""
    was_training = model.training
    model.eval()
    starts = np.linspace(0, len(val) - block_size - 1, num=max(1, n_batches * batch_size)).astype(np.int64)
    losses = [_loss(model, *_batch(val, chunk, block_size)).item() for chunk in np.array_split(starts, n_batches)
              if len(chunk)]
    model.train(was_training)
    return float(np.mean(losses))


def _load_state(out: Path) -> dict:
    """training_state.pt, read without unpickling code (weights_only) and checked."""
    path = out / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean "not a state we wrote"
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"--resume: {path} is not a training state edgegpt wrote (truncated, or holds objects "
                              f"other than tensors and plain data: {detail}); train again with --overwrite") from None
    want = {"step": int, "optimizer": dict, "torch_rng": torch.Tensor}
    bad = [k for k, t in want.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if bad:
        raise CheckpointError(f"--resume: {path} lacks {', '.join(bad)}; it was not written by edgegpt train: "
                              f"train again with --overwrite")
    return state


def _holds_checkpoint(out: Path) -> bool:
    return any((out / m).is_file() for m in KIND_MARKERS["checkpoint"])


def _prepare_out(cfg: TrainConfig) -> Optional[dict]:
    """Check the output dir before any work; return the saved training state when resuming."""
    out = Path(cfg.out)
    if cfg.resume:
        if not (out / STATE_FILE).is_file():
            raise CheckpointError(f"--resume: {out} has no {STATE_FILE}; train without --resume first")
        check_writable(out)
        return _load_state(out)
    inputs = [Path(p) for p in (cfg.init, cfg.teacher) if p]
    inputs += [Path(d) for d in cfg.data if not str(d).startswith(BUILTIN_PREFIX)]
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        if _holds_checkpoint(out):
            raise OutputExistsError(f"{out} already holds a checkpoint; pass --resume to continue or --overwrite "
                                    f"to replace it")
        raise OutputExistsError(f"{out} is not empty and holds no checkpoint ({describe_contents(out)}); choose a new "
                                f"or empty --out")
    check_output_dir(out, overwrite=True, what="checkpoint", inputs=inputs)
    return None


def _planned_config(cfg: TrainConfig, teacher: Optional[GPT]) -> GPTConfig:
    if teacher is None:
        return cfg.model_config()
    from edgegpt.model.distill import student_config

    return student_config(teacher.config, {k: getattr(cfg, k) for k in DIMS}, cfg.preset_dims())


def _provenance(cfg: TrainConfig) -> Optional[dict]:
    """What config.json records of a distilled student's teacher (export copies it into the manifest)."""
    if cfg.teacher is None:
        return None
    from edgegpt.model.checkpoint import checkpoint_hash

    return {"distilled_from": {"teacher": str(Path(cfg.teacher).resolve()), "sha256": checkpoint_hash(cfg.teacher),
                               "alpha": cfg.alpha, "temperature": cfg.temperature, "hidden_loss": cfg.hidden_loss,
                               "init_from_teacher": cfg.init_from_teacher}}


def _save(model: GPT, tok, opt, step: int, cfg: TrainConfig, val_loss: float, extra_config: Optional[dict] = None
          ) -> None:
    """The checkpoint plus what --resume needs, all tensors and plain data (loads with weights_only)."""
    buf = io.BytesIO()
    state = {"step": step, "optimizer": opt.state_dict(), "train_config": dataclasses.asdict(cfg),
             "model_config": model.config.to_dict(), "val_loss": val_loss,
             "torch_rng": torch.get_rng_state()}
    torch.save(state, buf)
    with atomic_dir(Path(cfg.out)) as tmp:
        write_checkpoint_files(model, tok, tmp, extra_files={STATE_FILE: buf.getvalue()}, extra_config=extra_config)


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    teacher_model = teacher_tok = None
    if cfg.teacher is not None:  # an input like the others: read and checked before any work
        from edgegpt.model.distill import check_teacher_dir

        teacher_model, teacher_tok = load_checkpoint(check_teacher_dir(cfg.teacher))
    if cfg.init is None and not cfg.resume:
        planned = _planned_config(cfg, teacher_model)
        params = parameter_count(planned) + (teacher_model.num_params() if teacher_model is not None else 0) // 4
        check_memory(TRAIN_BYTES_PER_PARAM * params, f"training a {parameter_count(planned) / 1e6:,.0f}M parameter model",
                     "choose a smaller preset or --n-layer / --n-embd")
    rank, world = _distributed()
    state = _prepare_out(cfg)
    torch.manual_seed(cfg.seed)
    texts = read_corpus(cfg.data)

    if state is not None:  # resume: model, tokenizer and step from the checkpoint in --out
        model, tok = load_checkpoint(cfg.out)
        start = int(state["step"])
    elif cfg.init:
        model, tok = load_checkpoint(cfg.init)
        start = 0
    elif teacher_model is not None:  # the student: the teacher's tokenizer and vocabulary
        model, tok, start = GPT(_planned_config(cfg, teacher_model)), teacher_tok, 0
    else:
        mcfg = cfg.model_config()
        tok = train_tokenizer(texts, mcfg.vocab_size)
        # The trained vocab can be smaller than asked on a small corpus; size the model to it.
        mcfg = dataclasses.replace(mcfg, vocab_size=tok.get_vocab_size(),
                                   bos_token_id=eos_id(tok), eos_token_id=eos_id(tok))
        model = GPT(mcfg)
        start = 0
    teacher = None
    if teacher_model is not None:
        from edgegpt.model.distill import Teacher, same_tokenizer

        if not same_tokenizer(tok, teacher_tok) or model.config.vocab_size != teacher_model.config.vocab_size:
            raise CheckpointError(f"the teacher {cfg.teacher} has another tokenizer or vocabulary than the student "
                                  f"({'--out' if state is not None else '--init'}); distil with the teacher's own")
        teacher = Teacher(teacher_model, teacher_tok, cfg.distill_config(), model.config)
        if cfg.init_from_teacher and state is None and not cfg.init:
            teacher.init_student(model)
    mcfg = model.config
    block = cfg.block_size or min(mcfg.n_positions, 128)
    if block > mcfg.n_positions:
        raise DataError(f"--block-size {block} exceeds the model's n_positions={mcfg.n_positions}")
    train_ids, val_ids = _tokenize(texts, tok, block, cfg.val_fraction)

    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model)
    # Each rank draws its own batches from a seed it owns; resume continues the same sequence.
    rng = np.random.default_rng([cfg.seed, rank, start])
    high = len(train_ids) - block - 1

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0
    loss_v, val_loss = float("nan"), float("nan")
    for step in range(start, cfg.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, y = _batch(train_ids, rng.integers(0, high + 1, size=cfg.batch_size), block)
        if teacher is not None:
            loss, parts = teacher.loss(ddp_model, model, x, y)
        else:
            loss, parts = _loss(ddp_model, x, y), {}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_v = loss.item()
        tokens += x.numel() * world
        last = step + 1 == cfg.max_steps
        if rank == 0 and (last or (cfg.eval_interval and (step + 1) % cfg.eval_interval == 0)):
            val_loss = evaluate(model, val_ids, block, cfg.batch_size, cfg.eval_batches)
            log.info("step %d: train loss %.4f, val loss %.4f", step + 1, loss_v, val_loss)
        if rank == 0 and (last or (cfg.checkpoint_interval and (step + 1) % cfg.checkpoint_interval == 0)):
            _save(model, tok, opt, step + 1, cfg, val_loss, _provenance(cfg))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}, val=f"{val_loss:.3f}",
                            tok_s=f"{tokens / max(1e-9, time.perf_counter() - t0):,.0f}")
    if bar is not None:
        bar.close()
    if start >= cfg.max_steps and rank == 0:
        val_loss = evaluate(model, val_ids, block, cfg.batch_size, cfg.eval_batches)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    seconds = time.perf_counter() - t0
    return TrainResult(out=Path(cfg.out), steps=cfg.max_steps, train_loss=loss_v, val_loss=val_loss,
                       seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9), n_params=model.num_params())
