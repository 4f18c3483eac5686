"""Reverse-mode differentiation of an ONNX graph into ordinary ONNX nodes.

``build_gradients(model, loss, wrt)`` walks the nodes between the tensors in ``wrt`` and ``loss`` in
reverse topological order, asks each node's registered vector-Jacobian rule for the gradients of its
inputs, sums gradients that reach one tensor along several paths, and returns the new nodes and
constants plus the name of each gradient.  Nothing is approximated: a node on the path whose op has
no rule is refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune import ir
from graphprune.autodiff import rules as _rules  # noqa: F401  (registers every rule)
from graphprune.autodiff.composites import find_gelu_patterns, gelu_gradient
from graphprune.autodiff.context import FLOAT_TYPES, GradContext, Shape
from graphprune.autodiff.registry import STRAIGHT_THROUGH_OPS, rule_for
from graphprune.autodiff.simplify import fold_constant_scalings
from graphprune.errors import UserError

__all__ = ["GradientGraph", "ForwardFacts", "forward_facts", "build_gradients", "differentiable_path"]


@dataclasses.dataclass
class ForwardFacts:
    """Element types, static shapes and constant values of a forward graph's tensors."""

    types: Dict[str, int]
    shapes: Dict[str, Shape]
    constants: Dict[str, np.ndarray]
    dim_names: Dict[str, Tuple[Optional[str], ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GradientGraph:
    """The gradient nodes and constants to append to the forward graph.

    Attributes:
        nodes: in topological order (they read forward tensors and each other).
        initializers: the constants they use.
        grads: each tensor of ``wrt`` -> the name of its gradient (None where the loss does not depend on it).
    """

    nodes: List[onnx.NodeProto]
    initializers: List[onnx.TensorProto]
    grads: Dict[str, Optional[str]]


def forward_facts(model: onnx.ModelProto) -> ForwardFacts:
    """Types and shapes from onnx shape inference (with data propagation); constants from the graph."""
    from graphprune.shapes import infer_shapes

    try:
        inferred = infer_shapes(model)
    except Exception:  # an unknown op stops inference: rules then see fewer static shapes
        inferred = model
    graph = inferred.graph
    types: Dict[str, int] = {}
    shapes: Dict[str, Shape] = {}
    dim_names: Dict[str, Tuple[Optional[str], ...]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tensor_type.elem_type:
            types[vi.name] = tensor_type.elem_type
        shape = ir.value_shape(vi)
        if shape is not None:
            shapes[vi.name] = tuple(d if isinstance(d, int) and d > 0 else None for d in shape)
            dim_names[vi.name] = tuple(d if isinstance(d, str) and d else None for d in shape)
    constants: Dict[str, np.ndarray] = {}
    for init in graph.initializer:
        constants[init.name] = numpy_helper.to_array(init)
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            try:
                value = ir.constant_node_value(node)
            except Exception:
                continue
            constants[node.output[0]] = np.asarray(value)
            types.setdefault(node.output[0], onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype))
    return ForwardFacts(types, shapes, constants, dim_names)


def _carries_gradient(node: onnx.NodeProto, name: str, facts: ForwardFacts) -> bool:
    elem = facts.types.get(name)
    return elem is None or elem in FLOAT_TYPES or node.op_type in STRAIGHT_THROUGH_OPS


def differentiable_path(model: onnx.ModelProto, wrt: Sequence[str], facts: ForwardFacts) -> Set[str]:
    """Tensors that depend on ``wrt`` through float values (integer tensors carry no gradient)."""
    reached = set(wrt)
    for node in model.graph.node:
        if any(name in reached for name in node.input if name):
            reached.update(out for out in node.output if out and _carries_gradient(node, out, facts))
    return reached


class _Accumulator:
    """Gradients arriving at each tensor, summed once all its consumers have contributed."""

    def __init__(self, ctx: GradContext):
        self.ctx = ctx
        self.parts: Dict[str, List[str]] = {}

    def add(self, name: str, grad: str) -> None:
        self.parts.setdefault(name, []).append(grad)

    def total(self, name: str) -> Optional[str]:
        parts = self.parts.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            self.parts[name] = [self.ctx.op("Sum", *parts) if len(parts) > 2 else self.ctx.op("Add", *parts)]
        return self.parts[name][0]


def build_gradients(
    model: onnx.ModelProto,
    loss: str,
    wrt: Sequence[str],
    facts: Optional[ForwardFacts] = None,
    seed: Optional[str] = None,
    prefix: str = "graphprune.grad/",
) -> GradientGraph:
    """The gradient of ``loss`` with respect to each tensor in ``wrt``, as ONNX nodes.

    Args:
        model: the forward model (topologically sorted, ai.onnx opset 13 or newer).
        loss: the tensor to differentiate (a scalar, or any tensor with ``seed`` as its incoming gradient).
        wrt: tensors to differentiate with respect to (weights, inputs).
        facts: precomputed ``forward_facts(model)``.
        seed: the gradient of ``loss`` (default: ones).
        prefix: name prefix of every emitted node and tensor.

    Raises ``UserError`` naming the op and node when a node on the path has no rule.
    """
    from graphprune.model_io import default_opset

    facts = facts or forward_facts(model)
    ctx = GradContext(default_opset(model) or 13, facts.types, facts.shapes, facts.constants, prefix=prefix,
                      default_type=facts.types.get(loss, onnx.TensorProto.FLOAT), dim_names=facts.dim_names)
    ctx.producers = {out: node.op_type for node in model.graph.node for out in node.output}
    reached = differentiable_path(model, wrt, facts)
    if loss not in reached:
        return GradientGraph([], [], {name: None for name in wrt})
    acc = _Accumulator(ctx)
    if seed is None:
        one = ctx.const(1.0, like=loss)
        seed = one if ctx.rank(loss) == 0 else ctx.op("Expand", one, ctx.shape_of(loss))
    acc.add(loss, seed)
    patterns = {key: p for key, p in find_gelu_patterns(model, facts.constants).items()  # constants not trained
                if not any(name in reached and name in facts.constants for n in p.inner + [p.final] for name in n.input)}
    covered = {id(n) for p in patterns.values() for n in p.inner}
    for node in reversed(model.graph.node):
        if id(node) in covered:  # differentiated with its pattern, at the pattern's last node
            continue
        wants = [bool(name) and name in reached for name in node.input]
        if not any(wants):
            continue
        if id(node) in patterns:
            grad = acc.total(node.output[0])
            if grad is not None:
                ctx.node = node
                acc.add(patterns[id(node)].x, gelu_gradient(ctx, patterns[id(node)], grad))
                ctx.node = None
            continue
        out_grads = [acc.total(out) if out else None for out in node.output]
        if all(g is None for g in out_grads):
            continue
        rule = rule_for(node)
        if rule is None:
            where = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            raise UserError(f"op {where}{node.op_type} (node {node.name or node.output[0]!r}) has no gradient rule: "
                            "the model cannot be fine-tuned through it")
        ctx.node = node
        in_grads = list(rule(ctx, node, out_grads, wants))
        ctx.node = None
        for name, want, grad in zip(node.input, wants, in_grads):
            if want and grad is not None:
                acc.add(name, grad)
    grads = {name: acc.total(name) for name in wrt}
    nodes, initializers = fold_constant_scalings(ctx.nodes, ctx.initializers, [g for g in grads.values() if g],
                                                 facts.constants)
    return GradientGraph(nodes, initializers, grads)
