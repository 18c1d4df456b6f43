"""Mobile packages on models with odd shapes: the default precision of each mobile target succeeds, and the
package's own check compares the ORT-format model with the ONNX model it came from like with like."""

import pytest
import torch

from edgegpt.export.bundle import export_bundle
from edgegpt.export.onnx_export import ExportOptions
from edgegpt.package.bundle import package_bundle
from tests.conftest import make_hf_checkpoint


@pytest.fixture(scope="module")
def odd_traced(tokenizers_by_vocab, tmp_path_factory):
    """3 heads, vocab 777, 96 positions, attention weights scaled up 8x (peaked attention, near-tied logits).
    With this seed the int8-static graph's QDQ nodes fused into int8 kernels (onnxruntime's "all" level) give
    other greedy tokens than the unfused QDQ graph that an ORT-format model runs in onnxruntime's full build."""
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("odd")
    ckpt = make_hf_checkpoint(root / "ckpt", tokenizers_by_vocab(777), seed=1, n_layer=4, n_head=3, n_embd=192,
                              n_positions=96, vocab_size=777)
    model = GPT2LMHeadModel.from_pretrained(ckpt)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)
    model.save_pretrained(ckpt)
    out = root / "traced"
    export_bundle(ckpt, out, ExportOptions(graph="traced"))
    return out


@pytest.mark.parametrize("target", ["android", "ios"])
def test_default_mobile_package_succeeds_on_an_odd_model(odd_traced, target, tmp_path):
    m = package_bundle(odd_traced, target, tmp_path / target)
    v = m["package"]["verification"]
    assert v["greedy_identical"] and "basic" in v["reference"]
    assert m["package"]["precision"] == {"android": "int8-static", "ios": "fp16"}[target]
