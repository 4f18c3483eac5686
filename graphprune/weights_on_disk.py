"""Weights left on disk: reading one tensor, and sessions that map the model's file instead of copying it.

A model loaded with ``load(path, load_external_data=False)`` keeps external-data records instead of
its weights (``source_dir`` is the folder of its file).  Copies of it (candidates, prepared models)
then cost only their graph, ONNX Runtime maps the weights from the original file, and a pass
(quantize, prune, sparsify, the dependency graph) reads one float weight at a time, keeping only
what it writes (the quantizer: its int8 form); ``save`` copies the untouched records from the
input file in chunks.  Peak memory stays near one mapped copy of the weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from typing import Dict, Iterator, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.errors import UserError

__all__ = ["has_weights_on_disk", "read_tensor", "read_kept", "forget_kept", "files_kept_open", "session",
           "reading_weights_from"]


def has_weights_on_disk(model: onnx.ModelProto) -> bool:
    """Whether some main-graph initializer of ``model`` is a record whose data is still on disk."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


# Element types stored as numpy stores them (little-endian, one element per item).
_PLAIN_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("FLOAT", "FLOAT16", "DOUBLE", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64",
                 "UINT64", "BOOL")
)


def read_tensor(tensor: onnx.TensorProto, source_dir: Optional[str]) -> np.ndarray:
    """The value of ``tensor``: in memory, or read (that tensor's bytes only) from ``source_dir``.

    The record was checked when the model was loaded (location confined to the model's folder,
    span inside the file); a file that shrank since is reported, not read short.
    """
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    if source_dir is None:
        raise ValueError(f"weight {tensor.name!r} has its data on disk and no folder to read it from")
    key = None
    if _KEPT is not None:  # looked up first: prune reads each of 10,000 small weights twice, and
        # decoding the record below cost ~6 us a read; its serialized bytes cost 0.7 us.
        key = (source_dir, tensor.SerializeToString())  # the whole record: same record, same value
        kept = _KEPT.get(key)
        if kept is not None:
            return kept.reshape(tuple(tensor.dims))
    entries = {e.key: e.value for e in tensor.external_data}
    path = os.path.join(source_dir, entries["location"])
    count = math.prod(tensor.dims)  # np.prod costs 10 us a call: a fifth of reading a small weight
    if tensor.data_type not in _PLAIN_TYPES:  # packed or exotic types (int4, bfloat16): onnx decodes them
        loose = onnx.TensorProto()
        loose.CopyFrom(tensor)
        del loose.external_data[:]
        loose.data_location = onnx.TensorProto.DEFAULT
        with open(path, "rb") as f:
            f.seek(int(entries.get("offset") or 0))
            loose.raw_data = f.read(int(entries["length"]) if entries.get("length") else -1)
        return numpy_helper.to_array(loose)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    offset = int(entries.get("offset") or 0)
    if _OPEN_FILES is None:
        value = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        short = value.size != count
    else:  # one descriptor per data file: opening it per weight was half of reading 10,000 small ones
        fd = _OPEN_FILES.get(path)
        if fd is None:
            fd = _OPEN_FILES[path] = os.open(path, os.O_RDONLY)
        value = np.empty(count, dtype=dtype)
        view, done = memoryview(value).cast("B"), 0
        while done < value.nbytes:  # a single read stops at 2 GiB
            got = os.preadv(fd, [view[done:]], offset + done)
            if not got:
                break
            done += got
        short = done != value.nbytes
    if short:
        raise UserError(f"{path}: external data of {tensor.name!r} ends early (truncated while being read?)")
    if key is not None and value.nbytes < _KEEP_BYTES:
        value.flags.writeable = False  # handed out again: nobody may change it in place
        _KEPT[key] = value
    return value.reshape(tuple(tensor.dims))


def forget_kept(tensor: onnx.TensorProto, source_dir: str) -> None:
    """Stop keeping ``tensor``'s value (``files_kept_open(keep_below=...)``): the bytes read with
    its neighbours are freed once none of them is kept any more."""
    if _KEPT is not None:
        _KEPT.pop((source_dir, tensor.SerializeToString()), None)


def read_kept(tensors: List[onnx.TensorProto], source_dir: str) -> Iterator[np.ndarray]:
    """``read_tensor`` of each of ``tensors`` in turn, within ``files_kept_open(keep_below=...)``:
    runs of records kept there (plain types, small) that follow one another in one file are read
    with one read each, then handed out as read-only views (prune's finite check of 10,000 small
    weights: one read each was 0.18 s, most of it per-read overhead)."""
    i = 0
    while i < len(tensors):
        run = _kept_run(tensors, i, source_dir)
        if len(run) < 2:
            yield read_tensor(tensors[i], source_dir)
            i += 1
            continue
        path, start = run[0][1], run[0][2]
        fd = _OPEN_FILES.get(path)
        if fd is None:
            fd = _OPEN_FILES[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, run[-1][2] + run[-1][3] - start, start)  # a run stays far below 2 GiB
        for tensor, _, offset, size, dtype, dims, key in run:
            if offset + size - start > len(data):
                raise UserError(f"{path}: external data of {tensor.name!r} ends early (truncated while being read?)")
            kept = _KEPT.get(key)
            if kept is None:  # read-only: frombuffer over bytes
                kept = _KEPT[key] = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset - start)
            yield kept.reshape(dims)
        i += len(run)


# A run of records read at once spans at most this many bytes, with gaps of at most _RUN_GAP between
# records (alignment padding).
_RUN_BYTES = 2**24
_RUN_GAP = 2**12


def _kept_run(tensors: List[onnx.TensorProto], first: int, source_dir: str) -> list:
    """(tensor, path, offset, length, dtype, dims, cache key) of the records from ``first`` on that
    ``read_kept`` reads at once: kept ones of plain types, in file order, nearly back to back."""
    run: list = []
    if _KEPT is None or _OPEN_FILES is None:
        return run
    paths: Dict[str, str] = {}
    for tensor in tensors[first:]:
        data_type = tensor.data_type
        if tensor.data_location != onnx.TensorProto.EXTERNAL or data_type not in _PLAIN_TYPES:
            break
        location, offset, length = "", 0, None
        for entry in tensor.external_data:
            key = entry.key
            if key == "location":
                location = entry.value
            elif key == "offset":
                offset = int(entry.value or 0)
            elif key == "length":
                length = entry.value
        dims = tuple(tensor.dims)
        dtype = _DTYPES.get(data_type) or _dtype(data_type)
        size = math.prod(dims) * dtype.itemsize
        if size >= _KEEP_BYTES or (length and int(length) != size):
            break
        path = paths.get(location)
        if path is None:
            path = paths[location] = os.path.join(source_dir, location)
        if run and (path != run[0][1] or not 0 <= offset - (run[-1][2] + run[-1][3]) <= _RUN_GAP
                    or offset + size - run[0][2] > _RUN_BYTES):
            break
        run.append((tensor, path, offset, size, dtype, dims, (source_dir, tensor.SerializeToString())))
    return run


_DTYPES: Dict[int, np.dtype] = {}


def _dtype(data_type: int) -> np.dtype:
    dtype = _DTYPES.get(data_type)
    if dtype is None:
        dtype = _DTYPES[data_type] = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    return dtype


_OPEN_FILES: Optional[Dict[str, int]] = None
_KEPT: Optional[Dict[tuple, np.ndarray]] = None
_KEEP_BYTES = 0


@contextlib.contextmanager
def files_kept_open(keep_below: int = 0) -> Iterator[None]:
    """``read_tensor`` keeps each data file open until the block ends (a pass reading thousands
    of small weights); outside such a block every read opens its file, so a file replaced
    between two reads is read afresh.

    Args:
        keep_below: tensors of fewer bytes are also kept once read and handed out again, read-only
            (prune reads each weight for the finite check, then to score it).
    """
    global _OPEN_FILES, _KEPT, _KEEP_BYTES
    if _OPEN_FILES is not None:  # nested: the outer block owns the descriptors
        yield
        return
    _OPEN_FILES, _KEPT, _KEEP_BYTES = {}, ({} if keep_below > 0 else None), keep_below
    try:
        yield
    finally:
        files, _OPEN_FILES, _KEPT, _KEEP_BYTES = _OPEN_FILES, None, None, 0
        for fd in files.values():
            os.close(fd)


def session(
    model: onnx.ModelProto,
    source_dir: Optional[str],
    threads: Optional[int] = 1,
    optimization: str = "all",
    spinning: bool = True,
    prepacking: bool = False,
):
    """An ONNX Runtime CPU session for ``model``, whose on-disk weights it reads from ``source_dir``.

    Without weights on disk this is ``runtime.make_session``.  Otherwise the serialized graph (and
    whatever tensors it holds inline, e.g. int8 weights) is handed over with the folder of the
    external data: the runtime maps the weights from the original file, nothing is copied to a
    temporary one.  Weight pre-packing is off unless asked for: it would hold a second, packed
    copy of every float weight (timing sessions turn it on, as deployment runs).
    """
    from graphprune.model_io import EXTERNAL_DATA_THRESHOLD, for_ort, save
    from graphprune.runtime import DISABLED_OPTIMIZERS, make_session, ort, runtime_refusal, session_options

    if source_dir is None or not has_weights_on_disk(model):
        return make_session(model, threads=threads, optimization=optimization, spinning=spinning)
    rt = ort()
    options = session_options(threads, optimization, spinning, prepacking)
    kwargs = dict(providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS))
    model = for_ort(model)
    with runtime_refusal():
        if _inline_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             os.fspath(source_dir))
            return rt.InferenceSession(model.SerializeToString(), options, **kwargs)
        # Too many inline bytes for one message: a file (on-disk tensors copied from the source).
        with tempfile.TemporaryDirectory(prefix="graphprune-session-") as tmp:
            path = save(model, os.path.join(tmp, "model.onnx"), external_data=True, source_dir=source_dir)
            return rt.InferenceSession(path, options, **kwargs)


def _inline_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights held in the proto itself (records left on disk cost nothing to serialize)."""
    from graphprune.ir import _tensor_bytes

    return sum(_tensor_bytes(t) for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)


# ORT's quantizer modules that read weights through ``tensor_proto_to_array`` (imported by name).
_QUANTIZER_MODULES = ("quant_utils", "base_quantizer", "onnx_quantizer", "qdq_quantizer")


@contextlib.contextmanager
def reading_weights_from(source_dir: Optional[str]) -> Iterator[None]:
    """While active, ONNX Runtime's quantizer reads weights left on disk from ``source_dir``.

    Its ``tensor_proto_to_array`` goes through ``onnx.numpy_helper.to_array``, which resolves
    records against the working directory and loads the bytes into the proto itself (every
    float weight would stay in memory next to its int8 copy).  Here each read returns a fresh
    array and leaves the record as it was; the quantizer drops the float record once unused.
    """
    if source_dir is None:
        yield
        return
    import importlib

    modules = [importlib.import_module(f"onnxruntime.quantization.{name}") for name in _QUANTIZER_MODULES]
    original = modules[0].tensor_proto_to_array

    def tensor_proto_to_array(initializer: onnx.TensorProto, *args, **kwargs) -> np.ndarray:
        if initializer.data_location == onnx.TensorProto.EXTERNAL:
            if initializer.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                return original(initializer, *args, **kwargs)  # its own refusal message
            return read_tensor(initializer, source_dir)
        return original(initializer, *args, **kwargs)

    saved = [(m, m.__dict__.get("tensor_proto_to_array")) for m in modules]
    try:
        for module, _ in saved:
            if "tensor_proto_to_array" in module.__dict__:
                module.tensor_proto_to_array = tensor_proto_to_array
        yield
    finally:
        for module, previous in saved:
            if previous is not None:
                module.tensor_proto_to_array = previous


def observed_shapes(model: onnx.ModelProto, feed, known, threads: Optional[int], source_dir: Optional[str]):
    """``shapes.observed_shapes`` (``known`` completed by one run exposing the node outputs it
    lacks), with the session reading the weights left on disk from ``source_dir``."""
    from graphprune.shapes import observed_shapes as observe

    if source_dir is None or not has_weights_on_disk(model):
        return observe(model, feed, known, threads=threads)
    produced = [out for node in model.graph.node for out in node.output if out]
    missing = [name for name in dict.fromkeys(produced) if name not in known]
    shapes = dict(known)
    if not missing:
        return shapes
    listed = {o.name for o in model.graph.output}
    count = len(model.graph.output)
    try:  # exposed as outputs of the model itself, then removed: no copy
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing if name not in listed)
        probe = session(model, source_dir, threads=threads)
    finally:
        del model.graph.output[count:]
    for name, value in zip(missing, probe.run(missing, dict(feed))):
        shapes[name] = tuple(np.shape(value))
    return shapes
