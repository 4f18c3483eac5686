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
import stat
from typing import Dict, Iterator, List, Optional, Tuple

import onnx

from graphprune.errors import UserError

__all__ = [
    "check_external_data",
    "load_external_data",
    "external_tensors",
    "data_files",
    "check_direct_paths",
    "SymlinkedData",
    "tensor_bytes",
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
# Locations longer than this are cut in messages (one readable line).
_SHOWN_CHARS = 80


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model`` stored outside the file: initializers, sparse tensors and attribute
    tensors, in subgraphs and functions too.

    One walk over each graph's nodes finds both its attribute tensors and its subgraphs (two walks,
    through nested generators, were 0.06 s a call on a 20,000-node graph; a command calls it 2-3
    times).  Order: each graph's own tensors, then its subgraphs depth first, last found first.
    """
    external = onnx.TensorProto.EXTERNAL
    stack: list = [model.graph, *model.functions]
    while stack:
        graph = stack.pop()
        for tensor in getattr(graph, "initializer", ()):
            if tensor.data_location == external:
                yield tensor
        for sparse in getattr(graph, "sparse_initializer", ()):
            yield from _if_external((sparse.values, sparse.indices))
        subgraphs: list = []
        for node in graph.node:
            if not node.attribute:  # most nodes: skip building an attribute iterator
                continue
            for attr in node.attribute:
                yield from _if_external(_attribute_tensors(attr))
                if attr.type == onnx.AttributeProto.GRAPH:
                    subgraphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    subgraphs.extend(attr.graphs)
        stack.extend(subgraphs)


def _if_external(tensors) -> Iterator[onnx.TensorProto]:
    return (t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL)


def check_external_data(model: onnx.ModelProto, model_path: "str | os.PathLike", direct: bool = False) -> List[str]:
    """Check every external-data record of ``model`` (read from ``model_path``) before any is read.

    Returns the data files the model reads, as real paths, in first-use order.  Raises
    ``UserError`` naming the model, the first bad tensor and its location; with ``direct``, then
    ``SymlinkedData`` for the first data file reached through a symlink (``check_direct_paths``
    from the paths resolved here: a second walk of every record cost 0.03 s on 20,000 nodes).
    """
    model_path = os.fspath(model_path)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(model_path)))
    sizes: Dict[str, int] = {}  # real path -> size, so each file is resolved once
    resolved: Dict[str, str] = {}  # location -> real path (10k tensors share one file: one realpath)
    for tensor in external_tensors(model):
        entries = _entries(tensor)  # decoded once per record (10,000 on a 20,000-node graph)
        location = entries.get("location", "")
        try:
            location, offset, length = _record(tensor, entries)
            real = resolved.get(location)
            if real is None:
                real = resolved[location] = _resolve(folder, location)
            if real not in sizes:
                sizes[real] = _regular_file_size(real)
            _check_span(tensor, offset, length, sizes[real])
        except _Refused as exc:
            shown = location if len(location) <= _SHOWN_CHARS else location[:_SHOWN_CHARS] + "..."
            raise UserError(f"{model_path}: tensor {tensor.name!r}: external data {shown!r} {exc}") from None
    if direct:
        for location, real in resolved.items():
            if real != os.path.normpath(os.path.join(folder, location)):
                raise SymlinkedData(model_path, location)
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


class SymlinkedData(UserError):
    """A data file reached through a symlink, refused as reading it would be (``_read_external``)."""

    def __init__(self, model_path: str, location: str):
        super().__init__(f"{model_path}: cannot read its external data (data file {location!r} is reached through a symlink)")


def check_direct_paths(model: onnx.ModelProto, model_path: "str | os.PathLike") -> None:
    """Refuse, as reading the data at load does (``_read_external``), a data file of ``model`` reached
    through a symlink: for a model loaded without its data whose weights are read later
    (``model_io.load(direct_paths=True)`` checks this while it checks the records)."""
    model_path = os.fspath(model_path)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(model_path)))
    for location in dict.fromkeys(_entries(t).get("location", "") for t in external_tensors(model)):
        if os.path.realpath(os.path.join(folder, location)) != os.path.normpath(os.path.join(folder, location)):
            raise SymlinkedData(model_path, location)


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
    found, seen = [], set()
    for tensor in external_tensors(model):
        location = _entries(tensor).get("location", "")
        if location in seen:  # one stat per file, not per tensor (10,000 on a 20,000-node graph)
            continue
        seen.add(location)
        path = os.path.join(folder, location)
        if location and path not in found and os.path.isfile(path):
            found.append(path)
    return found


class _Refused(Exception):
    """Why one record is refused (the caller adds the model, tensor and location)."""


def _entries(tensor: onnx.TensorProto) -> Dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _record(tensor: onnx.TensorProto, entries: Optional[Dict[str, str]] = None) -> Tuple[str, int, Optional[int]]:
    """(location, offset, length or None), each checked for form (``entries``: the tensor's, when
    the caller decoded them already)."""
    if entries is None:
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


def _attribute_tensors(attr: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    """Tensors an attribute holds: its value, its list, the parts of its sparse tensors."""
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    if attr.HasField("sparse_tensor"):
        yield attr.sparse_tensor.values
        yield attr.sparse_tensor.indices
    for sparse in attr.sparse_tensors:
        yield sparse.values
        yield sparse.indices


def load_external_data(model: onnx.ModelProto, model_path: "str | os.PathLike", read: bool = True,
                       direct: bool = False) -> None:
    """Check every external-data record of ``model`` (``check_external_data``, with ``direct`` also
    refusing data files reached through a symlink), then, with ``read``, read the data into the
    model (as ``onnx.load`` does).  Errors are ``UserError`` naming the model."""
    model_path = os.fspath(model_path)
    if not any(True for _ in external_tensors(model)):
        return
    check_external_data(model, model_path, direct=direct)
    if not read:
        return
    try:
        _read_external(model, model_path)
    except OSError as exc:
        raise UserError(f"{model_path}: cannot read its external data ({exc.strerror or exc})") from None
    except Exception as exc:  # onnx's own checks (symlinks, bounds) as assorted errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{model_path}: cannot read its external data ({first})") from None
