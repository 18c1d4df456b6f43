"""Benchmark workloads (docs/design.md, "Benchmark workloads"): batch 1, greedy, exactly N new tokens with EOS ignored."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_tokens: int
    new_tokens: int
    batch: int = 1
    model: str = ""

    def prompt_ids(self, vocab_size: int) -> list[list[int]]:
        """Random prompt ids from numpy's default_rng(1234), the same for every system measured."""
        rng = np.random.default_rng(1234)
        return rng.integers(0, vocab_size, size=(self.batch, self.prompt_tokens)).tolist()


WORKLOADS = {
    "W1": Workload("W1", 128, 128, model="GPT-2 small shape (12 layers, 768 wide, 12 heads, vocab 50257)"),
    "W2": Workload("W2", 896, 128, model="GPT-2 small shape; long context: KV-cache handling dominates"),
    "W3": Workload("W3", 32, 64, model="distilgpt2 shape (6 layers); a short interactive turn"),
}
