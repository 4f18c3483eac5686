"""Where a model's external data lives: locations confined to the model's folder, sizes checked before reading.

ONNX stores large tensors outside the ``.onnx`` file: each such tensor names a ``location``
relative to the model's folder, an ``offset`` and a ``length``.  A model is input like any other,
so these are checked before a byte is read.  Cases refused (one ``UserError`` line naming the
model, the tensor and the location):

- a location that is empty, absolute, or holds a ``..`` component;
- a location that leaves the model's folder once symlinks are resolved (a symlinked file or
  directory pointing elsewhere), checked with ``os.path.realpath`` and containment;
- a location that is missing or is not a regular file (FIFO, device, directory: reading a FIFO hangs);
- an offset or length that is not a non-negative integer, or reaches past the end of the file;
- a length that does not match the tensor's dims and element type.

What is not covered: a file swapped between this check and the read (the folder is the user's;
graphprune does not defend against a concurrent attacker there).
"""

from __future__ import annotations

import io
import os
import re
import stat
from typing import Dict, Iterator, List, Optional, Tuple

import onnx

from graphprune.errors import UserError
from graphprune.ir import copy_fields

__all__ = [
    "check_external_data",
    "load_external_data",
    "external_tensors",
    "data_files",
    "write_with_external_data",
    "write_inline",
    "free_data_name",
    "old_data_names",
    "tensor_bytes",
    "INLINE_BELOW",
]

# Bits per element of the fixed-width types; strings (variable width) are absent.  By name: older
# onnx releases lack the newest types.
_ELEM_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in [
        ("FLOAT", 32), ("UINT8", 8), ("INT8", 8), ("UINT16", 16), ("INT16", 16), ("INT32", 32),
        ("INT64", 64), ("BOOL", 8), ("FLOAT16", 16), ("DOUBLE", 64), ("UINT32", 32), ("UINT64", 64),
        ("COMPLEX64", 64), ("COMPLEX128", 128), ("BFLOAT16", 16),
        ("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8),
        ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("FLOAT8E8M0", 8), ("UINT2", 2), ("INT2", 2),
    ]
    if hasattr(onnx.TensorProto, name)
}
# Tensors below this many bytes stay inside the .onnx file (as onnx.save_model's size_threshold).
INLINE_BELOW = 1024
# Tensors of at least _ALIGN_FROM bytes start at a multiple of _PAGE in the data file, so ONNX
# Runtime can memory-map them; smaller ones at a multiple of _SMALL_ALIGN.
_ALIGN_FROM = 64 * 1024
_PAGE = 4096
_SMALL_ALIGN = 64
# Copies from a source data file go in chunks of this many bytes (bounded memory).
_CHUNK = 16 * 2**20
# Locations longer than this are cut in messages (one readable line).
_SHOWN_CHARS = 80


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model`` stored outside the file: initializers, sparse tensors and attribute
    tensors, in subgraphs and functions too."""
    for graph in _graphs(model):
        for tensor in _tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                yield tensor


def check_external_data(model: onnx.ModelProto, model_path: "str | os.PathLike") -> List[str]:
    """Check every external-data record of ``model`` (read from ``model_path``) before any is read.

    Returns the data files the model reads, as real paths, in first-use order.  Raises
    ``UserError`` naming the model, the first bad tensor and its location.
    """
    model_path = os.fspath(model_path)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(model_path)))
    sizes: Dict[str, int] = {}  # real path -> size, so each file is resolved once
    resolved: Dict[str, str] = {}  # location -> real path (10k tensors share one file: one realpath)
    for tensor in external_tensors(model):
        location = _entries(tensor).get("location", "")
        try:
            location, offset, length = _record(tensor)
            real = resolved.get(location)
            if real is None:
                real = resolved[location] = _resolve(folder, location)
            if real not in sizes:
                sizes[real] = _regular_file_size(real)
            _check_span(tensor, offset, length, sizes[real])
        except _Refused as exc:
            shown = location if len(location) <= _SHOWN_CHARS else location[:_SHOWN_CHARS] + "..."
            raise UserError(f"{model_path}: tensor {tensor.name!r}: external data {shown!r} {exc}") from None
    return list(sizes)


def _read_external(model: onnx.ModelProto, model_path: str) -> None:
    """Read every external tensor of ``model`` into it, as ``onnx.load_external_data_for_model``
    does, from the real paths ``check_external_data`` checked, each file opened once (onnx opens the
    file again for every tensor: 0.4 s for the 10,000 weights of a 20,000-node graph)."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(model_path)))
    resolved: Dict[str, str] = {}
    files: Dict[str, "io.BufferedReader"] = {}
    try:
        for tensor in list(external_tensors(model)):
            location, offset, length = _record(tensor)
            real = resolved.get(location)
            if real is None:
                real = resolved[location] = _resolve(folder, location)
                if real != os.path.normpath(os.path.join(folder, location)):  # onnx reads through no symlink either
                    raise OSError(f"data file {location!r} is reached through a symlink")
            f = files.get(real)
            if f is None:
                f = files[real] = open(real, "rb")
            f.seek(offset)
            tensor.raw_data = f.read(length) if length else f.read()  # no length (or 0): to the end, as onnx reads
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    finally:
        for f in files.values():
            f.close()


def check_direct_paths(model: onnx.ModelProto, model_path: "str | os.PathLike") -> None:
    """Refuse, as reading the data at load does (``_read_external``), a data file of ``model`` reached
    through a symlink: for a model loaded without its data whose weights are read later."""
    model_path = os.fspath(model_path)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(model_path)))
    for location in {_entries(t).get("location", "") for t in external_tensors(model)}:
        if os.path.realpath(os.path.join(folder, location)) != os.path.normpath(os.path.join(folder, location)):
            raise UserError(f"{model_path}: cannot read its external data "
                            f"(data file {location!r} is reached through a symlink)")


def data_files(model_path: "str | os.PathLike") -> List[str]:
    """The existing data files a saved model refers to, as written beside it (unchecked, unresolved).

    Parses the model without its weights; an unreadable model has none.
    """
    model_path = os.fspath(model_path)
    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception:  # not a model (or not ours to judge here): no side files
        return []
    folder = os.path.dirname(model_path)
    found = []
    for tensor in external_tensors(model):
        location = _entries(tensor).get("location", "")
        path = os.path.join(folder, location)
        if location and path not in found and os.path.isfile(path):
            found.append(path)
    return found


class _Refused(Exception):
    """Why one record is refused (the caller adds the model, tensor and location)."""


def _entries(tensor: onnx.TensorProto) -> Dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _record(tensor: onnx.TensorProto) -> Tuple[str, int, Optional[int]]:
    """(location, offset, length or None), each checked for form."""
    entries = _entries(tensor)
    location = entries.get("location", "")
    if not location:
        raise _Refused("has no location")
    if "\0" in location:
        raise _Refused("holds a NUL character")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise _Refused("is an absolute path (locations are relative to the model's folder)")
    if ".." in location.replace("\\", "/").split("/"):
        raise _Refused("holds '..' (locations must stay inside the model's folder)")
    offset = _non_negative(entries.get("offset"), "offset", default=0)
    length = _non_negative(entries.get("length"), "length", default=None)
    return location, offset, length


def _non_negative(text: Optional[str], what: str, default):
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise _Refused(f"has {what} {text[:20]!r}, not an integer") from None
    if value < 0:
        raise _Refused(f"has negative {what} {value}")
    return value


def _resolve(folder: str, location: str) -> str:
    """The real path of ``location``; refused when symlinks lead it out of ``folder``."""
    real = os.path.realpath(os.path.join(folder, location))
    if os.path.commonpath([folder, real]) != folder:
        raise _Refused(f"resolves outside the model's folder (to {real}; a symlink leaves {folder})")
    return real


def _regular_file_size(real: str) -> int:
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise _Refused("does not exist beside the model") from None
    except OSError as exc:
        raise _Refused(f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a special file"
        raise _Refused(f"is {kind}, not a regular file")
    return info.st_size


def _check_span(tensor: onnx.TensorProto, offset: int, length: Optional[int], size: int) -> None:
    """The bytes [offset, offset + length) lie inside the file and hold exactly the tensor."""
    needed = tensor_bytes(tensor)
    if offset > size:
        raise _Refused(f"has offset {offset} past the end of the file ({size} bytes)")
    if length is not None and needed is not None and length != needed:
        raise _Refused(f"has length {length}, but dims {list(tensor.dims)} need {needed} bytes")
    span = length if length is not None else needed
    if span is not None and offset + span > size:
        raise _Refused(f"needs bytes {offset}..{offset + span} but the file holds {size} (truncated?)")


def tensor_bytes(tensor: onnx.TensorProto) -> Optional[int]:
    """Bytes the tensor's data occupies, or None for variable-width (string) or unknown types."""
    bits = _ELEM_BITS.get(tensor.data_type)
    if bits is None:
        return None
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            return None  # the graph checker names negative dims
        count *= dim
    return (count * bits + 7) // 8


def _graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, every subgraph, and the node lists of functions (as pseudo-graphs)."""
    stack: list = [model.graph, *model.functions]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _tensors(graph) -> Iterator[onnx.TensorProto]:
    """Tensors held directly by a graph (or function): initializers, sparse parts, attribute values."""
    for tensor in getattr(graph, "initializer", ()):
        yield tensor
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices


# -- writing -------------------------------------------------------------------------------------

def free_data_name(folder: str, model_name: str) -> str:
    """A data-file name for ``model_name`` that does not exist in ``folder``.

    ``<model>.data`` when free, else ``<model>.1.data``, ``<model>.2.data``...  A free name is what
    makes a model and its data switch together (see ``model_io.save``): the model currently at
    ``model_name`` cannot refer to a file that does not exist yet.
    """
    for n in range(1000):
        name = f"{model_name}.data" if n == 0 else f"{model_name}.{n}.data"
        if not os.path.lexists(os.path.join(folder, name)):
            return name
    raise UserError(f"{os.path.join(folder, model_name)}: 1000 data files of that name exist beside it (remove them)")


def old_data_names(folder: str, model_name: str, keep: Optional[str]) -> List[str]:
    """Data files graphprune may have written for ``model_name`` (``<model>.data``,
    ``<model>.<n>.data``) other than ``keep``: the previous pair's data, or a killed write's."""
    pattern = re.compile(re.escape(model_name) + r"(\.[0-9]+)?\.data")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if n != keep and pattern.fullmatch(n))


def write_with_external_data(
    model: onnx.ModelProto,
    path: str,
    location: str,
    *,
    ir_version: Optional[int] = None,
    source_dir: Optional[str] = None,
) -> None:
    """Write ``model`` to ``path`` with its large main-graph initializers in ``location`` beside it,
    streamed one tensor at a time (the model is never copied whole; ``model`` is not modified).

    Tensors of ``INLINE_BELOW`` bytes or more that hold ``raw_data`` go to the data file; tensors
    whose data was left on disk (``data_location`` EXTERNAL, loaded without their data) are copied
    in chunks from ``source_dir``, where their model was read (their records are checked first).
    Both files are fsynced.  No data file is written when no tensor goes to one.

    Args:
        model: the model to write.
        path: the ``.onnx`` file to create.
        location: the data file's name, relative to ``path``'s folder.
        ir_version: the IR label to write (default: the model's).
        source_dir: the folder of the file ``model`` was loaded from, for tensors left on disk.
    """
    folder = os.path.dirname(os.path.abspath(path))
    light = onnx.ModelProto()  # the model without its initializers, which are added one by one
    copy_fields(model, light, skip={"graph"})
    copy_fields(model.graph, light.graph, skip={"initializer"})
    if ir_version is not None:
        light.ir_version = ir_version
    on_disk = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if on_disk:
        if source_dir is None:
            raise ValueError(f"tensor {on_disk[0].name!r} has its data on disk; save() needs the folder it was read from")
        probe = onnx.ModelProto()
        probe.graph.initializer.extend(on_disk)  # metadata only: these carry no data
        check_external_data(probe, os.path.join(source_dir, "model.onnx"))
    data_path = os.path.join(folder, location)
    data = None
    try:
        for tensor in model.graph.initializer:
            target = light.graph.initializer.add()
            source = _source_span(tensor, source_dir)
            if source is None:
                # by dims first: measuring a tensor (ByteSize, len(raw_data)) copies its bytes
                known = tensor_bytes(tensor)
                if not tensor.HasField("raw_data") or (known is not None and known < INLINE_BELOW):
                    target.CopyFrom(tensor)
                    continue
                raw = tensor.raw_data  # one tensor's bytes at a time
                if len(raw) < INLINE_BELOW:
                    target.CopyFrom(tensor)
                    continue
            if data is None:
                data = open(data_path, "xb")
            offset = _pad(data, _PAGE if (source[2] if source else len(raw)) >= _ALIGN_FROM else _SMALL_ALIGN)
            length = _copy_span(data, *source) if source else data.write(raw)
            _copy_metadata(tensor, target)
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = target.external_data.add()
                entry.key, entry.value = key, value
            raw = None
        if data is not None:
            data.flush()
            os.fsync(data.fileno())
    finally:
        if data is not None:
            data.close()
    with open(path, "xb") as f:
        f.write(light.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def write_inline(model: onnx.ModelProto, path: str, *, ir_version: Optional[int] = None) -> None:
    """Write ``model`` with its weights inside ``path`` (a new file), one initializer at a time.

    ``SerializeToString`` of the whole model is a second copy of every weight; here the model
    without its initializers is written first, then each initializer as its own ``graph`` field
    holding one ``initializer`` entry.  Protobuf merges repeated occurrences of a message field
    (``graph`` fragments append to its repeated ``initializer``), so every reader parses the
    file as the same model; only one tensor's bytes are held at a time.  The file is fsynced.
    """
    light = onnx.ModelProto()
    copy_fields(model, light, skip={"graph"})
    copy_fields(model.graph, light.graph, skip={"initializer"})
    if ir_version is not None:
        light.ir_version = ir_version
    with open(path, "xb") as f:
        f.write(light.SerializeToString())
        for tensor in model.graph.initializer:
            body = tensor.SerializeToString()  # one tensor's bytes
            entry = _GRAPH_INITIALIZER_TAG + _varint(len(body))
            f.write(_MODEL_GRAPH_TAG + _varint(len(entry) + len(body)))
            f.write(entry)
            f.write(body)
            body = None
        f.flush()
        os.fsync(f.fileno())


# Wire tags (field number << 3 | 2, length-delimited): ModelProto.graph is field 7,
# GraphProto.initializer field 5.
_MODEL_GRAPH_TAG = bytes([7 << 3 | 2])
_GRAPH_INITIALIZER_TAG = bytes([5 << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_DATA_FIELDS = frozenset(
    {"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"}
)


def _copy_metadata(tensor: onnx.TensorProto, target: onnx.TensorProto) -> None:
    """Everything of ``tensor`` but its data and data-location fields, then marked external.

    Field by field from the descriptor: ``ListFields`` would copy the data it lists.
    """
    for field in tensor.DESCRIPTOR.fields:
        if field.name in _DATA_FIELDS or field.name in ("external_data", "data_location"):
            continue
        value = getattr(tensor, field.name)
        if _is_repeated(field):
            getattr(target, field.name).extend(value)
        elif not tensor.HasField(field.name):
            continue
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    target.data_location = onnx.TensorProto.EXTERNAL


def _is_repeated(field) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; ``label`` is deprecated there
    return bool(is_repeated) if is_repeated is not None else field.label == field.LABEL_REPEATED


def _source_span(tensor: onnx.TensorProto, source_dir: Optional[str]) -> Optional[Tuple[str, int, int]]:
    """(file, offset, length) of a tensor whose data was left on disk, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entries = _entries(tensor)
    real = os.path.realpath(os.path.join(source_dir, entries["location"]))
    offset = int(entries.get("offset") or 0)
    length = entries.get("length")
    size = int(length) if length else os.path.getsize(real) - offset
    return real, offset, size


def _pad(f, alignment: int) -> int:
    """Zero-fill ``f`` up to a multiple of ``alignment``; returns the new position."""
    position = f.tell()
    gap = -position % alignment
    if gap:
        f.write(b"\0" * gap)
    return position + gap


def _copy_span(out, source: str, offset: int, length: int) -> int:
    with open(source, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise UserError(f"{source}: external data ended early (truncated while being read?)")
            out.write(chunk)
            left -= len(chunk)
    return length


def load_external_data(model: onnx.ModelProto, model_path: "str | os.PathLike", read: bool = True) -> None:
    """Check every external-data record of ``model`` (``check_external_data``), then, with ``read``,
    read the data into the model (as ``onnx.load`` does).  Errors are ``UserError`` naming the model."""
    model_path = os.fspath(model_path)
    if not any(True for _ in external_tensors(model)):
        return
    check_external_data(model, model_path)
    if not read:
        return
    try:
        _read_external(model, model_path)
    except OSError as exc:
        raise UserError(f"{model_path}: cannot read its external data ({exc.strerror or exc})") from None
    except Exception as exc:  # onnx's own checks (symlinks, bounds) as assorted errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{model_path}: cannot read its external data ({first})") from None
