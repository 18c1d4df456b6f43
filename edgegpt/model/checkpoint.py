"""Checkpoint directories in the Hugging Face GPT-2 layout, read and written without transformers.

Layout: ``config.json`` (GPT2Config fields), ``model.safetensors`` (or ``pytorch_model.bin``),
``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``), optional ``generation_config.json``.

HF GPT-2 stores c_attn / c_proj / c_fc as ``Conv1D`` whose weight is (in, out): the transpose of
``nn.Linear``'s (out, in). ``CONV1D_SUFFIXES`` is the one list of those parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch

from edgegpt.atomic import atomic_dir, check_output_dir, match_umask
from edgegpt.errors import CheckpointError
from edgegpt.model.gpt import GPT, GPTConfig, parameter_shapes
from edgegpt.model.tokenizer import load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Buffers that old HF checkpoints carry and our module rebuilds from positions instead.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def read_config(model_dir: Path) -> GPTConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; is it a Hugging Face GPT-2 checkpoint dir?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object of GPT2Config fields; "
                              f"re-save the checkpoint")
    arch = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
        raise CheckpointError(f"{path}: architectures must be a list of names, got {arch!r}")
    if model_type != "gpt2" or (arch and not set(arch) & set(SUPPORTED_ARCHITECTURES)):
        found = arch[0] if arch else model_type
        raise CheckpointError(
            f"{model_dir} holds a {found!r} model; edgegpt supports GPT-2 family checkpoints "
            f"(model_type 'gpt2', {' / '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if raw.get("add_cross_attention"):  # cross-attention reads an encoder's states, which no export feeds
        raise CheckpointError(f"{path}: add_cross_attention is not supported by edgegpt's GPT-2 export")
    if raw.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{path}: untied LM heads are not supported (tie_word_embeddings=false)")
    try:
        return GPTConfig.from_dict(raw)
    except TypeError as e:
        raise CheckpointError(f"{path} has an invalid field: {e}") from None


def distilled_from(model_dir: Path) -> Optional[dict]:
    """The teacher a distilled checkpoint records in its config.json (edgegpt train --teacher), if any."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    got = raw.get("distilled_from") if isinstance(raw, dict) else None
    return got if isinstance(got, dict) else None


def config_to_hf(cfg: GPTConfig) -> dict:
    """The config.json transformers' GPT2Config reads (and Optimum / genai look for)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": cfg.activation_function,
        "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": cfg.reorder_and_upcast_attn,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, as the Hub lays them out: model.safetensors, or shards named by
    model.safetensors.index.json; else pytorch_model.bin, or its shards. Shard names must be files of the dir."""
    model_dir = Path(model_dir)
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return [model_dir / name]
        index = model_dir / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a weight index ({type(e).__name__}); re-save the checkpoint") \
                    from None
            paths = []
            for shard in shards:
                if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                    raise CheckpointError(f"{index} names {shard!r}, which is not a file of {model_dir}")
                if not (model_dir / shard).is_file():
                    raise CheckpointError(f"{model_dir} is missing {shard}, which {index.name} lists")
                paths.append(model_dir / shard)
            return paths
    raise CheckpointError(f"{model_dir} has no weights ({' or '.join(WEIGHT_FILES)}, or their sharded index)")


# safetensors' element types (its format's names) that a GPT-2 checkpoint's weights may be stored in
SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _Source:
    """One stored tensor: its shape and type from the file's header, and how to copy it into a tensor of ours."""

    def __init__(self, shape: tuple, dtype: Optional[torch.dtype], copy_into: Callable[[torch.Tensor, bool], None]):
        self.shape, self.dtype, self.copy_into = shape, dtype, copy_into


def _safetensors_sources(path: Path, f: BinaryIO, scratch: list) -> dict[str, _Source]:
    """The tensors of a .safetensors file, each read from ``f`` when copied (no mapping of the file).

    safetensors' own loaders map the file, and every page read stays in the process's memory until it is
    closed, beside the copies made from them (GPT-2 large: 1.9x its weights); they have no read of one tensor
    into a caller's buffer. So the library checks the header (offsets in bounds, no overlaps, sizes that
    match the shapes) and the offsets are read here from that same header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt"):
        pass
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    base = 8 + n
    sources = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_FLOATS.get(info["dtype"])
        start, stop = info["data_offsets"]

        def copy_into(dest: torch.Tensor, transpose: bool, dtype=dtype, shape=tuple(info["shape"]),
                      start=base + start, size=stop - start) -> None:
            if not transpose and dtype == dest.dtype:
                target = dest.view(-1).view(torch.uint8)  # straight into the parameter
            else:  # through one reused buffer: no freed block per tensor for the allocator to keep
                if scratch[0].numel() < size:
                    scratch[0] = torch.empty(size, dtype=torch.uint8)
                target = scratch[0][:size]
            f.seek(start)
            if f.readinto(target.numpy()) != size:
                raise CheckpointError(f"{path} ends inside a tensor; re-download or re-save it")
            if target.data_ptr() != dest.data_ptr():
                stored = target.view(dtype).view(shape)
                dest.copy_(stored.t() if transpose else stored)

        sources[name] = _Source(tuple(info["shape"]), dtype, copy_into)
    return sources


def _pickle_sources(path: Path) -> dict[str, _Source]:
    """The tensors of a pytorch_model.bin, mapped from the file where torch can (its zip format)."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)  # never unpickles code
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file: pickle errors vary by version
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {msg}); re-download or re-save it") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path} does not hold a state dict of named tensors; re-save it")
    sources = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            sources[name] = _Source((), None, lambda dest, transpose: None)
            continue

        def copy_into(dest: torch.Tensor, transpose: bool, t=t) -> None:
            dest.copy_(t.t() if transpose else t)

        sources[name] = _Source(tuple(t.shape), t.dtype if t.is_floating_point() else None, copy_into)
    return sources


def _sources(path: Path, stack: contextlib.ExitStack, scratch: list) -> dict[str, _Source]:
    try:
        if path.name.endswith(".safetensors"):
            return _safetensors_sources(path, stack.enter_context(open(path, "rb")), scratch)
        return _pickle_sources(path)
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt header: safetensors' and json's errors vary by version
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {msg}); re-download or re-save it") from None


def edgegpt_name(key: str) -> Optional[str]:
    """HF GPT-2's name of a tensor -> our module's (GPT2LMHeadModel and bare GPT2Model keys); None for the ones
    we do not load (the tied LM head, the causal-mask buffers old checkpoints carry)."""
    if key.endswith(IGNORED_SUFFIXES) or key == "lm_head.weight":
        return None
    return key if key.startswith("transformer.") else f"transformer.{key}"


def edgegpt_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: HF stores only transformer.wte.weight
        t = t.detach().cpu()
        out[name] = t.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else t.contiguous()
    return out


def load_model(model_dir: str | Path) -> GPT:
    """Load a GPT-2 family checkpoint dir into edgegpt's GPT (eval mode, fp32, CPU).

    Every tensor's name, type and shape is checked from the files' headers before any weight is read, and each
    weight is then read straight into the parameter that keeps it (transposed from Conv1D's layout and made fp32
    on the way): the module is built without memory of its own (the meta device), so the process holds the
    weights once, not the file's copy beside the model's."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint dir {model_dir} does not exist")
    cfg = read_config(model_dir)
    expected = parameter_shapes(cfg)  # a config that asks for more than the weights hold allocates nothing
    with contextlib.ExitStack() as stack:
        scratch = [torch.empty(0, dtype=torch.uint8)]
        found: dict[str, _Source] = {}
        for path in weight_files(model_dir):
            for key, src in _sources(path, stack, scratch).items():
                name = edgegpt_name(key)
                if name is None:
                    continue
                if name in found:
                    raise CheckpointError(f"{path.name} repeats {key} from another shard; re-save the checkpoint")
                found[name] = src
        missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
        if missing or unexpected:
            detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
            raise CheckpointError(f"{model_dir}: weights do not match config.json ({detail})")
        for k, src in found.items():
            if src.dtype is None:
                raise CheckpointError(f"{model_dir}: {k} is not a floating-point tensor")
            shape = src.shape[::-1] if k.endswith(CONV1D_SUFFIXES) and len(src.shape) == 2 else src.shape
            if shape != expected[k]:
                raise CheckpointError(f"{model_dir}: {k} has shape {shape}, config.json implies {expected[k]}")
        with torch.device("meta"):
            model = GPT(cfg)
        state = {}
        for k, src in found.items():
            state[k] = torch.empty(expected[k], dtype=torch.float32)
            src.copy_into(state[k], k.endswith(CONV1D_SUFFIXES))
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # keep the tie after loading
    return model.eval()


def generation_config(cfg: GPTConfig, extra: Optional[dict] = None) -> dict:
    gc = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "max_length": cfg.n_positions}
    gc.update(extra or {})
    return gc


def write_checkpoint_files(model: GPT, tokenizer, dest: Path, extra_files: Optional[dict[str, bytes]] = None,
                           extra_config: Optional[dict] = None) -> None:
    """Write the HF layout into an existing (temporary) directory; ``extra_config`` adds edgegpt's own keys
    to config.json (transformers keeps unknown keys as attributes)."""
    from safetensors.torch import save_file

    dest = Path(dest)
    save_file(edgegpt_to_hf(model), str(dest / "model.safetensors"), metadata={"format": "pt"})
    match_umask(dest / "model.safetensors")  # safetensors creates it 0600
    (dest / "config.json").write_text(json.dumps({**config_to_hf(model.config), **(extra_config or {})}, indent=2)
                                      + "\n")
    (dest / "generation_config.json").write_text(json.dumps(generation_config(model.config), indent=2) + "\n")
    save_tokenizer(tokenizer, dest, model_max_length=model.config.n_positions)
    for name, data in (extra_files or {}).items():
        (dest / name).write_bytes(data)


def save_checkpoint(model: GPT, tokenizer, out: str | Path, *, overwrite: bool = False) -> Path:
    """Save atomically in the HF GPT-2 layout (transformers' GPT2LMHeadModel loads it unchanged)."""
    out = Path(out)
    check_output_dir(out, overwrite=overwrite, what="checkpoint")
    with atomic_dir(out, replace=overwrite) as tmp:
        write_checkpoint_files(model, tokenizer, tmp)
    return out


def load_checkpoint(model_dir: str | Path):
    """Model and tokenizer of a checkpoint dir."""
    return load_model(model_dir), load_tokenizer(model_dir)


def checkpoint_hash(model_dir: str | Path) -> str:
    """sha256 of the weights (of each shard in turn, for a sharded checkpoint): identifies a bundle's source."""
    h = hashlib.sha256()
    for path in weight_files(Path(model_dir)):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
