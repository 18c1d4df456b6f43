"""W4 and W5: prompts of held-out source code, and the peers' own prompt lookup beside edgegpt's."""

import pytest

from edgegpt.bench.bench import BenchConfig, resolve_workload, run_bench
from edgegpt.bench.workloads import QUOTE_TOKENS, WORKLOADS, Workload


def test_text_workloads_prompt_with_held_out_code(tokenizers_by_vocab):
    from edgegpt.corpus import builtin_pystdlib

    tok, held_out = tokenizers_by_vocab(1000), builtin_pystdlib(held_out=True)
    w4, w5 = (WORKLOADS[w].prompt_ids(1000, tok)[0] for w in ("W4", "W5"))
    assert len(w4) == len(w5) == 256 and w4 != w5
    assert tok.decode(w4[:64]) in held_out  # real, held-out text (not random ids)
    body = w5[:256 - QUOTE_TOKENS]
    assert w5[-QUOTE_TOKENS:] == body[:QUOTE_TOKENS]  # the prompt ends by starting its own passage again
    # the command's workload keeps its text (sizes given on the command line too)
    assert resolve_workload("w5", None, None, None).text == "quote"
    assert resolve_workload("W4", 64, 16, None).text == "continue"
    with pytest.raises(ValueError, match="needs the bundle's tokenizer"):
        WORKLOADS["W4"].prompt_ids(1000)


@pytest.mark.slow
def test_prompt_lookup_rows_for_edgegpt_llamacpp_and_transformers(hf_checkpoint, tmp_path):
    """--speculate lookup times edgegpt's lookup and the peers' own (llama-cpp-python's LlamaPromptLookupDecoding,
    transformers' prompt_lookup_num_tokens) in the same run; each gives its plain row's greedy tokens."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    import runpy

    from edgegpt.export.bundle import export_bundle
    from edgegpt.export.onnx_export import ExportOptions

    ckpt = hf_checkpoint("distil-like")
    export_bundle(ckpt, tmp_path / "shared", ExportOptions(kv_cache="shared"))
    gguf = tmp_path / "m-f32.gguf"
    runpy.run_path("scripts/peers/gguf_from_checkpoint.py")["write_f32"](ckpt, gguf)
    rep = run_bench(BenchConfig([str(tmp_path / "shared")], Workload("t", 64, 24, text="quote"), threads=1,
                                warmup=0, runs=1, gguf=(str(gguf),), baselines=("torch",), checkpoint=str(ckpt),
                                speculate="lookup"))
    rows = {r.label: r for r in rep.results}
    assert all(r.error is None and r.runs for r in rows.values()), {k: r.error for k, r in rows.items()}
    plain = {"edgegpt fp32 (shared)": "edgegpt fp32 (shared) +lookup",
             "llama.cpp m-f32": "llama.cpp m-f32 +LlamaPromptLookupDecoding(10)",
             "torch eager (transformers)": "torch eager (transformers) +prompt_lookup_num_tokens=10"}
    for a, b in plain.items():
        assert rows[a].tokens == rows[b].tokens and len(rows[b].tokens) == 24, (a, b)
