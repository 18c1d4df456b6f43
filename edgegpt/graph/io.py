"""Reading and writing ONNX graphs: untrusted graphs read in one place, models over protobuf's 2 GB
limit written with external data, shape inference and onnxruntime's basic optimizer by path.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from edgegpt.atomic import match_umask
from edgegpt.errors import BundleError, ExportError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3
# Above this many bytes of weights, write them to model.onnx.data beside the graph: leaves headroom
# under protobuf's 2 GiB hard limit for the graph itself and for later passes that add initializers.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 1024**3)
EXTERNAL_DATA_FILE = "model.onnx.data"


def load_graph(path: Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """onnx.load of a graph read from a bundle (untrusted): a file that is not an ONNX model, or whose
    external data points outside its folder (onnx refuses that itself), is one BundleError."""
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, onnx's ValidationError, OSError ...
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BundleError(f"{Path(path).parent}: {Path(path).name} is not a readable ONNX model ({detail}); "
                          f"re-run `edgegpt export`") from None


def save_model(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    """Save; with ``external`` the weights go to model.onnx.data next to the graph."""
    path = Path(path)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
        # onnx creates the data file 0600: give it the mode of every other file in the bundle, so a bundle
        # copied to an app or a server stays readable by the account that runs it
        match_umask(path.parent / EXTERNAL_DATA_FILE)
    else:
        write_streamed(model, path)


def data_file(path: Path) -> Path:
    """Where ``save_graph`` keeps the weights of the graph at ``path`` once they are too big to go inline."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def weight_bytes(model: onnx.ModelProto) -> int:
    """The serialized bytes of the initializers (each measured without serializing its raw data)."""
    return sum(_tensor_size(t) for t in model.graph.initializer)


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Save a graph whose weights are all in memory to ``path``: inline, streamed (``write_streamed``), or,
    once they pass EXTERNAL_DATA_THRESHOLD (GPT-2 large's 3.1 GB cannot be one protobuf), in
    ``data_file(path)`` beside it, and then they also leave ``model`` as they are written (onnx clears each
    tensor's raw data), so the caller must not read them again. A data file of that name already there is
    removed first: onnx appends to an existing one, and an inline save would leave it stale."""
    path = Path(path)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ValueError("save_graph needs every weight in memory: load the graph with its external data")
    data = data_file(path)
    data.unlink(missing_ok=True)
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        match_umask(data)
    else:
        write_streamed(model, path)


def set_layout(path: Path, *, external: bool) -> None:
    """Rewrite the graph at ``path`` with its weights in ``data_file(path)`` (``external``) or inline, unless they
    are already so. A bundle for the CPU runtime keeps a data file: onnxruntime maps one from disk, and an inline
    graph's weights are copied into a buffer it does not free once it has prepacked them (GPT-2 XL int8: 2.6 GB of
    resident memory inline, 1.65 GB with a data file, and twice as fast to load). Inline (an ORT-format or
    browser package, ``--external-data never``) is refused for weights over EXTERNAL_DATA_THRESHOLD."""
    path = Path(path)
    data = data_file(path)
    if data.is_file() == external:
        return
    if external:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        match_umask(data)
        return
    model = onnx.load(str(path), load_external_data=False)
    if weight_bytes(model) + sum(stored_bytes(t) for t in model.graph.initializer
                                 if t.data_location == onnx.TensorProto.EXTERNAL) > EXTERNAL_DATA_THRESHOLD:
        raise ValueError(f"{path.name}'s weights are over {EXTERNAL_DATA_THRESHOLD / 1e9:.2f} GB: too large for one "
                         f"file")
    staged = path.with_name(path.name + ".inline")
    write_streamed(model, staged, folder=path.parent)
    staged.replace(path)
    data.unlink()


def external_data_name(path: Path) -> str | None:
    """The manifest's graph.external_data for the graph at ``path``: its data file's name, or None."""
    return data_file(path).name if data_file(path).is_file() else None


def remove_graph(path: Path) -> None:
    """Delete a graph ``save_graph`` wrote, and its data file if it has one."""
    Path(path).unlink(missing_ok=True)
    data_file(path).unlink(missing_ok=True)


def copy_graph(src: Path, dst: Path) -> None:
    """Copy a graph and the data file ``save_graph`` may have written beside it (removing a stale one at dst). The
    graph names its data file, so a graph with one keeps its file name."""
    if data_file(src).is_file() and Path(src).name != Path(dst).name:
        raise ValueError(f"{Path(src).name} keeps its weights in {data_file(src).name}, which it names: copy it "
                         f"under the same name, not as {Path(dst).name}")
    shutil.copy2(src, dst)
    data_file(dst).unlink(missing_ok=True)
    if data_file(src).is_file():
        shutil.copy2(data_file(src), data_file(dst))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _without(message, skip: str):
    """A new message of the same type holding every field of ``message`` but ``skip`` (small fields copied)."""
    head = type(message)()
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(head, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(head, field.name).CopyFrom(value)
        else:
            setattr(head, field.name, value)
    return head


def _tensor_size(t) -> int:
    """A TensorProto's serialized length without serializing its raw data (upb's ByteSize serializes the whole
    message: on a model it held another 0.96 GB at once for GPT-2 small)."""
    if not t.HasField("raw_data"):
        return len(t.SerializeToString())
    n = len(t.raw_data)
    return len(_without(t, "raw_data").SerializeToString()) + 1 + len(_varint(n)) + n


def write_streamed(model: onnx.ModelProto, path: Path, *, folder: Path | None = None) -> None:
    """Write ``model`` as onnx.save_model would, one initializer at a time. SerializeToString (and ByteSize)
    hold the whole file in memory. Protobuf reads fields in any order and appends repeated ones, so the model's
    other fields, then the graph's other fields, then each initializer (GraphProto field 5) parse to the same
    model; onnx's own save has no streaming mode. With ``folder``, a weight kept in a data file there is read
    (``read_weight``) and written inline, one at a time: the file is self-contained."""
    from onnx import numpy_helper

    graph = model.graph

    def stored(t) -> bool:
        return folder is not None and t.data_location == onnx.TensorProto.EXTERNAL

    def size(t) -> int:
        if not stored(t):
            return _tensor_size(t)
        head = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type)  # what from_array sets
        n = stored_bytes(t)
        return len(head.SerializeToString()) + 1 + len(_varint(n)) + n

    head = _without(model, "graph").SerializeToString()
    graph_head = _without(graph, "initializer").SerializeToString()
    sizes = [size(t) for t in graph.initializer]
    graph_len = len(graph_head) + sum(1 + len(_varint(n)) + n for n in sizes)
    if len(head) + graph_len >= PROTOBUF_LIMIT:
        raise ExportError(f"the graph is {(len(head) + graph_len) / 1e9:.2f} GB, over protobuf's 2 GB limit; "
                          f"use --external-data always (the default)")
    with open(path, "wb") as f:
        f.write(head)
        f.write(b"\x3a" + _varint(graph_len))  # ModelProto.graph: field 7, length-delimited
        f.write(graph_head)
        for t, n in zip(graph.initializer, sizes):
            data = (numpy_helper.from_array(read_weight(t, folder), t.name) if stored(t) else t).SerializeToString()
            if len(data) != n:  # the length written before it must be the tensor's
                raise ExportError(f"{t.name}: serialized to {len(data)} bytes, not the {n} planned")
            f.write(b"\x2a" + _varint(n))  # GraphProto.initializer: field 5, length-delimited
            f.write(data)


def stored_bytes(t: onnx.TensorProto) -> int:
    """An initializer's bytes from its shape and type (they may lie in a data file)."""
    import numpy as np

    count = 1
    for d in t.dims:
        count *= d
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def read_weight(t: onnx.TensorProto, folder: Path):
    """An initializer's values as a numpy array; one kept in a data file is read from it without being loaded
    into ``t``. Under upb (protobuf's Python backend here) the bytes a message is given stay allocated until the
    whole model is freed, even once cleared or replaced, so a pass that loads weights into a graph to rewrite
    them holds both copies: read this way, only the graph it builds holds weights."""
    import numpy as np
    from onnx import numpy_helper

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    folder = Path(folder).resolve()
    file = (folder / info.get("location", "")).resolve()
    if folder not in file.parents or not file.is_file():
        raise BundleError(f"{t.name}: its data file {info.get('location')!r} is not a file inside {folder}; "
                          f"re-run `edgegpt export`")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    count = stored_bytes(t) // dtype.itemsize
    values = np.fromfile(file, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if values.size != count:
        raise BundleError(f"{t.name}: {file.name} ends before its {count} values; re-run `edgegpt export`")
    return values.reshape(tuple(t.dims))


def save_rewritten(model: onnx.ModelProto, folder: Path, dst: Path, rewrite: dict) -> None:
    """Save ``model`` (loaded with ``load_external_data=False`` from ``folder``) to ``dst`` as ``save_graph``
    does, with each initializer named in ``rewrite`` replaced by ``rewrite[name](values)`` (a list of
    TensorProtos), read one at a time (``read_weight``): the fp32 weights are never all in memory beside the
    new ones. ``rewrite[name]`` may also be the list itself, when the new tensors do not need the old values
    (they are then not read)."""
    from onnx import numpy_helper

    out = _without(model, "graph")
    out.graph.CopyFrom(_without(model.graph, "initializer"))
    for t in model.graph.initializer:
        if t.name in rewrite:
            new = rewrite[t.name]
            out.graph.initializer.extend(new if isinstance(new, list) else new(read_weight(t, folder)))
        elif t.data_location == onnx.TensorProto.EXTERNAL:
            out.graph.initializer.append(numpy_helper.from_array(read_weight(t, folder), t.name))
        else:
            out.graph.initializer.append(t)
    save_graph(out, dst)


def infer_shapes(path: Path) -> None:
    """onnx shape inference, in place, path-based so models over 2 GB work too."""
    onnx.shape_inference.infer_shapes_path(str(path), str(path))


def shaped_op_counts(path: Path) -> dict[str, int]:
    """Shape inference in place, then the graph's op counts (the manifest's graph.op_counts)."""
    from edgegpt.graph.passes import op_counts

    infer_shapes(path)
    return op_counts(onnx.load(str(path), load_external_data=False))


def ort_optimize(src: Path, dst: Path, *, external_data_file: str | None = None) -> None:
    """onnxruntime's basic-level optimizer (constant folding, dead and redundant node elimination;
    standard ops only) from src to dst."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if external_data_file:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data_file)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types per failure
        raise ExportError(f"onnxruntime could not load the graph {Path(src).name}: {e}".splitlines()[0]) from None
