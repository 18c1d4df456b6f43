"""Shared fixtures: tiny local models only (random-init HF configs and our own trained models).

Nothing here downloads anything; the text is CPython's own pydoc_data.topics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgegpt.corpus import builtin_pydoc

# Random-init shapes the parity tests sweep: distilgpt2-like (scaled down), gpt2-like (scaled
# down), an odd head count with the erf GELU, and a small vocabulary.
SHAPES = {
    "distil-like": dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=1000),
    "gpt2-like": dict(n_layer=4, n_head=4, n_embd=96, n_positions=256, vocab_size=1000),
    "odd-heads": dict(n_layer=3, n_head=3, n_embd=48, n_positions=64, vocab_size=1000, activation_function="gelu"),
    "small-vocab": dict(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=300),
    # GPT2Config's attention-scaling options: Stanford CRFM's Mistral GPT-2s (scores also divided by the layer
    # index + 1, computed in fp32), and unscaled scores. transformers' SDPA path ignores the first two (its
    # eager path, the models' definition, applies them), so tests compare against eager attention.
    "mistral-like": dict(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=1000,
                         scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "unscaled": dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=300, scale_attn_weights=False),
}


@pytest.fixture(scope="session")
def pydoc_text() -> str:
    return builtin_pydoc()


@pytest.fixture(scope="session")
def tokenizers_by_vocab(pydoc_text):
    from edgegpt.model.tokenizer import train_tokenizer

    cache = {}

    def get(vocab_size: int):
        if vocab_size not in cache:
            cache[vocab_size] = train_tokenizer([pydoc_text[:100_000]], vocab_size)
        return cache[vocab_size]

    return get


def make_hf_checkpoint(path: Path, tok, seed: int = 0, **shape) -> Path:
    """A random-init transformers GPT2LMHeadModel saved with save_pretrained, plus our tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgegpt.model.tokenizer import eos_id, save_tokenizer

    torch.manual_seed(seed)
    eos = eos_id(tok)
    cfg = GPT2Config(bos_token_id=eos, eos_token_id=eos, **shape)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    save_tokenizer(tok, path, model_max_length=cfg.n_positions)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tokenizers_by_vocab):
    """Factory: shape name -> a saved random-init HF GPT-2 checkpoint dir (cached per session)."""
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            shape = SHAPES[name]
            tok = tokenizers_by_vocab(shape["vocab_size"])
            cache[name] = make_hf_checkpoint(tmp_path_factory.mktemp(name), tok, **shape)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A small model trained with edgegpt's own trainer on builtin:pydoc (real, non-random weights)."""
    from edgegpt.model.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "ckpt"
    train(TrainConfig(data=["builtin:pydoc"], out=str(out), n_layer=2, n_head=2, n_embd=64, n_positions=128,
                      vocab_size=1024, block_size=64, batch_size=16, max_steps=500, warmup_steps=25,
                      eval_interval=0, progress=False))
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    return out


@pytest.fixture(scope="session")
def trained_bundle(trained_checkpoint, tmp_path_factory):
    """The trained model's fused graph with the concat cache (Optimum's contract; a left-padded batch runs as
    one step)."""
    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions

    out = tmp_path_factory.mktemp("rt-trained") / "bundle"
    export_bundle(trained_checkpoint, out, ExportOptions(kv_cache="concat"))
    return out


def run_without_torch(body: str):
    """Run ``body`` in a fresh Python where torch, onnx, transformers, optimum and safetensors cannot be imported
    (the embeddable runtime's promise). Returns the CompletedProcess."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        class Block:
            BLOCKED = ("torch", "onnx", "transformers", "optimum", "safetensors")
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
