"""Small helpers over ONNX protos and onnx-graphsurgeon graphs: lookups, constants, conversions."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

__all__ = [
    "clone",
    "real_inputs",
    "initializer_map",
    "producer_map",
    "consumer_map",
    "get_attr",
    "value_shape",
    "Dim",
    "to_gs",
    "from_gs",
    "count_params",
    "weight_bytes",
    "copy_fields",
    "approx_bytes",
    "has_external_data",
    "is_large",
    "weightless_copy",
    "write_weightless",
    "write_weightless_bytes",
    "WEIGHTLESS_LOCATION",
]

Dim = Union[int, str, None]


# Above this many bytes of weights, checks and shape inference work on a weightless copy:
# serializing the whole proto costs a second copy of every weight (and fails past 2 GiB).
LARGE_MODEL_BYTES = 64 * 2**20
# Where a weightless copy says its stripped tensors live (an empty file stands in for it).
WEIGHTLESS_LOCATION = "graphprune-weightless.data"
# Tensors smaller than this keep their data in a weightless copy; so do index tensors up to
# _KEEP_INDEX_BYTES (shape inference's data propagation reads Reshape shapes, Slice starts...).
_STRIP_MIN_BYTES = 1024
_KEEP_INDEX_BYTES = 2**20
_INDEX_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32})


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model``, weights included (use ``weightless_copy`` when they are not needed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (or its external record's length): never
    read from the data itself (upb's ``ByteSize`` encodes the message, i.e. copies the weights)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length" and entry.value.isdigit():
                return int(entry.value)
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return tensor.ByteSize()
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        try:
            bits = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * 8
        except KeyError:  # a corrupt type code: the checker's own words, so the door reports it as it would
            raise ValueError(f"Invalid tensor data type {tensor.data_type} of tensor {tensor.name!r}") from None
        _BITS[tensor.data_type] = bits
    return (math.prod(tensor.dims) * bits + 7) // 8  # math.prod: np.prod costs ~40 us a call (10k tensors: 0.4 s)


_BITS: Dict[int, int] = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, in memory or in external files (no data is read)."""
    return sum(_tensor_bytes(init) for init in model.graph.initializer)


def approx_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size as far as weights go (initializers and Constant-node tensors),
    without serializing it: ``ModelProto.ByteSize`` encodes the whole message under upb (a copy of
    every weight) and raises past protobuf's 2 GiB limit."""
    total = weight_bytes(model)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(_tensor_bytes(attr.t) for attr in node.attribute if attr.type == onnx.AttributeProto.TENSOR)
    return total


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when some initializer's data was left in its external file (loaded without it)."""
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def is_large(model: onnx.ModelProto) -> bool:
    """True when whole-proto copies or serialization should be avoided (see ``weightless_copy``)."""
    return has_external_data(model) or weight_bytes(model) >= LARGE_MODEL_BYTES


def _strippable(tensor: onnx.TensorProto) -> bool:
    size = _tensor_bytes(tensor)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return True
    return size >= (_KEEP_INDEX_BYTES if tensor.data_type in _INDEX_TYPES else _STRIP_MIN_BYTES)


def copy_fields(source, target, skip=()) -> None:
    """Copy every set field of ``source`` into ``target`` except those named in ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def weightless_copy(model: onnx.ModelProto, keep: "frozenset[str] | set[str]" = frozenset()) -> onnx.ModelProto:
    """A copy of ``model`` whose large main-graph initializers carry no data, built without copying any.

    Each stripped tensor keeps its name, type and dims and becomes an external-data record pointing
    at ``WEIGHTLESS_LOCATION`` (an empty stand-in file satisfies the path-based checker); small
    tensors and integer index tensors keep their values so shape inference can propagate them.
    Good for checking, shape inference and anything else that reads only structure.

    Args:
        keep: initializers that keep their data whatever their size (those a caller must read).
    """
    return _weightless(model, keep)[0]


def _weightless(model: onnx.ModelProto, keep=frozenset()) -> Tuple[onnx.ModelProto, int]:
    """``weightless_copy(model, keep)`` and the byte length of its longest stripped tensor."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip=("graph",))
    copy_fields(model.graph, copy.graph, skip=("initializer",))
    # A record is a copy of one made once per (type, dims, length): field by field it cost ~20 us
    # a tensor (10,000 weights: 0.2 s a copy); the copy equals the field-by-field one.
    records: Dict[tuple, onnx.TensorProto] = {}
    longest = 0
    external = onnx.TensorProto.EXTERNAL
    added = copy.graph.initializer.add
    for init in model.graph.initializer:
        target = added()
        if init.name in keep:
            target.CopyFrom(init)
            continue
        size = _tensor_bytes(init)
        if init.data_location != external and size < (_KEEP_INDEX_BYTES if init.data_type in _INDEX_TYPES
                                                      else _STRIP_MIN_BYTES):
            target.CopyFrom(init)  # ``_strippable`` inline
            continue
        longest = max(longest, size)
        dims = tuple(init.dims)
        record = records.get((init.data_type, dims, size))
        if record is None:
            record = records[(init.data_type, dims, size)] = _record(init.data_type, dims, size)
        # ListFields() would hand over (copy) the data fields: the record and the fields it lacks only
        target.CopyFrom(record)
        target.name, target.doc_string = init.name, init.doc_string
        if init.HasField("segment"):
            target.segment.CopyFrom(init.segment)
        if init.metadata_props:
            target.metadata_props.extend(init.metadata_props)
    return copy, longest


def _record(data_type: int, dims: tuple, size: int) -> onnx.TensorProto:
    """A nameless external-data record of ``size`` bytes at offset 0 of ``WEIGHTLESS_LOCATION``."""
    record = onnx.TensorProto(data_type=data_type, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", WEIGHTLESS_LOCATION), ("offset", "0"), ("length", str(size))):
        entry = record.external_data.add()
        entry.key, entry.value = key, value
    return record


def write_weightless(model: onnx.ModelProto, folder: str, name: str = "model.onnx", sized: bool = False) -> str:
    """Write ``weightless_copy(model)`` into ``folder`` beside its stand-in data file; returns its path.

    The stand-in is empty, or with ``sized`` a sparse file as long as the largest stripped tensor
    (every record points at offset 0): ONNX Runtime then maps the stand-in without reading it, so a
    session is created for the cost of the structure (its values are zeros: good for checking
    that the runtime loads the model, not for running it).
    """
    return write_weightless_bytes(model, folder, name, sized)[0]


def write_weightless_bytes(model: onnx.ModelProto, folder: str, name: str = "model.onnx",
                           sized: bool = False) -> Tuple[str, bytes]:
    """``write_weightless``'s path and the bytes written there (the copy itself is not kept)."""
    if _is_weightless(model):
        light, longest = model, 0
        for init in light.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                longest = max(longest, _tensor_bytes(init))
    else:
        light, longest = _weightless(model)
    with open(os.path.join(folder, WEIGHTLESS_LOCATION), "wb") as f:
        if sized:
            f.truncate(longest)  # a hole: no disk blocks, no memory
    data = light.SerializeToString()
    del light  # our copy (12 MB of a 20,000-node graph) goes before the caller's next step
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def _is_weightless(model: onnx.ModelProto) -> bool:
    """True when ``model`` already is a weightless copy (every external record points at the stand-in)."""
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            if not any(e.key == "location" and e.value == WEIGHTLESS_LOCATION for e in init.external_data):
                return False
        elif _strippable(init):
            return False
    return True


def declare_as_input(graph: onnx.GraphProto, tensor: onnx.TensorProto) -> None:
    """Add a graph input typed like ``tensor`` (element type and dims, no data): a weight of a shell
    model for shape inference.  Built in place: ``helper.make_tensor_value_info`` and ``np.prod``
    were half the cost of a shell of a 20,000-node graph (10,000 weights)."""
    vi = graph.input.add()
    vi.name = tensor.name
    vi.type.tensor_type.elem_type = tensor.data_type
    dims = vi.type.tensor_type.shape.dim
    for d in tensor.dims:
        dims.add().dim_value = d


def initializer_map(graph: onnx.GraphProto) -> Dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def real_inputs(graph: onnx.GraphProto) -> List[onnx.ValueInfoProto]:
    """Graph inputs the user feeds: old-style (IR < 4) graphs also list every initializer as an input."""
    inits = {init.name for init in graph.initializer}
    return [vi for vi in graph.input if vi.name not in inits]


def producer_map(graph: onnx.GraphProto) -> Dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def consumer_map(graph: onnx.GraphProto) -> Dict[str, List[onnx.NodeProto]]:
    consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                consumers[name].append(node)
    return consumers


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value a ``Constant`` node produces, whichever attribute holds it."""
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "sparse_value":
        return numpy_helper.to_array(onnx.helper.get_attribute_value(attr).values)  # pragma: no cover
    value = onnx.helper.get_attribute_value(attr)
    dtype = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }.get(attr.name)
    if dtype is None:  # value_string(s)
        return np.array(value, dtype=object)
    return np.array(value, dtype=dtype)


def value_shape(vi: onnx.ValueInfoProto) -> Optional[Tuple[Dim, ...]]:
    """The declared shape: ints for fixed dims, names for symbolic ones, None for unknown ones."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims: List[Dim] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def count_params(model: onnx.ModelProto) -> int:
    """Number of stored weight values: initializers (not fed inputs) and Constant-node tensors."""
    graph = model.graph
    fed = {vi.name for vi in real_inputs(graph)}
    total = sum(math.prod(init.dims) for init in graph.initializer if init.name not in fed)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            total += math.prod(node.attribute[0].t.dims)
    return total


def to_gs(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def from_gs(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping ``like``'s IR version, opsets, and metadata."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = max(like.ir_version, 4)  # initializers need not be inputs from IR 4 on
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    del model.functions[:]
    model.functions.extend(like.functions)
    return model
