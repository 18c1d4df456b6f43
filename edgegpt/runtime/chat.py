"""A conversation kept as token ids: each turn's text joins the history, then the model's reply does.

On a ``--kv-cache shared`` bundle the Generator keeps the last turn's KV cache (``prompt_cache``), so a
turn prefills only its new text. When the history outgrows the context, its oldest tokens are dropped
(and that turn prefills in full).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from edgegpt.errors import ArgumentError
from edgegpt.runtime.generator import Generator


@dataclass
class TurnStats:
    history_tokens: int
    reused_tokens: int  # taken from the last turn's KV cache
    new_tokens: int
    ttft_ms: float
    decode_tok_s: float

    def line(self) -> str:
        return (f"[{self.history_tokens} tokens of history, {self.reused_tokens} reused from the last turn; "
                f"TTFT {self.ttft_ms:.1f} ms, {self.decode_tok_s:.0f} tok/s]")


class Chat:
    def __init__(self, generator: Generator, *, system: str = "", max_new_tokens: int = 64,
                 stop: Sequence[str] = (), **sampling):
        if generator.session.kv_capacity and not generator.prompt_cache:
            generator = Generator(generator.session, generator.tokenizer, prompt_cache=True,
                                  speculate=generator.speculate)
        if max_new_tokens >= generator.max_context:
            raise ArgumentError(f"max_new_tokens ({max_new_tokens}) must be below the model's context of "
                                f"{generator.max_context}")
        generator.make_config(max_new_tokens, **sampling)  # every argument checked before the first turn
        self.gen, self.max_new_tokens, self.stop, self.sampling = generator, max_new_tokens, stop, sampling
        self.ids: list[int] = generator.encode(system) if system else []
        self.stats: Optional[TurnStats] = None

    @property
    def reuses_cache(self) -> bool:
        """Whether each turn continues the last one's KV cache (a shared-buffer bundle)."""
        return self.gen.prompt_cache

    def turn(self, text: str) -> Iterator[str]:
        """Add ``text`` (a line: a newline is added when missing) and yield the reply as it is produced."""
        line = text if text.endswith("\n") else text + "\n"
        self.ids = (self.ids + self.gen.encode(line))[-(self.gen.max_context - self.max_new_tokens):]
        t0, first, new = time.perf_counter(), None, []
        for piece, t in self.gen.stream_ids(self.ids, self.max_new_tokens, stop=self.stop, **self.sampling):
            if t is not None:
                new.append(t)
                first = first or time.perf_counter()
            if piece:
                yield piece
        speed = (len(new) - 1) / (time.perf_counter() - first) if len(new) > 1 else 0.0
        self.stats = TurnStats(len(self.ids), self.gen.last_reused_tokens if self.reuses_cache else 0, len(new),
                               1000 * ((first or t0) - t0), speed)
        self.ids += new
