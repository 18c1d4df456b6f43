"""Byte-level BPE tokenizers (GPT-2 style) with the `tokenizers` library: train, load, save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgegpt.errors import CheckpointError, DataError

EOS_TOKEN = "<|endoftext|>"


def _byte_level(tok: Tokenizer) -> Tokenizer:
    # add_prefix_space=False and no trimming: GPT-2's own convention, so ids round-trip to text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `<|endoftext|>` as its only special token."""
    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size must be at least 258 (256 bytes + {EOS_TOKEN} + 1 merge), got {vocab_size}")
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """tokenizer.json, or GPT-2's vocab.json + merges.txt, from a checkpoint or bundle dir."""
    model_dir = Path(model_dir)
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        try:
            return Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"{tj} cannot be loaded ({e}); re-save the tokenizer") from None
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        try:
            tok = _byte_level(Tokenizer(models.BPE.from_file(str(vocab), str(merges))))
        except Exception as e:
            raise CheckpointError(f"{vocab} / {merges} cannot be loaded ({e})") from None
        if tok.token_to_id(EOS_TOKEN) is not None:
            tok.add_special_tokens([EOS_TOKEN])
        return tok
    raise CheckpointError(f"{model_dir} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")


def tokenizer_config_files(tok: Tokenizer, *, model_max_length: int) -> dict[str, str]:
    """tokenizer_config.json and special_tokens_map.json, which transformers' AutoTokenizer and transformers.js
    read beside tokenizer.json to know the tokenizer's class and special tokens."""
    eos = EOS_TOKEN if tok.token_to_id(EOS_TOKEN) is not None else None
    cfg = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
           "bos_token": eos, "eos_token": eos, "unk_token": eos}
    special = {k: eos for k in ("bos_token", "eos_token", "unk_token")} if eos else {}
    return {"tokenizer_config.json": json.dumps(cfg, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def save_tokenizer(tok: Tokenizer, dest: Path, *, model_max_length: int) -> None:
    """tokenizer.json (for `tokenizers` and the runtime), vocab.json + merges.txt and the config files
    (so transformers' GPT2Tokenizer / AutoTokenizer load it too)."""
    dest = Path(dest)
    tok.save(str(dest / "tokenizer.json"))
    tok.model.save(str(dest))
    for name, text in tokenizer_config_files(tok, model_max_length=model_max_length).items():
        (dest / name).write_text(text)


def eos_id(tok: Tokenizer) -> int | None:
    return tok.token_to_id(EOS_TOKEN)
