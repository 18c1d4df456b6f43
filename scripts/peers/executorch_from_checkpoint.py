"""Export a GPT-2 checkpoint (HF layout, ours or downloaded) to ExecuTorch `.pte` programs for XNNPACK, so that
`edgegpt bench --executorch FILE` times PyTorch's own edge runtime beside edgegpt bundles of the same weights.

    pip install executorch
    python scripts/peers/executorch_from_checkpoint.py CHECKPOINT OUT_PREFIX    # OUT_PREFIX-fp32.pte, -8da8w, -8da4w

The recipe is optimum-executorch's XNNPACK one (optimum-executorch itself pins a transformers release that
optimum-onnx does not install beside): transformers' TorchExportableModuleForDecoderOnlyLM (a static KV cache
held as mutable buffers; forward(input_ids, cache_position) -> logits, the sequence length dynamic so one
program does prefill and decode), torchao's quantize_ on the linear layers, XNNPACK's partitioner.

One step that recipe lacks: GPT-2's blocks are transformers' Conv1D, not nn.Linear, and torchao quantizes only
nn.Linear, so without it the int8/int4 programs would quantize the LM head alone. Each Conv1D is replaced by
the nn.Linear it equals (weight transposed) before quantizing; the program's size shows it (an -8da4w file is
about a quarter of the -fp32 one plus the fp32 embeddings). 8da8w: int8 dynamic per-token activations, int8
per-channel weights; 8da4w: int4 weights in groups of 32 (XNNPACK's qd8-qc8w / qd8-qb4w kernels). The LM head is
quantized like the other linears (so it no longer shares the embedding's storage), the embeddings stay fp32.
A benchmarking aid, not a dependency of edgegpt.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

TYPES = ("fp32", "8da8w", "8da4w")
GROUP = 32  # 8da4w's weight group, optimum-executorch's default


def conv1d_to_linear(model) -> int:
    """Replace every transformers Conv1D (y = x W + b, W [in, out]) with the equal nn.Linear; returns the count."""
    import torch
    from transformers.pytorch_utils import Conv1D

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
                n += 1
    return n


def quantize(model, kind: str) -> None:
    import torch
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    if kind == "fp32":
        return
    # untie: the head gets its own weight to quantize, the embedding keeps the fp32 one
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    granularity = PerAxis(0) if kind == "8da8w" else PerGroup(GROUP)
    weight_dtype = torch.int8 if kind == "8da8w" else torch.int4
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity),
              lambda m, fqn: isinstance(m, torch.nn.Linear) and (kind == "8da8w" or m.in_features % GROUP == 0))


def export_pte(checkpoint: str, kind: str, out: Path, max_len: int) -> Path:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from transformers import GenerationConfig, GPT2LMHeadModel
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model = GPT2LMHeadModel.from_pretrained(checkpoint, torch_dtype=torch.float32, attn_implementation="sdpa")
    max_len = min(max_len, model.config.n_positions)
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static", max_length=max_len,
                                               cache_config={"batch_size": 1, "max_cache_len": max_len})
    model.eval()
    if conv1d_to_linear(model) == 0:
        raise SystemExit(f"{checkpoint}: no Conv1D layers found; is this a GPT-2 checkpoint?")
    quantize(model, kind)
    with torch.no_grad():
        module = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_len)
        seq = torch.export.Dim("seq_length_dim", max=max_len - 1)
        ep = module.export(input_ids=torch.zeros((1, 3), dtype=torch.long),
                           cache_position=torch.arange(3, dtype=torch.long),
                           dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
    compile_config = EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)
    constants = {"get_max_seq_len": max_len, "get_vocab_size": model.config.vocab_size}
    prog = to_edge_transform_and_lower({"forward": ep}, partitioner=[XnnpackPartitioner()],
                                       compile_config=compile_config, constant_methods=constants)
    planning = MemoryPlanningPass(alloc_graph_input=False)
    prog = prog.to_executorch(config=ExecutorchBackendConfig(extract_delegate_segments=True,
                                                             memory_planning_pass=planning))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".pte.tmp")  # written whole, then renamed into place
    with os.fdopen(fd, "wb") as f:
        prog.write_to_file(f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out_prefix")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    ap.add_argument("--max-len", type=int, default=1024, help="the static KV cache's length (capped at n_positions)")
    args = ap.parse_args(argv)
    kinds = [t.strip() for t in args.types.split(",") if t.strip()]
    bad = [k for k in kinds if k not in TYPES]
    if bad or not kinds:
        ap.error(f"--types: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(TYPES)}")
    if not 2 <= args.max_len <= 1 << 20:
        ap.error("--max-len must be between 2 and 1048576")
    for kind in kinds:
        out = export_pte(args.checkpoint, kind, Path(f"{args.out_prefix}-{kind}.pte"), args.max_len)
        print(out, f"{out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
