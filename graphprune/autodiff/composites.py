"""Gradients of multi-node patterns whose chain rule, node by node, costs extra passes: exact GELU.

Exporters write GELU as ``y = x * (erf(x / c) + b) * h`` (five elementwise nodes; BERT's FFN, 4 of
its [batch, seq, 4 * hidden] tensors per layer).  Node by node, the chain rule gives
``g h E + (g h x) * erf'(u) / c`` — seven passes over that big tensor.  Seen whole, with
``u = x / c`` and ``E = erf(u) + b`` both kept by the forward,

    dy/dx = h * (E + 2 / sqrt(pi) * u / exp(u^2))

(``x / c`` is ``u`` itself, so no constant value is assumed: exact for any c, b, h), which is six
passes.  Without the scaling (``x * (erf(x) + b) * h``, the form ``linear_gemm`` leaves) u is x.
A pattern is used only when its inner tensors feed nothing else; otherwise the per-op rules run as
usual.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import numpy as np
import onnx

__all__ = ["GeluPattern", "find_gelu_patterns", "gelu_gradient"]


@dataclasses.dataclass
class GeluPattern:
    """One exported exact GELU: ``inner`` nodes are covered by the rule emitted at ``final``."""

    x: str
    u: str  # x / c (or x * c); x itself when the pattern has no scaling
    e: str  # erf(u) + b
    scale: Optional[str]  # the constant h, None when there is no final scaling
    final: onnx.NodeProto
    inner: List[onnx.NodeProto]


def _other(node: onnx.NodeProto, name: str) -> Optional[str]:
    """The input of a two-input ``node`` that is not ``name`` (None if ``name`` is not an input)."""
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _scalar(constants: Dict[str, np.ndarray], name: Optional[str]) -> bool:
    value = constants.get(name) if name else None
    return value is not None and value.size == 1 and value.dtype.kind == "f"


def find_gelu_patterns(model: onnx.ModelProto, constants: Dict[str, np.ndarray]) -> Dict[int, GeluPattern]:
    """Exact-GELU patterns of ``model``, keyed by ``id`` of their final node."""
    graph = model.graph
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {vi.name for vi in graph.output}

    def only(name: str, op: str) -> Optional[onnx.NodeProto]:
        """The single consumer of ``name`` when it is an ``op`` of the default domain."""
        readers = consumers.get(name, [])
        if name in outputs or len(readers) != 1:
            return None
        reader = readers[0]
        return reader if reader.op_type == op and reader.domain in ("", "ai.onnx") else None

    found: Dict[int, GeluPattern] = {}
    for erf in graph.node:
        if erf.op_type != "Erf" or erf.domain not in ("", "ai.onnx"):
            continue
        u = erf.input[0]
        scale_node = next((n for n in graph.node if u in n.output), None)
        x, c = u, None  # x * (erf(x) + b) * h: u is x itself (linear_gemm moved 1 / c into a Gemm)
        if (scale_node is not None and scale_node.op_type in ("Div", "Mul") and u not in outputs
                and len(consumers.get(u, [])) == 1):
            x, c = scale_node.input[0], scale_node.input[1]
            if scale_node.op_type == "Mul" and _scalar(constants, x):
                x, c = c, x
        add = only(erf.output[0], "Add")
        if (c is not None and not _scalar(constants, c)) or add is None or not _scalar(constants, _other(add, erf.output[0])):
            continue
        e = add.output[0]
        product = only(e, "Mul")
        if product is None:
            continue
        partner = _other(product, e)
        inner = ([scale_node] if c is not None else []) + [erf, add]
        if partner == x:  # (x * E) [* h]
            scaled = only(product.output[0], "Mul")
            h = _other(scaled, product.output[0]) if scaled is not None else None
            if scaled is not None and _scalar(constants, h):
                found[id(scaled)] = GeluPattern(x, u, e, h, scaled, inner + [product])
            else:
                found[id(product)] = GeluPattern(x, u, e, None, product, inner)
            continue
        half = next((n for n in graph.node if partner in n.output), None)  # (x * h) * E
        if (half is not None and half.op_type == "Mul" and x in half.input and _scalar(constants, _other(half, x))
                and len(consumers.get(partner, [])) == 1 and partner not in outputs):
            found[id(product)] = GeluPattern(x, u, e, _other(half, x), product, inner + [half])
    return found


def gelu_gradient(ctx, pattern: GeluPattern, g: str) -> str:
    """The gradient of ``pattern.x`` given ``g``, the gradient of the pattern's output."""
    u = pattern.u
    if pattern.scale is not None:
        g = ctx.op("Mul", g, pattern.scale)  # a scalar: onnxruntime folds it into a producing MatMul
    slope = ctx.op("Div", u, ctx.op("Exp", ctx.op("Mul", u, u)))  # exp(u^2) -> inf for |u| > 9.4: slope 0
    total = ctx.op("Add", pattern.e, ctx.op("Mul", slope, ctx.const(2.0 / math.sqrt(math.pi), like=u)))
    return ctx.op("Mul", g, total)
