"""Gradient rules: QuantizeLinear / DequantizeLinear with the straight-through estimator (QAT fine-tuning).

QuantizeLinear is in ``STRAIGHT_THROUGH_OPS``: its integer output carries a float gradient expressed
in dequantized units.  DequantizeLinear passes that gradient straight through to its integer input;
QuantizeLinear passes it on to ``x`` where ``round(x / scale) + zero_point`` lies inside the integer
range and stops it where the value was clipped — the gradient of torch's ``fake_quantize_*`` ops.
Together a ``weight -> Q -> DQ`` chain differentiates like fake quantization, so a QDQ model fine-tunes
in place.

Scales and zero points are frozen: they get no gradient (no LSQ-style scale learning).  Handled:
per-tensor, per-axis (``axis``, negative too) and blocked (opset 21 ``block_size``) parameters;
int4/uint4/int8/uint8/int16/uint16 outputs.  Refused: float8/float4 outputs (no integer range).
"""

from __future__ import annotations

import numpy as np
import onnx

from graphprune.autodiff.registry import vjp
from graphprune.errors import UserError

_T = onnx.TensorProto
_INT_RANGES = {
    _T.INT8: (-128, 127), _T.UINT8: (0, 255), _T.INT16: (-32768, 32767), _T.UINT16: (0, 65535),
    _T.INT4: (-8, 7), _T.UINT4: (0, 15),
}


def _refuse(node, why: str) -> UserError:
    return UserError(f"{node.op_type} node {node.name or node.output[0]!r}: {why}")


def _output_type(ctx, node) -> int:
    """The element type QuantizeLinear produces: zero point's type, else ``output_dtype``, else uint8."""
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero_point is not None and zero_point in ctx.types:
        return ctx.types[zero_point]
    if node.output[0] in ctx.types:
        return ctx.types[node.output[0]]
    return int(ctx.attr(node, "output_dtype", 0)) or _T.UINT8


def _broadcast_param(ctx, node, param: str, shape, x: str) -> str:
    """Scale or zero point (of static ``shape``) made to broadcast against ``x`` (per-tensor, per-axis or blocked)."""
    if shape is not None and int(np.prod(shape, dtype=np.int64)) == 1 and len(shape) <= 1:
        return param  # per-tensor
    rank = ctx.rank(x)
    if rank is None or shape is None:
        raise _refuse(node, "a per-axis or blocked scale on an input of unknown rank")
    axis = int(ctx.attr(node, "axis", 1))
    axis = axis + rank if axis < 0 else axis
    block = int(ctx.attr(node, "block_size", 0))
    if block:
        # Blocked: parameter dim k covers x's dims [k*block, (k+1)*block) on ``axis``.
        dim = (ctx.shape(x) or [None] * rank)[axis]
        if dim is None:
            raise _refuse(node, "block_size on an axis whose size is only known at run time")
        return ctx.op("Gather", param, ctx.ints(np.arange(dim) // block), axis=axis)
    # Per-axis: a 1-D parameter along ``axis``, trailing ones for the axes after it.
    return ctx.op("Reshape", param, ctx.ints([-1] + [1] * (rank - axis - 1)))


def _float_param(ctx, node, param: str, x: str) -> str:
    """Scale or zero point in ``x``'s float type, broadcast against ``x``."""
    # Cast before broadcasting: the runtime's Gather has no int4 kernel.
    value = param if ctx.elem_type(param) == ctx.elem_type(x) else ctx.cast_like(param, x)
    return _broadcast_param(ctx, node, value, ctx.shape(param), x)


@vjp("QuantizeLinear")
def _quantize_linear(ctx, node, dy, wants):
    x = node.input[0]
    grads = [None] * len(node.input)
    if not wants[0]:
        return grads
    out_type = _output_type(ctx, node)
    if out_type not in _INT_RANGES:
        raise _refuse(node, f"output type {onnx.helper.tensor_dtype_to_string(out_type)} has no integer range "
                            "for the straight-through estimator (int4/8/16 and uint4/8/16 train)")
    qmin, qmax = _INT_RANGES[out_type]
    scale = _float_param(ctx, node, node.input[1], x)
    level = ctx.op("Round", ctx.op("Div", x, scale))  # the unclipped integer level, minus the zero point
    lo, hi = ctx.const(float(qmin), like=x), ctx.const(float(qmax), like=x)
    if len(node.input) > 2 and node.input[2]:
        zero_point = _float_param(ctx, node, node.input[2], x)
        lo, hi = ctx.op("Sub", lo, zero_point), ctx.op("Sub", hi, zero_point)
    clipped = ctx.op("Or", ctx.op("Less", level, lo), ctx.op("Greater", level, hi))
    grads[0] = ctx.op("Where", clipped, ctx.const(0.0, like=x), dy[0])
    return grads


@vjp("DequantizeLinear")
def _dequantize_linear(ctx, node, dy, wants):
    # Straight through: the integer input's gradient is the output's, in dequantized units.
    return [dy[0] if wants[0] else None] + [None] * (len(node.input) - 1)
