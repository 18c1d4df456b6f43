"""Measuring a bundle against a SourceRun (the source run once, alone) gives what measuring it against the source
bundle itself gives, figure for figure."""

import pytest

from edgegpt.corpus import default_eval_text
from edgegpt.quality.evaluate import AGREEMENT_PROMPTS, decode_path, evaluate, greedy_agreement, run_source
from edgegpt.runtime import Generator


@pytest.fixture(scope="module")
def int8(trained_bundle, tmp_path_factory):
    from edgegpt.quantize.bundle import quantize_bundle

    out = tmp_path_factory.mktemp("sr") / "int8"
    quantize_bundle(trained_bundle, out, "int8", eval_tokens=1200)
    return out


def test_a_source_run_gives_the_same_figures_as_the_source(trained_bundle, int8, tmp_path):
    text = default_eval_text()
    source = run_source(trained_bundle, text, tmp_path, max_tokens=1200)
    assert source.result.windows > 3 and (tmp_path / "source-rows.f32").stat().st_size > 0
    assert source.result.perplexity == evaluate(trained_bundle, text, max_tokens=1200).perplexity
    direct, stored = evaluate(int8, text, max_tokens=1200, reference=trained_bundle), evaluate(int8, text,
                                                                                              reference=source)
    assert stored.kl_mean > 0 and stored.top1_agreement < 1
    assert stored.as_dict() == direct.as_dict()
    assert decode_path(int8, source, text) == decode_path(int8, trained_bundle, text)
    assert greedy_agreement(source, int8) == greedy_agreement(trained_bundle, int8)
    gen = Generator.load(trained_bundle)
    assert source.greedy == {p: gen.generate_ids([gen.encode(p)], 16, ignore_eos=True)[0] for p in AGREEMENT_PROMPTS}
