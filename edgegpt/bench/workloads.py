"""Benchmark workloads (docs/design.md, "Benchmark workloads"): batch 1, greedy, exactly N new tokens with EOS ignored.

W1-W3 prompt with random token ids (speed at a shape, any weights). W4 and W5 prompt with real text, the held-out
packages of builtin:pystdlib (email, http, json), tokenized with the bundle's tokenizer: they are for a model
trained on source code (docs/quantization.md trains one), where speculative decoding has something to find.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

QUOTE_TOKENS = 32  # W5: the prompt ends with this many tokens of its own passage again


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_tokens: int
    new_tokens: int
    batch: int = 1
    model: str = ""
    text: Optional[str] = None  # W4/W5: "continue" or "quote", prompts from held-out source code

    def prompt_ids(self, vocab_size: int, tokenizer=None) -> list[list[int]]:
        """Random prompt ids from numpy's default_rng(1234), the same for every system measured; for a text
        workload, ``batch`` passages of held-out code (each from the start of a ``def``), tokenized."""
        if self.text is None:
            rng = np.random.default_rng(1234)
            return rng.integers(0, vocab_size, size=(self.batch, self.prompt_tokens)).tolist()
        if tokenizer is None:
            raise ValueError(f"workload {self.name} prompts with text: it needs the bundle's tokenizer")
        from edgegpt.corpus import builtin_pystdlib

        text = builtin_pystdlib(held_out=True)
        prompts, at = [], 0
        while len(prompts) < self.batch:
            at = text.index("\n    def ", at) + 1
            ids = tokenizer.encode(text[at:at + 8 * self.prompt_tokens]).ids
            if self.text == "continue":
                prompts.append(ids[:self.prompt_tokens])
            else:  # quote: a passage, a blank line, then the passage's start again: the answer repeats it
                sep = tokenizer.encode("\n\n\n").ids
                body = ids[:self.prompt_tokens - len(sep) - QUOTE_TOKENS]
                prompts.append(body + sep + body[:QUOTE_TOKENS])
            at += 8 * self.prompt_tokens  # the next prompt from further on
        return prompts


WORKLOADS = {
    "W1": Workload("W1", 128, 128, model="GPT-2 small shape (12 layers, 768 wide, 12 heads, vocab 50257)"),
    "W2": Workload("W2", 896, 128, model="GPT-2 small shape; long context: KV-cache handling dominates"),
    "W3": Workload("W3", 32, 64, model="distilgpt2 shape (6 layers); a short interactive turn"),
    "W4": Workload("W4", 256, 128, model="a model trained on source code; held-out code to continue", text="continue"),
    "W5": Workload("W5", 256, 128, model="a model trained on source code; the prompt holds the text the answer "
                                         "repeats (an edit, a quote)", text="quote"),
}
