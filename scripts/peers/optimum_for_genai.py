"""The graphs an onnxruntime-genai user gets for a GPT-2 checkpoint today, for `edgegpt bench --genai`.

onnxruntime-genai's model builder has no GPT-2 support, so its users export with Optimum and write the
genai_config.json by hand (model type "decoder": type "gpt2" does not load Optimum's input names). This script
does the same, offline, from a local checkpoint:

  fp32  optimum's `text-generation-with-past` export (concat KV cache: every step copies the past)
  int8  that graph through Optimum's ORTQuantizer, dynamic, per channel, avx512_vnni (Optimum's documented recipe)
  int4  that graph (its Gemm layers rewritten as MatMul + Add, which the quantizer needs) through onnxruntime's
        MatMulNBitsQuantizer: blocks of 128, symmetric, accuracy_level 4
        (the fastest 4-bit setting of onnxruntime's CPU kernel; the tied LM head stays fp32 because Optimum's
        head is a MatMul over a Transpose of the embedding, not over an initializer)

  python scripts/peers/optimum_for_genai.py CHECKPOINT OUT [--precisions fp32,int8,int4]

writes OUT-fp32/, OUT-int8/, OUT-int4/, each a directory `edgegpt bench --genai DIR` runs. Needs the `interop`
extra (optimum-onnx, onnxruntime-genai).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from edgegpt.atomic import atomic_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def genai_config(checkpoint: Path) -> dict:
    c = json.loads((checkpoint / "config.json").read_text())
    heads, width = c["n_head"], c["n_embd"]
    eos = c.get("eos_token_id", c["vocab_size"] - 1)
    return {
        "model": {
            "type": "decoder", "vocab_size": c["vocab_size"], "context_length": c["n_positions"],
            "bos_token_id": c.get("bos_token_id", eos), "eos_token_id": eos, "pad_token_id": eos,
            "decoder": {
                "filename": "model.onnx", "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": width, "num_attention_heads": heads, "num_key_value_heads": heads,
                "head_size": width // heads, "num_hidden_layers": c["n_layer"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": c["n_positions"], "min_length": 0,
                   "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0, "temperature": 1.0},
    }


def export_fp32(checkpoint: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint), output=str(out), task="text-generation-with-past", device="cpu")


def quantize_int8(src: Path, out: Path) -> None:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    q = ORTQuantizer.from_pretrained(str(src), file_name="model.onnx")
    q.quantize(AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True), save_dir=str(out),
               file_suffix=None)


def gemm_to_matmul(model) -> int:
    """Optimum writes GPT-2's Conv1D layers as Gemm, which MatMulNBitsQuantizer skips: rewrite each
    Gemm(x, W, b) over an initializer W as MatMul(x, W) + b, the same arithmetic. Returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, n = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        w = node.input[1]
        if attrs.get("transB", 0):
            t = numpy_helper.to_array(inits[w]).T.copy()
            inits[w].CopyFrom(numpy_helper.from_array(t, w))
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = out + "_matmul" if has_bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], w], [mm_out], name=node.name + "_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=node.name + "_Add"))
        n += 1
    del g.node[:]
    g.node.extend(nodes)
    if model.ByteSize() < 2**31:  # the checker takes protos under 2 GB only
        onnx.checker.check_model(model)
    return n


def quantize_int4(src: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src / "model.onnx"))
    print(f"   {gemm_to_matmul(model)} Gemm nodes rewritten as MatMul + Add")
    q = MatMulNBitsQuantizer(model, block_size=128, is_symmetric=True, accuracy_level=4)
    q.process()
    onnx.save_model(q.model.model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", help="prefix: writes OUT-fp32, OUT-int8, OUT-int4")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    a = ap.parse_args(argv)
    if not (a.checkpoint / "config.json").is_file():
        print(f"error: {a.checkpoint} is not a checkpoint (no config.json)", file=sys.stderr)
        return 2
    wanted = [p for p in a.precisions.split(",") if p]
    bad = [p for p in wanted if p not in ("fp32", "int8", "int4")]
    if bad:
        print(f"error: unknown precision {bad[0]!r}; choose from fp32, int8, int4", file=sys.stderr)
        return 2
    cfg = genai_config(a.checkpoint)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        print("note: without accelerate (pip install accelerate) Optimum stores the tied embedding and LM head "
              "twice: the fp32 file is ~30% larger (decode reads the same bytes either way)")
    todo = [p for p in wanted if not Path(f"{a.out}-{p}").exists()]
    for p in sorted(set(wanted) - set(todo)):
        print(f"== {a.out}-{p}: already there, left as it is")
    if not todo:
        return 0
    with tempfile.TemporaryDirectory(prefix="optimum-genai-") as tmp:
        fp32 = Path(tmp, "fp32")
        print("== optimum export (fp32)")
        export_fp32(a.checkpoint, fp32)
        for p in todo:
            print(f"== {p}")
            with atomic_dir(Path(f"{a.out}-{p}")) as stage:  # into place only when complete
                if p == "fp32":
                    shutil.copytree(fp32, stage, dirs_exist_ok=True)
                elif p == "int8":
                    quantize_int8(fp32, stage)
                else:
                    quantize_int4(fp32, stage)
                (stage / "genai_config.json").write_text(json.dumps(cfg, indent=2))
            print(f"wrote {a.out}-{p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
