"""LayerNorm on the hidden stream: LayerNormalization, RMSNorm and their decomposed forms.

A LayerNorm over the last axis normalizes the hidden size (the residual stream of a transformer).
Its input, output, scale and bias share that axis, so it couples them all: every layer's residual
Adds and LayerNorms, the projections reading and writing the stream, the embedding tables, form
one ``hidden`` group.  Pruning it is lossy (the mean and variance are then taken over fewer
features, so masked is not removed), so the axis blocks, saying so, unless the analysis is asked
for the hidden size (``AnalysisOptions.hidden``, the prune pass's ``hidden_ratio``).

The decomposed form (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) and RMSNorm
(Pow, ReduceMean, Add, Sqrt, Div or Reciprocal, Mul) reach here through their ReduceMean over the
last axis (``normalization_statistic``, called by the reduction rule); the other ops are
elementwise.  A LayerNorm over several axes ([N, C, H, W] from axis 1) blocks them all as before.
"""

from __future__ import annotations

from typing import Sequence

from graphprune.dependency.dims import DimKey
from graphprune.dependency.kinds import HIDDEN
from graphprune.dependency.rules.registry import RuleContext, register_rule

__all__ = ["HIDDEN_BLOCKED", "normalization_statistic", "couple_hidden"]

HIDDEN_BLOCKED = "normalizes over the hidden size (lossy: statistics change; pruned only with --hidden-ratio)"


def couple_hidden(ctx: RuleContext, dims: Sequence[DimKey]) -> None:
    """Tag ``dims`` as the hidden size and couple them, blocked with the reason unless hidden-size
    pruning was asked for (coupled either way, so the stream reports as one group)."""
    for dim in dims:
        ctx.tag(dim, HIDDEN)
        if not ctx.options.hidden:
            ctx.block(dim, HIDDEN_BLOCKED)
    for dim in dims[1:]:
        ctx.couple(dims[0], dim)


def _params(ctx: RuleContext, names_roles) -> list:
    dims = []
    for name, role in names_roles:
        if name:
            if ctx.is_param(name):
                ctx.param(name, role)
            dims.append(DimKey(name, 0))
    return dims


@register_rule("LayerNormalization", "SimplifiedLayerNormalization")
def layer_norm(ctx: RuleContext) -> None:
    """Y = (X - mean) / std * scale + bias over axes >= ``axis``; leading axes pass through.

    ``SimplifiedLayerNormalization`` (ORT's RMSNorm, no mean, no bias) is handled alike.  The
    optional Mean / InvStdDev outputs are [leading..., 1, ...].
    """
    x = ctx.input(0)
    rank = ctx.rank(x)
    axis = int(ctx.attr("axis", -1)) % rank
    y = ctx.outputs[0]
    for a in range(axis):
        ctx.couple(DimKey(x, a), DimKey(y, a))
    for stat in ctx.outputs[1:]:
        if stat:
            for a in range(rank):
                if a < axis:
                    ctx.couple(DimKey(x, a), DimKey(stat, a))
                else:
                    ctx.leave(DimKey(stat, a))
    params = ctx.inputs[1:3]
    scale_shape = ctx.shape(params[0]) if params and params[0] else None
    if axis == rank - 1 and (scale_shape is None or len(scale_shape) == 1):
        couple_hidden(ctx, [DimKey(x, axis), DimKey(y, axis), *_params(ctx, zip(params, ("norm_scale", "shift")))])
        return
    for a in range(axis, rank):
        ctx.block(DimKey(x, a), "normalized over by LayerNormalization")
        ctx.block(DimKey(y, a), "normalized over by LayerNormalization")
    for name in params:
        if name:
            ctx.block_tensor(name, "LayerNormalization scale/bias over normalized axes")


def _is_square_of(ctx: RuleContext, name: str) -> bool:
    node = ctx.producer(name)
    if node is None:
        return False
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    if node.op_type == "Pow":
        exponent = ctx.const(node.input[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0
    return False


def normalization_statistic(ctx: RuleContext, axes: Sequence[int], keepdims: bool) -> bool:
    """Handle a ReduceMean that is the mean or the (mean-square) variance of a decomposed LayerNorm
    or RMSNorm over the last axis; False (nothing done) for any other reduction.

    Recognised: ``ReduceMean(x)`` read by ``Sub(x, mean)`` (the centring), and ``ReduceMean`` of
    ``Pow(c, 2)`` / ``Mul(c, c)`` (variance, RMS).  The reduced axis is the hidden size: the input
    axis is left free (hidden-size pruning) or blocked saying why; the kept size-1 axis is free.
    """
    x, y = ctx.input(0), ctx.outputs[0]
    rank = ctx.rank(x)
    if not keepdims or rank < 2 or list(axes) != [rank - 1]:
        return False
    centring = any(n.op_type == "Sub" and list(n.input) == [x, y] for n in ctx.consumers(y))
    if not (centring or _is_square_of(ctx, x)):
        return False
    for a in range(rank - 1):
        ctx.couple(DimKey(x, a), DimKey(y, a))
    hidden = DimKey(x, rank - 1)
    ctx.tag(hidden, HIDDEN)
    if ctx.options.hidden:
        ctx.leave(hidden)
    else:
        ctx.block(hidden, HIDDEN_BLOCKED)
    ctx.leave(DimKey(y, rank - 1))
    return True
