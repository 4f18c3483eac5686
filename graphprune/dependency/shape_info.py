"""Shape inference without the weights: fast on large models, same result as on the full model."""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.ir import copy_fields, declare_as_input, value_shape

__all__ = ["infer_value_info", "tensor_shapes", "symbolic_shapes", "model_shell"]

# Initializers at most this many elements keep their values (shape vectors, axes, scalars) so
# that data propagation resolves Reshape targets; larger ones become typed inputs.
_SMALL = 64


def model_shell(model: onnx.ModelProto, keep_value_info: bool) -> onnx.ModelProto:
    """The model without its initializers (and without its value_info unless ``keep_value_info``),
    built field by field: no copy of the (large) weights."""
    shell = onnx.ModelProto()
    copy_fields(model, shell, skip=("graph",))
    skip = ("initializer",) if keep_value_info else ("initializer", "value_info")
    copy_fields(model.graph, shell.graph, skip=skip)
    return shell


def _light_model(model: onnx.ModelProto, keep_value_info: bool) -> onnx.ModelProto:
    """The model with large initializers replaced by typed graph inputs."""
    light = model_shell(model, keep_value_info)
    declared = {vi.name for vi in model.graph.input}
    for init in model.graph.initializer:  # math.prod, not np.prod: a third of this on 10,000 weights
        if math.prod(init.dims) <= _SMALL:
            light.graph.initializer.add().CopyFrom(init)
        elif init.name not in declared:
            declare_as_input(light.graph, init)
    return light


# Ops whose first output has the first input's shape and type.  onnx's inference misses some of
# them (GroupNormalization in onnx 1.17, domain-specific activations): their output shape is
# copied from the input and inference resumed from there.
SAME_SHAPE_OPS = frozenset(
    {"GroupNormalization", "InstanceNormalization", "BatchNormalization", "LayerNormalization", "Dropout"}
    # com.microsoft ops of ORT's transformer optimizer (rules/fused.py checks Attention's width)
    | {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "FastGelu",
       "BiasGelu", "QuickGelu", "Attention", "MultiHeadAttention"}
)


def _known(graph: onnx.GraphProto) -> Dict[str, onnx.ValueInfoProto]:
    return {
        vi.name: vi
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
        if vi.type.tensor_type.HasField("shape")
    }


def infer_value_info(model: onnx.ModelProto, keep_value_info: bool = False) -> List[onnx.ValueInfoProto]:
    """Inferred value_info of every intermediate tensor (empty list when inference fails).

    Args:
        model: the model (not modified).
        keep_value_info: start from the model's recorded value_info (for analysis of a model
            whose custom ops inference cannot see through); False after a rewrite made them stale.
    """
    from graphprune.dependency.rules.elementwise import UNARY_OPS

    same_shape = SAME_SHAPE_OPS | set(UNARY_OPS)
    light = _light_model(model, keep_value_info)
    for _ in range(16):  # each round fills the outputs inference skipped, then infers on from them
        try:
            inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
        except Exception:  # inference errors on unusual graphs: fall back to what is recorded
            return list(light.graph.value_info)
        known = _known(inferred.graph)
        filled = []
        for node in inferred.graph.node:
            if (node.op_type in same_shape and node.input and node.output[0] not in known and node.input[0] in known
                    and _keeps_width(node, known)):
                vi = onnx.ValueInfoProto()
                vi.CopyFrom(known[node.input[0]])
                vi.name = node.output[0]
                filled.append(vi)
        refined = [vi for vi in (_slice_kept_axes(n, known, light.graph) for n in inferred.graph.node) if vi is not None]
        if not filled and not refined:
            return list(inferred.graph.value_info)
        replaced = {vi.name for vi in refined}
        del light.graph.value_info[:]
        light.graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name not in replaced)
        light.graph.value_info.extend(filled + refined)
    return list(light.graph.value_info)


def _last_dim(known, name: str) -> Optional[int]:
    vi = known.get(name)
    dims = vi.type.tensor_type.shape.dim if vi is not None else ()
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None


def _keeps_width(node: onnx.NodeProto, known) -> bool:
    """Fused attention writes [B, S, V width]: its input's shape only when V is as wide as the input."""
    if node.op_type == "Attention":
        w = known.get(node.input[1]) if len(node.input) > 1 else None
        dims = w.type.tensor_type.shape.dim if w is not None else ()
        width = _last_dim(known, node.input[0])
        return (not any(a.name == "qkv_hidden_sizes" for a in node.attribute) and len(dims) == 2
                and width is not None and dims[1].dim_value == 3 * width)
    if node.op_type == "MultiHeadAttention":
        width = _last_dim(known, node.input[0])
        return len(node.input) > 2 and width is not None and _last_dim(known, node.input[2]) == width
    return True


def _slice_kept_axes(node: onnx.NodeProto, known, graph: onnx.GraphProto) -> Optional[onnx.ValueInfoProto]:
    """The output of a Slice whose bounds are computed at run time, with the dims of the axes it
    does not slice copied from its input (onnx's inference then knows no dim at all: a causal mask
    sliced to [.., S, S] would lose its leading size-1 axes); None when there is nothing to add."""
    if node.op_type != "Slice" or len(node.input) < 3 or node.output[0] not in known or node.input[0] not in known:
        return None
    x, y = known[node.input[0]].type.tensor_type.shape.dim, known[node.output[0]].type.tensor_type.shape.dim
    if len(x) != len(y):
        return None
    if len(node.input) > 3 and node.input[3]:
        axes = _small_constant(graph, node.input[3])
        if axes is None:
            return None
    else:
        starts = known.get(node.input[1])
        dims = starts.type.tensor_type.shape.dim if starts is not None else ()
        if len(dims) != 1 or not dims[0].HasField("dim_value"):
            return None
        axes = np.arange(dims[0].dim_value)
    sliced = {int(a) % len(x) for a in np.asarray(axes).reshape(-1)}
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(known[node.output[0]])
    changed = False
    for a, (d_in, d_out) in enumerate(zip(x, vi.type.tensor_type.shape.dim)):
        unknown = not d_out.HasField("dim_value") and not d_out.HasField("dim_param")
        if a not in sliced and d_in.HasField("dim_value") and (unknown or d_out.dim_param.startswith("unk__")):
            d_out.Clear()
            d_out.dim_value = d_in.dim_value
            changed = True
    return vi if changed else None


def _small_constant(graph: onnx.GraphProto, name: str) -> Optional[np.ndarray]:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _unresolved(shape: Tuple) -> bool:
    return any(d is None or (isinstance(d, str) and d.startswith("unk__")) for d in shape)


_SYMBOLIC: List = []  # the SymbolicShapeInference class, loaded once (None: unavailable)


def _symbolic_shape_inference():
    """onnxruntime's ``SymbolicShapeInference``, loaded from its file: importing it as
    ``onnxruntime.tools.symbolic_shape_infer`` runs ``onnxruntime/tools/__init__.py``, which imports
    torch when torch is installed (seconds, for nothing the inference uses)."""
    if not _SYMBOLIC:
        found = None
        try:
            spec = importlib.util.find_spec("onnxruntime")
            path = os.path.join(os.path.dirname(spec.origin), "tools", "symbolic_shape_infer.py") if spec else ""
            if os.path.exists(path):
                loader = importlib.util.spec_from_file_location("_graphprune_symbolic_shape_infer", path)
                module = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(module)
                found = module.SymbolicShapeInference
        except Exception:  # an onnxruntime build without its tools, or without sympy
            found = None
        _SYMBOLIC.append(found)
    return _SYMBOLIC[0]


def symbolic_shapes(model: onnx.ModelProto) -> Dict[str, Tuple]:
    """Name -> shape from onnxruntime's symbolic shape inference (empty when it fails).

    Exporters compute Reshape targets at run time: ``view(*input_shape, -1, head_dim)`` becomes
    ``Reshape(x, Concat(Shape(x)[0], Shape(x)[1], [-1], [16]))``.  onnx's data propagation leaves the
    ``-1`` axis unknown and names every broadcast result anew; onnxruntime's inference evaluates the
    shape arithmetic on symbols (``batch``, ``sequence`` stay symbols, ``-1`` is resolved from the
    known product, merged axes read ``batch*sequence``), so the Reshape rule can match axes.
    """
    inference = _symbolic_shape_inference()
    if inference is None:
        return {}
    light = _light_model(model, keep_value_info=False)
    try:
        inferred = inference.infer_shapes(light, auto_merge=True, guess_output_rank=False)
    except Exception:  # unknown ops, or shape arithmetic it cannot follow: onnx's inference alone
        return {}
    if inferred is None:
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        shape = value_shape(vi)
        if shape is not None:
            shapes[vi.name] = shape
    return shapes


def _fast_shape(vi: onnx.ValueInfoProto) -> Optional[Tuple]:
    """``ir.value_shape`` with fewer proto accesses for the common all-fixed case (it runs once per
    tensor of the model: 20,000 times on a 20,000-node graph)."""
    tensor_type = vi.type.tensor_type  # unset for non-tensor types: no shape field then
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    values = tuple(d.dim_value for d in dims)
    if all(v > 0 for v in values):
        return values
    return value_shape(vi)


def tensor_shapes(model: onnx.ModelProto) -> Dict[str, Optional[Tuple]]:
    """Name -> shape (ints, symbols, None for unknown dims) of every tensor the model can tell.

    onnx's inference first; a shape it leaves partly unknown is taken from onnxruntime's symbolic
    inference (``symbolic_shapes``) when that knows it at the same rank and in full.
    """
    from graphprune.shapes import checked_shapes, covers

    checked = checked_shapes(model)
    if checked is not None and covers(checked, model):  # the full check found every shape: nothing to add
        return dict(checked)
    shapes: Dict[str, Optional[Tuple]] = {}
    graph = model.graph
    for vi in list(graph.input) + infer_value_info(model, keep_value_info=True) + list(graph.output):
        shape = _fast_shape(vi)
        if shape is not None:
            shapes[vi.name] = shape
    if any(_unresolved(s) for s in shapes.values()):
        for name, shape in symbolic_shapes(model).items():
            known = shapes.get(name)
            if not _unresolved(shape) and (known is None or (len(known) == len(shape) and _unresolved(known))):
                shapes[name] = shape
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(int(d) for d in node.attribute[0].t.dims)
    return shapes
