"""Rules for ops that relabel axes: Reshape, Flatten, Transpose, Squeeze, Unsqueeze."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple


from graphprune.dependency.dims import DimKey
from graphprune.dependency.rules.common import axes_arg, block_all
from graphprune.dependency.rules.registry import RuleContext, register_rule
from graphprune.dependency.rules.shape_vectors import read_shape_vector

__all__ = ["match_reshape_axes"]


def match_reshape_axes(src: Sequence, dst: Sequence) -> Optional[List[Tuple[List[int], List[int]]]]:
    """Pair the non-1 axes of ``src`` and ``dst`` into runs of equal product (row-major reshape).

    Returns [(src axes, dst axes), ...] or None when the shapes cannot be matched (unknown dims
    inside a regrouped run).
    """
    si = [a for a, d in enumerate(src) if d != 1]
    di = [a for a, d in enumerate(dst) if d != 1]
    i = j = 0
    runs = []
    while i < len(si) and j < len(di):
        a, b = src[si[i]], dst[di[j]]
        if a == b and a is not None:
            runs.append(([si[i]], [di[j]]))
            i, j = i + 1, j + 1
            continue
        if not isinstance(a, int) or not isinstance(b, int):
            return None
        ins, outs, pa, pb = [si[i]], [di[j]], a, b
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(si) or not isinstance(src[si[i]], int):
                    return None
                pa *= src[si[i]]
                ins.append(si[i])
                i += 1
            else:
                if j >= len(di) or not isinstance(dst[di[j]], int):
                    return None
                pb *= dst[di[j]]
                outs.append(di[j])
                j += 1
        runs.append((ins, outs))
    if i < len(si) or j < len(di):
        return None
    return runs


def _couple_runs(ctx: RuleContext, x: str, y: str, xs, ys, prefer=None) -> bool:
    """Couple the axes of a reshape from x to y; False when they cannot be matched."""
    runs = match_reshape_axes(xs, ys)
    if runs is None:
        return False
    for a, d in enumerate(xs):
        if d == 1:
            ctx.leave(DimKey(x, a))
    for a, d in enumerate(ys):
        if d == 1:
            ctx.leave(DimKey(y, a))
    for ins, outs in runs:
        if len(ins) == 1 and len(outs) == 1:
            ctx.couple(DimKey(x, ins[0]), DimKey(y, outs[0]))
        elif len(ins) == 1:
            ctx.factor(DimKey(x, ins[0]), [DimKey(y, o) for o in outs], prefer)
        elif len(outs) == 1:
            ctx.factor(DimKey(y, outs[0]), [DimKey(x, i) for i in ins], prefer)
        else:
            for i in ins:
                ctx.block(DimKey(x, i), "Reshape regroups several axes into several others")
            for o in outs:
                ctx.block(DimKey(y, o), "Reshape regroups several axes into several others")
    return True


@register_rule("Reshape")
def reshape(ctx: RuleContext) -> None:
    """Kept axes couple 1:1; a split or merged axis couples to one factor (``RuleContext.factor``).

    The target shape is rewritten with the new sizes (its 0 and -1 entries stay).
    """
    x, s, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    ctx.ignore(s)
    target = read_shape_vector(ctx, s)  # a constant, or a Concat of constants and run-time sizes
    if target is None:
        block_all(ctx, "Reshape target computed at run time")
        return
    if not _couple_runs(ctx, x, y, ctx.require_shape(x), ctx.require_shape(y)):
        block_all(ctx, "Reshape between shapes whose axes cannot be matched")
        return
    for j in target.runtime_entries:
        ctx.block(DimKey(y, j), "its size in the Reshape target is computed at run time")

    def fixup(editor, node):
        new = [editor.new_size(DimKey(y, j)) if v is not None and v > 0 else v for j, v in enumerate(target.values)]
        target.write(editor, node, 1, new)

    ctx.fixup(fixup)


@register_rule("Flatten")
def flatten(ctx: RuleContext) -> None:
    """[d0..d(a-1)] -> output axis 0, [da..] -> axis 1; channel c of [N,C,H,W] is features c*H*W.."""
    x, y = ctx.input(0), ctx.outputs[0]
    xs = ctx.require_shape(x)
    axis = int(ctx.attr("axis", 1))
    axis = axis + len(xs) if axis < 0 else axis
    for out_axis, axes in ((0, range(0, axis)), (1, range(axis, len(xs)))):
        big = [a for a in axes if xs[a] != 1]
        for a in axes:
            if xs[a] == 1:
                ctx.leave(DimKey(x, a))
        if not big:
            ctx.leave(DimKey(y, out_axis))
        elif len(big) == 1:
            ctx.couple(DimKey(x, big[0]), DimKey(y, out_axis))
        else:
            ctx.factor(DimKey(y, out_axis), [DimKey(x, a) for a in big])


@register_rule("Transpose")
def transpose(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.outputs[0]
    rank = ctx.rank(x)
    perm = ctx.attr("perm") or list(reversed(range(rank)))
    for out_axis, in_axis in enumerate(perm):
        ctx.couple(DimKey(x, int(in_axis)), DimKey(y, out_axis))


@register_rule("Squeeze")
def squeeze(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.outputs[0]
    xs = ctx.require_shape(x)
    known, axes = axes_arg(ctx)
    if not known:
        block_all(ctx, "Squeeze axes computed at run time")
        return
    gone = {a % len(xs) for a in axes} if axes else {a for a, d in enumerate(xs) if d == 1}
    kept = [a for a in range(len(xs)) if a not in gone]
    for a in gone:
        ctx.leave(DimKey(x, a))
    for out_axis, a in enumerate(kept):
        ctx.couple(DimKey(x, a), DimKey(y, out_axis))


@register_rule("Unsqueeze")
def unsqueeze(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.outputs[0]
    rank_y = ctx.rank(y)
    known, axes = axes_arg(ctx)
    if not known or axes is None:
        block_all(ctx, "Unsqueeze axes computed at run time")
        return
    new = {a % rank_y for a in axes}
    kept = [a for a in range(rank_y) if a not in new]
    for a in new:
        ctx.leave(DimKey(y, a))
    for in_axis, a in enumerate(kept):
        ctx.couple(DimKey(x, in_axis), DimKey(y, a))
