"""Shape inference without the weights: fast on large models, same result as on the full model."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper

from graphprune.ir import value_shape

__all__ = ["infer_value_info", "tensor_shapes"]

# Initializers at most this many elements keep their values (shape vectors, axes, scalars) so
# that data propagation resolves Reshape targets; larger ones become typed inputs.
_SMALL = 64


def _copy_fields(src, dst, skip=()) -> None:
    """Copy every set field of a protobuf message except ``skip`` (no deep copy of the graph)."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        target = getattr(dst, field.name)
        if field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _light_model(model: onnx.ModelProto, keep_value_info: bool) -> onnx.ModelProto:
    """The model with large initializers replaced by typed graph inputs."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    skip = ("initializer", "value_info") if not keep_value_info else ("initializer",)
    _copy_fields(model.graph, light.graph, skip=skip)
    declared = {vi.name for vi in model.graph.input}
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= _SMALL:
            light.graph.initializer.append(init)
        elif init.name not in declared:
            light.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def infer_value_info(model: onnx.ModelProto, keep_value_info: bool = False) -> List[onnx.ValueInfoProto]:
    """Inferred value_info of every intermediate tensor (empty list when inference fails).

    Args:
        model: the model (not modified).
        keep_value_info: start from the model's recorded value_info (for analysis of a model
            whose custom ops inference cannot see through); False after a rewrite made them stale.
    """
    light = _light_model(model, keep_value_info)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # inference errors on unusual graphs: fall back to what is recorded
        return list(model.graph.value_info) if keep_value_info else []
    return list(inferred.graph.value_info)


def tensor_shapes(model: onnx.ModelProto) -> Dict[str, Optional[Tuple]]:
    """Name -> shape (ints, symbols, None for unknown dims) of every tensor the model can tell."""
    shapes: Dict[str, Optional[Tuple]] = {}
    graph = model.graph
    for vi in list(graph.input) + infer_value_info(model, keep_value_info=True) + list(graph.output):
        shape = value_shape(vi)
        if shape is not None:
            shapes[vi.name] = shape
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(int(d) for d in node.attribute[0].t.dims)
    return shapes
