"""What every `edgegpt` command shares: one-line errors, the sampling and recipe flags, and the
generator a command runs (over a bundle or a checkpoint). cli.py holds the commands themselves."""

from __future__ import annotations

import functools
import re
import sys

import click

from edgegpt.errors import EdgeGPTError, os_error_message
from edgegpt.quantize.recipes import cli_options


def cli_words(message: str) -> str:
    """The library names its arguments as Python does (max_new_tokens, truncate_prompt=True); at the
    command line the same words name the current command's flags (--max-new-tokens, --truncate-prompt)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return message
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.name:
            flag = max(p.opts, key=len)
            message = re.sub(rf"\b{p.name}=True\b", flag, message)
            # snake_case names anywhere; a one-word name only where the message starts with it
            message = re.sub(rf"(?<![-\w]){p.name}\b" if "_" in p.name else rf"^{p.name}\b", flag, message)
    return message


def friendly_errors(fn):
    """Turn expected errors into a one-line message and a non-zero exit: no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeGPTError as e:
            raise click.ClickException(cli_words(str(e).splitlines()[0] if str(e) else type(e).__name__)) from None
        except OSError as e:
            raise click.ClickException(os_error_message(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; no partial output was left behind", err=True)
            sys.exit(130)

    return wrapper


def int_list(value: str, option: str, example: str) -> list[int]:
    """A comma-separated list of integers from an option, or a usage error naming it."""
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"{option} takes comma-separated integers, e.g. {example}; got {value!r}") from None


def generator_for(path: str, provider: str, threads, fallback: bool, verify: bool, speculate=None):
    """The runtime's Generator over a bundle (onnxruntime) or a checkpoint dir (PyTorch)."""
    from edgegpt.manifest import folder_kind

    if folder_kind(path) == "bundle":
        from edgegpt.runtime import Generator

        return Generator.load(path, provider=provider, threads=threads, fallback=fallback, verify_files=verify,
                              speculate=speculate)
    if provider != "cpu" or fallback or verify or speculate:
        raise click.ClickException("--provider, --fallback, --verify and --speculate apply to bundles; export the "
                                   "checkpoint first")
    from edgegpt.model.generate import checkpoint_generator

    return checkpoint_generator(path, threads)


def sampling_options(fn):
    """The sampling flags shared by every command that generates."""
    opts = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="1.0 = off."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1.0 = off."),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def recipe_options(fn):
    """One flag per recipe option of the cards in edgegpt/quantize/recipes/ (a new card's options appear here)."""
    for o, choices, text in reversed(cli_options()):
        if o.negative:
            fn = click.option(f"{o.flag}/{o.negative}", o.name, default=None, help=text)(fn)
        else:
            fn = click.option(o.flag, o.name, type=click.Choice([str(c) for c in choices]), default=None,
                              callback=_typed(choices), help=text)(fn)
    return fn


def _typed(choices: tuple):
    """A click callback turning the chosen string back into the card's own value (an int, a bool)."""
    by_text = {str(c): c for c in choices}
    return lambda ctx, param, value: None if value is None else by_text[value]


def speculate_option(fn):
    """--speculate: decode several tokens per step of the bundle, with its own output (runtime/speculate.py)."""
    return click.option("--speculate", metavar="lookup|DRAFT_BUNDLE", default=None,
                        help="Speculative decoding, same output: lookup (n-gram matches in the prompt and the text "
                             "so far) or a draft bundle sharing the tokenizer (e.g. the int4 bundle of the same "
                             "model). Needs a --kv-cache shared bundle with every position's logits.")(fn)
