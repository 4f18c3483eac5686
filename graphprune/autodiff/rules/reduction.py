"""Gradient rules: reductions (ReduceSum/Mean/Max/Min/L1/L2/SumSquare/LogSumExp/LogSum/Prod).

Every rule restores the reduced axes of the output gradient, as size-1 axes (``_keepdims_grad``,
which broadcast against the input in the product with the local derivative) or expanded to the
input's shape (``expand_back``), and scales it by the op's local derivative.
"""

from __future__ import annotations

from typing import List, Optional

from graphprune.autodiff.registry import vjp
from graphprune.errors import UserError


def reduced_axes(ctx, node) -> Optional[List[int]]:
    """The axes ``node`` reduces, non-negative; None for all axes.  Raises when they are only known at run time."""
    axes = ctx.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.value(node.input[1])
        if value is None:
            raise UserError(f"{node.op_type} node {node.name!r}: its axes are computed at run time; "
                            "only constant axes train")
        axes = [int(a) for a in value.reshape(-1)]
    if axes is not None and len(axes) == 0:
        axes = None
    if axes is None:
        if ctx.attr(node, "noop_with_empty_axes", 0):
            return []
        return None
    rank = ctx.rank(node.input[0])
    if any(a < 0 for a in axes):
        if rank is None:
            raise UserError(f"{node.op_type} node {node.name!r}: negative axes on an input of unknown rank")
        axes = [a + rank if a < 0 else a for a in axes]
    return sorted(axes)


def expand_back(ctx, node, grad: str) -> str:
    """The output gradient broadcast back over the reduced axes, shaped like the input."""
    x = node.input[0]
    axes = reduced_axes(ctx, node)
    if axes == []:
        return grad
    if not ctx.attr(node, "keepdims", 1) and axes is not None:
        # (Reduced over every axis without keepdims, the gradient is a scalar: it expands as it is.)
        grad = ctx.unsqueeze(grad, axes)
    return ctx.op("Expand", grad, ctx.shape_of(x))


def keepdims_output(ctx, node, y: str) -> str:
    """The forward output with the reduced axes kept (size 1), for broadcasting against the input."""
    axes = reduced_axes(ctx, node)
    if ctx.attr(node, "keepdims", 1) or not axes:
        return y  # (axes None without keepdims: a scalar, which broadcasts as it is)
    return ctx.unsqueeze(y, axes)


def _keepdims_grad(ctx, node, grad: str) -> str:
    axes = reduced_axes(ctx, node)
    if ctx.attr(node, "keepdims", 1) or not axes:
        return grad
    return ctx.unsqueeze(grad, axes)


@vjp("ReduceSum")
def _reduce_sum(ctx, node, dy, wants):
    return [expand_back(ctx, node, dy[0])]


@vjp("ReduceMean")
def _reduce_mean(ctx, node, dy, wants):
    x, y = node.input[0], node.output[0]
    # count = size(x) / size(y), computed in the graph so dynamic dims work.
    size_x = ctx.cast_like(ctx.op("Size", x), x)
    size_y = ctx.cast_like(ctx.op("Size", y), x)
    scaled = ctx.op("Div", dy[0], ctx.op("Div", size_x, size_y))
    return [expand_back(ctx, node, scaled)]


@vjp("ReduceMax", "ReduceMin")
def _reduce_max_min(ctx, node, dy, wants):
    # The gradient goes to the elements equal to the result, shared equally among ties (as torch's
    # amax/amin do).  The keepdims-shaped share broadcasts against the mask: no Expand needed.
    x, axes = node.input[0], reduced_axes(ctx, node)
    if axes == []:
        return [dy[0]]
    mask = ctx.op("Cast", ctx.op("Equal", x, keepdims_output(ctx, node, node.output[0])), to=ctx.elem_type(x))
    count = ctx.reduce_sum(mask, axes, keepdims=True)
    return [ctx.op("Mul", mask, ctx.op("Div", _keepdims_grad(ctx, node, dy[0]), count))]


@vjp("ReduceL1")
def _reduce_l1(ctx, node, dy, wants):
    x = node.input[0]
    return [ctx.op("Mul", ctx.op("Sign", x), _keepdims_grad(ctx, node, dy[0]))]


@vjp("ReduceL2")
def _reduce_l2(ctx, node, dy, wants):
    # d sqrt(sum x^2) = x / y (undefined where the norm is 0, as the forward's derivative is).
    x = node.input[0]
    share = ctx.op("Div", _keepdims_grad(ctx, node, dy[0]), keepdims_output(ctx, node, node.output[0]))
    return [ctx.op("Mul", x, share)]


@vjp("ReduceSumSquare")
def _reduce_sum_square(ctx, node, dy, wants):
    x = node.input[0]
    return [ctx.op("Mul", ctx.op("Add", x, x), _keepdims_grad(ctx, node, dy[0]))]


@vjp("ReduceLogSumExp")
def _reduce_log_sum_exp(ctx, node, dy, wants):
    # The softmax of x over the reduced axes: exp(x - y).
    x = node.input[0]
    softmax = ctx.op("Exp", ctx.op("Sub", x, keepdims_output(ctx, node, node.output[0])))
    return [ctx.op("Mul", softmax, _keepdims_grad(ctx, node, dy[0]))]


@vjp("ReduceLogSum")
def _reduce_log_sum(ctx, node, dy, wants):
    # y = log(s): every element gets g / s = g / exp(y).
    share = ctx.op("Div", dy[0], ctx.op("Exp", node.output[0]))
    return [expand_back(ctx, node, share)]


@vjp("ReduceProd")
def _reduce_prod(ctx, node, dy, wants):
    # d prod / d x_i = prod / x_i: exact for inputs without zeros (a zero makes it 0 / 0).
    x = node.input[0]
    share = ctx.op("Mul", _keepdims_grad(ctx, node, dy[0]), keepdims_output(ctx, node, node.output[0]))
    return [ctx.op("Div", share, x)]
