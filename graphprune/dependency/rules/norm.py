"""Rules for normalizations (per-channel ones couple, cross-channel ones block) and softmax."""

from __future__ import annotations

from graphprune.dependency.dims import DimKey
from graphprune.dependency.index_mapping import Expand
from graphprune.dependency.rules.common import couple_same_shape
from graphprune.dependency.rules.registry import RuleContext, register_rule

__all__ = []


def _channel_params(ctx: RuleContext, x: str, params) -> None:
    for name, role in params:
        if name:
            if ctx.is_param(name):
                ctx.param(name, role)
            ctx.couple(DimKey(name, 0), DimKey(x, 1))


@register_rule("BatchNormalization")
def batch_norm(ctx: RuleContext) -> None:
    """Y = scale * (X - mean) / sqrt(var + eps) + B, all four parameters [C] on axis 1."""
    x, y = ctx.input(0), ctx.outputs[0]
    ctx.ignore(*ctx.outputs[1:])
    if any(ctx.used(o) for o in ctx.outputs[1:]):
        for name in ctx.inputs + ctx.outputs:
            if name:
                ctx.block_tensor(name, "training-mode BatchNormalization (running statistics outputs)")
        return
    couple_same_shape(ctx, x, y)
    roles = ("norm_scale", "shift", "stat", "stat")
    _channel_params(ctx, x, zip(ctx.inputs[1:5], roles))


@register_rule("InstanceNormalization")
def instance_norm(ctx: RuleContext) -> None:
    """Per-channel statistics over the spatial axes: channels are independent."""
    x, y = ctx.input(0), ctx.outputs[0]
    couple_same_shape(ctx, x, y)
    _channel_params(ctx, x, zip(ctx.inputs[1:3], ("norm_scale", "shift")))


@register_rule("GroupNormalization")
def group_norm(ctx: RuleContext) -> None:
    """Statistics over groups of C/G channels: only whole groups can go (mask == remove then).

    Scale and bias are [G] (opset 18) or [C] (opset 21); ``num_groups`` is rewritten.
    """
    x, y = ctx.input(0), ctx.outputs[0]
    couple_same_shape(ctx, x, y)
    groups = int(ctx.attr("num_groups"))
    channels = ctx.require_shape(x)[1]
    if not isinstance(channels, int) or channels % groups:
        ctx.block(DimKey(x, 1), "GroupNormalization channels unknown or not divisible by num_groups")
        ctx.ignore(*ctx.inputs[1:])
        return
    whole = ctx.virtual("groups", groups)
    ctx.couple(whole, DimKey(x, 1), Expand(inner=channels // groups))
    for name, role in zip(ctx.inputs[1:3], ("norm_scale", "shift")):
        if ctx.is_param(name):
            ctx.param(name, role)
        size = ctx.require_shape(name)[0]
        ctx.couple(DimKey(name, 0), whole if size == groups and size != channels else DimKey(x, 1))

    def fixup(editor, node):
        editor.set_attr(node, "num_groups", editor.new_size(whole))

    ctx.fixup(fixup)


def _block_axes_from(ctx: RuleContext, start_axes, reason: str) -> None:
    x, y = ctx.input(0), ctx.outputs[0]
    for a in range(ctx.rank(x)):
        if a in start_axes:
            ctx.block(DimKey(x, a), reason)
            ctx.block(DimKey(y, a), reason)
        else:
            ctx.couple(DimKey(x, a), DimKey(y, a))


@register_rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx: RuleContext) -> None:
    """Opset 13+: normalizes over ``axis``; earlier opsets over every axis from ``axis`` on."""
    rank = ctx.rank(ctx.input(0))
    if ctx.opset >= 13:
        axes = {int(ctx.attr("axis", -1)) % rank}
    else:
        axes = set(range(int(ctx.attr("axis", 1)) % rank, rank))
    _block_axes_from(ctx, axes, f"{ctx.op_type} normalizes over this axis")


@register_rule("LRN")
def lrn(ctx: RuleContext) -> None:
    """Local response normalization mixes neighbouring channels."""
    _block_axes_from(ctx, {1}, "LRN mixes neighbouring channels")


@register_rule("LpNormalization")
def lp_norm(ctx: RuleContext) -> None:
    rank = ctx.rank(ctx.input(0))
    _block_axes_from(ctx, {int(ctx.attr("axis", -1)) % rank}, "LpNormalization normalizes over this axis")
