"""Shape inference: symbolic (for passes) and concrete at given input shapes (for MAC counts)."""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np

import onnx

from graphprune.ir import clone, copy_fields, declare_as_input, is_large, real_inputs, value_shape, weightless_copy

__all__ = ["infer_shapes", "concrete_shapes", "with_input_shapes", "observed_shapes", "name_negative_dims",
           "sharing_inference", "sharing_active", "sharing_folder", "strict_inference", "checked_shapes",
           "checked_file", "covers"]


def name_negative_dims(graph: onnx.GraphProto) -> int:
    """Give every declared dim of -1 a symbolic name; returns how many were named.

    Paddle's exporter (every PP-OCR model) and older Keras/tf2onnx exports write a dynamic dim as
    ``dim_value: -1`` on the graph's inputs, outputs and value_info.  ONNX says a dim is a
    non-negative value or a name; ONNX Runtime reads -1 as "any size".  A name per tensor and axis
    says exactly that and claims no equality between dims the model does not tie together.  Other
    negative values follow no convention: they stay, and the door refuses them.
    """
    named = 0
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value == -1:
                dim.dim_param = f"{vi.name}_dim{axis}"  # setting the name clears the value (a oneof)
                named += 1
    return named


def infer_shapes(model: onnx.ModelProto, strict: bool = False, inplace: bool = False) -> onnx.ModelProto:
    """onnx shape inference with data propagation (so Shape->Gather->Reshape chains resolve).

    Large models (``ir.is_large``) are inferred as a weightless copy and the inferred value_info
    is put back: the in-memory API serializes its argument, which would copy every weight (and
    fails past 2 GiB).

    Args:
        strict: raise on inference errors.
        inplace: record the value_info in ``model`` itself and return it (no copy of the weights).
    """
    if not is_large(model):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=strict, data_prop=True)
        if inplace:
            del model.graph.value_info[:]
            model.graph.value_info.extend(inferred.graph.value_info)
            return model
        return inferred
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=strict, data_prop=True)
    result = model if inplace else clone(model)
    del result.graph.value_info[:]
    result.graph.value_info.extend(inferred.graph.value_info)
    return result


def with_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Tuple[int, ...]]) -> onnx.ModelProto:
    """A copy whose inputs have the given concrete shapes (for inference at one size)."""
    fixed = clone(model)
    _set_input_shapes(fixed, input_shapes)
    return fixed


def _set_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Tuple[int, ...]]) -> None:
    for vi in model.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[vi.name]:
                dims.add().dim_value = int(d)


def concrete_shapes(
    model: onnx.ModelProto, input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None
) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Name -> concrete shape of every tensor whose shape inference resolves, at ``input_shapes``.

    Works on a weightless copy (shapes need no weights). Returns None when an input has dynamic
    dims not given in ``input_shapes``.
    """
    overrides = dict(input_shapes or {})
    for vi in real_inputs(model.graph):
        if vi.name in overrides:
            continue
        shape = value_shape(vi)
        if not (shape is not None and all(isinstance(d, int) and d > 0 for d in shape)):
            return None
    light = _shape_shell(model)
    _set_input_shapes(light, overrides)
    return _concrete(model, _infer(light.SerializeToString(), strict=False, data_prop=True))


def _infer(serialized: bytes, strict: bool, data_prop: bool) -> bytes:
    """``onnx.shape_inference.infer_shapes`` on a serialized model (type checks with ``strict``),
    returning the inferred model serialized: the ONNX function parses it into a ``ModelProto``
    (about 20 MB of a 20,000-node graph) of which ``_concrete`` reads only the value shapes."""
    try:  # what the ONNX function calls: a private module, so an onnx without it takes the public way
        from onnx.onnx_cpp2py_export import shape_inference as c_inference

        infer = c_inference.infer_shapes
    except (ImportError, AttributeError):
        return onnx.shape_inference.infer_shapes(serialized, strict, strict, data_prop).SerializeToString()
    return infer(serialized, strict, strict, data_prop)


def _concrete(model: onnx.ModelProto, inferred: bytes, same_initializers: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor of ``model`` whose shape in the serialized ``inferred`` model
    (``model`` or a copy sharing its nodes, after shape inference) is concrete.

    Args:
        same_initializers: the inferred model lists ``model``'s initializers (names, dims, order):
            its own list is read, once.
    """
    g = _shape_message().FromString(inferred).graph
    inferred_inits = {init.name: tuple(init.dims) for init in g.initializer}
    shapes: Dict[str, Tuple[int, ...]] = dict(inferred_inits) if same_initializers else {
        init.name: tuple(init.dims) for init in model.graph.initializer}
    # Each value's type is read as bytes and decoded once per distinct type: walking 20,000 typed
    # values field by field was 0.16 s (most tensors of a graph share a handful of types)
    by_type: Dict[bytes, Optional[Tuple[int, ...]]] = {}
    for vi in [vi for vi in g.input if vi.name not in shapes] + list(g.value_info) + list(g.output):
        type_bytes = vi.type
        values = by_type.get(type_bytes, _UNSEEN)
        if values is _UNSEEN:
            values = by_type[type_bytes] = _concrete_dims(onnx.TypeProto.FromString(type_bytes))
        if values is not None:
            shapes[vi.name] = values
    shapes.update(inferred_inits)  # the initializers' dims win over any value of their name
    for node in model.graph.node:  # the inferred model's nodes are ``model``'s: inference adds only value_info
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    return shapes


def _concrete_dims(type_proto: onnx.TypeProto) -> Optional[Tuple[int, ...]]:
    """The dims of a tensor type whose every dim is a value (positive, or set to 0), else None."""
    tensor_type = type_proto.tensor_type  # unset for non-tensor types: no shape field then
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    values = tuple(d.dim_value for d in dims)
    if all(v > 0 for v in values) or all(d.HasField("dim_value") for d in dims):
        return values
    return None


_SHAPE_MESSAGE = None
_UNSEEN = object()


def _shape_message():
    """A message class reading a serialized ``ModelProto`` for its graph's value names, types (as
    bytes) and initializer dims only: the rest stays unparsed bytes (no 20,000 node objects)."""
    global _SHAPE_MESSAGE
    if _SHAPE_MESSAGE is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        F = descriptor_pb2.FieldDescriptorProto
        spec = descriptor_pb2.FileDescriptorProto(name="graphprune_shapes.proto", package="graphprune_shapes",
                                                  syntax="proto2")

        def message(name: str, fields) -> None:
            msg = spec.message_type.add(name=name)
            for field, number, kind, label, of in fields:
                msg.field.add(name=field, number=number, type=kind, label=label,
                              type_name=f".graphprune_shapes.{of}" if of else None)

        # field numbers of onnx.proto: ModelProto.graph 7; GraphProto.initializer 5, input 11,
        # output 12, value_info 13; ValueInfoProto.name 1, type 2; TensorProto.dims 1, name 8
        message("Value", [("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None), ("type", 2, F.TYPE_BYTES, F.LABEL_OPTIONAL, None)])
        message("Tensor", [("dims", 1, F.TYPE_INT64, F.LABEL_REPEATED, None), ("name", 8, F.TYPE_STRING, F.LABEL_OPTIONAL, None)])
        message("Graph", [("initializer", 5, F.TYPE_MESSAGE, F.LABEL_REPEATED, "Tensor")]
                + [(f, n, F.TYPE_MESSAGE, F.LABEL_REPEATED, "Value") for f, n in (("input", 11), ("output", 12), ("value_info", 13))])
        message("Model", [("graph", 7, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, "Graph")])
        pool = descriptor_pool.DescriptorPool()
        pool.Add(spec)
        _SHAPE_MESSAGE = message_factory.GetMessageClass(pool.FindMessageTypeByName("graphprune_shapes.Model"))
    return _SHAPE_MESSAGE


# Within ``sharing_inference``: id(model) -> (model, its size signature, the concrete shapes the
# full check's strict inference found, the file of the weightless copy it checked or None); the
# model is held so that its id is not reused.  The copy itself is not kept (12 MB of a 20,000-node
# graph, for the whole command): the session check reads its file.
_CHECKED: Optional[Dict[int, tuple]] = None
# The folder holding those files (``sharing_folder``), made on first use within the block.
_FOLDER: Optional[str] = None


@contextlib.contextmanager
def sharing_inference() -> Iterator[None]:
    """Within the block, the full check (``model_io.check_model(full=True)``) keeps the concrete
    shapes its strict inference finds, for ``checked_shapes``: a command that checks a model and
    then counts its MACs or analyses it infers its shapes once, not three times (0.2-0.3 s each
    on a 20,000-node graph).  The file of the weightless copy it checked stays too, for the session
    check (``checked_file``): one copy and one serialization per model.  Only for code that does
    not edit a model after checking it."""
    global _CHECKED, _FOLDER
    if _CHECKED is not None:
        yield
        return
    _CHECKED = {}
    try:
        yield
    finally:
        _CHECKED = None
        folder, _FOLDER = _FOLDER, None
        if folder is not None:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def sharing_active() -> bool:
    """Whether a ``sharing_inference`` block is active."""
    return _CHECKED is not None


def sharing_folder() -> str:
    """A new empty folder that lives as long as the active ``sharing_inference`` block."""
    import tempfile

    global _FOLDER
    if _CHECKED is None:
        raise RuntimeError("sharing_folder() outside sharing_inference()")
    if _FOLDER is None:
        _FOLDER = tempfile.mkdtemp(prefix="graphprune-check-")
    return tempfile.mkdtemp(dir=_FOLDER)


def _signature(model: onnx.ModelProto) -> tuple:
    g = model.graph
    return len(g.node), len(g.initializer), len(g.input), len(g.output), len(g.value_info)


def strict_inference(checked: Optional[onnx.ModelProto], model: onnx.ModelProto, serialized: Optional[bytes] = None,
                     path: Optional[str] = None) -> None:
    """Run what the full checker adds to the basic one on ``checked`` (``model`` or its weightless
    copy): onnx's shape inference with type checks, strict (``check_model(full_check=True)`` runs
    exactly this), raising its ``InferenceError``; within ``sharing_inference`` the shapes are
    kept for ``model``.

    Args:
        serialized: ``checked``'s bytes when the caller has them (inferred from them: no second
            serialization; ``checked`` may then be None).
        path: the file ``checked`` was written to (kept for ``checked_file``).
    """
    inferred = _infer(serialized if serialized is not None else checked.SerializeToString(), strict=True, data_prop=False)
    if _CHECKED is not None:
        # ``checked`` is ``model`` or its weightless copy: the same initializers, records or not
        _CHECKED[id(model)] = (model, _signature(model), _concrete(model, inferred, same_initializers=True), path)


def _entry(model: onnx.ModelProto) -> Optional[tuple]:
    entry = (_CHECKED or {}).get(id(model))
    if entry is None or entry[0] is not model or entry[1] != _signature(model):
        return None
    return entry


def checked_shapes(model: onnx.ModelProto) -> Optional[Dict[str, Tuple[int, ...]]]:
    """The concrete shapes the full check of ``model`` inferred (within ``sharing_inference``),
    or None.  A tensor whose shape is not concrete there is absent: callers fall back to their
    own inference unless every shape they need is present."""
    entry = _entry(model)
    return None if entry is None else entry[2]


def checked_file(model: onnx.ModelProto) -> Optional[str]:
    """The file the full check of ``model`` checked, within ``sharing_inference``: its weightless
    copy (``ir.weightless_copy``) written beside a sized stand-in for its weights
    (``ir.write_weightless(sized=True)``); None when there is none."""
    entry = _entry(model)
    return None if entry is None else entry[3]


def covers(shapes: Mapping[str, tuple], model: onnx.ModelProto) -> bool:
    """Whether ``shapes`` holds every real input and node output of ``model`` (all concrete)."""
    graph = model.graph
    return all(vi.name in shapes for vi in real_inputs(graph)) and all(
        not name or name in shapes for node in graph.node for name in node.output)


# Initializers up to this many elements keep their values in ``_shape_shell`` (shape vectors, axes,
# scalars: data propagation reads them), as do integer tensors up to _SHELL_INDEX (Reshape targets,
# Slice bounds, Gather indices).
_SHELL_SMALL = 64
_SHELL_INDEX = 2**17
_INDEX_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _shape_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for shape inference: large initializers become typed graph inputs (no data at all).

    Cheaper than ``ir.weightless_copy`` (no external-data records to build, serialize and parse):
    a third less time per inference on a 20,000-node graph, counted twice per ``prune``.
    """
    light = onnx.ModelProto()
    copy_fields(model, light, skip=("graph",))
    copy_fields(model.graph, light.graph, skip=("initializer",))
    declared = {vi.name for vi in model.graph.input}
    for init in model.graph.initializer:
        count = math.prod(init.dims)
        stays = count <= _SHELL_SMALL or (init.data_type in _INDEX_TYPES and count <= _SHELL_INDEX)
        if stays and init.data_location != onnx.TensorProto.EXTERNAL:
            light.graph.initializer.add().CopyFrom(init)
        elif init.name not in declared:
            declare_as_input(light.graph, init)
    return light


def observed_shapes(
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    known: Mapping[str, tuple],
    *,
    names: Optional[Iterable[str]] = None,
    threads: Optional[int] = 1,
) -> Dict[str, tuple]:
    """``known`` completed with the shapes ORT observes for the node outputs it lacks.

    ONNX shape inference gives up on some exported graphs (position-embedding slices at batch 1,
    Shape -> Gather -> Reshape chains); one run with those tensors exposed as outputs fills the gaps.

    Args:
        feed: one input feed at the shapes of interest.
        known: shapes already known (from inference); returned entries override nothing in it.
        names: the tensors wanted (default: every node output).
        threads: intra-op threads of the probe session.
    """
    from graphprune.runtime import make_session

    produced = [out for node in model.graph.node for out in node.output if out]
    produced_set = set(produced)
    wanted = produced if names is None else [n for n in names if n in produced_set]
    missing = list(dict.fromkeys(n for n in wanted if n not in known))
    if not missing:
        return dict(known)
    # the tensors are exposed as outputs of ``model`` itself for the session, then removed again:
    # a copy would duplicate every weight
    listed = {o.name for o in model.graph.output}
    n_outputs = len(model.graph.output)
    try:
        for name in missing:
            if name not in listed:
                model.graph.output.append(onnx.ValueInfoProto(name=name))  # ORT needs no type for outputs
        session = make_session(model, threads=threads)
    finally:
        del model.graph.output[n_outputs:]
    values = session.run(missing, dict(feed))
    shapes = dict(known)
    shapes.update({name: tuple(np.shape(v)) for name, v in zip(missing, values)})
    return shapes
