"""Small helpers over ONNX protos and onnx-graphsurgeon graphs: lookups, constants, conversions."""

from __future__ import annotations

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
]

Dim = Union[int, str, None]


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


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
    total = sum(int(np.prod(init.dims)) for init in graph.initializer if init.name not in fed)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            total += int(np.prod(node.attribute[0].t.dims))
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
