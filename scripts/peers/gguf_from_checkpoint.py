"""Write a GPT-2 checkpoint (HF layout, ours or downloaded) as GGUF files for llama.cpp, so that
`edgegpt bench --gguf FILE` can time llama.cpp beside edgegpt bundles of the same weights.

    pip install gguf llama-cpp-python        # llama.cpp builds from source (~7 min on 2 cores)
    # on a CPU with AMX (recent Xeons), build without ggml's AMX kernels, which crash on q8_0 here:
    # CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF ..."
    python scripts/peers/gguf_from_checkpoint.py CHECKPOINT OUT_PREFIX [--types f32,q8_0,q4_0]

Writes OUT_PREFIX-f32.gguf, then the requested quantized types with llama.cpp's own quantizer.
Not a dependency of edgegpt: a benchmarking aid for developers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# llama.cpp ftypes (llama.h: LLAMA_FTYPE_MOSTLY_*); the k-quants want rows of a multiple of 256 values and
# llama.cpp's quantizer falls back to another type for tensors that are not (it says so)
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_K_S": 14, "q4_K_M": 15, "q5_K_S": 16, "q5_K_M": 17,
          "q6_K": 18}


def write_f32(checkpoint: Path, out: Path) -> None:
    import gguf

    from edgegpt.model.checkpoint import load_model

    model = load_model(checkpoint)
    cfg = model.config
    if not cfg.default_attn_scale:  # llama.cpp's gpt2 graph scales every layer's scores by 1/sqrt(head_dim)
        raise SystemExit(f"error: {checkpoint} scales attention otherwise (scale_attn_weights / "
                         f"scale_attn_by_inverse_layer_idx), which llama.cpp's gpt2 architecture cannot express")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(out), "gpt2")
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.inner_dim)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(FTYPES["f32"])

    tj = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for extra in tj.get("added_tokens", []):
        types[extra["id"]] = gguf.TokenType.CONTROL
    # The model's embedding may be larger than the trained vocabulary (W1 uses 50257 rows with a
    # smaller pydoc tokenizer): pad with unused tokens so llama.cpp sees n_vocab rows.
    for i in range(len(tokens), cfg.vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)

    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    per_layer = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(cfg.n_layer):
        for ours, theirs in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"transformer.h.{i}.{ours}.{kind}"] = f"blk.{i}.{theirs}.{kind}"
    for ours, theirs in names.items():
        # nn.Linear weights are (out, in): exactly ggml's row-major (ne0 = in) layout; the LM head is
        # tied, so no separate output.weight is written.
        w.add_tensor(theirs, np.ascontiguousarray(sd[ours]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {dst}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out_prefix")
    ap.add_argument("--types", default="f32,q8_0,q4_0", help=f"comma-separated, of {', '.join(FTYPES)}")
    args = ap.parse_args()
    unknown = sorted(set(args.types.split(",")) - set(FTYPES))
    if unknown:
        raise SystemExit(f"unknown --types {', '.join(unknown)}; choose from {', '.join(FTYPES)}")
    f32 = Path(f"{args.out_prefix}-f32.gguf")
    write_f32(args.checkpoint, f32)
    print(f32)
    for t in args.types.split(","):
        if t != "f32":
            dst = Path(f"{args.out_prefix}-{t}.gguf")
            quantize(f32, dst, FTYPES[t])
            print(dst)


if __name__ == "__main__":
    main()
