"""edgegpt's GPT against transformers' GPT2LMHeadModel on the same weights: logits, cache, padding."""

import pytest
import torch

from edgegpt.model import load_model
from tests.conftest import SHAPES

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def _pair(hf_checkpoint, name):
    path = hf_checkpoint(name)
    # eager: transformers' SDPA path ignores scale_attn_weights and scale_attn_by_inverse_layer_idx
    # (huggingface/transformers#44380); the eager path is GPT-2's definition
    hf = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    return hf, load_model(path)


@pytest.mark.parametrize("name", list(SHAPES))
@torch.no_grad()
def test_prefill_and_cached_decode_match_transformers(hf_checkpoint, name):
    hf, ours = _pair(hf_checkpoint, name)
    V = ours.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 12), generator=g)

    ref = hf(ids[:, :8], use_cache=True)
    logits, present = ours(ids[:, :8])
    assert (ref.logits - logits).abs().max().item() < TOL

    past_hf = ref.past_key_values
    for t in range(8, 12):  # cached decode, one token at a time
        ref = hf(ids[:, t:t + 1], past_key_values=past_hf, use_cache=True)
        past_hf = ref.past_key_values
        logits, present = ours(ids[:, t:t + 1], present)
        assert (ref.logits - logits).abs().max().item() < TOL
    assert present[0][0].shape == (2, ours.config.n_head, 12, ours.config.head_dim)


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(hf_checkpoint):
    """The pitfall of is_causal=True with a cache: one query over a longer past must see all of it."""
    _, ours = _pair(hf_checkpoint, "odd-heads")
    ids = torch.randint(0, ours.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    full, _ = ours(ids)
    logits, past = ours(ids[:, :5])
    steps = [logits[:, -1]]
    for t in range(5, 20):
        logits, past = ours(ids[:, t:t + 1], past)
        steps.append(logits[:, -1])
    assert (torch.stack(steps[:-1], 1) - full[:, 4:19]).abs().max().item() < TOL


@torch.no_grad()
def test_left_padding_gives_the_same_logits_for_real_tokens(hf_checkpoint):
    _, ours = _pair(hf_checkpoint, "gpt2-like")
    V = ours.config.vocab_size
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(0, V, (1, 5), generator=g), torch.randint(0, V, (1, 9), generator=g)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    logits, past = ours(batch, attention_mask=mask)
    alone, past_alone = ours(short)
    assert (logits[0, 4:] - alone[0]).abs().max().item() < TOL
    # one cached decode step on the padded batch, too
    nxt = torch.tensor([[7], [7]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step, _ = ours(nxt, past, attention_mask=mask)
    step_alone, _ = ours(nxt[:1], past_alone)
    assert (step[0] - step_alone[0]).abs().max().item() < TOL


@torch.no_grad()
def test_greedy_tokens_and_text_match_transformers_generate(hf_checkpoint):
    from edgegpt.model.generate import generate_ids
    from edgegpt.model.tokenizer import load_tokenizer

    path = hf_checkpoint("gpt2-like")
    hf, ours = _pair(hf_checkpoint, "gpt2-like")
    tok = load_tokenizer(path)
    prompt = tok.encode("The with statement").ids
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    mine = generate_ids(ours, prompt, 16)
    assert mine == ref[0, len(prompt):].tolist()
    assert tok.decode(mine) == tok.decode(ref[0, len(prompt):].tolist())


def test_context_longer_than_n_positions_is_refused(hf_checkpoint):
    _, ours = _pair(hf_checkpoint, "small-vocab")
    with pytest.raises(ValueError, match="n_positions"):
        ours(torch.zeros(1, ours.config.n_positions + 1, dtype=torch.long))
