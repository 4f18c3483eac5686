"""Rules for ops over spatial windows or reduced axes: pools, Resize/Upsample, Reduce*, ArgMax."""

from __future__ import annotations

import numpy as np

from graphprune.dependency.dims import DimKey
from graphprune.dependency.rules.common import axes_arg, block_all
from graphprune.dependency.rules.layernorm import normalization_statistic
from graphprune.dependency.rules.registry import RuleContext, register_rule
from graphprune.dependency.rules.shape_vectors import read_shape_vector

__all__ = ["REDUCE_OPS"]

REDUCE_OPS = (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)


@register_rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pool(ctx: RuleContext) -> None:
    """Per-channel windows: batch and channel axes pass through, spatial axes are no channels."""
    x, y = ctx.input(0), ctx.outputs[0]
    for a in range(ctx.rank(x)):
        if a < 2:
            ctx.couple(DimKey(x, a), DimKey(y, a))
        else:
            ctx.fix(DimKey(x, a), "spatial axis")
            ctx.fix(DimKey(y, a), "spatial axis")
    indices = ctx.outputs[1] if len(ctx.outputs) > 1 else None
    ctx.ignore(indices)
    if ctx.used(indices):  # flat indices encode the channel count
        ctx.block(DimKey(x, 1), "MaxPool indices output encodes channel positions")
        ctx.block_tensor(indices, "MaxPool indices output encodes channel positions")


@register_rule("Resize", "Upsample")
def resize(ctx: RuleContext) -> None:
    """Axes that keep their size (scale 1: batch, channels) couple; a constant ``sizes`` input is
    rewritten with the new channel count; resized axes are no channels."""
    x, y = ctx.input(0), ctx.outputs[0]
    xs, ys = ctx.require_shape(x), ctx.require_shape(y)
    rank = len(xs)
    sizes_index = 3 if ctx.op_type == "Resize" and ctx.opset >= 11 else None
    ctx.ignore(*ctx.inputs[1:])
    sizes = ctx.const(ctx.input(sizes_index)) if sizes_index is not None and ctx.input(sizes_index) else None
    axes = ctx.attr("axes")
    axes = [int(a) % rank for a in axes] if axes else list(range(rank))
    coupled = []
    for a in range(rank):
        if isinstance(xs[a], int) and xs[a] == ys[a]:
            ctx.couple(DimKey(x, a), DimKey(y, a))
            coupled.append(a)
        elif xs[a] is None or ys[a] is None:
            ctx.block(DimKey(x, a), "Resize output size unknown")
            ctx.block(DimKey(y, a), "Resize output size unknown")
        else:
            ctx.fix(DimKey(x, a), "resized axis")
            ctx.fix(DimKey(y, a), "resized axis")
    if sizes is None:
        if sizes_index is not None and ctx.input(sizes_index):
            _runtime_sizes(ctx, x, y, ctx.input(sizes_index), axes, coupled)
        return

    def fixup(editor, node):
        new = np.array(sizes)
        for k, a in enumerate(axes):
            if a in coupled:
                new[k] = editor.new_size(DimKey(y, a))
        editor.set_input(node, sizes_index, new)

    ctx.fixup(fixup)


def _runtime_sizes(ctx: RuleContext, x: str, y: str, name: str, axes, coupled) -> None:
    """``sizes`` built at run time (``F.interpolate(x, size=...)``: ``Concat(Shape(x)[:2], [H, W])``).
    An entry that reads X's own size on the same axis follows pruning by itself; any other entry
    fixes the size it reads, and a kept-size axis it sizes blocks (it could not follow)."""
    target = read_shape_vector(ctx, name)
    if target is None or len(target.values) != len(axes):
        for a in coupled:
            ctx.block(DimKey(y, a), "Resize sizes computed at run time")
        return
    for k, a in enumerate(axes):
        source = target.source(k)
        if target.values[k] is None and source is not None and source.tensor == x and source.axis == a \
                and source.factor == 1:
            continue
        if source is not None:
            ctx.block(DimKey(source.tensor, source.axis), "its size is read into a Resize target at run time")
        if a in coupled and target.values[k] != 1:
            ctx.block(DimKey(y, a), "its size in the Resize target is not its input's own size")


def _reduced_axes(ctx: RuleContext, rank: int):
    """(known, axes) of a Reduce op: attribute before opset 18 (13 for ReduceSum), input after."""
    known, axes = axes_arg(ctx, since=13 if ctx.op_type == "ReduceSum" else 18)
    return known, None if axes is None else [a % rank for a in axes]


def _reduce(ctx: RuleContext, reduced: set, keepdims: bool) -> None:
    x, y = ctx.input(0), ctx.outputs[0]
    out_axis = 0
    for a in range(ctx.rank(x)):
        if a in reduced:
            ctx.block(DimKey(x, a), f"reduced over by {ctx.op_type}")
            if keepdims:
                ctx.leave(DimKey(y, out_axis))
                out_axis += 1
        else:
            ctx.couple(DimKey(x, a), DimKey(y, out_axis))
            out_axis += 1


@register_rule(*REDUCE_OPS)
def reduce(ctx: RuleContext) -> None:
    """Axes reduced over block (a channel reduction mixes channels); the others pass through."""
    rank = ctx.rank(ctx.input(0))
    known, axes = _reduced_axes(ctx, rank)
    if not known:
        block_all(ctx, f"{ctx.op_type} axes computed at run time")
        return
    if not axes:
        axes = [] if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
    if ctx.op_type == "ReduceMean" and normalization_statistic(ctx, axes, bool(ctx.attr("keepdims", 1))):
        return  # mean or variance of a decomposed LayerNorm / RMSNorm (rules/layernorm.py)
    _reduce(ctx, set(axes), bool(ctx.attr("keepdims", 1)))


@register_rule("ArgMax", "ArgMin")
def arg_reduce(ctx: RuleContext) -> None:
    rank = ctx.rank(ctx.input(0))
    _reduce(ctx, {int(ctx.attr("axis", 0)) % rank}, bool(ctx.attr("keepdims", 1)))
