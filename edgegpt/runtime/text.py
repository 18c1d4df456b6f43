"""Text in and out: the bundle's tokenizer, incremental UTF-8-safe detokenizing, stop strings."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from edgegpt.errors import ArgumentError, BundleError
from edgegpt.manifest import TOKENIZER_FILE, bundle_file


def load_bundle_tokenizer(bundle: str | Path) -> Tokenizer:
    path = bundle_file(bundle, TOKENIZER_FILE)
    if not path.is_file():
        raise BundleError(f"{bundle} has no {TOKENIZER_FILE}; re-run `edgegpt export`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exceptions
        raise BundleError(f"{path} cannot be loaded ({e}); re-run `edgegpt export`") from None


class IncrementalDecoder:
    """Yields only complete text as tokens arrive.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character (emoji, CJK); decoding them
    alone gives U+FFFD. We decode a short window of recent tokens and release the new suffix only
    when it does not end in a replacement character (the same scheme as text-generation-inference).
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens already turned into released text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopStrings:
    """Cuts text at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ArgumentError("stop strings must be non-empty")
        self.stops = list(stops)
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """New text in; text safe to release out. Sets ``stopped`` when a stop string appears."""
        if self.stopped:
            return ""
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        if self.hold == 0 or not self.stops:
            out, self.buffer = self.buffer, ""
            return out
        keep = 0  # longest buffer suffix that is a prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buffer)), keep, -1):
                if self.buffer.endswith(s[:k]):
                    keep = k
                    break
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
