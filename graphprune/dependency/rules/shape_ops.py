"""Rules for ops that cut, join or size axes: Concat, Split, Slice, Expand, ConstantOfShape, Tile,
Pad, Shape, Size."""

from __future__ import annotations

from typing import Optional

import numpy as np

from graphprune.dependency.dims import DimKey
from graphprune.dependency.index_mapping import Expand, Offset
from graphprune.dependency.rules.common import block_all, ints, set_ints
from graphprune.dependency.rules.registry import RuleContext, register_rule
from graphprune.dependency.rules.shape_vectors import (ShapeVector, foldable_slice, read_shape_vector,
                                                       size_flows_to_targets, static_ints)
from graphprune.ir import get_attr

__all__ = []


def _couple_segments(ctx: RuleContext, whole: str, pieces, axis: int, what: str) -> None:
    """Piece k is ``whole``'s segment k along ``axis``: its channels are ``whole``'s channels
    [offset_k, offset_k + C_k); the other axes are the same axes.  After a segment of dynamic size
    no offset is known: the rest block."""
    rank = ctx.rank(whole)
    start: Optional[int] = 0
    for piece in pieces:
        for a in range(rank):
            if a != axis:
                ctx.couple(DimKey(piece, a), DimKey(whole, a))
        size = ctx.require_shape(piece)[axis]
        if not isinstance(size, int) or start is None:
            ctx.block(DimKey(piece, axis), f"{what} along an axis of dynamic size")
            ctx.block(DimKey(whole, axis), f"{what} along an axis of dynamic size")
            start = None
        elif size:
            ctx.couple(DimKey(piece, axis), DimKey(whole, axis), Offset(start))
            start += size
        else:
            ctx.leave(DimKey(piece, axis))


# Inputs that are shape vectors, sizes, axes or bounds (never channels), by op type.
_SHAPE_OPERANDS = {
    "Reshape": {1}, "Expand": {1}, "Resize": {1, 2, 3}, "Upsample": {1}, "ConstantOfShape": {0}, "Tile": {1},
    "Slice": {1, 2, 3, 4}, "Pad": {1, 2, 3}, "Range": {0, 1, 2}, "Squeeze": {1}, "Unsqueeze": {1},
}


def _is_shape_vector(ctx: RuleContext, name: str, depth: int = 4) -> bool:
    """Whether the 1-D tensor ``name`` ends up as a shape operand (through Cast/Concat/Identity)."""
    for node in ctx.consumers(name):
        indices = [i for i, n in enumerate(node.input) if n == name]
        if any(i in _SHAPE_OPERANDS.get(node.op_type, ()) for i in indices):
            return True
        if depth and node.op_type in ("Cast", "Concat", "Identity") and _is_shape_vector(ctx, node.output[0], depth - 1):
            return True
    return False


@register_rule("Concat")
def concat(ctx: RuleContext) -> None:
    """Input k's channels are the output's channels [offset_k, offset_k + C_k).  A shape vector built
    by Concat (``Concat(Shape(x)[:2], [16, 16])``) holds sizes, not channels: its axis is fixed."""
    y = ctx.outputs[0]
    if ctx.rank(y) == 1 and _is_shape_vector(ctx, y):
        for name in [x for x in ctx.inputs if x] + [y]:
            ctx.fix(DimKey(name, 0), "a shape vector")
        return
    axis = int(ctx.attr("axis")) % ctx.rank(y)
    _couple_segments(ctx, y, [x for x in ctx.inputs if x], axis, "concatenated")


@register_rule("Split")
def split(ctx: RuleContext) -> None:
    """Output k is the input's segment k; the split sizes are rewritten (explicit from then on)."""
    x = ctx.input(0)
    axis = int(ctx.attr("axis", 0)) % ctx.rank(x)
    ctx.ignore(ctx.input(1))
    outs = [o for o in ctx.outputs if o]
    _couple_segments(ctx, x, outs, axis, "split")
    as_input = ctx.opset >= 13

    def fixup(editor, node):
        sizes = [editor.new_size(DimKey(y, axis)) for y in outs]
        set_ints(editor, node, 1, "split", sizes, as_input)
        editor.remove_attr(node, "num_outputs")

    ctx.fixup(fixup)


@register_rule("Slice")
def slice_(ctx: RuleContext) -> None:
    """A contiguous range (step 1) of an axis: output index i is input index start + i."""
    x, y = ctx.input(0), ctx.outputs[0]
    rank = ctx.rank(x)
    xs = ctx.require_shape(x)
    as_input = ctx.opset >= 10
    folded = False
    if as_input:
        ctx.ignore(*ctx.inputs[1:])
        starts, ends = ctx.const(ctx.input(1)), ctx.const(ctx.input(2))
        axes = ctx.const(ctx.input(3)) if ctx.input(3) else (None if starts is None else np.arange(len(starts)))
        steps = ctx.const(ctx.input(4)) if ctx.input(4) else (None if starts is None else np.ones(len(starts), np.int64))
        folded = (starts is None or ends is None) and foldable_slice(ctx, ctx.node)
        if folded:  # computed from sizes known in the graph (TorchScript's chunk): written as constants
            starts, ends = static_ints(ctx, ctx.input(1)).reshape(-1), static_ints(ctx, ctx.input(2)).reshape(-1)
            axes = ctx.const(ctx.input(3)) if ctx.input(3) else np.arange(len(starts))
            steps = ctx.const(ctx.input(4)) if ctx.input(4) else np.ones(len(starts), np.int64)
    else:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes = ctx.attr("axes", list(range(len(starts or []))))
        steps = [1] * len(starts or [])
    if any(v is None for v in (starts, ends, axes, steps)):
        if axes is None:
            block_all(ctx, "Slice bounds computed at run time")
            return
        # bounds computed at run time (rotate_half's x[..., : x.shape[-1] // 2]) on known axes:
        # only those axes block
        sliced = {int(a) % rank for a in np.asarray(axes).reshape(-1)}
        for a in range(rank):
            if a in sliced:
                ctx.block(DimKey(x, a), "Slice bounds computed at run time")
                ctx.block(DimKey(y, a), "Slice bounds computed at run time")
            else:
                ctx.couple(DimKey(x, a), DimKey(y, a))
        return
    sliced = {int(a) % rank: (k, int(s), int(e), int(st)) for k, (s, e, a, st) in enumerate(zip(starts, ends, axes, steps))}
    moved = {}
    for a in range(rank):
        if a not in sliced:
            ctx.couple(DimKey(x, a), DimKey(y, a))
            continue
        k, s, e, st = sliced[a]
        if not isinstance(xs[a], int):
            ctx.fix(DimKey(x, a), "sliced axis of dynamic size")
            ctx.fix(DimKey(y, a), "sliced axis of dynamic size")
            continue
        kept = range(xs[a])[slice(s, e, st)]
        if st == 1 and len(kept) == xs[a]:
            ctx.couple(DimKey(x, a), DimKey(y, a))
        elif st == 1 and len(kept):
            ctx.couple(DimKey(y, a), DimKey(x, a), Offset(kept.start))
            moved[a] = (k, kept.start)
        else:
            ctx.block(DimKey(x, a), f"Slice with step {st} or empty range")
            ctx.block(DimKey(y, a), f"Slice with step {st} or empty range")
    if not moved and not folded:
        return
    starts, ends = np.array(starts), np.array(ends)  # folded bounds are always written as constants

    def fixup(editor, node):
        new_starts, new_ends = starts.copy(), ends.copy()
        for a, (k, first) in moved.items():
            new_starts[k] = int(editor.kept(DimKey(x, a))[:first].sum())
            new_ends[k] = new_starts[k] + editor.new_size(DimKey(y, a))
        set_ints(editor, node, 1, "starts", new_starts, as_input, starts)
        set_ints(editor, node, 2, "ends", new_ends, as_input, ends)

    ctx.fixup(fixup)


def _rewrite_target(ctx: RuleContext, y: str, target: ShapeVector, skip_ones: bool) -> None:
    """Fixup: target entries (aligned right to y's axes) become y's new sizes (entries computed at
    run time stay)."""
    rank_y = ctx.rank(y)

    def fixup(editor, node):
        lead = rank_y - len(target.values)
        # an axis of unknown size (no symbolic inference) is in no prunable group: its entry stays
        new = [v if v is None or (skip_ones and v == 1) or not editor.dep.info(DimKey(y, k + lead)).concrete
               else editor.new_size(DimKey(y, k + lead)) for k, v in enumerate(target.values)]
        target.write(editor, node, 1, new)

    ctx.fixup(fixup)


def _entry_follows(ctx: RuleContext, x: str, y: str, source, i: int, j: int) -> bool:
    """Whether output axis ``j``, sized at run time by ``source``, follows pruning: the entry reads
    the size of X's own axis ``i`` (no broadcast there), or of another tensor's axis (coupled to ``j``)."""
    if source is None or source.factor != 1:
        return False
    if source.tensor == x:
        return source.axis == i
    ctx.couple(DimKey(source.tensor, source.axis), DimKey(y, j))
    return True


@register_rule("Expand")
def expand(ctx: RuleContext) -> None:
    """Broadcast to a constant shape: axes X already has couple; axes it broadcasts take the
    target's size, which is rewritten to whatever the output's group keeps."""
    x, s, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    ctx.ignore(s)
    target = read_shape_vector(ctx, s)  # a constant, or a Concat of constants and run-time sizes
    xs, ys = ctx.require_shape(x), ctx.require_shape(y)
    lead = len(ys) - len(xs)
    runtime = {k + len(ys) - len(target.values) for k in target.fixed_entries} if target is not None else set()
    for j in range(len(ys)):
        i = j - lead
        source = target.source(j - len(ys) + len(target.values)) if j in runtime else None
        if j in runtime and not _entry_follows(ctx, x, y, source, i, j):
            ctx.block(DimKey(y, j), "its size in the Expand target is computed at run time")
            if source is not None:  # the size it reads must not change either
                ctx.block(DimKey(source.tensor, source.axis), "its size is read into an Expand target at run time")
        if i >= 0 and xs[i] == ys[j] and xs[i] is not None:
            ctx.couple(DimKey(x, i), DimKey(y, j))
            continue
        if i >= 0 and xs[i] == 1:
            ctx.leave(DimKey(x, i))
        elif i >= 0:
            ctx.block(DimKey(x, i), "cannot tell how Expand broadcasts this axis")
        if target is None:
            ctx.block(DimKey(y, j), "Expand target computed at run time")
        else:
            ctx.own(DimKey(y, j))
    if target is not None:
        _rewrite_target(ctx, y, target, skip_ones=True)


@register_rule("ConstantOfShape")
def constant_of_shape(ctx: RuleContext) -> None:
    """Every output axis is sized by the constant shape input, rewritten when pruned."""
    s, y = ctx.input(0), ctx.outputs[0]
    ctx.ignore(s)
    target = ctx.const(s)
    if target is None:
        ctx.block_tensor(y, "ConstantOfShape shape computed at run time")
        return
    for j in range(ctx.rank(y)):
        ctx.own(DimKey(y, j))

    def fixup(editor, node):
        editor.set_input(node, 0, np.array([editor.new_size(DimKey(y, j)) for j in range(len(target))], dtype=target.dtype))

    ctx.fixup(fixup)


@register_rule("Tile")
def tile(ctx: RuleContext) -> None:
    """Output axis = the input axis repeated r times: channel c is indices k*C + c."""
    x, r, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    ctx.ignore(r)
    repeats = ints(ctx.const(r))
    if repeats is None:
        block_all(ctx, "Tile repeats computed at run time")
        return
    for a, times in enumerate(repeats):
        ctx.couple(DimKey(x, a), DimKey(y, a), Expand(outer=times))


@register_rule("Pad")
def pad(ctx: RuleContext) -> None:
    """Unpadded axes couple; padded ones (spatial, normally) do not carry channels through."""
    x, y = ctx.input(0), ctx.outputs[0]
    rank = ctx.rank(x)
    if ctx.opset >= 11:
        ctx.ignore(*ctx.inputs[1:])
        pads = ints(ctx.const(ctx.input(1)))
        axes = ints(ctx.const(ctx.input(3))) if ctx.input(3) else list(range(rank))
    else:
        pads, axes = ints(ctx.attr("pads")), list(range(rank))
    if pads is None or axes is None:
        block_all(ctx, "Pad amounts computed at run time")
        return
    n = len(axes)
    padded = {int(a) % rank for k, a in enumerate(axes) if pads[k] or pads[k + n]}
    for a in range(rank):
        if a in padded:
            ctx.block(DimKey(x, a), "padded by Pad")
            ctx.block(DimKey(y, a), "padded by Pad")
        else:
            ctx.couple(DimKey(x, a), DimKey(y, a))


def _shape_read_axes(ctx: RuleContext, rank: int, start: int, end: int) -> set:
    """Input axes whose size flows on: only those a Gather/Slice consumer picks, when all are such."""
    every = set(range(start, end))
    picked: set = set()
    for consumer in ctx.consumers(ctx.outputs[0]):
        if consumer.op_type == "Gather" and consumer.input[0] == ctx.outputs[0]:
            axis = get_attr(consumer, "axis", 0)
            idx = ctx.const(consumer.input[1])
            if axis != 0 or idx is None:
                return every
            picked.update(start + int(i) % (end - start) for i in np.asarray(idx).reshape(-1))
        elif consumer.op_type == "Slice" and consumer.input[0] == ctx.outputs[0] and len(consumer.input) >= 3:
            s, e = ctx.const(consumer.input[1]), ctx.const(consumer.input[2])
            if s is None or e is None or len(consumer.input) > 4 or np.asarray(s).size != 1:
                return every
            picked.update(start + i for i in range(end - start)[slice(int(s.reshape(-1)[0]), int(e.reshape(-1)[0]))])
        else:
            return every
    return picked


@register_rule("Shape")
def shape(ctx: RuleContext) -> None:
    """The sizes Shape reads must not change: those axes block (others are free)."""
    x = ctx.input(0)
    rank = ctx.rank(x)
    start = int(ctx.attr("start", 0))
    end = int(ctx.attr("end", rank))
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    read = _shape_read_axes(ctx, rank, start, end) if end > start else set()
    if size_flows_to_targets(ctx, ctx.outputs[0]):
        read = set()  # only Reshape targets read these sizes: the Reshape rule couples each entry
    for a in range(rank):
        if a in read:
            ctx.block(DimKey(x, a), "its size is read by Shape")
        else:
            ctx.leave(DimKey(x, a))
    ctx.ignore(ctx.outputs[0])


@register_rule("Size")
def size(ctx: RuleContext) -> None:
    ctx.block_tensor(ctx.input(0), "its size is read by Size")
    ctx.ignore(ctx.outputs[0])
