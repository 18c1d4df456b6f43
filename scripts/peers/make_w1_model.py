"""The benchmark models of docs/design.md with random weights (no download): GPT-2 small's shape (M124,
12 layers) or distilgpt2's (M82, --layers 6), or the larger GPT-2 sizes (--size medium|large|xl), vocab 50257,
initialised by edgegpt's GPT under seed 0, with a byte-level BPE tokenizer trained on builtin:pydoc. Benchmark
prompts are token ids, so the tokenizer only has to exist.

    python scripts/peers/make_w1_model.py out/m124 [--layers 12 | --size medium]
"""

from __future__ import annotations

import argparse

import torch

from edgegpt.model.checkpoint import save_checkpoint
from edgegpt.corpus import builtin_pydoc
from edgegpt.model.gpt import GPT, GPTConfig
from edgegpt.model.tokenizer import eos_id, train_tokenizer


# the GPT-2 family as released: (layers, width, heads)
SIZES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20), "xl": (48, 1600, 25)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None, help="GPT-2 small's width with this many layers [12]")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="a GPT-2 size: layers, width, heads")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    tok = train_tokenizer([builtin_pydoc()], 8192)
    eos = eos_id(tok)
    torch.manual_seed(0)
    n_layer, n_embd, n_head = SIZES[args.size]
    model = GPT(GPTConfig(n_layer=args.layers or n_layer, n_embd=n_embd, n_head=n_head, bos_token_id=eos,
                          eos_token_id=eos)).eval()
    save_checkpoint(model, tok, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
