"""Writing a model with its weights streamed one tensor at a time: into a data file beside it
(``write_with_external_data``), or inside the ``.onnx`` file itself (``write_inline``), and the
names its data files take.

Neither ever serializes the whole model (a second copy of every weight, and refused by protobuf
past 2 GiB); tensors a model left on disk are copied file to file in chunks.  Records read from a
source folder are checked as at load (``external_data.check_external_data``).
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

import onnx

from graphprune.errors import UserError
from graphprune.external_data import _entries, check_external_data, tensor_bytes
from graphprune.ir import copy_fields

__all__ = ["write_with_external_data", "write_inline", "free_data_name", "old_data_names", "INLINE_BELOW"]

# Tensors below this many bytes stay inside the .onnx file (as onnx.save_model's size_threshold).
INLINE_BELOW = 1024
# Tensors of at least _ALIGN_FROM bytes start at a multiple of _PAGE in the data file, so ONNX
# Runtime can memory-map them; smaller ones at a multiple of _SMALL_ALIGN.
_ALIGN_FROM = 64 * 1024
_PAGE = 4096
_SMALL_ALIGN = 64
# Copies from a source data file go in chunks of this many bytes (bounded memory).
_CHUNK = 16 * 2**20


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
    # a large buffer: 10,000 small tensors through the default 8 KiB one were 10,000 write calls
    with open(path, "xb", buffering=_WRITE_BUFFER) as f:
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


_WRITE_BUFFER = 2**20
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
