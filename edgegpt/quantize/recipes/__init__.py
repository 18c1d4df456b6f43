"""Precision recipes as cards: one file per recipe in this folder, each with a ``CARD`` and a ``build``.

A card is light data (no onnx import): the recipe's name (what ``quantize --mode`` and ``package
--precision`` take), its options with their choices, defaults and help, its quality budget, the
targets it runs on, whether it may keep an int8 KV cache and whether it reads calibration text. The
CLI builds ``--mode``/``--precision`` and the recipe flags from the cards; quantize and package read
them. ``build(src, dst, options, calibration)`` writes the new graph with onnxruntime's tooling and
returns what the manifest should record beyond the options.

Adding a precision is one new file here (a CARD and a build) and its test; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from edgegpt.errors import QuantizeError
from edgegpt.quantize.recipes.card import Option, RecipeCard, quiet_quantizer

__all__ = ["CARDS", "Option", "RecipeCard", "card", "cli_options", "precisions_for", "quiet_quantizer"]


def _discover() -> dict[str, RecipeCard]:
    cards = []
    for info in pkgutil.iter_modules(__path__):
        card = getattr(importlib.import_module(f"{__name__}.{info.name}"), "CARD", None)
        if isinstance(card, RecipeCard):
            cards.append(card)
    return {c.name: c for c in sorted(cards, key=lambda c: (c.order, c.name))}


CARDS: dict[str, RecipeCard] = _discover()


def card(name: str) -> RecipeCard:
    if name not in CARDS:
        raise QuantizeError(f"unknown mode {name!r}; choose one of {', '.join(CARDS)}")
    return CARDS[name]


def precisions_for(target: str) -> tuple[str, ...]:
    """The recipes a package target runs, in --mode order."""
    return tuple(c.name for c in CARDS.values() if target in c.targets)


def cli_options() -> list[tuple[Option, tuple, str]]:
    """Each recipe flag once, as `edgegpt quantize` offers it: (its first declaration, the union of its
    choices over the recipes, a help text that says which recipe takes what)."""
    merged: dict[str, list[tuple[str, Option]]] = {}
    for c in CARDS.values():
        for o in c.options:
            if o.cli:
                merged.setdefault(o.name, []).append((c.name, o))
    out = []
    for users in merged.values():
        choices: list = []
        by_help: dict[str, list[str]] = {}
        for name, o in users:
            choices.extend(x for x in o.choices if x not in choices)
            by_help.setdefault(o.help, []).append(name)
        text = " ".join(f"{'/'.join(names)}: {h}." for h, names in by_help.items())
        out.append((users[0][1], tuple(choices), text))
    return out
