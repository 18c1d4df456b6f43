"""Bundles with a shared (in-place) KV buffer: GroupQueryAttention over fixed-capacity past/present."""

import numpy as np
import onnxruntime as ort
import pytest

from edgegpt.errors import ExportError
from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.model import load_checkpoint
from edgegpt.model.generate import generate_ids
from edgegpt.corpus import default_eval_text
from edgegpt.quality.evaluate import evaluate
from edgegpt.runtime import Generator
from edgegpt.runtime.session import ModelSession


@pytest.fixture(scope="module")
def shared(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "b"
    return out, export_bundle(hf_checkpoint("gpt2-like"), out, ExportOptions(kv_cache="shared"))


def test_shared_bundle_is_recorded_and_verified(shared):
    _, m = shared
    opts = m["graph"]["options"]
    assert opts["shared_kv_buffer"] and opts["kv_capacity"] == 256
    assert opts["fused_attention"] == "com.microsoft.GroupQueryAttention"
    assert m["io"]["inputs"][3]["shape"] == ["batch_size", 4, "kv_slots", 24]
    assert m["verification"]["passed"] and m["verification"]["greedy_identical"]


def test_runtime_updates_the_buffer_in_place_and_matches_pytorch(shared, hf_checkpoint):
    out, _ = shared
    gen = Generator.load(out)
    s = gen.session
    past = s.empty_past(1, slots=10)  # sized to the generation, not the model's 256-token context
    assert past[0].shape() == [1, 4, 10, 24]
    ptr = past[0].data_ptr()
    _, after = s.step(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64), np.arange(3)[None], past)
    _, after = s.step(np.array([[4]]), np.ones((1, 4), np.int64), np.array([[3]]), after)
    assert after[0].data_ptr() == ptr and isinstance(after[0], ort.OrtValue)  # no new allocation per step
    model, tok = load_checkpoint(hf_checkpoint("gpt2-like"))
    for prompt in ("The try statement", "x"):
        ids = tok.encode(prompt).ids
        assert gen.generate_ids([ids], 40, ignore_eos=True)[0] == generate_ids(model, ids, 40)


def test_prompts_of_different_lengths_run_one_at_a_time(shared):
    gen = Generator.load(shared[0])
    prompts = ["The try statement", "A"]
    assert gen.generate(prompts, 8, ignore_eos=True) == [gen.generate(p, 8, ignore_eos=True) for p in prompts]
    with pytest.raises(ValueError, match="takes no padding"):
        next(gen.iter_ids([[1, 2], [3]], gen.make_config(4)))


def test_perplexity_is_the_same_as_the_concat_bundle(shared, hf_checkpoint, tmp_path):
    concat = tmp_path / "concat"
    export_bundle(hf_checkpoint("gpt2-like"), concat, ExportOptions(kv_cache="concat"))
    text = default_eval_text()
    a = evaluate(shared[0], text, max_tokens=600)
    b = evaluate(concat, text, max_tokens=600)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)


def test_shared_kv_refusals(hf_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="needs --graph fused"):
        export_bundle(hf_checkpoint("small-vocab"), tmp_path / "x", ExportOptions(graph="traced", kv_cache="shared"))
    assert not (tmp_path / "x").exists()


def test_a_prompt_can_continue_a_cache_in_chunks(shared):
    """Two multi-token steps of different lengths on an every-position-logits bundle: the second
    must not be handed the first one's (tokens, vocab) logits buffer."""
    out, _ = shared
    s = ModelSession(out)
    ids = np.arange(3, 23, dtype=np.int64)[None]
    chunks = s.start(1, slots=32)
    chunks.step(ids[:, :12], np.ones((1, 12), np.int64), np.arange(12)[None])
    a = chunks.step(ids[:, 12:], np.ones((1, 20), np.int64), np.arange(12, 20)[None]).copy()
    whole = s.start(1, slots=32)
    b = whole.step(ids, np.ones((1, 20), np.int64), np.arange(20)[None]).copy()
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_decode_steps_rebind_only_the_three_small_inputs(shared):
    """The per-step Python work: past buffers are bound once; each step binds ids, mask and positions."""
    out, _ = shared
    s = ModelSession(out)
    cache = s.start(1, slots=16)
    calls = []
    real = cache.binding.bind_ortvalue_input, cache.binding.bind_cpu_input
    cache.binding.bind_ortvalue_input = lambda name, v: (calls.append(name), real[0](name, v))
    cache.binding.bind_cpu_input = lambda name, v: (calls.append(name), real[1](name, v))
    x = np.arange(3, 7)[None]
    cache.step(x, np.ones_like(x), np.arange(4)[None])
    assert len(calls) == 2 * s.n_layer + 3 + 1  # + logits_to_keep, bound once like the past
    assert s.keeps_logits
    calls.clear()
    for t in range(4, 8):
        cache.step(np.asarray([[t]]), np.ones((1, t + 1), np.int64), np.asarray([[t]]))
    assert sorted(set(calls)) == ["attention_mask", "input_ids", "position_ids"] and len(calls) == 3 * 4


def test_prompt_cache_prefills_only_what_the_next_prompt_adds(trained_checkpoint, tmp_path):
    out = tmp_path / "shared"
    export_bundle(trained_checkpoint, out, ExportOptions(kv_cache="shared"))
    fresh, cached = Generator.load(out), Generator.load(out, prompt_cache=True)
    text = default_eval_text()[:4000]
    a = cached.encode(text[:300])[:40]
    first = cached.generate_ids([a], 12, ignore_eos=True)[0]
    assert cached.last_reused_tokens == 0 and first == fresh.generate_ids([a], 12, ignore_eos=True)[0]
    # a chat turn: the history (prompt + reply) and a new message. The cache holds the prompt and all
    # but the last reply token (that one was never fed back), so that is what is reused.
    b = a + first + cached.encode(text[300:600])[:15]
    second = cached.generate_ids([b], 10, ignore_eos=True)[0]
    assert cached.last_reused_tokens == len(a) + len(first) - 1
    assert second == fresh.generate_ids([b], 10, ignore_eos=True)[0]
    # a prompt that parts from the cache after 25 tokens rewinds to there
    c = a[:25] + cached.encode(text[2000:2400])[:20]
    assert cached.generate_ids([c], 8, ignore_eos=True)[0] == fresh.generate_ids([c], 8, ignore_eos=True)[0]
    assert cached.last_reused_tokens == 25
    # the same prompt again: everything but its last token comes from the cache; stopping a stream
    # early leaves the cache consistent with what was fed
    assert cached.generate_ids([c], 8, ignore_eos=True)[0] == fresh.generate_ids([c], 8, ignore_eos=True)[0]
    assert cached.last_reused_tokens == len(c) - 1
    text_a = text[:200]
    for i, _ in enumerate(cached.stream(text_a, 20, ignore_eos=True)):
        if i == 3:
            break
    assert cached.generate(text_a, 6, ignore_eos=True) == fresh.generate(text_a, 6, ignore_eos=True)
    assert cached.last_reused_tokens == len(cached.encode(text_a)) - 1
    # batches bypass the kept cache and leave it alone; clear_prompt_cache forgets it
    ta = cached.encode(text_a)
    cached.generate_ids([a, a], 4, ignore_eos=True)
    cached.generate_ids([ta], 2, ignore_eos=True)
    assert cached.last_reused_tokens == len(ta) - 1
    cached.clear_prompt_cache()
    cached.generate_ids([ta], 2, ignore_eos=True)
    assert cached.last_reused_tokens == 0


def test_prompt_cache_needs_a_shared_buffer(trained_bundle):
    with pytest.raises(ValueError, match="--kv-cache shared"):
        Generator.load(trained_bundle, prompt_cache=True)


def test_chat_command_keeps_the_history_as_ids_and_reuses_the_cache(trained_checkpoint, tmp_path):
    import re

    from click.testing import CliRunner

    from edgegpt.cli import main

    out = tmp_path / "shared"
    export_bundle(trained_checkpoint, out, ExportOptions(kv_cache="shared"))
    gen = Generator.load(out)
    system, lines = "Python reference:\n", ["The with statement\n", "A class definition\n", "The for loop\n"]
    res = CliRunner().invoke(main, ["chat", str(out), "--system", system, "--max-new-tokens", "6", "--stats"],
                             input="".join(lines))
    assert res.exit_code == 0, res.output
    stats = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) tokens of history, (\d+) reused", res.stderr)]
    # every later turn reuses the whole earlier history but, at most, its last reply token (not fed back
    # when a reply ends at --max-new-tokens; it is when the reply ends at eos)
    assert stats[0] == (len(gen.encode(system)) + len(gen.encode(lines[0])), 0) and len(stats) == 3
    for k in (1, 2):
        before = stats[k][0] - len(gen.encode(lines[k]))  # the history the last turn left
        assert before >= stats[k - 1][0] and stats[k][1] in (before - 1, before)
    # the first reply is what the runtime gives for the same ids (greedy)
    first = "".join(piece for piece, _ in gen.stream_ids(gen.encode(system) + gen.encode(lines[0]), 6))
    assert res.stdout.startswith(first + "\n")
