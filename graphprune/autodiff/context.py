"""What a gradient rule builds with: node emission, typed constants, static shapes and broadcast reduction.

Rules never write protos by hand: ``ctx.op("Mul", a, b)`` appends a node with fresh names and returns
its output; ``ctx.const(0.5, like=x)`` makes a constant of ``x``'s float type (the same rule serves
float32 training and the float64 gradient checks); ``ctx.reduce_to(g, x, y)`` sums a gradient of the
broadcast output ``y`` back to the shape of the input ``x`` — the one place broadcasting is handled.

The emitted graph targets ai.onnx opset 13 or newer (reduction axes and Squeeze/Unsqueeze axes as
inputs); the helpers ``reduce``, ``squeeze`` and ``unsqueeze`` pick the right form for the opset.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["GradContext", "Shape", "FLOAT_TYPES"]

# A static shape: ints where known, None for dims only known at run time; None for unknown rank.
Shape = Optional[Tuple[Optional[int], ...]]

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}

# Reductions whose axes became an input at opset 18 (ReduceSum already at 13).
_AXES_INPUT_SINCE = {"ReduceSum": 13}
_AXES_INPUT_DEFAULT = 18


class GradContext:
    """Emits the nodes of a gradient graph and answers rules' questions about forward tensors.

    Args:
        opset: the ai.onnx opset of the model the nodes go into (13 or newer).
        types: tensor name -> ONNX element type, for every forward tensor shape inference typed.
        shapes: tensor name -> static shape (see ``Shape``).
        constants: tensor name -> value, for initializers and Constant outputs (axes, shapes, pads...).
        prefix: name prefix of every emitted node and tensor.
        default_type: element type assumed for tensors shape inference left untyped.
        dim_names: tensor name -> the symbolic name of each dim (None where static or unnamed); two
            dims with one name are equal, which spares run-time broadcast reductions over batch and
            sequence dims.
    """

    def __init__(
        self,
        opset: int,
        types: Dict[str, int],
        shapes: Dict[str, Shape],
        constants: Dict[str, np.ndarray],
        prefix: str = "graphprune.grad/",
        default_type: int = onnx.TensorProto.FLOAT,
        dim_names: Optional[Dict[str, Tuple[Optional[str], ...]]] = None,
    ):
        self.opset = opset
        self.types = types
        self.shapes = shapes
        self.constants = constants
        self.prefix = prefix
        self.default_type = default_type
        self.dim_names = dim_names or {}
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.node: Optional[onnx.NodeProto] = None  # the forward node whose rule is running
        self.producers: Dict[str, str] = {}  # forward tensor -> op type of the node computing it
        self._count = 0
        self._shape_cache: Dict[str, str] = {}
        self._const_cache: Dict[Tuple, str] = {}

    # ----- naming and emission -------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        self._count += 1
        owner = (self.node.name or self.node.op_type) if self.node is not None else "graph"
        return f"{self.prefix}{owner}/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: Optional[str], outputs: int = 1, domain: str = "", **attrs):
        """Append ``op_type(*inputs)``; returns its output name, or a list when ``outputs`` > 1.

        ``None`` inputs become empty names (an omitted optional input)."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        node = helper.make_node(op_type, [i or "" for i in inputs], names, name=self.fresh(op_type), domain=domain,
                                **{k: v for k, v in attrs.items() if v is not None})
        self.nodes.append(node)
        return names[0] if outputs == 1 else names

    def const(self, value, like: Optional[str] = None, dtype: Optional[int] = None) -> str:
        """A constant initializer holding ``value`` in ``like``'s element type (or ``dtype``)."""
        elem = dtype if dtype is not None else (self.elem_type(like) if like is not None else self.default_type)
        array = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(elem))
        key = (elem, array.shape, array.tobytes())
        if key not in self._const_cache:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (axes, shapes, starts...)."""
        return self.const(np.asarray(list(values), dtype=np.int64), dtype=onnx.TensorProto.INT64)

    # ----- what is known about forward tensors ---------------------------------------------------
    def elem_type(self, name: str) -> int:
        return self.types.get(name, self.default_type)

    def np_dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type(name)))

    def shape(self, name: str) -> Shape:
        if name in self.constants:
            return tuple(self.constants[name].shape)
        return self.shapes.get(name)

    def rank(self, name: str) -> Optional[int]:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def value(self, name: str) -> Optional[np.ndarray]:
        """The constant value of ``name`` (an initializer or a Constant's output), else None."""
        return self.constants.get(name) if name else None

    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default=None):
        for attribute in node.attribute:
            if attribute.name == name:
                return helper.get_attribute_value(attribute)
        return default

    def shape_of(self, name: str) -> str:
        """``Shape(name)``, emitted once per tensor."""
        if name not in self._shape_cache:
            self._shape_cache[name] = self.op("Shape", name)
        return self._shape_cache[name]

    # ----- opset-aware building blocks -----------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: Optional[Sequence[int]], keepdims: bool = True) -> str:
        """``op_type`` (ReduceSum, ReduceMean, ReduceMax...) over ``axes`` (None: all axes)."""
        since = _AXES_INPUT_SINCE.get(op_type, _AXES_INPUT_DEFAULT)
        if axes is not None and not len(axes):
            return x
        if self.opset >= since:
            return self.op(op_type, x, self.ints(axes) if axes is not None else None, keepdims=int(keepdims))
        return self.op(op_type, x, keepdims=int(keepdims), axes=list(axes) if axes is not None else None)

    def reduce_sum(self, x: str, axes: Optional[Sequence[int]], keepdims: bool = True) -> str:
        return self.reduce("ReduceSum", x, axes, keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset < 13:  # axes were an attribute before opset 13
            return self.op("Unsqueeze", x, axes=list(axes))
        return self.op("Unsqueeze", x, self.ints(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset < 13:
            return self.op("Squeeze", x, axes=list(axes))
        return self.op("Squeeze", x, self.ints(axes))

    def zeros_like(self, name: str) -> str:
        """Zeros of ``name``'s shape and type (for outputs no gradient reached)."""
        zero = self.const(np.zeros(1), like=name)
        return self.op("Expand", zero, self.shape_of(name))

    def cast_like(self, x: str, like: str) -> str:
        return self.op("Cast", x, to=self.elem_type(like))

    # ----- broadcasting --------------------------------------------------------------------------
    def reduce_to(self, grad: str, x: str, out: "str | Shape") -> str:
        """Sum ``grad`` (shaped like the broadcast output ``out``) back to the shape of input ``x``.

        ``out`` is the forward tensor ``grad`` is the gradient of, or its static shape.  Static shapes
        decide the reduced axes where they can; where a dim of ``x`` is only known at run time and
        could be 1, the axes are computed in the graph (ReduceSum with run-time axes).
        """
        shape_x = self.shape(x)
        shape_out = self.shape(out) if isinstance(out, str) else out
        if shape_x is not None and shape_out is not None and len(shape_out) >= len(shape_x):
            lead = len(shape_out) - len(shape_x)
            names_x = self.dim_names.get(x, (None,) * len(shape_x))
            names_out = self.dim_names.get(out, (None,) * len(shape_out)) if isinstance(out, str) else None
            axes, static = list(range(lead)), True
            for i, dim in enumerate(shape_x):
                other = shape_out[lead + i]
                same_symbol = names_out is not None and names_x[i] is not None and names_x[i] == names_out[lead + i]
                if dim == 1 and other != 1:
                    axes.append(lead + i)
                elif dim is None and other != 1 and not same_symbol:
                    static = False  # x's dim may be 1 while out's is not
            if static:
                if not axes:
                    return grad
                summed = self.reduce_sum(grad, axes, keepdims=True)
                return self.squeeze(summed, list(range(lead))) if lead else summed
        return self._reduce_to_dynamic(grad, x)

    def _reduce_to_dynamic(self, grad: str, x: str) -> str:
        shape_g, shape_x = self.shape_of(grad), self.shape_of(x)
        # Pad x's shape with leading ones to grad's rank, then reduce wherever the two differ.
        lead = self.op("Sub", self.op("Size", shape_g), self.op("Size", shape_x))
        ones = self.op("ConstantOfShape", self.unsqueeze(lead, [0]), value=numpy_helper.from_array(np.ones(1, np.int64)))
        padded = self.op("Concat", ones, shape_x, axis=0)
        differ = self.op("Not", self.op("Equal", shape_g, padded))
        axes = self.squeeze(self.op("NonZero", differ), [0])
        summed = self.op("ReduceSum", grad, axes, keepdims=1, noop_with_empty_axes=1)
        return self.op("Reshape", summed, shape_x)
