"""Precision recipes: one small registered class each, with its options, CLI name and quality budget.

Every recipe reads the fp32 bundle's graph and writes a new graph with onnxruntime's own tooling:

    int8         quantize_dynamic: per-channel int8 weights of the block MatMuls, int8 activations
                 quantized at run time (MatMulConstBOnly, so attention's activation x activation
                 MatMuls stay fp32); the tied LM head optionally as an 8-bit MatMulNBits.
    int4         MatMulNBits: weight-only 4-bit blocks (block_size 128 with zero points, chosen by GPTQ on
                 calibration text, accuracy_level 4), LM head 8-bit by default (most of GPT-2's 4-bit error
                 lives in the tied embedding / head).
    fp16         float16 weights, compute and KV cache for GPU / mobile targets; LayerNormalization,
                 Softmax and the logits stay float32 (fp16 overflow: onnxruntime#6328, #11384).
    int8-static  QDQ static quantization calibrated on the user's text, for NNAPI / QNN / XNNPACK.
    fp32         the weights as they are, for --kv-cache int8, or with --lm-head screened (an 8-bit head
                 that recomputes the possible greedy picks in fp32: quantize/screen.py).
"""

from __future__ import annotations

import logging
import platform
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegpt import contract
from edgegpt.errors import QuantizeError
from edgegpt.export.graph import load_graph

log = logging.getLogger(__name__)

RECIPES: dict[str, type["Recipe"]] = {}


def register(cls):
    RECIPES[cls.name] = cls
    return cls


def cpu_flags() -> set[str]:
    """x86 ISA extensions from /proc/cpuinfo (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def untie_lm_head(model: onnx.ModelProto) -> Optional[str]:
    """Gemm(x, wte, transB=1) -> MatMul(x, wte^T) with its own initializer, so weight-only
    quantizers (which take MatMul with a constant B) can quantize the head while the embedding
    Gather keeps the original table. Returns the new MatMul's name."""
    inits = {t.name: t for t in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Gemm" and node.input[1] in inits and any(a.name == "transB" and a.i for a in node.attribute):
            w = numpy_helper.to_array(inits[node.input[1]])
            name = "lm_head.weight_t"  # (n_embd, vocab)
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
            mm = helper.make_node("MatMul", [node.input[0], name], list(node.output), name="/lm_head/MatMul")
            model.graph.node.remove(node)
            model.graph.node.insert(i, mm)
            return mm.name
    return None


@dataclass
class Recipe(ABC):
    name: ClassVar[str]
    budget_pct: ClassVar[float]  # default max perplexity increase over fp32, percent
    kv_dtype: ClassVar[str] = "float32"
    targets: ClassVar[str] = "cpu"

    @abstractmethod
    def apply(self, src: Path, dst: Path, *, calibration: Optional[str] = None) -> dict:
        """Write the quantized graph to dst (model.onnx); return the recipe's manifest section."""

    def describe(self) -> dict:
        return {"name": self.name, **{k: v for k, v in self.__dict__.items()}}


@register
@dataclass
class Int8(Recipe):
    name: ClassVar[str] = "int8"
    budget_pct: ClassVar[float] = 1.0
    per_channel: bool = True
    lm_head: str = "int8"  # fp32 | int8
    embedding: str = "auto"  # auto (int8 with a quantized head, else fp32) | fp32 | int8 | int4

    def apply(self, src, dst, *, calibration=None):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        _check_choice("lm_head", self.lm_head, ("fp32", "int8"))
        embedding = _check_embedding(self.embedding, self.lm_head)
        flags = cpu_flags()
        # Without VNNI, x86 u8s8 kernels use VPMADDUBSW which saturates; reduce_range (7-bit weights)
        # avoids it at a small accuracy cost (onnxruntime#6004).
        reduce_range = platform.machine() in ("x86_64", "AMD64") and not (flags & {"avx512_vnni", "avx_vnni"})
        model, head = _load_untied(src)
        block_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and _const_b(model, n)
                         and n.name != head]
        _quiet_root()  # quantize_dynamic logs a generic "consider pre-processing" warning on the root logger
        quantize_dynamic(model, str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=block_matmuls,
                         per_channel=self.per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         # DefaultTensorType: onnx's shape inference cannot see through contrib ops
                         # (MultiHeadAttention, SkipLayerNormalization) of the fused graph
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        _finish_head(dst, head, self.lm_head, block_size=HEAD_BLOCK, accuracy_level=4)
        quantize_embedding(dst, embedding)
        return {**self.describe(), "embedding": embedding, "reduce_range": reduce_range, "quantized_matmuls": len(block_matmuls),
                "cpu_vnni": bool(flags & {"avx512_vnni", "avx_vnni"})}


@register
@dataclass
class Int4(Recipe):
    name: ClassVar[str] = "int4"
    budget_pct: ClassVar[float] = 4.0
    # GPTQ in blocks of 128 with a zero point per block. On a trained 4x256 model the KL to fp32 is
    # 0.0125, against 0.0237 for round-to-nearest in blocks of 64 (the previous default) and 0.0320 in
    # blocks of 128; and blocks of 128 are the faster kernel: W1 decode 1.11x and TTFT 0.79x those of
    # round-to-nearest 64 (GPT-2 small shape, same run). Quantizing GPT-2 small takes ~2 min instead of ~50 s.
    block_size: int = 128
    accuracy_level: int = 4  # int8 activations in the dot product: 2.3x faster decode (onnxruntime/mobius#402)
    symmetric: bool = False
    lm_head: str = "int8"  # fp32 | int8 | int4
    embedding: str = "auto"  # auto (int8 with a quantized head, else fp32) | fp32 | int8 | int4
    algorithm: str = "gptq"  # gptq (rounding error corrected on calibration text) | rtn (round to nearest)

    def apply(self, src, dst, *, calibration=None):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        _check_choice("lm_head", self.lm_head, ("fp32", "int8", "int4"))
        _check_choice("algorithm", self.algorithm, ("rtn", "gptq"))
        embedding = _check_embedding(self.embedding, self.lm_head)
        _check_choice("block_size", self.block_size, (16, 32, 64, 128, 256))
        _check_choice("accuracy_level", self.accuracy_level, (0, 1, 2, 3, 4))
        model, head = _load_untied(src)
        info = {}
        if self.algorithm == "gptq":
            info = _gptq(model, head, Path(src).parent, self, calibration)
        else:
            q = MatMulNBitsQuantizer(model, bits=4, block_size=self.block_size, is_symmetric=self.symmetric,
                                     accuracy_level=self.accuracy_level or None,
                                     nodes_to_exclude=[] if self.lm_head == "int4" else [head])
            q.process()
            model = q.model.model
        onnx.save_model(model, str(dst))
        _finish_head(dst, head, "int4-done" if self.lm_head == "int4" else self.lm_head,
                     block_size=HEAD_BLOCK, accuracy_level=self.accuracy_level)
        quantize_embedding(dst, embedding)
        return {**self.describe(), "embedding": embedding, **info}


# Calibration for GPTQ: windows of 128 tokens. KL to fp32 on the trained 4x256 model with 16 / 32 / 64 / 128
# windows: 0.0148 / 0.0139 / 0.0137 / 0.0125 (GPT-2 small shape: 0.00425 at 32, 0.00355 at 128); each doubling
# adds ~12 s to quantizing GPT-2 small.
GPTQ_WINDOWS = 128


def _calibration_feeds(bundle: Path, text: str, *, windows: int, window: int) -> list[dict]:
    """Prefill feeds for the fp32 ``bundle``'s graph (either KV layout) over calibration windows of
    ``text`` (evaluate.calibration_windows)."""
    from edgegpt.quantize.evaluate import calibration_windows
    from edgegpt.runtime.session import ModelSession

    sess = ModelSession(bundle)
    chunks = calibration_windows(bundle, text, windows=windows, window=window, max_context=sess.max_context)
    empty = sess.empty_past_numpy(1, slots=len(chunks[0]))
    return [{contract.INPUT_IDS: c[None], contract.ATTENTION_MASK: np.ones((1, len(c)), np.int64),
             contract.POSITION_IDS: np.arange(len(c), dtype=np.int64)[None],
             **{n: empty for n in contract.past_names(sess.n_layer)}} for c in chunks]


def _gptq(model: onnx.ModelProto, head: Optional[str], bundle: Path, recipe: "Int4",
          calibration: Optional[str]) -> dict:
    """The body's MatMuls (and the head with --lm-head int4) as GPTQ-chosen 4-bit blocks, in place."""
    from edgegpt.quantize.gptq import gptq_model
    from edgegpt.quantize.evaluate import calibration_text

    feeds = _calibration_feeds(bundle, calibration_text(calibration), windows=GPTQ_WINDOWS, window=128)
    tokens = sum(f[contract.INPUT_IDS].size for f in feeds)
    done = gptq_model(model, feeds, block_size=recipe.block_size, symmetric=recipe.symmetric,
                      accuracy_level=recipe.accuracy_level, exclude=None if recipe.lm_head == "int4" else {head})
    return {"calibration_tokens": tokens, "gptq_matmuls": done,
            "calibration_text": "user text" if calibration else "builtin:pydoc (training part)"}


@register
@dataclass
class Fp32(Recipe):
    """fp32 weights, for two things: ``--kv-cache int8``, which then stores the cache of an fp32 model
    in int8 (llama.cpp's f32 models keep an f16 cache for the same reason); and ``--lm-head
    screened``, which reads an 8-bit copy of the tied head and recomputes in fp32 every token that
    could be the greedy pick (quantize/screen.py): the fp32 bundle's greedy tokens, ~25% fewer bytes
    a decode step."""

    name: ClassVar[str] = "fp32"
    budget_pct: ClassVar[float] = 1.0
    lm_head: str = "fp32"  # fp32 | screened

    def apply(self, src, dst, *, calibration=None):
        _check_choice("lm_head", self.lm_head, ("fp32", "screened"))
        if self.lm_head == "fp32":
            shutil.copyfile(src, dst)
            return self.describe()
        from edgegpt.quantize.screen import screen_lm_head

        model = load_graph(src)
        info = screen_lm_head(model)
        onnx.save_model(model, str(dst))
        return {**self.describe(), **info}


@register
@dataclass
class Fp16(Recipe):
    name: ClassVar[str] = "fp16"
    budget_pct: ClassVar[float] = 1.0
    kv_dtype: ClassVar[str] = "float16"
    targets: ClassVar[str] = "cuda, coreml, dml (fp16 on a CPU is slower than fp32: onnxruntime#9892)"

    def apply(self, src, dst, *, calibration=None):
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        from onnxruntime.transformers.float16 import convert_float_to_float16

        from edgegpt.export.graph import topological_sort

        model = load_graph(src)
        # The converter places its Casts by the types in value_info; onnx's own shape inference stops at
        # contrib ops, so without this a tensor feeding both a blocked LayerNormalization and an fp16 Add
        # gets no Cast and the graph is mistyped.
        try:
            model = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
        except Exception as e:  # noqa: BLE001 - the converter still works on graphs it can type itself
            log.debug("symbolic shape inference failed (%s); converting without it", e)
        # logits stay fp32 (sampling and perplexity want them); the KV cache goes fp16.
        keep = [contract.LOGITS]
        blocked = ["LayerNormalization", "Softmax"]
        model = convert_float_to_float16(model, keep_io_types=keep, op_block_list=blocked)
        _unique_node_names(model)
        topological_sort(model)
        onnx.save_model(model, str(dst))
        return {**self.describe(), "fp32_ops": blocked, "fp32_io": keep}


@register
@dataclass
class Int8Static(Recipe):
    name: ClassVar[str] = "int8-static"
    budget_pct: ClassVar[float] = 5.0
    targets: ClassVar[str] = "nnapi, qnn, xnnpack (accelerators that need static quantization)"
    per_channel: bool = True
    calibration_windows: int = 16
    window: int = 128

    def apply(self, src, dst, *, calibration=None):
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        if not calibration:
            raise QuantizeError("int8-static needs calibration text: pass --calibration PATH (text like your prompts)")
        feeds = _calibration_feeds(Path(src).parent, calibration, windows=self.calibration_windows, window=self.window)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(feeds)

            def get_next(self):
                return next(self.feeds, None)

        model, head = _load_untied(src)
        weights = [n.name for n in model.graph.node if n.op_type == "MatMul" and _const_b(model, n)]
        _quiet_root()
        untied = Path(dst).with_name("untied.onnx")
        onnx.save_model(model, str(untied))
        try:
            quantize_static(str(untied), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                            nodes_to_quantize=weights, per_channel=self.per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            untied.unlink(missing_ok=True)
        return {**self.describe(), "calibration_tokens": sum(f[contract.INPUT_IDS].size for f in feeds),
                "calibration_windows": len(feeds),
                "quantized_matmuls": len(weights), "format": "QDQ", "activations": "uint8", "weights": "int8"}


def _quiet_root() -> None:
    class _DropPreprocessHint(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    if not any(isinstance(f, _DropPreprocessHint) for f in root.filters):
        root.addFilter(_DropPreprocessHint())


def _check_embedding(embedding: str, lm_head: str) -> str:
    """The embedding precision to use: auto is int8 (GatherBlockQuantized) once the head has its own
    quantized weights, fp32 when the fp32 head still reads the shared table."""
    _check_choice("embedding", embedding, ("auto", "fp32", "int8", "int4"))
    if embedding == "auto":
        return "fp32" if lm_head == "fp32" else "int8"
    if embedding != "fp32" and lm_head == "fp32":
        raise QuantizeError("a quantized embedding needs a quantized LM head (the fp32 head reads the embedding "
                            "table itself): pass --lm-head int8 or --embedding fp32")
    return embedding


EMBEDDING_BLOCK = 32


def quantize_embedding(path: Path, mode: str) -> None:
    """Replace the token-embedding Gather with GatherBlockQuantized over a blocked int8 / int4 copy
    of the table (symmetric, one fp32 scale per 32 values along the embedding axis), in place.

    A decode step reads one row of this table, so this is about size and memory (GPT-2 small's
    fp32 table is 154 MB, 44% of an int4 bundle), not speed. Only valid once the LM head has its
    own weights (untied), which is checked by the caller.
    """
    if mode == "fp32":
        return
    bits = 8 if mode == "int8" else 4
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and n.input[0].endswith("transformer.wte.weight")), None)
    if gather is None:
        raise QuantizeError("found no token-embedding Gather on transformer.wte.weight to quantize")
    if any(gather.input[0] in n.input for n in model.graph.node if n is not gather):
        raise QuantizeError("the embedding table is still read by the LM head; untie the head first (--lm-head int8)")
    w = numpy_helper.to_array(inits[gather.input[0]]).astype(np.float32)
    V, C = w.shape
    if C % EMBEDDING_BLOCK:
        raise QuantizeError(f"n_embd={C} is not a multiple of {EMBEDDING_BLOCK}; pass --embedding fp32")
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(V, C // EMBEDDING_BLOCK, EMBEDDING_BLOCK)
    scale = np.maximum(np.abs(blocks).max(-1), 1e-12) / qmax  # (V, C / block)
    q = np.clip(np.round(blocks / scale[..., None]), -qmax - 1, qmax).astype(np.int16).reshape(V, C)
    name = gather.input[0]
    if bits == 8:  # uint8 with an explicit zero point of 128
        data = (q + 128).astype(np.uint8)
        extra = [numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), name + ".zero_point")]
    else:  # two 4-bit values per byte, low nibble first; the default zero point is 8
        u = (q + 8).astype(np.uint8)
        data = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
        extra = []
    model.graph.initializer.remove(inits[name])
    model.graph.initializer.extend([numpy_helper.from_array(data, name + ".q"),
                                    numpy_helper.from_array(scale.astype(np.float32), name + ".scale"), *extra])
    inputs = [name + ".q", gather.input[1], name + ".scale"] + ([name + ".zero_point"] if extra else [])
    node = helper.make_node("GatherBlockQuantized", inputs, list(gather.output), name=gather.name + "BlockQuantized",
                            domain="com.microsoft", block_size=EMBEDDING_BLOCK, gather_axis=0, quantize_axis=1,
                            bits=bits)
    idx = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(idx, node)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(path))


def _const_b(model: onnx.ModelProto, node) -> bool:
    return node.input[1] in {t.name for t in model.graph.initializer}


def _unique_node_names(model: onnx.ModelProto) -> None:
    """The fp16 converter names its Cast nodes after the tensor they cast, so a tensor feeding two
    blocked (fp32) nodes gets two identical Casts (same name, same output), which onnxruntime
    rejects. Drop the repeats, then make any remaining duplicate node names unique."""
    casts = set()
    for node in list(model.graph.node):
        if node.op_type == "Cast":
            key = (tuple(node.input), tuple(node.output), node.attribute[0].i)
            if key in casts:
                model.graph.node.remove(node)
            casts.add(key)
    seen: dict[str, int] = {}
    for node in model.graph.node:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0


def _check_choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise QuantizeError(f"{name} must be one of {', '.join(map(str, valid))}, got {value}")


def _load_untied(src: Path) -> tuple[onnx.ModelProto, Optional[str]]:
    """The graph with its LM head as a MatMul of its own. onnxruntime's quantizers rewrite a
    Gemm(transB=1) into a MatMul by transposing its weight in place, which corrupts the embedding
    Gather that shares it; untying first keeps the embedding intact."""
    model = load_graph(src)
    return model, untie_lm_head(model)


# The 8-bit LM head (int8 and int4 recipes) in blocks of 128: KL to fp32 unchanged from block 32
# (0.00158 vs 0.00155, trained 4x256 model); W1 decode 1.10-1.12x and 34 MB less RSS for int8 on the
# GPT-2 small shape; the 768 x 50257 head alone runs 1.30 ms vs 1.38 (block 64) and 1.55 (block 256).
HEAD_BLOCK = 128


def _finish_head(path: Path, head: Optional[str], mode: str, *, block_size: int, accuracy_level: int) -> None:
    """The untied head: 8-bit MatMulNBits (int8), or tied back to the embedding (fp32)."""
    if head is None or mode == "int4-done":
        return
    model = onnx.load(str(path))
    if mode == "fp32":
        from edgegpt.export.graph import tie_lm_head

        wte = next(t.name for t in model.graph.initializer if t.name.endswith("transformer.wte.weight"))
        tie_lm_head(model, wte)
        onnx.save_model(model, str(path))
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level or None, nodes_to_include=[head])
    q.process()
    onnx.save_model(q.model.model, str(path))
