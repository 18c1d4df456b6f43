"""Checkpoint I/O in the HF GPT-2 layout: round trips, transformers interop, and every bad input."""

import json
import shutil

import pytest
import torch

from edgegpt.errors import CheckpointError, OutputExistsError
from edgegpt.model import load_checkpoint, load_model, save_checkpoint
from edgegpt.model.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")


def test_saved_checkpoint_loads_in_transformers_unchanged(hf_checkpoint, tmp_path):
    model, tok = load_checkpoint(hf_checkpoint("distil-like"))
    out = save_checkpoint(model, tok, tmp_path / "ck")
    assert not list(tmp_path.glob(".ck.tmp-*"))  # the temp dir was renamed into place
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("def f(x): return x")["input_ids"] == tok.encode("def f(x): return x").ids


@pytest.mark.parametrize("shape", ["mistral-like", "unscaled"])
def test_attention_scaling_options_round_trip_through_a_saved_checkpoint(hf_checkpoint, tmp_path, shape):
    """scale_attn_weights, scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn are read, kept and written
    back, so transformers' eager attention (the models' definition) computes our logits from our save."""
    src = hf_checkpoint(shape)
    model, tok = load_checkpoint(src)
    written = json.loads((save_checkpoint(model, tok, tmp_path / "ck") / "config.json").read_text())
    given = json.loads((src / "config.json").read_text())
    for key in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        assert written[key] == given[key]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ck", attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() < 1e-5


def test_pytorch_model_bin_and_vocab_merges_are_read(hf_checkpoint, tmp_path):
    src = hf_checkpoint("small-vocab")
    dst = tmp_path / "legacy"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    shutil.copy(src / "vocab.json", dst)
    shutil.copy(src / "merges.txt", dst)
    hf = transformers.GPT2LMHeadModel.from_pretrained(src)
    torch.save(hf.state_dict(), dst / "pytorch_model.bin")  # includes lm_head.weight and no prefix issue
    model = load_model(dst)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    ids = torch.arange(6).unsqueeze(0)
    with torch.no_grad():
        want = load_model(src)(ids)[0]
        assert torch.equal(model(ids)[0], want)
        # the pre-1.6 format, which torch cannot map: read whole
        torch.save(hf.state_dict(), dst / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        assert torch.equal(load_model(dst)(ids)[0], want)
    tok = load_tokenizer(dst)
    assert tok.encode("lambda x: x").ids == load_tokenizer(src).encode("lambda x: x").ids


def test_bare_gpt2model_keys_load(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = hf_checkpoint("small-vocab")
    dst = shutil.copytree(src, tmp_path / "bare")
    state = load_file(str(src / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(dst / "model.safetensors"))
    ids = torch.arange(6).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(load_model(dst)(ids)[0], load_model(src)(ids)[0])


def _broken(src, tmp_path, edit):
    dst = shutil.copytree(src, tmp_path / "broken")
    edit(dst)
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})),
     "LlamaForCausalLM"),
    (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 10), "cannot be read"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "n_layer": 5})),
     "do not match"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "n_embd": 34})),
     "divisible|shape"),
    (lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "activation_function": "swish"})), "not supported"),
])
def test_malformed_checkpoints_raise_one_clear_error(hf_checkpoint, tmp_path, edit, message):
    bad = _broken(hf_checkpoint("small-vocab"), tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)


def test_missing_dir_and_missing_tokenizer(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    bad = _broken(hf_checkpoint("small-vocab"), tmp_path, lambda d: [(d / f).unlink() for f in
                                                                    ("tokenizer.json", "vocab.json", "merges.txt")])
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(bad)


def test_save_refuses_existing_dir_without_overwrite(hf_checkpoint, tmp_path):
    model, tok = load_checkpoint(hf_checkpoint("small-vocab"))
    (tmp_path / "ck").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_checkpoint(model, tok, tmp_path / "ck")
    save_checkpoint(model, tok, tmp_path / "ck", overwrite=True)
    assert (tmp_path / "ck" / "model.safetensors").is_file()


def test_parameter_shapes_are_the_modules_own():
    from edgegpt.model.gpt import GPT, GPTConfig, parameter_shapes

    for cfg in (GPTConfig(vocab_size=50, n_positions=16, n_embd=12, n_layer=2, n_head=3),
                GPTConfig(vocab_size=7, n_positions=4, n_embd=8, n_layer=1, n_head=2, n_inner=20)):
        real = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items() if k != "lm_head.weight"}
        assert parameter_shapes(cfg) == real


@pytest.mark.parametrize("layout", ["sharded-safetensors", "sharded-bin", "fp16", "bf16"])
def test_hub_layouts_load_with_the_weights_they_hold(hf_checkpoint, tmp_path, layout):
    """Sharded checkpoints (model-00001-of-0000N + index, as save_pretrained writes models over its shard
    size) and fp16-stored weights load into the same model transformers builds from them."""
    src = hf_checkpoint("gpt2-like")
    hf = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
    if layout in ("fp16", "bf16"):
        hf = hf.to(torch.float16 if layout == "fp16" else torch.bfloat16)
    hf.save_pretrained(tmp_path / "c", max_shard_size="200KB" if layout.startswith("sharded") else "10GB",
                       safe_serialization=layout != "sharded-bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / "c" / name)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    if layout.startswith("sharded"):
        assert any(n.endswith(".index.json") for n in files) and sum("-of-" in n for n in files) > 1
    model = load_model(tmp_path / "c")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        want = hf.float()(ids).logits
        assert (want - model(ids)[0]).abs().max().item() < 1e-4
    from edgegpt.model.checkpoint import checkpoint_hash

    assert len(checkpoint_hash(tmp_path / "c")) == 64


def test_a_shard_index_pointing_outside_is_refused(hf_checkpoint, tmp_path):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_checkpoint("gpt2-like"))
    hf.save_pretrained(tmp_path / "c", max_shard_size="200KB")
    index = next((tmp_path / "c").glob("*.index.json"))
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="which is not a file of"):
        load_model(tmp_path / "c")
