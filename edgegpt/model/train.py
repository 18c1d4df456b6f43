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

from edgegpt.atomic import atomic_dir, check_output_dir
from edgegpt.errors import CheckpointError, DataError, OutputExistsError
from edgegpt.model.checkpoint import load_checkpoint, write_checkpoint_files
from edgegpt.model.data import read_corpus
from edgegpt.model.gpt import GPT, GPTConfig
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


@dataclass
class TrainConfig:
    data: Sequence[str]
    out: str
    preset: str = "tiny"
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
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 0  # 0: only at the end
    seed: int = 0
    init: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def model_config(self) -> GPTConfig:
        if self.preset not in PRESETS:
            raise DataError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        dims = dict(PRESETS[self.preset])
        dims.update({k: getattr(self, k) for k in DIMS if getattr(self, k) is not None})
        return GPTConfig(**dims)


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
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
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


def _prepare_out(cfg: TrainConfig) -> Optional[dict]:
    """Check the output dir; return the saved training state when resuming."""
    out = Path(cfg.out)
    holds_checkpoint = (out / "config.json").exists() or (out / STATE_FILE).exists()
    if cfg.resume:
        if not (out / STATE_FILE).is_file():
            raise CheckpointError(f"--resume: {out} has no {STATE_FILE}; train without --resume first")
        return torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)
    if out.exists() and (holds_checkpoint or any(out.iterdir())) and not cfg.overwrite:
        raise OutputExistsError(f"{out} already holds a checkpoint; pass --resume to continue or --overwrite to replace it")
    if cfg.init and Path(cfg.init).resolve() == out.resolve():
        raise OutputExistsError(f"--out {out} is the --init checkpoint; choose a different --out")
    check_output_dir(out, overwrite=True, what="checkpoint")
    return None


def _save(model: GPT, tok, opt, step: int, cfg: TrainConfig, val_loss: float) -> None:
    buf = io.BytesIO()
    state = {"step": step, "optimizer": opt.state_dict(), "train_config": dataclasses.asdict(cfg),
             "model_config": model.config.to_dict(), "val_loss": val_loss,
             "torch_rng": torch.get_rng_state()}
    torch.save(state, buf)
    with atomic_dir(Path(cfg.out)) as tmp:
        write_checkpoint_files(model, tok, tmp, extra_files={STATE_FILE: buf.getvalue()})


def train(cfg: TrainConfig) -> TrainResult:
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
    else:
        mcfg = cfg.model_config()
        tok = train_tokenizer(texts, mcfg.vocab_size)
        # The trained vocab can be smaller than asked on a small corpus; size the model to it.
        mcfg = dataclasses.replace(mcfg, vocab_size=tok.get_vocab_size(),
                                   bos_token_id=eos_id(tok), eos_token_id=eos_id(tok))
        model = GPT(mcfg)
        start = 0
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
        loss = _loss(ddp_model, x, y)
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
            _save(model, tok, opt, step + 1, cfg, val_loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", val=f"{val_loss:.3f}",
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
