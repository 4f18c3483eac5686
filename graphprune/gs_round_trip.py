"""Whether onnx-graphsurgeon's round trip (import, fold_constants, cleanup, toposort, export) would leave
a graph's structure as it is, decided on the proto in linear time without running it.

``CanonicalizePass`` runs that round trip; on a 20,000-node graph it costs 6-8 s of CPU and a
graphsurgeon object per node and tensor, and most models that reach it (canonicalized already,
or written by graphprune) come back unchanged.  ``round_trip_keeps`` answers "unchanged?" on the
proto: True only when every step provably is a no-op on the structure (nodes, their attributes
and order, initializers and their order, input and output names; value_info and declared types
are not structure).  Anything it is unsure of says False, and the caller runs graphsurgeon: a
wrong False costs time, never a different result.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

__all__ = ["Replay", "replayable", "round_trip_keeps"]

# What graphsurgeon (0.6) does to a graph, and where each condition below comes from:
#  - fold_constants: lowers Constant nodes, elides Casts around shape arithmetic (Cast -> op ->
#    Cast), folds Shape nodes of static shapes, evaluates every node whose inputs are all constant
#    (a node without inputs too) except these ops, flattens If nodes of constant conditions;
_NO_FOLD_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_CAST_ELISION_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Greater", "Less", "Concat"})
#  - cleanup: drops nodes no graph output depends on (and initializers nothing reads, at export);
#  - toposort: orders nodes by their depth (longest path from a graph input or constant), stable;
#  - export: rebuilds each node with ``helper.make_node`` and ``make_attribute`` (a node's
#    doc_string and the like are lost), each input and output from its name and type, the
#    initializers in the order nodes first read them, the graph from its name and doc_string.
_NODE_FIELDS = frozenset({"input", "output", "name", "op_type", "domain", "attribute"})
_IO_FIELDS = frozenset({"name", "type"})
_GRAPH_FIELDS = frozenset({"node", "name", "initializer", "doc_string", "input", "output", "value_info"})
# attribute types graphsurgeon imports and exports as they are (others are dropped or rebuilt)
_PLAIN_ATTRS = frozenset({
    onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING, onnx.AttributeProto.TENSOR,
    onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS, onnx.AttributeProto.STRINGS,
})
_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values())


class Replay(NamedTuple):
    """A graph whose round trip ``replayable`` found computable on the proto."""

    nodes: List[Tuple[str, Tuple[str, ...], Tuple[str, ...]]]  # (op_type, inputs, outputs) of each node
    producer: Dict[str, int]  # tensor name -> index of the node producing it
    ordered: bool  # every node after the producers of its inputs


def replayable(model: onnx.ModelProto, fold: bool) -> Optional[Replay]:
    """The nodes of ``model`` when graphsurgeon's round trip of it (as ``CanonicalizePass`` runs
    it) amounts to ``cleanup``, ``toposort`` and export alone, each node exported byte for byte:
    nothing ``fold_constants`` would change (when ``fold``), no subgraph, function, Constant node or
    node field make_node drops, one producer per tensor, tensor types only.  None otherwise."""
    graph = model.graph
    if len(model.functions) or not _header_kept(graph):
        return None
    inits = [init.name for init in graph.initializer]
    init_set = set(inits)
    if len(init_set) != len(inits) or not _types_read(graph):
        return None
    inputs = {vi.name for vi in graph.input}
    if inputs & init_set:
        return None
    nodes = _plain_nodes(graph)
    if nodes is None:
        return None
    found = _producers(nodes, inputs | init_set)
    if found is None or (fold and _foldable(graph, nodes, init_set, found[0])):
        return None
    return Replay(nodes, *found)


def round_trip_keeps(model: onnx.ModelProto, replay: Optional[Replay]) -> bool:
    """True when graphsurgeon's import, ``fold_constants``, ``cleanup``, ``toposort`` and export, as
    ``CanonicalizePass`` runs them, would give back ``model``'s graph structure unchanged
    (``replay``: ``replayable(model, fold)``, None answers False).  Linear in the graph; False
    whenever unsure.

    Assumes what canonicalize does first was a no-op: main-graph Constant nodes (``replayable``
    refuses any) and graph inputs that name an initializer (refused too).
    """
    if replay is None or not replay.ordered:
        return False
    graph = model.graph
    inits = [init.name for init in graph.initializer]
    return (all(_io_kept(vi) for vi in list(graph.input) + list(graph.output)) and _all_live(graph, replay.nodes)
            and _depths_ascend(replay.nodes, replay.producer)
            and _initializers_in_read_order(graph, replay.nodes, inits, set(inits)))


def _header_kept(graph: onnx.GraphProto) -> bool:
    """The graph's own fields survive ``helper.make_graph(name=..., doc_string=...)``: a name set,
    no empty doc_string set (make_graph skips it), nothing graphsurgeon does not export."""
    fields = {field.name for field, _ in graph.ListFields()}
    if not fields <= _GRAPH_FIELDS or not graph.HasField("name"):
        return False
    return not (graph.HasField("doc_string") and not graph.doc_string)


def _io_kept(vi: onnx.ValueInfoProto) -> bool:
    """A graph input or output comes back as its name and a type (types are not structure here)."""
    return vi.HasField("name") and {f.name for f, _ in vi.ListFields()} <= _IO_FIELDS and _typed_plainly(vi)


def _types_read(graph: onnx.GraphProto) -> bool:
    """Whether graphsurgeon imports and exports every element type of the graph's tensors without
    an error, and every value is a tensor (its importer reads no other type without a warning or an
    error): each distinct type is tried once with its own functions."""
    infos = (graph.input, graph.output, graph.value_info)
    if not all(_typed_plainly(vi) for vis in infos for vi in vis):
        return False
    weights = {init.data_type for init in graph.initializer}
    values = {vi.type.tensor_type.elem_type for vis in infos for vi in vis if vi.HasField("type")}
    try:
        for data_type in weights:
            OnnxImporter.import_tensor(onnx.TensorProto(name="probe", data_type=data_type, dims=[0]))
        for elem_type in values:
            probe = onnx.helper.make_tensor_value_info("probe", elem_type, [1])
            OnnxExporter.export_value_info_proto(OnnxImporter.import_tensor(probe), False)
    except Exception:  # graphsurgeon fails on this type: let it, as before
        return False
    return True


def _typed_plainly(vi: onnx.ValueInfoProto) -> bool:
    """No type, or a tensor type of a known element type (graphsurgeon's importer reads nothing else
    without a warning or an error)."""
    if not vi.HasField("type"):
        return True
    tt = vi.type
    return tt.HasField("tensor_type") and len(tt.ListFields()) == 1 and tt.tensor_type.elem_type in _KNOWN_TYPES


def _plain_nodes(graph: onnx.GraphProto) -> Optional[List[Tuple[str, Tuple[str, ...], Tuple[str, ...]]]]:
    """(op_type, inputs, outputs) of every node, when each comes back byte for byte from
    ``make_node`` and ``make_attribute`` and none is a Constant node or holds a subgraph; else None.
    The proto is read here once: the checks after work on these tuples."""
    verdicts: Dict[bytes, bool] = {}  # an attribute's bytes -> survives (most repeat)
    nodes = []
    for node in graph.node:
        fields = {f.name for f, _ in node.ListFields()}
        if not fields <= _NODE_FIELDS or "op_type" not in fields or node.op_type == "Constant":
            return None
        if "name" in fields and not node.name:
            return None  # make_node sets no empty name
        if "attribute" in fields and not _attributes_kept(node.attribute, verdicts):
            return None
        nodes.append((node.op_type, tuple(node.input), tuple(node.output)))
    return nodes


def _attributes_kept(attrs, verdicts: Dict[bytes, bool]) -> bool:
    if len({a.name for a in attrs}) != len(attrs):
        return False  # graphsurgeon keeps one attribute per name
    for attr in attrs:
        if attr.type not in _PLAIN_ATTRS or attr.ref_attr_name:
            return False  # subgraphs (folded, cleaned, sorted inside) and attributes gs drops or rebuilds
        key = attr.SerializeToString()
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = _attribute_kept(attr, key)
        if not verdict:
            return False
    return True


def _producers(nodes, sources: Set[str]) -> Optional[Tuple[Dict[str, int], bool]]:
    """(tensor name -> index of the node producing it, whether every node comes after the
    producers of its inputs); None when a tensor has two producers or a node produces a graph
    input or an initializer (graphsurgeon's cleanup disconnects those)."""
    producer: Dict[str, int] = {}
    for index, (_, _, outputs) in enumerate(nodes):
        for name in outputs:
            if not name:
                continue
            if name in producer or name in sources:
                return None
            producer[name] = index
    ordered = all(producer.get(name, -1) < index for index, (_, inputs, _) in enumerate(nodes) for name in inputs)
    return producer, ordered


def _foldable(graph: onnx.GraphProto, nodes, init_set: Set[str], producer: Dict[str, int]) -> bool:
    """Whether graphsurgeon's ``fold_constants`` might change something: a node it would evaluate
    (every input constant, or no input), a Shape node it folds (``_shapes_fold``), or an op
    between Casts (cast elision, over-approximated: any such op between two Casts)."""
    cast_outputs = {out for op, _, outputs in nodes if op == "Cast" for out in outputs if out}
    cast_inputs = {inputs[0] for op, inputs, _ in nodes if op == "Cast" and inputs}
    for op, inputs, outputs in nodes:
        if op not in _NO_FOLD_OPS and all(name in init_set for name in inputs if name):
            return True
        if op in _CAST_ELISION_OPS and any(name in cast_outputs for name in inputs) and any(
                name in cast_inputs for name in outputs):
            return True
    try:
        return _shapes_fold(graph, nodes, init_set, producer)
    except Exception:  # graphsurgeon's shape folding fails here too (and the failure is reported)
        return True


def _shapes_fold(graph: onnx.GraphProto, nodes, init_set: Set[str], producer: Dict[str, int]) -> bool:
    """graphsurgeon's shape folding, replayed: a Shape node's output is folded when its input's
    shape (as the importer read it) is static, a Gather of it when the dims its constant indices
    pick are, a Slice of it (along axis 0, constant bounds) when the dims it picks are.  Raises
    where graphsurgeon raises (its Gather and Slice routines read every such node's constants)."""
    shapes = _imported_shapes(graph, {inputs[0] for op, inputs, _ in nodes if op == "Shape" and inputs})
    tensors = {init.name: init for init in graph.initializer}

    def measured_shape(name: str) -> Optional[list]:
        """The shape of the tensor whose Shape ``name`` is (None: not a Shape output, or unknown)."""
        index = producer.get(name)
        if index is None or nodes[index][0] != "Shape":
            return None
        return shapes.get(nodes[index][1][0])

    for index, (op, inputs, _) in enumerate(nodes):
        if op == "Gather":
            data, indices = inputs[0], inputs[1]  # an IndexError as in graphsurgeon
            shape = measured_shape(data)
            if shape is None or indices not in init_set:
                continue
            picked = _value(tensors[indices])
            dims = [shape[int(picked)]] if not picked.shape else [shape[k] for k in picked]
        elif op == "Slice":
            dims = _sliced(graph.node[index], inputs, tensors, measured_shape)
        elif op == "Shape" and inputs:
            dims = shapes.get(inputs[0])
        else:
            continue
        if dims is not None and not any(_is_dynamic(d) for d in dims):
            return True
    return False


def _sliced(node: onnx.NodeProto, inputs, tensors, measured_shape) -> Optional[list]:
    """The dims graphsurgeon's Slice folding takes from a Shape's output (None when it does not)."""
    init_set = tensors.keys()

    def scalar(name):
        values = _value(tensors[name])
        return values if not values.shape else list(values)[0]  # graphsurgeon's get_scalar_value

    attrs = {a.name: list(a.ints) for a in node.attribute}
    if len(inputs) >= 3:
        if inputs[1] not in init_set or inputs[2] not in init_set:
            return None
        starts, ends = scalar(inputs[1]), scalar(inputs[2])
    elif "starts" in attrs and "ends" in attrs:
        starts, ends = attrs["starts"][0], attrs["ends"][0]
    else:
        return None
    shape = measured_shape(inputs[0])
    if shape is None:
        return None
    if len(inputs) > 3:
        if inputs[3] not in init_set or scalar(inputs[3]) != 0:
            return None
    elif "axes" in attrs and attrs["axes"][0] != 0:
        return None
    steps = 1
    if len(inputs) > 4:
        if inputs[4] not in init_set:
            return None
        steps = scalar(inputs[4])
    elif "steps" in attrs:
        steps = attrs["steps"][0]
    return shape[starts:ends:steps]


def _value(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's values (index tensors: a few elements); raises for data left on disk."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise ValueError("data on disk")  # graphsurgeon would read it: counted as foldable
    return numpy_helper.to_array(tensor)


def _is_dynamic(dim) -> bool:
    return not isinstance(dim, int) or dim < 0  # graphsurgeon's is_dynamic_dimension


def _imported_shapes(graph: onnx.GraphProto, names: Set[str]) -> Dict[str, Optional[list]]:
    """The shape graphsurgeon's importer gives each of ``names``: from the first value_info entry
    (later ones fill it while it is empty), else the first graph input, else the first output."""
    shapes: Dict[str, Optional[list]] = {}
    for vi in graph.value_info:
        if vi.name in names:
            shapes[vi.name] = shapes.get(vi.name) or _declared_shape(vi)
    for vi in list(graph.input) + list(graph.output):
        if vi.name in names and vi.name not in shapes:
            shapes[vi.name] = _declared_shape(vi)
    return shapes


def _declared_shape(vi: onnx.ValueInfoProto) -> Optional[list]:
    """graphsurgeon's reading: None without a shape, else per dim its value, name, or None."""
    tensor_type = vi.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
            for d in tensor_type.shape.dim]


def _all_live(graph: onnx.GraphProto, nodes) -> bool:
    """Whether every node feeds a graph output (``cleanup`` keeps exactly those); one backward pass
    over a sorted graph."""
    needed = {vi.name for vi in graph.output}
    for _, inputs, outputs in reversed(nodes):
        if not any(name in needed for name in outputs if name):
            return False
        needed.update(inputs)
    return True


def _depths_ascend(nodes, producer: Dict[str, int]) -> bool:
    """Whether ``toposort`` keeps the order: it sorts a sorted graph stably by depth (1 + the
    deepest producer of an input), so the order stays exactly when depths never decrease."""
    depth: List[int] = []
    last = -1
    for _, inputs, _ in nodes:
        level = 0
        for name in inputs:
            index = producer.get(name)
            if index is not None and depth[index] + 1 > level:
                level = depth[index] + 1
        if level < last:
            return False
        depth.append(level)
        last = level
    return True


def _initializers_in_read_order(graph: onnx.GraphProto, nodes, inits: List[str], init_set: Set[str]) -> bool:
    """Whether the initializers are listed as the export lists them: in the order nodes (inputs,
    then outputs) and then graph outputs first name them, none unread."""
    order: List[str] = []
    seen: Set[str] = set()
    for _, inputs, _ in nodes:
        for name in inputs:
            if name in init_set and name not in seen:
                seen.add(name)
                order.append(name)
    for vi in graph.output:
        if vi.name in init_set and vi.name not in seen:
            seen.add(vi.name)
            order.append(vi.name)
    return order == inits


def _attribute_kept(attr: onnx.AttributeProto, serialized: bytes) -> bool:
    """Whether graphsurgeon's import and export of ``attr`` give back the same bytes."""
    kind = attr.type
    try:
        if kind == onnx.AttributeProto.STRING:
            value = attr.s.decode()
        elif kind == onnx.AttributeProto.STRINGS:
            value = [s.decode() for s in attr.strings]
        elif kind == onnx.AttributeProto.TENSOR:
            value = onnx.TensorProto()
            value.CopyFrom(attr.t)
            value.name = attr.t.name  # the exporter names the tensor: the field is then set
        elif kind in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
            value = list(attr.floats if kind == onnx.AttributeProto.FLOATS else attr.ints)
        else:
            value = attr.f if kind == onnx.AttributeProto.FLOAT else attr.i
        rebuilt = helper.make_attribute(attr.name, value)
    except Exception:  # graphsurgeon fails the same way (an empty list, bytes that are not UTF-8)
        return False
    return rebuilt.SerializeToString() == serialized
