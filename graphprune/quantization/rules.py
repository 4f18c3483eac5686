"""Placement rules: which ops ONNX Runtime runs in int8 once wrapped in QDQ, each with a ``check``.

A rule names an op type, its *role* and a ``check(node, graph) -> reason | None`` that returns why
the rule does not apply to this node (``None`` when it does).  Roles:

* ``compute``: Conv, Gemm, MatMul: fused into QLinearConv / QGemm / QLinearMatMul, the ops whose int8
  kernels are the reason to quantize at all (and ConvTranspose, which only other runtimes fuse);
* ``flow``: data movement that runs on int8 as is (pools, Concat, Reshape, Transpose...), so int8
  can flow from one compute op to the next without a DequantizeLinear/QuantizeLinear round trip;
* ``fused``: Relu and Clip, folded into the range of the op before them;
* ``elementwise``: Add, Mul, Sigmoid, LeakyRelu with int8 kernels (QLinearAdd...).

An op type without a rule stays float: ORT has no int8 CPU kernel for it (HardSwish, LayerNorm,
Softmax over float...), and the reason says so.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional

import onnx

from graphprune.ir import get_attr

__all__ = ["Rule", "RULES", "GraphView", "eligible_nodes", "rule_for"]

_FLOAT = onnx.TensorProto.FLOAT


@dataclasses.dataclass
class GraphView:
    """What rules look at: constants, element types and shapes of a prepared graph."""

    graph: onnx.GraphProto
    constants: Mapping[str, onnx.TensorProto]
    elem_types: Mapping[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphView":
        g = model.graph
        fed = {vi.name for vi in g.input}
        constants = {init.name: init for init in g.initializer if init.name not in fed}
        elem_types = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.HasField("tensor_type"):
                elem_types[vi.name] = vi.type.tensor_type.elem_type
        for init in g.initializer:
            elem_types[init.name] = init.data_type
        return cls(g, constants, elem_types)

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def is_float(self, name: str) -> bool:
        return self.elem_types.get(name) == _FLOAT


Check = Callable[[onnx.NodeProto, GraphView], Optional[str]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One op type's int8 story: its role and when it does not apply."""

    op_type: str
    role: str
    check: Check


def _float_activation(node: onnx.NodeProto, view: GraphView) -> Optional[str]:
    x = node.input[0] if node.input else ""
    if not x or not view.is_float(x):
        return f"input {x!r} is not float32"
    return None


def _weighted(node: onnx.NodeProto, view: GraphView) -> Optional[str]:
    reason = _float_activation(node, view)
    if reason:
        return reason
    if len(node.input) < 2 or not view.is_constant(node.input[1]):
        return f"{node.op_type} weight {node.input[1] if len(node.input) > 1 else ''!r} is computed at run time, not a constant"
    if not view.is_float(node.input[1]):
        return "weight is not float32"
    return None


def _matmul(node: onnx.NodeProto, view: GraphView) -> Optional[str]:
    # Both operands may be activations (attention scores): QLinearMatMul takes two int8 inputs.
    for name in node.input[:2]:
        if not view.is_float(name):
            return f"operand {name!r} is not float32"
    return None


def _gemm(node: onnx.NodeProto, view: GraphView) -> Optional[str]:
    reason = _weighted(node, view)
    if reason:
        return reason
    if get_attr(node, "transA", 0):
        return "Gemm with transA=1 has no QGemm kernel"
    return None


def _binary(node: onnx.NodeProto, view: GraphView) -> Optional[str]:
    for name in node.input[:2]:
        if not view.is_float(name):
            return f"operand {name!r} is not float32"
    return None


def _max_pool(node: onnx.NodeProto, view: GraphView) -> Optional[str]:
    if len(node.output) > 1 and node.output[1]:
        return "MaxPool with an indices output has no int8 kernel"
    return _float_activation(node, view)


def _resize(node: onnx.NodeProto, view: GraphView) -> Optional[str]:
    mode = get_attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("nearest", "linear"):
        return f"Resize mode {mode!r} has no int8 kernel"
    return _float_activation(node, view)


def _rules() -> Dict[str, Rule]:
    table: List[Rule] = [
        Rule("Conv", "compute", _weighted),
        # QDQ form for runtimes with an int8 ConvTranspose (TensorRT, OpenVINO); ORT 1.19's CPU
        # provider has none, so the cost model keeps it float there.
        Rule("ConvTranspose", "compute", _weighted),
        Rule("Gemm", "compute", _gemm),
        Rule("MatMul", "compute", _matmul),
        Rule("Relu", "fused", _float_activation),
        Rule("Clip", "fused", _float_activation),
        Rule("Add", "elementwise", _binary),
        Rule("Mul", "elementwise", _binary),
        Rule("Sigmoid", "elementwise", _float_activation),
        Rule("LeakyRelu", "elementwise", _float_activation),
        Rule("MaxPool", "flow", _max_pool),
        Rule("AveragePool", "flow", _float_activation),
        Rule("GlobalAveragePool", "flow", _float_activation),
        Rule("Concat", "flow", _float_activation),
        Rule("Split", "flow", _float_activation),
        Rule("Reshape", "flow", _float_activation),
        Rule("Transpose", "flow", _float_activation),
        Rule("Squeeze", "flow", _float_activation),
        Rule("Unsqueeze", "flow", _float_activation),
        Rule("Resize", "flow", _resize),
    ]
    return {rule.op_type: rule for rule in table}


# op type -> rule; an op type missing here stays float
RULES: Dict[str, Rule] = _rules()


def rule_for(node: onnx.NodeProto) -> Optional[Rule]:
    if node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


def eligible_nodes(model: onnx.ModelProto, view: Optional[GraphView] = None) -> Dict[str, Optional[str]]:
    """Node name -> None when it may run in int8, else the reason it stays float."""
    view = view or GraphView.of(model)
    result: Dict[str, Optional[str]] = {}
    for node in model.graph.node:
        rule = rule_for(node)
        if rule is None:
            result[node.name] = f"no int8 kernel for {node.op_type} in ONNX Runtime (CPU)"
        else:
            result[node.name] = rule.check(node, view)
    return result
