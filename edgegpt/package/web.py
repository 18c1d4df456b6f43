"""The web target: a package laid out as transformers.js (and its onnxruntime-web backend) loads models from the
Hugging Face Hub, so `AutoModelForCausalLM.from_pretrained(DIR, { dtype })` takes it with no options: config and
tokenizer files at the top, the graph under onnx/ named by transformers.js's dtype for its precision."""

from __future__ import annotations

from pathlib import Path

from edgegpt.errors import PackageError
from edgegpt.manifest import MODEL_FILE, sha256_file

ONNX_DIR = "onnx"
# edgegpt precision -> (transformers.js dtype, the file it loads for that dtype under onnx/)
DTYPES = {"fp32": ("fp32", "model.onnx"), "fp16": ("fp16", "model_fp16.onnx"),
          "int8": ("q8", "model_quantized.onnx"), "int4": ("q4", "model_q4.onnx")}


def web_layout(tmp: Path, precision: str) -> dict:
    """Move tmp's graph to onnx/<transformers.js name>, its quantized embedding lookup in standard ops; returns the
    manifest's package.web section."""
    if precision not in DTYPES:
        raise PackageError(f"transformers.js has no dtype for {precision}; choose one of {', '.join(DTYPES)}")
    import onnx

    dtype, name = DTYPES[precision]
    (tmp / ONNX_DIR).mkdir()
    dst = tmp / ONNX_DIR / name
    model = onnx.load(str(tmp / MODEL_FILE))
    embedding, bias = standard_embedding(model), attention_bias(model)
    onnx.save_model(model, str(dst))
    (tmp / MODEL_FILE).unlink()
    return {"layout": "transformers.js (Hugging Face Hub)", "dtype": dtype, "model_file": f"{ONNX_DIR}/{name}",
            "sha256": sha256_file(dst), "bytes": dst.stat().st_size, "embedding_in_standard_ops": embedding,
            "attention_bias": bias}


REWRITE_CHECK_STEPS, REWRITE_ATOL = 8, 1e-4  # export's fp32 parity tolerance


def concat_source(bundle: Path, manifest: dict, dst: Path) -> tuple[dict, dict]:
    """A sealed copy of an fp32 bundle with the shared KV buffer (the default export) in ``dst``, its graph rewritten
    to the concat layout that transformers.js drives (graph.kv_layout); returns its manifest and what the package
    records of the rewrite. The copy's logits are checked against the source's (export's fp32 tolerance) before
    anything is built from it."""
    import json
    import shutil

    from edgegpt import contract
    from edgegpt.graph import io as gio, passes as gp
    from edgegpt.graph.kv_layout import shared_to_concat
    from edgegpt.manifest import bundle_file, seal

    dst.mkdir()
    for name in manifest["files"]:  # copies: onnx refuses a data file with another hard link ("hardlink attack")
        if name != MODEL_FILE:
            shutil.copy2(bundle_file(bundle, name), dst / name)
    model = gio.load_graph(bundle_file(bundle, MODEL_FILE), load_external_data=False)
    layers = shared_to_concat(model)
    gio.write_streamed(model, dst / MODEL_FILE)
    genai = dst / "genai_config.json"
    if genai.is_file():
        cfg = json.loads(genai.read_text())
        cfg["search"]["past_present_share_buffer"] = False
        genai.write_text(json.dumps(cfg, indent=2) + "\n")
    options = dict(manifest["graph"]["options"], shared_kv_buffer=False, kv_capacity=None,
                   fused_attention="com.microsoft.MultiHeadAttention")
    io = json.loads(json.dumps(manifest["io"]))
    for x in io["inputs"] + io["outputs"]:
        if contract.is_kv(x["name"]):
            x["shape"][2] = contract.PAST if x["name"].startswith(contract.PAST_PREFIX) else contract.TOTAL
    m = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", "size_bytes")}
    m.update(io=io, graph=dict(manifest["graph"], options=options, op_counts=gp.op_counts(model)))
    sealed = seal(dst, m)
    diff = _max_logit_diff(bundle, dst)
    if not diff <= REWRITE_ATOL:
        raise PackageError(f"{bundle}'s graph rewritten to a growing KV cache is off by {diff:.2e} in its logits "
                           f"(tolerance {REWRITE_ATOL}); export with `--kv-cache concat` and package that")
    return sealed, {"from": "shared", "to": "concat", "layers": layers, "max_abs_logit_diff": float(diff),
                    "checked_steps": REWRITE_CHECK_STEPS}


def _max_logit_diff(a: Path, b: Path) -> float:
    """The largest |logit| difference between two bundles over a 16-token prompt and REWRITE_CHECK_STEPS greedy
    decode steps through each one's own cache (a's tokens fed to both)."""
    import numpy as np

    from edgegpt.runtime.session import ModelSession

    sessions = [ModelSession(p) for p in (a, b)]
    caches = [s.start(1, slots=16 + REWRITE_CHECK_STEPS) for s in sessions]
    ids = np.arange(1, 17, dtype=np.int64)[None] % sessions[0].vocab_size
    worst, n = 0.0, ids.shape[1]
    for step in range(REWRITE_CHECK_STEPS + 1):
        mask, pos = np.ones((1, n), np.int64), np.arange(n - ids.shape[1], n, dtype=np.int64)[None]
        la, lb = (c.step(ids, mask, pos).copy() for c in caches)
        worst = max(worst, float(np.abs(la - lb).max()))
        ids, n = la.argmax(-1)[:, None].astype(np.int64), n + 1
    return worst


def attention_bias(model) -> int:
    """Each MultiHeadAttention that masks by key_padding_mask and unidirectional=1 gets the same mask as one
    additive attention_bias (B, 1, S, T) built once from attention_mask; returns how many were rewritten.
    onnxruntime-web's WebGPU MultiHeadAttention implements neither ("input `key_padding_mask` not implemented for
    webgpu"; a unidirectional one is refused), its WASM one runs both forms alike. Key j is seen from query i iff
    attention_mask[b, j] and j - i <= T - S: causal by absolute position, bottom-right aligned, as before."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgegpt import contract
    from edgegpt.graph.passes import topological_sort

    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and len(n.input) > 4 and n.input[4]]
    if not mha:
        return 0
    # the bias is in the attention's own type: that of its qkv bias weight (fp16 in an fp16 graph whose cache is fp32)
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
    kind = types.get(mha[0].input[3]) or types.get(contract.PAST_KEY.format(0))
    if kind not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise PackageError("the web package needs float attention: package the fp32 bundle")
    p, f = "/model/attention_bias", helper.tensor_dtype_to_np_dtype(kind)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(v, t), p + n) for n, v, t in (
        ("/zero", 0, np.int64), ("/one", 1, np.int64), ("/axis0", [0], np.int64), ("/axis1", [1], np.int64),
        ("/axes01", [0, 1], np.int64), ("/axes12", [1, 2], np.int64), ("/open", 0, f), ("/closed", -10000, f))])
    mk = helper.make_node
    nodes = [mk("Shape", [contract.INPUT_IDS], [p + "/ids_shape"], name=p + "/ShapeIds"),
             mk("Gather", [p + "/ids_shape", p + "/one"], [p + "/S"], name=p + "/GatherS", axis=0),
             mk("Shape", [contract.ATTENTION_MASK], [p + "/mask_shape"], name=p + "/ShapeMask"),
             mk("Gather", [p + "/mask_shape", p + "/one"], [p + "/T"], name=p + "/GatherT", axis=0),
             mk("Range", [p + "/zero", p + "/S", p + "/one"], [p + "/i"], name=p + "/RangeI"),
             mk("Range", [p + "/zero", p + "/T", p + "/one"], [p + "/j"], name=p + "/RangeJ"),
             mk("Unsqueeze", [p + "/i", p + "/axis1"], [p + "/i_col"], name=p + "/UnsqueezeI"),
             mk("Unsqueeze", [p + "/j", p + "/axis0"], [p + "/j_row"], name=p + "/UnsqueezeJ"),
             mk("Sub", [p + "/j_row", p + "/i_col"], [p + "/j_minus_i"], name=p + "/SubJI"),
             mk("Sub", [p + "/T", p + "/S"], [p + "/past"], name=p + "/SubTS"),
             mk("LessOrEqual", [p + "/j_minus_i", p + "/past"], [p + "/causal"], name=p + "/Causal"),
             mk("Unsqueeze", [p + "/causal", p + "/axes01"], [p + "/causal4"], name=p + "/UnsqueezeCausal"),
             mk("Cast", [contract.ATTENTION_MASK], [p + "/kept"], name=p + "/CastMask", to=TensorProto.BOOL),
             mk("Unsqueeze", [p + "/kept", p + "/axes12"], [p + "/kept4"], name=p + "/UnsqueezeMask"),
             mk("And", [p + "/causal4", p + "/kept4"], [p + "/seen"], name=p + "/And"),
             mk("Where", [p + "/seen", p + "/open", p + "/closed"], [p + "/bias"], name=p + "/Where")]
    model.graph.node.extend(nodes)
    for n in mha:
        while len(n.input) < 6:
            n.input.append("")
        n.input[4], n.input[5] = "", p + "/bias"
        kept = [a for a in n.attribute if a.name != "unidirectional"]
        del n.attribute[:]
        n.attribute.extend(kept)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    live = [n for n in model.graph.node if any(o in used for o in n.output)]  # drops the old mask's Cast
    del model.graph.node[:]
    model.graph.node.extend(live)
    topological_sort(model)
    return len(mha)


def standard_embedding(model) -> bool:
    """GatherBlockQuantized (8-bit) -> Gather, Cast, Sub, Mul over the same bytes, in place; False if the graph has
    none. onnxruntime-web's WASM backend has no GatherBlockQuantized kernel ("Could not find an implementation");
    the rows come out the same, (q - zero point) * scale, from standard ops every backend runs."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from edgegpt.graph.passes import replace_node

    node = next((n for n in model.graph.node if n.op_type == "GatherBlockQuantized"), None)
    if node is None:
        return False
    attrs = {a.name: a.i for a in node.attribute}
    inits = {t.name: t for t in model.graph.initializer}
    data, ids, scales = node.input[0], node.input[1], node.input[2]
    zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if attrs.get("bits", 4) != 8 or zp is None or attrs.get("gather_axis", 0) != 0 or data not in inits:
        raise PackageError("the web package needs an 8-bit or fp32 embedding table (onnxruntime-web runs no 4-bit "
                           "gather): package the fp32 bundle with the default --embedding, or quantize with "
                           "--embedding int8")
    rank = len(inits[data].dims)
    out, p = node.output[0], node.name
    nodes = [helper.make_node("Gather", [data, ids], [p + "/q"], name=p + "/Gather", axis=0),
             helper.make_node("Cast", [p + "/q"], [p + "/qf"], name=p + "/Cast", to=onnx.TensorProto.FLOAT),
             helper.make_node("Gather", [zp, ids], [p + "/zp"], name=p + "/GatherZeroPoint", axis=0),
             helper.make_node("Cast", [p + "/zp"], [p + "/zpf"], name=p + "/CastZeroPoint", to=onnx.TensorProto.FLOAT),
             helper.make_node("Gather", [scales, ids], [p + "/s"], name=p + "/GatherScale", axis=0)]
    centered, scale = p + "/centered", p + "/s"
    if rank == 3:  # the head's (vocab, blocks, block) bytes; scales and zero points (vocab, blocks, 1)
        nodes += [helper.make_node("Sub", [p + "/qf", p + "/zpf"], [centered], name=p + "/Sub"),
                  helper.make_node("Mul", [centered, scale], [out], name=p + "/Mul")]
    else:  # a (vocab, n_embd) copy with (vocab, n_embd / block) scales: rows to blocks and back
        width, block = inits[data].dims[1], attrs["block_size"]
        n_ids = next((len(i.type.tensor_type.shape.dim) for i in model.graph.input if i.name == ids), 2)
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([0] * n_ids + [width // block, block], np.int64), p + "/blocks_shape"),
            numpy_helper.from_array(np.array([0] * n_ids + [width], np.int64), p + "/rows_shape"),
            numpy_helper.from_array(np.array([-1], np.int64), p + "/last")])
        nodes += [helper.make_node("Reshape", [p + "/qf", p + "/blocks_shape"], [p + "/qb"], name=p + "/Blocks"),
                  helper.make_node("Unsqueeze", [p + "/zpf", p + "/last"], [p + "/zpb"], name=p + "/ZeroPointBlocks"),
                  helper.make_node("Unsqueeze", [p + "/s", p + "/last"], [p + "/sb"], name=p + "/ScaleBlocks"),
                  helper.make_node("Sub", [p + "/qb", p + "/zpb"], [centered], name=p + "/Sub"),
                  helper.make_node("Mul", [centered, p + "/sb"], [p + "/rows"], name=p + "/Mul"),
                  helper.make_node("Reshape", [p + "/rows", p + "/rows_shape"], [out], name=p + "/Rows")]
    replace_node(model, node, nodes)
    return True


def readme(m: dict) -> str:
    w = m["package"]["web"]
    return (f"edgegpt package for the web ({m['package']['precision']}): transformers.js loads it as it loads a Hub "
            f"model.\n\n  const model = await AutoModelForCausalLM.from_pretrained(URL_OR_DIR, {{ dtype: "
            f"\"{w['dtype']}\" }});\n  const tokenizer = await AutoTokenizer.from_pretrained(URL_OR_DIR);\n\n"
            f"Files: config.json, generation_config.json, tokenizer.json, tokenizer_config.json, "
            f"special_tokens_map.json, {w['model_file']} (sha256 in edgegpt.json).\n")
