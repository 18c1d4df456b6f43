"""Mobile packages, with onnxruntime's own tools: ORT-format conversion with the
required-operators config a reduced build needs, the NNAPI / CoreML usability check, XNNPACK
coverage, and fixed-shape decode variants for providers that need static shapes.
"""

from __future__ import annotations

import contextlib
import io
import logging
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
