"""Model statistics from the graph: op counts, parameters, file size and MACs from inferred shapes."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Callable, Dict, Mapping, Optional, Tuple

import onnx

from graphprune.ir import clone, count_params, get_attr, has_external_data, is_large, real_inputs, weight_bytes
from graphprune.shapes import checked_shapes, concrete_shapes

__all__ = ["ModelStats", "model_stats", "count_macs", "MAC_RULES"]


def _prod(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _conv_macs(node, shapes) -> Optional[int]:
    out = shapes.get(node.output[0])
    w = shapes.get(node.input[1])
    if out is None or w is None:
        return None
    # weight [Cout, Cin/groups, k...]: every output element needs Cin/groups * prod(k) MACs
    return _prod(out) * _prod(w[1:])


def _conv_transpose_macs(node, shapes) -> Optional[int]:
    x = shapes.get(node.input[0])
    w = shapes.get(node.input[1])
    if x is None or w is None:
        return None
    # weight [Cin, Cout/groups, k...]: every input element scatters into Cout/groups * prod(k) outputs
    return _prod(x) * _prod(w[1:])


def _gemm_macs(node, shapes) -> Optional[int]:
    a = shapes.get(node.input[0])
    out = shapes.get(node.output[0])
    if a is None or out is None:
        return None
    k = a[0] if get_attr(node, "transA", 0) else a[1]
    return _prod(out) * int(k)


def _matmul_macs(node, shapes) -> Optional[int]:
    a = shapes.get(node.input[0])
    out = shapes.get(node.output[0])
    if a is None or out is None or not a:
        return None
    return _prod(out) * int(a[-1])


def _qlinear_conv_macs(node, shapes) -> Optional[int]:
    out = shapes.get(node.output[0])
    w = shapes.get(node.input[3])  # x, x_scale, x_zero_point come first
    return None if out is None or w is None else _prod(out) * _prod(w[1:])


# op type -> rule(node, shapes) giving MACs (None when shapes are unknown)
MAC_RULES: Dict[str, Callable] = {
    "Conv": _conv_macs,
    "ConvInteger": _conv_macs,
    "QLinearConv": _qlinear_conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
    "MatMulInteger": _matmul_macs,
}


def count_macs(
    model: onnx.ModelProto,
    input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
    external_dir: Optional[str] = None,
) -> Optional[int]:
    """Multiply-accumulates of one run at the given input shapes (Conv, ConvTranspose, Gemm, MatMul).

    QDQ models count the float ops their DequantizeLinear pairs wrap, which is what they compute.
    Returns None when the input shapes cannot be resolved (dynamic dims without ``input_shapes``).
    ``external_dir`` is where the weights of a model loaded without its external data are read
    from, should shapes need one ORT run to resolve.
    """
    shapes = None if input_shapes else checked_shapes(model)
    # every graph input known covers the fed ones (``real_inputs``) without a set of the initializers
    if shapes is not None and (all(vi.name in shapes for vi in model.graph.input)
                               or all(vi.name in shapes for vi in real_inputs(model.graph))):
        total = _total_macs(model, shapes, complete=True)
        if total is not None:
            return total
    shapes = concrete_shapes(model, input_shapes)
    if shapes is None:
        return None
    shapes = _complete_mac_shapes(model, shapes, input_shapes or {}, external_dir)
    return _total_macs(model, shapes)


def _total_macs(model: onnx.ModelProto, shapes: Mapping[str, tuple], complete: bool = False) -> Optional[int]:
    """The MACs of every node a rule counts, from ``shapes``.  With ``complete`` (the shapes the full
    check of ``model`` inferred, ``shapes.sharing_inference``): None unless they hold every tensor
    a MAC rule reads, as only then are they what ``concrete_shapes`` finds (checked in the same
    walk: one pass over the nodes, not two)."""
    total = 0
    for node in model.graph.node:
        rule = MAC_RULES.get(node.op_type)
        if rule is None:
            continue
        if complete:  # plain loops over the fields: no tuple or generator per node
            for name in node.input:
                if name and name not in shapes:
                    return None
            for name in node.output:
                if name and name not in shapes:
                    return None
        macs = rule(node, shapes)
        if macs is not None:
            total += macs
    return total


def _complete_mac_shapes(
    model: onnx.ModelProto, shapes: dict, input_shapes: Mapping[str, Tuple[int, ...]], external_dir: Optional[str]
) -> dict:
    """Fill the shapes MAC rules need but ONNX inference lost with what one ORT run observes.

    Exported transformers lose the sequence length at Shape -> Slice chains, which would otherwise
    count their MatMuls as zero.  Models ORT cannot run on random inputs keep the inferred shapes.
    """
    wanted = [
        name
        for node in model.graph.node
        if node.op_type in MAC_RULES
        for name in list(node.input) + list(node.output)
        if name and name not in shapes
    ]
    if not wanted:
        return shapes
    from graphprune.data import random_inputs
    from graphprune.errors import UserError
    from graphprune.shapes import observed_shapes

    try:
        if has_external_data(model):
            if external_dir is None:
                raise UserError("its weights were not loaded")
            model = clone(model)  # cheap: the weights are still on disk; ORT needs them in memory
            onnx.load_external_data_for_model(model, external_dir)
        feed = random_inputs(model, input_shapes, samples=1).first_batch()
        return observed_shapes(model, feed, shapes, names=wanted)
    except (UserError, RuntimeError, ValueError, OSError) as exc:  # ORT failures surface as RuntimeError subclasses
        import warnings

        warnings.warn(f"MACs counted from inferred shapes only (ORT could not run the model: {exc})")
        return shapes


@dataclasses.dataclass
class ModelStats:
    """Size and cost figures of a model, as shown by ``inspect`` and ``validate``."""

    nodes: int
    ops: Dict[str, int]
    params: int
    size_bytes: int
    macs: Optional[int]
    inputs: Dict[str, list]
    outputs: Dict[str, list]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_stats(
    model: onnx.ModelProto, input_shapes=None, size_bytes: Optional[int] = None, external_dir: Optional[str] = None
) -> ModelStats:
    """The figures ``inspect`` prints; ``model`` may be loaded without its external data (see ``count_macs``)."""
    from graphprune.ir import value_shape

    return ModelStats(
        nodes=len(model.graph.node),
        ops=dict(Counter(n.op_type for n in model.graph.node).most_common()),
        params=count_params(model),
        size_bytes=_proto_bytes(model) if size_bytes is None else size_bytes,
        macs=count_macs(model, input_shapes, external_dir),
        inputs={vi.name: list(value_shape(vi) or []) for vi in real_inputs(model.graph)},
        outputs={vi.name: list(value_shape(vi) or []) for vi in model.graph.output},
    )


def _proto_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size; for large models its weights' bytes (``ByteSize`` walks every tensor)."""
    return weight_bytes(model) if is_large(model) else model.ByteSize()
