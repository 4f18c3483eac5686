"""The vector-Jacobian rules, one per op type, registered by decorator (like the dependency rules).

A rule receives the gradient context, the forward node, the gradients of the node's outputs (None
for an output nothing downstream differentiates) and which inputs need a gradient; it returns one
gradient name per input (None where no gradient flows: integer inputs, shapes, indices, or inputs
that were not asked for).  Rules emit ordinary ONNX nodes through the context, so the gradient graph
runs in any onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import onnx

if TYPE_CHECKING:
    from graphprune.autodiff.context import GradContext

__all__ = ["VJPRule", "VJP_RULES", "vjp", "STRAIGHT_THROUGH_OPS", "rule_for"]

VJPRule = Callable[["GradContext", onnx.NodeProto, List[Optional[str]], List[bool]], Sequence[Optional[str]]]

VJP_RULES: Dict[str, VJPRule] = {}

# Ops whose integer outputs still carry a gradient: QuantizeLinear's int8 output is differentiated
# with the straight-through estimator (its gradient is a float tensor in dequantized units).
STRAIGHT_THROUGH_OPS = {"QuantizeLinear"}


def vjp(*op_types: str) -> Callable[[VJPRule], VJPRule]:
    """Register ``fn`` as the vector-Jacobian rule of ``op_types`` (ai.onnx domain)."""

    def register(fn: VJPRule) -> VJPRule:
        for op in op_types:
            if op in VJP_RULES:
                raise ValueError(f"two gradient rules for {op}")
            VJP_RULES[op] = fn
        return fn

    return register


def rule_for(node: onnx.NodeProto) -> Optional[VJPRule]:
    """The rule of ``node``'s op, or None (ops of other domains have none)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return VJP_RULES.get(node.op_type)
