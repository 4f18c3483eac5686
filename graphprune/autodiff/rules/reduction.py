"""Gradient rules: reductions (ReduceSum/Mean/Max/Min/L1/L2/SumSquare/LogSumExp/Prod).

Every rule first restores the reduced axes of the output gradient (``_expand_back``), then scales it
by the op's local derivative.
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
    if not ctx.attr(node, "keepdims", 1):
        if axes is None:
            rank = ctx.rank(x)
            if rank is None:
                raise UserError(f"{node.op_type} node {node.name!r}: input of unknown rank")
            axes = list(range(rank))
        grad = ctx.unsqueeze(grad, axes) if axes else grad
    return ctx.op("Expand", grad, ctx.shape_of(x))


def keepdims_output(ctx, node, y: str) -> str:
    """The forward output with the reduced axes kept (size 1), for broadcasting against the input."""
    axes = reduced_axes(ctx, node)
    if ctx.attr(node, "keepdims", 1) or axes == []:
        return y
    if axes is None:
        axes = list(range(ctx.rank(node.input[0])))
    return ctx.unsqueeze(y, axes)


def _keepdims_grad(ctx, node, grad: str) -> str:
    axes = reduced_axes(ctx, node)
    if ctx.attr(node, "keepdims", 1) or axes == []:
        return grad
    if axes is None:
        axes = list(range(ctx.rank(node.input[0])))
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
