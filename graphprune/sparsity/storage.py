"""Compact storage of sparse weights: non-zeros plus 1-byte position steps, rebuilt in-graph.

Why not ONNX ``sparse_initializer``: ORT 1.19 loads it, but ``onnx.checker`` (full check) rejects any
op consuming one (shape inference types it ``sparse_tensor``), and its indices must be int64 — 8 bytes
per non-zero, more than a float value.  Instead a weight ``W`` is stored as

    W.sparse_values  [K]  the non-zeros (plus zero fillers), in the weight's dtype
    W.sparse_steps   [K]  uint8 distance from the previous stored position (the first from 0)

and rebuilt by standard ops that ONNX Runtime constant-folds when the session is created:

    Reshape(ScatterElements(ConstantOfShape(numel), CumSum(Cast(steps)), values), shape) -> W

A gap longer than 255 is bridged by fillers (value 0 every 255 positions), as Deep Compression's
relative indices do.  Consumers still read ``W``, so outputs are bit-identical to the dense model.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune import ir
from graphprune.errors import UserError
from graphprune.model_io import default_opset

__all__ = [
    "MIN_OPSET",
    "encode_positions",
    "compact_initializers",
    "stored_weights",
    "compact_weight_names",
    "expand_compact_weights",
]

# CumSum and ScatterElements first appear in opset 11.
MIN_OPSET = 11
_MAX_STEP = 255
# Bytes the rebuild nodes and their small constants add; a weight is compacted only if it still saves.
_OVERHEAD_BYTES = 512
_SUPPORTED_DTYPES = {
    np.dtype(t)
    for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
              np.uint8, np.uint16, np.uint32, np.uint64)
}


def encode_positions(weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 steps, values) such that ``positions = cumsum(steps)`` and ``flat[positions] = values``.

    Every non-zero of ``weight`` appears once; gaps over 255 get zero-valued fillers.
    """
    flat = weight.ravel()
    positions = np.flatnonzero(flat)
    if positions.size == 0:  # an all-zero weight still needs one entry for a well-formed scatter
        positions = np.zeros(1, dtype=np.int64)
    deltas = np.diff(positions, prepend=0)
    hops = np.maximum(1, -(-deltas // _MAX_STEP))  # ceil(delta / 255), at least one entry
    ends = np.cumsum(hops) - 1
    steps = np.full(int(hops.sum()), _MAX_STEP, dtype=np.uint8)
    steps[ends] = (deltas - _MAX_STEP * (hops - 1)).astype(np.uint8)
    values = np.zeros(steps.size, dtype=weight.dtype)
    values[ends] = flat[positions]
    return steps, values


def compact_initializers(model: onnx.ModelProto, names: Iterable[str],
                         read: Optional[Callable[[onnx.TensorProto], np.ndarray]] = None,
                         write_dense: Optional[Callable[[onnx.TensorProto, np.ndarray], None]] = None,
                         ) -> Tuple[List[str], Dict[str, str]]:
    """Replace initializers ``names`` by their compact form, in place, where that makes them smaller.

    ``read`` gives an initializer's value (default ``numpy_helper.to_array``): the sparsify pass
    reads records left on disk, and hands over the weights it pruned, through it, one weight at a
    time; ``write_dense(initializer, value)`` is called for a weight that stays dense.  Returns
    (compacted names, {name: why it stayed dense}).  Raises ``UserError`` when the model's opset
    predates the rebuild ops.
    """
    opset = default_opset(model) or 0
    if opset < MIN_OPSET:
        raise UserError(f"sparse storage needs ai.onnx opset >= {MIN_OPSET} (the model imports opset {opset})")
    graph = model.graph
    inits = ir.initializer_map(graph)
    used = _all_names(graph)
    compacted: List[str] = []
    kept: Dict[str, str] = {}
    rebuild_nodes: List[onnx.NodeProto] = []
    for name in dict.fromkeys(names):
        weight = (read or numpy_helper.to_array)(inits[name])
        if weight.dtype not in _SUPPORTED_DTYPES:
            kept[name] = f"element type {weight.dtype} has no compact form"
        else:
            steps, values = encode_positions(weight)
            if steps.nbytes + values.nbytes + _OVERHEAD_BYTES >= weight.nbytes:
                kept[name] = "too few zeros for compact storage to be smaller"
        if name in kept:
            if write_dense is not None:
                write_dense(inits[name], weight)
            continue
        nodes, constants = _rebuild(name, weight, steps, values, used)
        del weight, steps, values
        graph.initializer.remove(inits[name])
        for constant in constants:  # add().CopyFrom: extend() keeps each constant's own arena alive too
            graph.initializer.add().CopyFrom(constant)
        del constants
        rebuild_nodes.extend(nodes)
        compacted.append(name)
    if rebuild_nodes:
        # Rebuilds first: their inputs are all initializers, so topological order holds.
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend(rebuild_nodes + existing)
    return compacted, kept


def _all_names(graph: onnx.GraphProto) -> set:
    names = {init.name for init in graph.initializer} | {vi.name for vi in graph.input}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _fresh(base: str, used: set) -> str:
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def _rebuild(name: str, weight: np.ndarray, steps: np.ndarray, values: np.ndarray, used: set):
    """The five nodes and five constants that recreate ``name`` from its compact form."""
    t = {key: _fresh(f"{name}.sparse_{key}", used)
         for key in ("values", "steps", "axis", "numel", "shape", "steps64", "positions", "zeros", "flat")}
    constants = [
        numpy_helper.from_array(values, t["values"]),
        numpy_helper.from_array(steps, t["steps"]),
        numpy_helper.from_array(np.array(0, dtype=np.int64), t["axis"]),
        numpy_helper.from_array(np.array([weight.size], dtype=np.int64), t["numel"]),
        numpy_helper.from_array(np.array(weight.shape, dtype=np.int64), t["shape"]),
    ]
    zero = numpy_helper.from_array(np.zeros(1, dtype=weight.dtype))
    nodes = [
        helper.make_node("Cast", [t["steps"]], [t["steps64"]], name=_fresh(f"{name}.sparse_cast", used),
                         to=onnx.TensorProto.INT64),
        helper.make_node("CumSum", [t["steps64"], t["axis"]], [t["positions"]],
                         name=_fresh(f"{name}.sparse_cumsum", used)),
        helper.make_node("ConstantOfShape", [t["numel"]], [t["zeros"]],
                         name=_fresh(f"{name}.sparse_zeros", used), value=zero),
        helper.make_node("ScatterElements", [t["zeros"], t["positions"], t["values"]], [t["flat"]],
                         name=_fresh(f"{name}.sparse_scatter", used), axis=0),
        helper.make_node("Reshape", [t["flat"], t["shape"]], [name], name=_fresh(f"{name}.sparse_reshape", used)),
    ]
    return nodes, constants


def _decode_chain(name: str, producers, inits) -> Optional[Tuple[np.ndarray, List[onnx.NodeProto], List[str]]]:
    """(dense value, rebuild nodes, their initializers) when ``name`` is a compact rebuild, else None."""
    reshape = producers.get(name)
    if reshape is None or reshape.op_type != "Reshape":
        return None
    scatter = producers.get(reshape.input[0])
    if scatter is None or scatter.op_type != "ScatterElements" or len(scatter.input) != 3:
        return None
    zeros, cumsum = producers.get(scatter.input[0]), producers.get(scatter.input[1])
    if zeros is None or zeros.op_type != "ConstantOfShape" or cumsum is None or cumsum.op_type != "CumSum":
        return None
    cast = producers.get(cumsum.input[0])
    if cast is None or cast.op_type != "Cast":
        return None
    constant_names = [cast.input[0], cumsum.input[1], zeros.input[0], scatter.input[2], reshape.input[1]]
    if not all(n in inits for n in constant_names):
        return None
    steps, _, numel, values, shape = (numpy_helper.to_array(inits[n]) for n in constant_names)
    flat = np.zeros(int(numel[0]), dtype=values.dtype)
    flat[np.cumsum(steps.astype(np.int64))] = values
    return flat.reshape(tuple(int(d) for d in shape)), [cast, cumsum, zeros, scatter, reshape], constant_names


def compact_weight_names(model: onnx.ModelProto) -> List[str]:
    """Names of the weights stored in compact form."""
    graph = model.graph
    producers, inits = ir.producer_map(graph), ir.initializer_map(graph)
    return [n.output[0] for n in graph.node
            if n.op_type == "Reshape" and _decode_chain(n.output[0], producers, inits) is not None]


def stored_weights(model: onnx.ModelProto, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Values of ``names``, whether dense initializers or compact rebuilds; unknown names are left out."""
    graph = model.graph
    producers, inits = ir.producer_map(graph), ir.initializer_map(graph)
    values: Dict[str, np.ndarray] = {}
    for name in names:
        if name in inits:
            values[name] = numpy_helper.to_array(inits[name])
            continue
        chain = _decode_chain(name, producers, inits)
        if chain is not None:
            values[name] = chain[0]
    return values


def expand_compact_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every compact weight back as a dense initializer (the exact inverse)."""
    result = ir.clone(model)
    graph = result.graph
    producers, inits = ir.producer_map(graph), ir.initializer_map(graph)
    drop_nodes, drop_inits, dense = set(), set(), []
    for reshape in graph.node:
        chain = _decode_chain(reshape.output[0], producers, inits) if reshape.op_type == "Reshape" else None
        if chain is None:
            continue
        value, nodes, constants = chain
        drop_nodes.update(tuple(n.output) for n in nodes)  # not id(): upb wrappers are short-lived
        drop_inits.update(constants)
        dense.append(numpy_helper.from_array(value, reshape.output[0]))
    kept_nodes = [n for n in graph.node if tuple(n.output) not in drop_nodes]
    kept_inits = [i for i in graph.initializer if i.name not in drop_inits]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + dense)
    return result
