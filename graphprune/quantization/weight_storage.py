"""Fewer bytes for a model whose weights ONNX Runtime folds at load: packed float16 constants, short names, no defaults.

The int8 fallback of static quantization (``cli/quantize_weight_only.fallback``) stores the weights
as int8 + Cast + Mul, folded into float weights when a session is created.  What remains of the
file besides the int8 values is per-channel scales, biases and graph structure (on PP-OCR's
orientation classifier, a third of the file after int8); this module trims them without changing
what ONNX Runtime runs:

- Conv attributes equal to their defaults (strides, dilations 1, pads 0, group 1) are dropped, and
  ``kernel_shape`` where it is the weight's own spatial shape (the spec infers it from the weight);
- small constants with equal type, shape and values (the scalars of every HardSigmoid...) are one;
- the float32 constants (per-channel scales, folded BatchNormalizations' biases, small float
  weights) are packed: those with the same trailing dimensions are concatenated along their first
  axis into one tensor, stored in float16 where that rounds each by at most ``REL_ERROR`` of its
  largest value, and cut back apart by one ``Split`` (after one ``Cast`` to float32) whose outputs
  carry the original names.  One Cast and one Split for all of them instead of a Cast and a
  tensor header each: ONNX Runtime folds both at load like the dequantization;
- every tensor except the graph's inputs and outputs gets a short name (``0``, ``1``... ``a``...,
  base 62, in graph order) and nodes lose their names: on a small CNN the names were 30% of what
  is not int8 values, and ONNX Runtime names the nodes of the graph it runs itself; the metadata
  records graphprune reads back (masked channels, sparse weights, removals) follow the new names.

Refused (left as they are): graph inputs and outputs, tensors on disk, float16 that overflows or
rounds by more than ``REL_ERROR``; in a graph with subgraphs (If, Loop, Scan bodies may read any
outer tensor by name), sparse initializers, quantization annotations or training info (they name
tensors too) only default attributes are dropped.
"""

from __future__ import annotations

import string
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["compact", "REL_ERROR", "CAST_BYTES", "short_name"]

# float16 keeps 11 significant bits (relative rounding 2^-11 = 4.9e-4); int8 weights round by up to
# 1/254 of a channel's range, ten times more.  Subnormal float16 (below 6.1e-5) rounds more coarsely:
# the bound is checked on the values, relative to the tensor's largest magnitude.
REL_ERROR = 1e-3
# What a Cast node of its own costs (a tensor that packs with no other): below twice this many
# elements, float16 does not pay for it.
CAST_BYTES = 24
# Constants up to this many elements are merged when equal (scalars and small shape vectors).
_MERGE_ELEMENTS = 16
# Larger constants are not packed: concatenating them would copy large weights for no gain.
_PACK_ELEMENTS = 1 << 16
_CONV_DEFAULTS = {"strides": 1, "dilations": 1, "pads": 0}
_DIGITS = string.digits + string.ascii_letters


def compact(model: onnx.ModelProto) -> Dict[str, int]:
    """Trims ``model`` in place (see the module docstring); returns what it did, by kind."""
    graph = model.graph
    stats = {"default_attributes": _drop_conv_defaults(graph), "merged_constants": 0, "packed_constants": 0,
             "float16_constants": 0, "packed_weights": 0, "renamed_tensors": 0, "unnamed_nodes": 0}
    if graph.sparse_initializer or graph.quantization_annotation or model.training_info or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return stats  # a subgraph (or an annotation) may name any tensor: no tensor is retyped or renamed
    fixed = {i.name for i in graph.input} | {o.name for o in graph.output}
    stats["packed_weights"] = _pack_dequantized(graph, fixed, _opset(model))
    stats["packed_constants"], stats["float16_constants"] = _pack_constants(graph, fixed, _opset(model))
    stats["merged_constants"] = _merge_duplicates(graph, fixed)  # after packing: equal Split sizes too
    renamed, stats["unnamed_nodes"] = _shorten_names(graph, fixed)
    stats["renamed_tensors"] = sum(1 for old, short in renamed.items() if old != short)
    _rename_records(model, renamed)
    return stats


def short_name(index: int) -> str:
    """``index`` in base 62 (0-9, a-z, A-Z): the shortest names a graph can have."""
    digits = ""
    while True:
        index, digit = divmod(index, len(_DIGITS))
        digits = _DIGITS[digit] + digits
        if not index:
            return digits


def _opset(model: onnx.ModelProto) -> int:
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)


def _half_or_none(values: np.ndarray) -> Optional[np.ndarray]:
    """The float16 form of ``values`` when it overflows nowhere and rounds by at most REL_ERROR."""
    with np.errstate(over="ignore"):  # overflow is refused just below
        half = values.astype(np.float16)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if not np.all(np.isfinite(half)) or np.abs(half.astype(np.float32) - values).max(initial=0.0) > REL_ERROR * peak:
        return None
    return half


def _pack_constants(graph: onnx.GraphProto, fixed: Set[str], opset: int) -> Tuple[int, int]:
    """Packs float32 constants by trailing shape (see the module docstring); returns (tensors
    packed into a shared tensor, tensors stored in float16)."""
    read = {name for node in graph.node for name in node.input}
    groups: Dict[Tuple[tuple, bool], List[Tuple[TensorProto, np.ndarray]]] = {}
    for tensor in graph.initializer:
        if (tensor.data_type != TensorProto.FLOAT or tensor.name in fixed or tensor.name not in read
                or tensor.data_location == TensorProto.EXTERNAL or not tensor.dims
                or not 0 < int(np.prod(tensor.dims)) <= _PACK_ELEMENTS):
            continue
        values = numpy_helper.to_array(tensor)
        half = _half_or_none(values)
        stored = values if half is None else half
        groups.setdefault((tuple(tensor.dims[1:]), half is not None), []).append((tensor, stored))
    taken = {t.name for t in graph.initializer} | {x for n in graph.node for x in list(n.input) + list(n.output)}
    removed: Set[str] = set()
    new_inits, new_nodes, packed, halves = [], [], 0, 0
    for (_, is_half), members in groups.items():
        if len(members) == 1 and (not is_half or members[0][1].size * 2 <= CAST_BYTES):
            continue  # alone and float32, or too small to pay for its Cast: left as it is
        blob = _fresh(f"{members[0][0].name}_packed", taken)
        new_inits.append(numpy_helper.from_array(np.concatenate([m for _, m in members], axis=0), blob))
        names = [t.name for t, _ in members]
        source = blob
        if is_half:
            source = names[0] if len(members) == 1 else _fresh(f"{blob}_float", taken)
            new_nodes.append(helper.make_node("Cast", [blob], [source], to=TensorProto.FLOAT))
            halves += len(members)
        if len(members) > 1:
            new_nodes.append(_split(source, names, [int(t.dims[0]) for t, _ in members], opset, taken, new_inits))
            packed += len(members)
        removed.update(names)
    if removed:
        kept = [t for t in graph.initializer if t.name not in removed]
        del graph.initializer[:]
        graph.initializer.extend(kept + new_inits)
        nodes = new_nodes + list(graph.node)  # they read initializers only: first is topological order
        del graph.node[:]
        graph.node.extend(nodes)
    return packed, halves


def _split(source: str, names: List[str], sizes: List[int], opset: int, taken: Set[str], inits: list):
    """A Split of ``source`` along axis 0 into ``names``; from opset 13 the sizes are an input
    (stored as varints, not 8-byte raw values), before it an attribute."""
    if opset < 13:
        return helper.make_node("Split", [source], names, axis=0, split=sizes)
    sizes_name = _fresh(f"{source}_sizes", taken)
    inits.append(helper.make_tensor(sizes_name, TensorProto.INT64, [len(sizes)], sizes))
    return helper.make_node("Split", [source, sizes_name], names, axis=0)


def _pack_dequantized(graph: onnx.GraphProto, fixed: Set[str], opset: int) -> int:
    """Int8 weights dequantized per output channel (``Cast(q) * scale``, scale [C, 1, ...]) with the
    same trailing dimensions become one int8 tensor, one Cast, one Mul by the concatenated scales
    and one Split into the weights' names: two nodes and two tensor headers fewer per weight.
    Returns how many weights were packed."""
    inits = {t.name: t for t in graph.initializer}
    readers: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.domain in ("", "ai.onnx")
             and len(n.input) == 1 and n.input[0] in inits and n.input[0] not in fixed}
    groups: Dict[tuple, List[Tuple[onnx.NodeProto, onnx.NodeProto, TensorProto, TensorProto]]] = {}
    for mul in graph.node:
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or mul.output[0] in fixed:
            continue
        cast = casts.get(mul.input[0])
        scale = inits.get(mul.input[1])
        if cast is None or scale is None or scale.name in fixed or readers.get(scale.name) != 1:
            continue
        q = inits[cast.input[0]]
        if (q.data_type != TensorProto.INT8 or readers.get(q.name) != 1 or readers.get(cast.output[0]) != 1
                or cast.output[0] in fixed or q.data_location == TensorProto.EXTERNAL
                or scale.data_location == TensorProto.EXTERNAL or not 0 < int(np.prod(q.dims)) <= _PACK_ELEMENTS
                or tuple(scale.dims) != (q.dims[0],) + (1,) * (len(q.dims) - 1)):
            continue
        to = next(a.i for a in cast.attribute if a.name == "to")
        groups.setdefault((tuple(q.dims[1:]), to, scale.data_type), []).append((cast, mul, q, scale))
    taken = set(inits) | {x for n in graph.node for x in list(n.input) + list(n.output)}
    dropped_nodes: Set[int] = set()
    dropped_inits: Set[str] = set()
    new_inits, new_nodes, packed = [], [], 0
    for (_, to, _), members in groups.items():
        if len(members) < 2:
            continue
        blob = _fresh(f"{members[0][2].name}_packed", taken)
        new_inits.append(numpy_helper.from_array(np.concatenate([numpy_helper.to_array(q) for _, _, q, _ in members]), blob))
        scales = _fresh(f"{blob}_scale", taken)
        new_inits.append(numpy_helper.from_array(np.concatenate([numpy_helper.to_array(s) for *_, s in members]), scales))
        floats, weights = _fresh(f"{blob}_float", taken), _fresh(f"{blob}_dequantized", taken)
        new_nodes += [helper.make_node("Cast", [blob], [floats], to=to), helper.make_node("Mul", [floats, scales], [weights]),
                      _split(weights, [m.output[0] for _, m, _, _ in members], [int(q.dims[0]) for _, _, q, _ in members],
                             opset, taken, new_inits)]
        for cast, mul, q, scale in members:
            dropped_nodes.update((id(cast), id(mul)))
            dropped_inits.update((q.name, scale.name))
        packed += len(members)
    if packed:
        kept = [t for t in graph.initializer if t.name not in dropped_inits]
        del graph.initializer[:]
        graph.initializer.extend(kept + new_inits)
        nodes = new_nodes + [n for n in graph.node if id(n) not in dropped_nodes]  # from initializers only: first
        del graph.node[:]
        graph.node.extend(nodes)
    return packed


def _fresh(base: str, taken: Set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _merge_duplicates(graph: onnx.GraphProto, fixed: Set[str]) -> int:
    kept, alias, seen = [], {}, {}
    for tensor in graph.initializer:
        if tensor.name not in fixed and tensor.data_location != TensorProto.EXTERNAL \
                and int(np.prod(tensor.dims)) <= _MERGE_ELEMENTS:
            key = (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
            if key in seen:
                alias[tensor.name] = seen[key]
                continue
            seen[key] = tensor.name
        kept.append(tensor)
    if alias:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for node in graph.node:
            for j, name in enumerate(node.input):
                node.input[j] = alias.get(name, name)
    return len(alias)


def _drop_conv_defaults(graph: onnx.GraphProto) -> int:
    shapes = _constant_shapes(graph)
    dropped = 0
    for node in graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        kept = [a for a in node.attribute if not _is_default(a, weight)]
        dropped += len(node.attribute) - len(kept)
        if len(kept) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)
    return dropped


def _constant_shapes(graph: onnx.GraphProto) -> Dict[str, tuple]:
    """Shapes of the initializers and of what Cast and Mul compute from them (the dequantized weights)."""
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        inputs = [shapes.get(name) for name in node.input]
        if not inputs or any(s is None for s in inputs):
            continue
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            shapes[node.output[0]] = inputs[0]
        elif node.op_type == "Mul" and node.domain in ("", "ai.onnx"):
            try:
                shapes[node.output[0]] = tuple(np.broadcast_shapes(*inputs))
            except ValueError:
                continue
    return shapes


def _is_default(attr: onnx.AttributeProto, weight: Optional[tuple]) -> bool:
    if attr.name == "group":
        return attr.type == onnx.AttributeProto.INT and attr.i == 1
    if attr.name == "kernel_shape":  # inferred from the weight when absent
        return weight is not None and attr.type == onnx.AttributeProto.INTS and tuple(attr.ints) == weight[2:]
    default = _CONV_DEFAULTS.get(attr.name)
    return default is not None and attr.type == onnx.AttributeProto.INTS and all(v == default for v in attr.ints)


def _shorten_names(graph: onnx.GraphProto, fixed: Set[str]) -> Tuple[Dict[str, str], int]:
    """Every tensor but the graph's inputs and outputs renamed in base 62, in graph order (initializers
    first); every node name cleared.  Returns (old name -> new name, nodes unnamed)."""
    renamed: Dict[str, str] = {}
    counter = 0

    def new(name: str) -> str:
        nonlocal counter
        if not name or name in fixed:
            return name
        if name not in renamed:
            while short_name(counter) in fixed:
                counter += 1
            renamed[name] = short_name(counter)
            counter += 1
        return renamed[name]

    for tensor in graph.initializer:
        tensor.name = new(tensor.name)
    unnamed = 0
    for node in graph.node:
        if node.name:
            unnamed += 1
            node.ClearField("name")
        for j, name in enumerate(node.input):
            node.input[j] = new(name)
        for j, name in enumerate(node.output):
            node.output[j] = new(name)
    for info in graph.value_info:
        info.name = new(info.name)
    return renamed, unnamed


def _rename_records(model: onnx.ModelProto, renamed: Dict[str, str]) -> None:
    """The metadata records graphprune reads back name weights: they follow the new names.

    Otherwise a later ``finetune`` would find none of its masked channels or sparse weights, and the
    mark that the statistics follow a reconstruction would no longer match the removal record it
    copies.  A record that is not valid JSON is left as it is (its readers warn and ignore it).
    """
    import json

    from graphprune.pruning.apply import PRUNED_CHANNELS_KEY, REMOVED_CHANNELS_KEY
    from graphprune.training.batchnorm import RECONSTRUCTED_KEY
    from graphprune.training.masks import WEIGHT_MASKS_KEY

    def by_name(record):
        return {renamed.get(k, k): v for k, v in record.items()} if isinstance(record, dict) else record

    props = {p.key: p for p in model.metadata_props}
    removed = props.get(REMOVED_CHANNELS_KEY)
    mark = props.get(RECONSTRUCTED_KEY)
    mark_matches = mark is not None and removed is not None and mark.value == removed.value
    for key in (PRUNED_CHANNELS_KEY, REMOVED_CHANNELS_KEY, WEIGHT_MASKS_KEY):
        if key not in props:
            continue
        try:
            record = json.loads(props[key].value)
        except (ValueError, RecursionError):
            continue
        if key == WEIGHT_MASKS_KEY and isinstance(record, dict):
            record["weights"] = by_name(record.get("weights"))
        else:
            record = by_name(record)
        props[key].value = json.dumps(record, sort_keys=True)
    if mark_matches:
        mark.value = removed.value
