"""Mobile packages, with onnxruntime's own tools: ORT-format conversion with the
required-operators config a reduced build needs, the NNAPI / CoreML usability check, XNNPACK
coverage, QNN's offline HTP compile, and the static graphs (static.py) for providers that need static shapes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx

from edgegpt.errors import PackageError
from edgegpt.graph.io import load_graph
from edgegpt.manifest import MODEL_FILE

log = logging.getLogger(__name__)

# Operators the XNNPACK execution provider implements (onnxruntime docs, Xnnpack-ExecutionProvider:
# "Supported ops"). onnxruntime ships no usability checker for XNNPACK, so coverage is counted by
# op type against this list; shape limits are not checked.
XNNPACK_OPS = {"AveragePool", "Conv", "ConvTranspose", "Gemm", "MatMul", "MaxPool", "Softmax", "Resize",
               "QLinearConv", "QLinearAveragePool", "QLinearSoftmax", "QLinearConvTranspose", "QuantizeLinear",
               "DequantizeLinear"}


@dataclass
class Coverage:
    provider: str
    nodes: int
    supported: int
    partitions: int
    unsupported_ops: list[str]
    dynamic_shape_nodes: int
    suitability: str

    def as_dict(self) -> dict:
        return dict(self.__dict__, supported_pct=round(100 * self.supported / max(1, self.nodes), 1))


def _shaped(path: Path) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(load_graph(path))


def ep_coverage(path: Path, *, fixed: bool) -> list[Coverage]:
    """How much of the graph NNAPI, CoreML (ML Program) and XNNPACK could take."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    model = _shaped(path)
    out = []
    for name, info in (("nnapi", uc.check_nnapi_partitions(model, require_fixed_input_sizes=True)),
                       ("coreml", uc.check_coreml_partitions(model, require_fixed_input_sizes=True,
                                                              config_filename="coreml_supported_mlprogram_ops.md"))):
        out.append(Coverage(name, info.num_nodes, info.num_supported_nodes, info.num_partitions,
                            sorted(info.unsupported_ops), info.nodes_unsupported_due_to_dynamic_input,
                            info.suitability().name))
    nodes = list(model.graph.node)
    ok = [n for n in nodes if n.op_type in XNNPACK_OPS and n.domain in ("", "ai.onnx")]
    out.append(Coverage("xnnpack", len(nodes), len(ok), _runs(nodes, {id(n) for n in ok}),
                        sorted({n.op_type for n in nodes} - XNNPACK_OPS), 0,
                        "YES" if len(ok) > 0.75 * len(nodes) else "NO"))
    return out


# Qualcomm's HTP (Hexagon NPU) compiled offline, as QNN's tools do on a desktop: onnxruntime-qnn's HTP backend
# runs on x86-64 Linux and writes a context binary for a given chip without the device. SM8550 (Snapdragon 8
# Gen 2, HTP v73) stands for a current phone.
QNN_CHIP = {"soc_model": "57", "htp_arch": "73"}
_qnn_registered = False


def qnn_coverage(path: Path) -> Optional[Coverage]:
    """How much of ``path`` QNN's HTP backend compiles (the nodes inside its EPContext nodes), or None when
    onnxruntime-qnn is not installed. Partitions: the EPContext nodes; what is left runs on the CPU EP."""
    global _qnn_registered
    try:
        import onnxruntime as ort
        import onnxruntime_qnn as qnn
    except ImportError:
        return None
    if not _qnn_registered:
        ort.register_execution_provider_library(qnn.EP_NAME, qnn.get_library_path())
        _qnn_registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == qnn.EP_NAME]
    nodes = len(load_graph(path, load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory(prefix="edgegpt-qnn-") as work:
        ctx = Path(work) / "ctx.onnx"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for k, v in (("ep.context_enable", "1"), ("ep.context_file_path", str(ctx)), ("ep.context_embed_mode", "0")):
            so.add_session_config_entry(k, v)
        so.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path(), **QNN_CHIP})
        try:
            with _native_output_silenced():  # the QNN libraries print their own notices
                ort.InferenceSession(str(path), so)
            left = list(load_graph(ctx, load_external_data=False).graph.node) if ctx.exists() else None
        except Exception as e:  # onnxruntime / QNN raise their own exception types per failure
            log.warning("QNN's HTP compiler failed on %s: %s", path.name, str(e).splitlines()[0][:200])
            left = None
    if left is None:
        return Coverage("qnn-htp", nodes, 0, 0, ["(the HTP compiler failed)"], 0, "NO")
    on_cpu = [n for n in left if n.op_type != "EPContext"]
    parts = len(left) - len(on_cpu)
    inits = {t.name for t in load_graph(path, load_external_data=False).graph.initializer}
    # a Q/DQ pair at the graph's edge costs nothing; a weight dequantized on the CPU is copied over every step
    weights = sorted({x for n in on_cpu for x in n.input[:1] if x in inits})
    edge = all(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in on_cpu) and not weights
    ops = sorted({n.op_type for n in on_cpu}) + [f"(weight {w} dequantized on the CPU)" for w in weights]
    return Coverage("qnn-htp", nodes, nodes - len(on_cpu), parts, ops, 0,
                    "YES" if parts == 1 and edge else "MAYBE" if parts == 1 else "NO")


@contextlib.contextmanager
def _native_output_silenced():
    """File descriptors 1 and 2 to /dev/null: native libraries write past Python's sys.stdout."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _runs(nodes, ok_ids) -> int:
    """Partitions approximated as maximal runs of supported nodes in topological order."""
    runs, inside = 0, False
    for n in nodes:
        if id(n) in ok_ids and not inside:
            runs += 1
        inside = id(n) in ok_ids
    return runs


def to_ort_format(src: Path, dst_dir: Path, *, runtime_optimizations: bool) -> tuple[Path, Path]:
    """Convert with onnxruntime.tools.convert_onnx_models_to_ort. Runtime-optimization style for
    targets with an accelerator EP (it can claim nodes before CPU-only fusions are applied), fixed
    style otherwise. Returns (the .ort file, its required_operators.config)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    style = OptimizationStyle.Runtime if runtime_optimizations else OptimizationStyle.Fixed
    with tempfile.TemporaryDirectory(prefix="edgegpt-ort-") as work:
        staged = Path(work) / "in" / src.name
        staged.parent.mkdir()
        shutil.copy2(src, staged)
        out = Path(work) / "out"
        quiet = logging.getLogger("ort_format_model.utils")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
                convert_onnx_models_to_ort(staged, out, [style], target_platform="arm")
        finally:
            quiet.setLevel(level)
        ort_files = sorted(out.glob("*.ort"))
        configs = sorted(out.glob("*.config"))
        if not ort_files or not configs:
            raise PackageError(f"onnxruntime's ORT-format conversion of {src.name} produced no .ort file")
        ort_dst = dst_dir / (src.stem + ".ort")
        cfg_dst = dst_dir / (src.stem + ".required_operators.config")
        shutil.move(str(ort_files[0]), ort_dst)
        shutil.move(str(configs[0]), cfg_dst)
    return ort_dst, cfg_dst


ACCELERATOR = {"android": "nnapi", "ios": "coreml"}  # what each target's static graphs are shaped for


def static_files(seq: int) -> str:
    return "model_decode_static" if seq == 1 else f"model_prefill_{seq}"


def mobile_artifacts(tmp: Path, manifest: dict, target: str, past: int, buckets: tuple[int, ...],
                     fp32_graph: Optional[Path] = None) -> dict:
    """Beside tmp's model.onnx: its ORT-format model and operator config, the static graphs (a decode step and
    one prefill graph per bucket; from ``fp32_graph`` converted to fp16 when given) and the provider usability
    report. Returns the manifest's package section for them."""
    from edgegpt.package.static import static_graph

    onnx_path = tmp / MODEL_FILE
    onnx_size = onnx_path.stat().st_size
    dynamic_cov = ep_coverage(onnx_path, fixed=False)
    ort_path, cfg_path = to_ort_format(onnx_path, tmp, runtime_optimizations=True)
    accelerator = ACCELERATOR[target]
    statics = []
    for seq in (1, *buckets):
        staged = tmp / (static_files(seq) + ".onnx")
        info = static_graph(fp32_graph or onnx_path, staged, seq=seq, past=past,
                            n_layer=manifest["architecture"]["n_layer"], accelerator=accelerator,
                            fp16=fp32_graph is not None)
        cov = ep_coverage(staged, fixed=True)
        if accelerator == "nnapi":  # QNN also takes the android graphs
            cov += [c for c in (qnn_coverage(staged),) if c is not None]
        ort_file, cfg = to_ort_format(staged, tmp, runtime_optimizations=True)
        staged.unlink()
        statics.append({"file": ort_file.name, "required_operators": cfg.name,
                        "use": "decode step" if seq == 1 else "prefill", "accelerator": accelerator, **info,
                        "coverage": [c.as_dict() for c in cov]})
    (tmp / "mobile_usability.md").write_text(_report(manifest, dynamic_cov, statics))
    return {
        "ort_format": {"file": ort_path.name, "bytes": ort_path.stat().st_size, "onnx_bytes": onnx_size,
                       "required_operators": cfg_path.name},
        "static_graphs": statics,
        "coverage": {"dynamic": [c.as_dict() for c in dynamic_cov]},
        "report": "mobile_usability.md",
    }


def _report(manifest: dict, dynamic, statics: list[dict]) -> str:
    a = manifest["architecture"]
    lines = [f"# Mobile usability: GPT-2 family, {a['n_layer']} layers x {a['n_embd']}, {manifest['precision']}", "",
             "Produced by onnxruntime's usability checker (NNAPI, CoreML ML Program) and, for XNNPACK, by op type "
             "against its documented operator list. Nodes not taken by a provider run on the CPU EP.", ""]
    tables = [("Dynamic-shape graph (model.ort)", [c.as_dict() for c in dynamic])]
    for g in statics:
        tables.append((f"Static {g['use']} graph ({g['file']}: {g['sequence_length']} rows over {g['past_slots']} "
                       f"cache slots, shaped for {g['accelerator']})", g["coverage"]))
    for title, cov in tables:
        lines += [f"## {title}", "", "| provider | nodes supported | partitions | suitability | falls back to CPU |",
                  "|---|---|---|---|---|"]
        for c in cov:
            reasons = []
            if c["dynamic_shape_nodes"]:
                reasons.append(f"{c['dynamic_shape_nodes']} nodes have dynamic input shapes")
            if c["unsupported_ops"]:
                reasons.append("unsupported ops: " + ", ".join(c["unsupported_ops"]))
            lines.append(f"| {c['provider']} | {c['supported']}/{c['nodes']} ({c['supported_pct']:.0f}%) | "
                         f"{c['partitions']} | {c['suitability']} | {'; '.join(reasons) or '-'} |")
        lines.append("")
    lines += ["Many partitions mean a copy between the accelerator and the CPU at every boundary, every step: "
              "measure against the CPU EP (or XNNPACK) before choosing an accelerator.", ""]
    return "\n".join(lines)
