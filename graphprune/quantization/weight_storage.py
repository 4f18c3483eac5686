"""Fewer bytes for a model whose weights ONNX Runtime folds at load: float16 constants, no default attributes, no duplicates.

The int8 fallback of static quantization (``cli/quantize_weight_only.fallback``) stores the weights
as int8 + Cast + Mul, folded into float weights when a session is created.  What remains of the
file besides the int8 values is per-channel scales, biases and graph structure; this module trims
them without changing what ONNX Runtime runs:

- a float32 constant (a per-channel scale, a folded BatchNormalization's bias...) whose float16 form
  is within ``REL_ERROR`` of it (relative to its largest magnitude) and pays for its Cast node is
  stored in float16 with ``Cast`` to float32 under its own name (folded at load like the rest);
- nodes computed from constants only (those Casts and Muls) lose their node names, and the tensors
  they compute for one another get short ones (``~0``, ``~1``...): they are not layers, and ORT's
  optimized graph no longer holds them.  Stored tensors keep their names (a float16 tensor the one
  it replaces, its Cast's output is a short one), and so do the weights layers read;
- Conv attributes equal to their defaults (strides, dilations 1, pads 0, group 1) are dropped;
- small constants with equal type, shape and values (the scalars of every HardSigmoid...) are one.

Refused (left as they are): graph inputs and outputs, tensors on disk, float16 that overflows or
rounds by more than ``REL_ERROR``, tensors too small to pay for a Cast; in a graph with subgraphs
(If, Loop, Scan bodies may read any outer tensor by name) only default attributes are dropped.
"""

from __future__ import annotations

from typing import Dict, Set

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["compact", "REL_ERROR", "CAST_BYTES"]

# float16 keeps 11 significant bits (relative rounding 2^-11 = 4.9e-4); int8 weights round by up to
# 1/254 of a channel's range, ten times more.  Subnormal float16 (below 6.1e-5) rounds more coarsely:
# the bound is checked on the values, relative to the tensor's largest magnitude.
REL_ERROR = 1e-3
# What a Cast node and the float16 tensor's renamed header cost (measured on PP-OCR cls: ~40 bytes).
CAST_BYTES = 48
# Constants up to this many elements are merged when equal (scalars and small shape vectors).
_MERGE_ELEMENTS = 16
_CONV_DEFAULTS = {"strides": 1, "dilations": 1, "pads": 0}


def compact(model: onnx.ModelProto) -> Dict[str, int]:
    """Trims ``model`` in place (see the module docstring); returns what it did, by kind."""
    graph = model.graph
    stats = {"float16_constants": 0, "merged_constants": 0, "default_attributes": _drop_conv_defaults(graph),
             "unnamed_constant_nodes": 0, "renamed_transients": 0}
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return stats  # a subgraph may read any outer tensor by name: no tensor is retyped or renamed
    fixed = {i.name for i in graph.input} | {o.name for o in graph.output}
    casts = _to_float16(graph, fixed)
    stats["float16_constants"] = len(casts)
    stats["merged_constants"] = _merge_duplicates(graph, fixed)
    stats["unnamed_constant_nodes"] = _unname_constant_nodes(graph)
    stats["renamed_transients"] = _shorten_transients(graph, fixed, casts)
    return stats


def _to_float16(graph: onnx.GraphProto, fixed: Set[str]) -> Set[str]:
    """Returns the outputs of the Casts it inserted."""
    first_reader: Dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            first_reader.setdefault(name, index)
    casts: Dict[int, list] = {}
    for tensor in graph.initializer:
        if (tensor.data_type != TensorProto.FLOAT or tensor.name in fixed or tensor.name not in first_reader
                or tensor.data_location == TensorProto.EXTERNAL or int(np.prod(tensor.dims)) * 2 <= CAST_BYTES):
            continue
        values = numpy_helper.to_array(tensor)
        with np.errstate(over="ignore"):  # overflow is refused just below
            half = values.astype(np.float16)
        peak = float(np.abs(values).max())
        if not np.all(np.isfinite(half)) or np.abs(half.astype(np.float32) - values).max() > REL_ERROR * peak:
            continue
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(half, name))  # the stored tensor keeps its name
        casts.setdefault(first_reader[name], []).append(
            helper.make_node("Cast", [name], [f"{name}_float"], to=TensorProto.FLOAT))
    if casts:
        cast_of = {c.input[0]: c.output[0] for cs in casts.values() for c in cs}
        nodes = []
        for index, node in enumerate(graph.node):
            for j, name in enumerate(node.input):
                node.input[j] = cast_of.get(name, name)
            nodes.extend(casts.get(index, ()))
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    return {c.output[0] for cs in casts.values() for c in cs}


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
    dropped = 0
    for node in graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        kept = [a for a in node.attribute if not _is_default(a)]
        dropped += len(node.attribute) - len(kept)
        if len(kept) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)
    return dropped


def _is_default(attr: onnx.AttributeProto) -> bool:
    if attr.name == "group":
        return attr.type == onnx.AttributeProto.INT and attr.i == 1
    default = _CONV_DEFAULTS.get(attr.name)
    return default is not None and attr.type == onnx.AttributeProto.INTS and all(v == default for v in attr.ints)


def _unname_constant_nodes(graph: onnx.GraphProto) -> int:
    """Nodes whose inputs are all constants (transitively): ORT folds them, no one looks them up."""
    constant = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    count = 0
    for node in graph.node:
        if node.input and all(name in constant for name in node.input if name):
            constant.update(node.output)
            if node.name:
                node.name = ""
                count += 1
    return count


def _shorten_transients(graph: onnx.GraphProto, fixed: Set[str], casts: Set[str]) -> int:
    """Tensors that only constant-only nodes compute and read, and the float16 Casts' outputs
    (``casts``: new names, the stored tensor keeps the old one), get short names (``~<n>``): each
    occurs twice in the file, and ORT folds them all at load.  Graph outputs and other tensors a
    layer reads are left alone."""
    constant = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    folded = set()  # indices of nodes computed from constants only
    for index, node in enumerate(graph.node):
        if node.input and all(name in constant for name in node.input if name):
            folded.add(index)
            constant.update(node.output)
    read_by_layer = set(fixed)
    for index, node in enumerate(graph.node):
        if index not in folded:
            read_by_layer.update(name for name in node.input if name not in casts)
    taken = {t.name for t in graph.initializer} | fixed | {x for n in graph.node for x in list(n.input) + list(n.output)}
    renamed: Dict[str, str] = {}
    counter = 0
    for index, node in enumerate(graph.node):
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)
        if index not in folded:
            continue
        for j, name in enumerate(node.output):
            if name and name not in read_by_layer:
                while f"~{counter}" in taken:
                    counter += 1
                renamed[name] = node.output[j] = f"~{counter}"
                counter += 1
    return len(renamed)
