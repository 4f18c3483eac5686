"""Shape inference: symbolic (for passes) and concrete at given input shapes (for MAC counts)."""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

import onnx

from graphprune.ir import clone, real_inputs, value_shape
from graphprune.model_io import EXTERNAL_DATA_THRESHOLD

__all__ = ["infer_shapes", "concrete_shapes", "with_input_shapes", "observed_shapes"]


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
    probe = clone(model)
    listed = {o.name for o in probe.graph.output}
    for name in missing:
        if name not in listed:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))  # ORT needs no type for outputs
    values = make_session(probe, threads=threads).run(missing, dict(feed))
    shapes = dict(known)
    shapes.update({name: tuple(np.shape(v)) for name, v in zip(missing, values)})
    return shapes
