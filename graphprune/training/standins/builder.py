"""The builder a training stand-in writes its nodes with, and the registry of stand-ins by op type."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune import ir
from graphprune.errors import UserError

__all__ = ["STANDINS", "Standin", "StandinBuilder", "standin"]

_PREFIX = "graphprune.train"


class StandinBuilder:
    """Writes the replacement nodes of one node; the last op must write ``self.y`` (the node's output).

    Args:
        node: the node being replaced.
        opset: the model's ai.onnx opset (decides attribute vs input forms of Clip / ReduceMean).
        constants: name -> value of the graph's constant tensors (to read BatchNorm statistics).
        shapes: tensor name -> inferred shape (None for unknown dims) where the rank is known.
    """

    def __init__(self, node: onnx.NodeProto, opset: int, constants: Dict[str, np.ndarray],
                 shapes: Dict[str, Tuple[Optional[int], ...]]):
        self.node = node
        self.shapes = shapes
        self.rank = len(shapes[node.input[0]]) if node.input[0] in shapes else None
        self.opset = opset
        self.constants = constants
        self.x = node.input[0]
        self.y = node.output[0]
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self._base = f"{_PREFIX}/{node.name or node.output[0]}"
        self._count = 0

    def fresh(self, kind: str) -> str:
        self._count += 1
        return f"{self._base}/{kind}{self._count}"

    def attr(self, name: str, default):
        return ir.get_attr(self.node, name, default)

    def const(self, value) -> str:
        name = self.fresh("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str = "", **attrs) -> str:
        out = out or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh("n"), **attrs))
        return out

    def clip(self, x: str, low: float, high: float, out: str = "") -> str:
        if self.opset < 11:
            return self.op("Clip", x, out=out, min=float(low), max=float(high))
        return self.op("Clip", x, self.const(np.float32(low)), self.const(np.float32(high)), out=out)

    def reduce_mean(self, x: str, axes: List[int]) -> str:
        if self.opset < 18:
            return self.op("ReduceMean", x, axes=axes, keepdims=1)
        return self.op("ReduceMean", x, self.const(np.array(axes, np.int64)), keepdims=1)

    def unsqueeze(self, x: str, axes: List[int]) -> str:
        if self.opset < 13:
            return self.op("Unsqueeze", x, axes=axes)
        return self.op("Unsqueeze", x, self.const(np.array(axes, np.int64)))

    def squeeze(self, x: str, axes: List[int]) -> str:
        if self.opset < 13:
            return self.op("Squeeze", x, axes=axes)
        return self.op("Squeeze", x, self.const(np.array(axes, np.int64)))

    def min_zero(self, x: str) -> str:
        """min(x, 0) as -Relu(-x): both have gradients."""
        return self.op("Neg", self.op("Relu", self.op("Neg", x)))

    def softplus(self, x: str) -> str:
        """log(1 + e^x) without overflow: relu(x) + log(1 + e^-|x|)."""
        tail = self.op("Log", self.op("Add", self.const(np.float32(1)), self.op("Exp", self.op("Neg", self.op("Abs", x)))))
        return self.op("Add", self.op("Relu", x), tail)

    def known_rank(self) -> int:
        if self.rank is None:
            raise UserError(
                f"{self.node.op_type} node {self.node.name!r}: the rank of its input is unknown, "
                "which its training stand-in needs (give the model's input shapes)"
            )
        return self.rank

    def channel_shaped(self, vector: str, rank: int) -> str:
        """A [C] parameter reshaped to [C, 1, ..., 1] so that it broadcasts over [N, C, ...] of ``rank``."""
        return self.op("Reshape", vector, self.const(np.array([-1] + [1] * (rank - 2), np.int64)))

    def normalize(self, x: str, axes: List[int], eps: float) -> str:
        """(x - mean) / sqrt(var + eps) over ``axes``."""
        centered = self.op("Sub", x, self.reduce_mean(x, axes))
        var = self.reduce_mean(self.op("Mul", centered, centered), axes)
        return self.op("Div", centered, self.op("Sqrt", self.op("Add", var, self.const(np.float32(eps)))))


Standin = Callable[[StandinBuilder], Optional[bool]]
STANDINS: Dict[str, Standin] = {}


def standin(*op_types: str):
    """Register the decorated function as the stand-in of ``op_types``."""

    def register(fn: Standin) -> Standin:
        for op in op_types:
            STANDINS[op] = fn
        return fn

    return register
