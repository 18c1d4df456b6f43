"""Speculative decoding gives the target's own output: greedy token for token, sampling in distribution."""

from __future__ import annotations

import numpy as np
import pytest

from edgegpt.corpus import default_eval_text
from edgegpt.errors import ArgumentError
from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.runtime import Generator
from edgegpt.runtime.speculate import Payoff


@pytest.fixture(scope="module")
def bundles(trained_checkpoint, tmp_path_factory):
    from edgegpt.quantize.bundle import quantize_bundle

    root = tmp_path_factory.mktemp("spec")
    export_bundle(trained_checkpoint, root / "fp32", ExportOptions(kv_cache="shared"))
    for mode, extra in (("int4", {}), ("fp32", {"options": {"lm_head": "screened"}})):
        name = "screened" if mode == "fp32" else mode
        quantize_bundle(root / "fp32", root / name, mode, eval_tokens=512, force=True, **extra)
    quantize_bundle(root / "fp32", root / "int4-last", "int4", eval_tokens=512, force=True, last_logits_only=True)
    return root


@pytest.fixture(autouse=True)
def always_speculate(monkeypatch):
    """The clock decides in real use; here every step speculates, so every path is exercised."""
    monkeypatch.setattr(Payoff, "MARGIN", float("inf"))
    monkeypatch.setattr(Payoff, "PROBE", 0)


def _prompts(gen, n=10, length=48):
    ids = gen.encode(default_eval_text())
    return [ids[s:s + length] for s in range(0, 40 * n, 40)][:n]


@pytest.mark.parametrize("target, drafter", [("fp32", "lookup"), ("fp32", "int4-last"), ("screened", "int4-last"),
                                             ("int4", "lookup"), ("screened", "lookup")])
def test_greedy_output_is_the_targets_token_for_token(bundles, target, drafter):
    plain = Generator.load(bundles / target)
    spec = Generator.load(bundles / target, speculate="lookup" if drafter == "lookup" else bundles / drafter)
    drafted = 0
    for p in _prompts(plain):
        for n in (1, 2, 7, 33):  # a length that ends inside an accepted run, too
            want = plain.generate_ids([p], n, ignore_eos=True)
            assert spec.generate_ids([p], n, ignore_eos=True) == want, (p[:5], n)
            drafted += spec.last_tokens_per_step > 1
    assert drafted  # drafts were accepted: verification really ran


def test_streaming_stop_strings_and_eos_are_the_targets(bundles):
    plain = Generator.load(bundles / "fp32")
    spec = Generator.load(bundles / "fp32", speculate=bundles / "int4-last")
    for text in ("The with statement", "A class definition", "def f(x):\n    return x"):
        full = plain.generate(text, 40)
        stop = full[10:13] if len(full) > 13 else "\n"
        assert spec.generate(text, 40) == full
        assert "".join(spec.stream(text, 40, stop=[stop])) == "".join(plain.stream(text, 40, stop=[stop]))
        assert spec.generate(text, 40, repetition_penalty=1.3) == plain.generate(text, 40, repetition_penalty=1.3)


def test_a_kept_chat_cache_speculates_too(bundles):
    plain = Generator.load(bundles / "fp32", prompt_cache=True)
    spec = Generator.load(bundles / "fp32", prompt_cache=True, speculate="lookup")
    history_a = history_b = plain.encode("The try statement specifies exception handlers.\n")
    for line in ("What does finally do?\n", "And else?\n", "Show the syntax.\n"):
        a = plain.generate_ids([history_a], 24)[0]
        b = spec.generate_ids([history_b], 24)[0]
        assert a == b and spec.last_reused_tokens == plain.last_reused_tokens
        history_a = history_b = history_a + a + plain.encode(line)


def test_batches_decode_as_before(bundles):
    plain = Generator.load(bundles / "fp32")
    spec = Generator.load(bundles / "fp32", speculate="lookup")
    prompts = _prompts(plain, n=3)
    assert spec.generate_ids(prompts, 12, ignore_eos=True) == plain.generate_ids(prompts, 12, ignore_eos=True)


def _second_token_distribution(gen, prompt, top_k):
    """The exact distribution of the second new token at temperature 1 and top-k: sum over the first."""
    from edgegpt.runtime.sampling import SamplingParams, distribution

    params = SamplingParams(temperature=1.0, top_k=top_k)
    cache = gen.session.start(1, slots=len(prompt) + 2)
    x = np.asarray([prompt], np.int64)
    first = cache.step(x, np.ones_like(x), np.arange(len(prompt))[None]).copy()
    idx, p = distribution(first[0], params)
    out = np.zeros(gen.session.vocab_size)
    for t, pt in zip(idx, p):
        c = gen.session.start(1, slots=len(prompt) + 2)
        y = np.asarray([prompt + [int(t)]], np.int64)
        row = c.step(y, np.ones_like(y), np.arange(len(prompt) + 1)[None])
        j, q = distribution(row[0], params)
        out[j] += pt * q
    return out


@pytest.mark.parametrize("drafter", ["lookup", "int4-last"])
def test_sampling_keeps_the_targets_distribution(bundles, drafter):
    """Chi-square of 1500 speculative samples of the second token (the first one verification decides)
    against its exact distribution under the target."""
    target = Generator.load(bundles / "fp32")
    spec = Generator.load(bundles / "fp32", speculate="lookup" if drafter == "lookup" else bundles / drafter)
    chunk = target.encode("The with statement is used to wrap the execution of a block")[:8]
    prompt = chunk * 3  # repeats: lookup proposes what followed last time
    exact = _second_token_distribution(target, prompt, top_k=8)
    rng_seeds = range(1500)
    counts = np.zeros_like(exact)
    for seed in rng_seeds:
        counts[spec.generate_ids([prompt], 3, temperature=1.0, top_k=8, seed=seed, ignore_eos=True)[0][1]] += 1
    support = exact > 0
    assert counts[~support].sum() == 0
    expected = exact[support] * len(rng_seeds)
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    # p < 0.001 for a chi-square with dof degrees of freedom: dof + 3.1 sqrt(2 dof) + 10 bounds it comfortably
    assert chi2 < dof + 3.1 * np.sqrt(2 * dof) + 10, (chi2, dof)


def test_what_cannot_speculate_is_refused(bundles, hf_checkpoint, tmp_path):
    with pytest.raises(ArgumentError, match="needs a shared KV buffer and every position's logits"):
        Generator.load(bundles / "int4-last", speculate="lookup")
    export_bundle(hf_checkpoint("small-vocab"), tmp_path / "other", ExportOptions(kv_cache="shared"))
    with pytest.raises(ArgumentError, match="vocabulary|another tokenizer"):
        Generator.load(bundles / "fp32", speculate=tmp_path / "other")
    with pytest.raises(ArgumentError, match="speculate must be"):
        Generator(Generator.load(bundles / "fp32").session, Generator.load(bundles / "fp32").tokenizer,
                  speculate="ngram")
    from edgegpt.quantize.bundle import quantize_bundle

    # int8's dynamic activation scale spans a step's rows: a verification step is not a one-token step
    quantize_bundle(bundles / "fp32", tmp_path / "int8", "int8", eval_tokens=512, force=True)
    with pytest.raises(ArgumentError, match="is int8: .*Speculate on the fp32"):
        Generator.load(tmp_path / "int8", speculate="lookup")


def test_chat_keeps_its_drafter(bundles):
    from edgegpt.runtime.chat import Chat

    plain = Chat(Generator.load(bundles / "fp32"), max_new_tokens=16)
    spec = Chat(Generator.load(bundles / "fp32", speculate="lookup"), max_new_tokens=16)
    assert spec.gen.drafter is not None and spec.reuses_cache
    for line in ("The with statement", "and the try statement"):
        assert "".join(spec.turn(line)) == "".join(plain.turn(line))


def test_payoff_goes_off_by_the_clock_and_back_on_when_lookup_would_match(monkeypatch):
    monkeypatch.setattr(Payoff, "MARGIN", 0.97)
    monkeypatch.setattr(Payoff, "PROBE", 3)
    p = Payoff()
    for _ in range(3):
        p.plain(1.0)
    assert p.speculate()
    for _ in range(Payoff.WINDOW):
        p.speculative(2.0, 1)  # 2 s a token against 1 s plain: it does not pay
    assert p.off and not p.speculate()
    for hit in (True, False, True):  # 2 of the last 3 unverified proposals were right: not yet
        p.shadow(hit)
    assert p.off
    p.shadow(True)  # 3 of the last 4
    assert not p.off and p.speculate()
    for _ in range(Payoff.WINDOW):
        p.speculative(2.0, 1)
    assert p.off
    p.new_generation()  # each generation starts on, judged afresh
    assert not p.off and p.speculate()
