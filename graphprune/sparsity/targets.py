"""Which weights a sparsification touches: per-op rules (weight input, reduction axis) and the selection.

Each supported op type has a ``WeightRule`` saying which input holds its weight and along which weight
axis the op sums (the axis N:M groups run along, as sparse tensor cores expect).  Unknown op types are
refused rather than guessed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune import ir
from graphprune.errors import UserError

__all__ = [
    "WeightRule",
    "WeightTarget",
    "SkippedWeight",
    "WEIGHT_RULES",
    "DEFAULT_OP_TYPES",
    "parse_op_types",
    "find_weights",
]

DEFAULT_OP_TYPES: Tuple[str, ...] = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """How one op type holds its weight.

    Attributes:
        weight_input: index of the node input that is the weight.
        reduction_axis: (node, weight rank) -> the weight axis the op sums over.
    """

    weight_input: int
    reduction_axis: Callable[[onnx.NodeProto, int], int]


def _gemm_axis(node: onnx.NodeProto, rank: int) -> int:
    # Y = A @ B: B is [K, N], or [N, K] with transB=1; K is the summed axis.
    return 1 if ir.get_attr(node, "transB", 0) else 0


WEIGHT_RULES: Dict[str, WeightRule] = {
    # W [C_out, C_in / group, k...]: each output sums over its group's input channels.
    "Conv": WeightRule(1, lambda node, rank: 1),
    # W [C_in, C_out / group, k...]: each output sums over input channels, the first axis.
    "ConvTranspose": WeightRule(1, lambda node, rank: 0),
    "Gemm": WeightRule(1, _gemm_axis),
    # B [..., K, N] (or a 1-D [K]): K is the second-to-last axis.
    "MatMul": WeightRule(1, lambda node, rank: max(rank - 2, 0)),
}


@dataclasses.dataclass
class WeightTarget:
    """A weight initializer to sparsify.

    Attributes:
        name: the initializer name.
        nodes: the nodes that use it as their weight.
        op_type: their op type.
        shape: the weight's shape.
        reduction_axis: the axis the op sums over (N:M groups run along it).
    """

    name: str
    nodes: List[str]
    op_type: str
    shape: Tuple[int, ...]
    reduction_axis: int


@dataclasses.dataclass
class SkippedWeight:
    """A selected node whose weight is left alone, and why."""

    node: str
    op_type: str
    reason: str


def parse_op_types(op_types: "str | Iterable[str] | None") -> Tuple[str, ...]:
    """``"Conv,Gemm"`` or ``["Conv", "Gemm"]`` -> ("Conv", "Gemm"); unknown types are a ``UserError``."""
    if op_types is None:
        return DEFAULT_OP_TYPES
    items = op_types.split(",") if isinstance(op_types, str) else list(op_types)
    names = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names:
        raise UserError("op types: the list is empty (give e.g. Conv,Gemm,MatMul)")
    unknown = [name for name in names if name not in WEIGHT_RULES]
    if unknown:
        raise UserError(
            f"op type {unknown[0]!r} cannot be sparsified (supported: {', '.join(sorted(WEIGHT_RULES))})"
        )
    return names


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def find_weights(
    model: onnx.ModelProto,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    exclude: Sequence[str] = (),
    through_dequantize: bool = False,
    on_disk: bool = False,
) -> Tuple[List[WeightTarget], List[SkippedWeight]]:
    """The weights of the main graph's ``op_types`` nodes that can be sparsified, and the skipped ones.

    Args:
        model: the model (not modified).
        op_types: op types to select (see ``WEIGHT_RULES``).
        exclude: node names (or weight initializer names) to leave alone; a name matching neither is a
            ``UserError``, as a typo would otherwise silently prune the layer the user meant to keep.
        through_dequantize: also select a weight stored quantized (initializer -> DequantizeLinear ->
            node); the target is then the quantized initializer.  Pruning refuses these (zeroing a
            quantized value is only exact with a zero point of 0); compact storage accepts them.
        on_disk: the caller reads weights whose external data was not loaded from disk itself
            (otherwise they are skipped).

    A weight is skipped, with the reason, when it is computed rather than stored, is a graph input
    (overridable at run time), is not a float tensor, or is shared with a node that is not selected.
    """
    graph = model.graph
    inits = ir.initializer_map(graph)
    fed = {vi.name for vi in graph.input}
    producers = ir.producer_map(graph)
    consumers = ir.consumer_map(graph)
    # Keyed by outputs, not id(): protobuf's upb backend hands out short-lived wrapper objects whose
    # ids are reused, so id(node) does not identify a node.
    labels = {_node_key(node): _node_label(node, i) for i, node in enumerate(graph.node)}
    excluded = set(exclude)
    known_names = set(labels.values()) | set(inits)
    for name in excluded:
        if name not in known_names:
            raise UserError(f"--exclude {name!r}: no node or weight of that name in the model")

    by_weight: Dict[str, List[onnx.NodeProto]] = {}
    skipped: List[SkippedWeight] = []
    for node in graph.node:
        rule = WEIGHT_RULES.get(node.op_type)
        if node.op_type not in op_types or rule is None or node.domain not in ("", "ai.onnx"):
            continue
        label = labels[_node_key(node)]
        if len(node.input) <= rule.weight_input or not node.input[rule.weight_input]:
            continue
        weight = node.input[rule.weight_input]
        stored = _stored_name(weight, inits, producers, through_dequantize)
        if label in excluded or weight in excluded or (stored is not None and stored in excluded):
            continue
        reason = _unusable_reason(weight, stored, inits, fed, producers, on_disk)
        if reason:
            skipped.append(SkippedWeight(label, node.op_type, reason))
            continue
        by_weight.setdefault(stored, []).append(node)

    targets: List[WeightTarget] = []
    for stored, nodes in by_weight.items():
        reason = _sharing_reason(stored, nodes, consumers, producers, labels)
        if reason:
            skipped.extend(SkippedWeight(labels[_node_key(n)], n.op_type, reason) for n in nodes)
            continue
        shape = tuple(int(d) for d in inits[stored].dims)
        axes = {WEIGHT_RULES[n.op_type].reduction_axis(n, len(shape)) for n in nodes}
        ops = {n.op_type for n in nodes}
        if len(axes) > 1 or len(ops) > 1:
            skipped.extend(
                SkippedWeight(labels[_node_key(n)], n.op_type, "weight shared by nodes that sum over different axes")
                for n in nodes
            )
            continue
        targets.append(WeightTarget(stored, [labels[_node_key(n)] for n in nodes], nodes[0].op_type, shape, axes.pop()))
    return targets, skipped


def _stored_name(weight: str, inits, producers, through_dequantize: bool) -> Optional[str]:
    """The initializer holding ``weight``: itself, or (optionally) a DequantizeLinear's input."""
    if weight in inits:
        return weight
    producer = producers.get(weight)
    if through_dequantize and producer is not None and producer.op_type == "DequantizeLinear":
        if producer.input[0] in inits:
            return producer.input[0]
    return None


def _unusable_reason(weight: str, stored: Optional[str], inits, fed, producers, on_disk: bool = False) -> Optional[str]:
    if stored is None:
        producer = producers.get(weight)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "weight is already quantized (sparsify before quantizing)"
        if weight in fed:
            return "weight is a graph input, not a stored constant"
        return f"weight is computed by a {producer.op_type if producer else 'missing'} node, not stored"
    if stored in fed:
        return "weight initializer is also a graph input (overridable at run time)"
    init = inits[stored]
    if init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data and not on_disk:
        return "weight data is external and was not loaded"
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    if stored == weight and not np.issubdtype(dtype, np.floating):
        return f"weight is {np.dtype(dtype).name}, not a float tensor"
    return None


def _node_key(node: onnx.NodeProto):
    """What identifies a node within its graph: its name and outputs (outputs are unique in SSA)."""
    return node.name, tuple(node.output)


def _sharing_reason(stored: str, nodes, consumers, producers, labels) -> Optional[str]:
    """Why a weight used elsewhere too must stay: zeroing it would change those other uses."""
    selected = {_node_key(n) for n in nodes}
    for user in consumers.get(stored, []):
        if _node_key(user) in selected:
            continue
        if user.op_type == "DequantizeLinear":
            # The quantized form: its output's users must all be selected nodes.
            for inner in consumers.get(user.output[0], []):
                if _node_key(inner) not in selected:
                    return f"weight also feeds {inner.op_type} node {labels[_node_key(inner)]!r}"
            continue
        return f"weight also feeds {user.op_type} node {labels[_node_key(user)]!r}"
    return None

