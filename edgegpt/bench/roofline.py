"""The memory-bandwidth bound of decoding: tokens/s <= read bandwidth / bytes read per token (the
weights once, plus the KV cache at the workload's mean decode context).

Bandwidth is probed with onnxruntime itself (a multi-threaded ReduceSum over a 512 MiB tensor at the
benchmark's thread count), so the bound reflects what the same thread pool can stream from DRAM. A
shared host's bandwidth moves by 1.5x within minutes, so the benchmark probes before every timed run
and sets the median run against the median probe: both sample the same minutes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from edgegpt import contract

PROBE_BYTES = 512 * 1024**2


class BandwidthProbe:
    """Read bandwidth in GB/s, measurable again and again during a benchmark: a bound probed once
    before the runs can read below what a later run streams (and report more than 100% of it).
    The session never spins, so a probe taken just before a run leaves no thread competing with it."""

    def __init__(self, threads: Optional[int] = None, nbytes: int = PROBE_BYTES, x: Optional[np.ndarray] = None):
        # x: another probe's array, so probes at several thread counts share one buffer
        self.x = x if x is not None else np.ones((nbytes // 4 // 4096, 4096), dtype=np.float32)
        self.nbytes = self.x.nbytes
        try:
            import onnxruntime as ort
            from onnx import TensorProto, helper, numpy_helper

            # Row sums: onnxruntime splits the rows over its thread pool (a single full reduction
            # would run on one thread).
            graph = helper.make_graph(
                [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)], "bw",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.x.shape))],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [self.x.shape[0]])],
                [numpy_helper.from_array(np.array([1], np.int64), "axes")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads = threads
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            self._run = lambda: sess.run(None, {"x": self.x})
            self.method = f"onnxruntime row ReduceSum, {threads or 'default'} threads"
        except ImportError:
            self._run, self.method = (lambda: self.x.sum()), "numpy sum, 1 thread"
        self._run()

    def __call__(self, reps: int = 3) -> float:
        """The best of reps, as STREAM reports: nothing reads 512 MiB from DRAM faster than the memory
        allows, so the fastest pass is the closest to what the machine can do."""
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            self._run()
            best = min(best, time.perf_counter() - t)
        return self.nbytes / best / 1e9


def weight_bytes_per_token(bundle: str | Path) -> Optional[int]:
    """Bytes of initializers one decode step reads: all of them but tables only indexed by Gather
    (the embedding rows a step reads are negligible; a tied LM head counts once, via its Gemm).
    Nodes inside If branches count too, except branches named ``fallback*`` that a decode step does
    not take (the screened head's fp32 Gemm)."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        return None
    from edgegpt.graph.io import load_graph
    from edgegpt.manifest import bundle_file, read_manifest

    m = read_manifest(bundle)
    model = load_graph(bundle_file(bundle, m["graph"]["file"]), load_external_data=False)
    users: dict[str, set[str]] = {}

    def walk(graph) -> None:
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, set()).add(node.op_type)
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    if not sub.name.startswith("fallback"):
                        walk(sub)

    walk(model.graph)
    total = 0
    for t in model.graph.initializer:
        ops = users.get(t.name, set())
        if not ops or ops <= {"Gather", "GatherBlockQuantized"}:
            continue
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def kv_bytes_per_token(manifest: dict, context: float, batch: int = 1) -> int:
    """Bytes of KV cache one decode step reads at ``context`` tokens: every layer's K and V for every
    head (the shared buffer's unused slots are not read)."""
    a = manifest["architecture"]
    dtype = contract.kv_dtype(manifest["io"])
    return int(2 * a["n_layer"] * batch * a["n_head"] * a["head_dim"] * context * np.dtype(dtype).itemsize)
