"""Shape inference: symbolic (for passes) and concrete at given input shapes (for MAC counts)."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import onnx

from graphprune.ir import clone, real_inputs, value_shape
from graphprune.model_io import EXTERNAL_DATA_THRESHOLD

__all__ = ["infer_shapes", "concrete_shapes", "with_input_shapes"]


def infer_shapes(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """onnx shape inference with data propagation (so Shape->Gather->Reshape chains resolve)."""
    if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
        # the in-memory API cannot take > 2 GiB protos; inference without weights is the same graph
        stripped = clone(model)
        for init in stripped.graph.initializer:
            init.ClearField("raw_data")
        inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=strict, data_prop=True)
        result = clone(model)
        del result.graph.value_info[:]
        result.graph.value_info.extend(inferred.graph.value_info)
        return result
    return onnx.shape_inference.infer_shapes(model, strict_mode=strict, data_prop=True)


def with_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Tuple[int, ...]]) -> onnx.ModelProto:
    """A copy whose inputs have the given concrete shapes (for inference at one size)."""
    fixed = clone(model)
    for vi in fixed.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[vi.name]:
                dims.add().dim_value = int(d)
    return fixed


def concrete_shapes(
    model: onnx.ModelProto, input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None
) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Name -> concrete shape of every tensor whose shape inference resolves, at ``input_shapes``.

    Returns None when an input has dynamic dims not given in ``input_shapes``.
    """
    overrides = dict(input_shapes or {})
    for vi in real_inputs(model.graph):
        if vi.name in overrides:
            continue
        shape = value_shape(vi)
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            return None
    light = clone(model) if model.ByteSize() < EXTERNAL_DATA_THRESHOLD else None
    inferred = infer_shapes(with_input_shapes(light or model, overrides))
    shapes: Dict[str, Tuple[int, ...]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        s = value_shape(vi)
        if s is not None and all(isinstance(d, int) for d in s):
            shapes[vi.name] = s
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    return shapes
