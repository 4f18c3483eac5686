"""Rules for ops that relabel axes: Reshape, Flatten, Transpose, Squeeze, Unsqueeze."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from graphprune.dependency.dims import DimKey
from graphprune.dependency.rules.common import axes_arg, block_all
from graphprune.dependency.rules.registry import RuleContext, register_rule
from graphprune.dependency.rules.shape_vectors import SizeSource, read_shape_vector

__all__ = ["match_reshape_axes"]


class _Product:
    """A size as an int times a multiset of symbols: ``batch*sequence`` (onnxruntime's symbolic
    inference names a merged dynamic axis so) is ``1 x {batch, sequence}``."""

    def __init__(self, coef: int = 1, symbols: Tuple[str, ...] = ()):
        self.coef, self.symbols = coef, tuple(sorted(symbols))

    @classmethod
    def of(cls, dim) -> Optional["_Product"]:
        if isinstance(dim, int):
            return cls(dim)
        if not isinstance(dim, str):
            return None
        coef, symbols = 1, []
        for part in dim.split("*"):
            part = part.strip()
            if part.isdigit():
                coef *= int(part)
            elif part.isidentifier():
                symbols.append(part)
            else:  # "sequence + 1": one symbol as a whole
                return cls(1, (dim,))
        return cls(coef, tuple(symbols))

    def __mul__(self, other: "_Product") -> "_Product":
        return _Product(self.coef * other.coef, self.symbols + other.symbols)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Product) and (self.coef, self.symbols) == (other.coef, other.symbols)

    def divides(self, other: "_Product") -> bool:
        rest = list(other.symbols)
        for sym in self.symbols:
            if sym not in rest:
                return False
            rest.remove(sym)
        return self.coef != 0 and other.coef % self.coef == 0


def match_reshape_axes(src: Sequence, dst: Sequence) -> Optional[List[Tuple[List[int], List[int]]]]:
    """Pair the non-1 axes of ``src`` and ``dst`` into runs of equal product (row-major reshape).

    Sizes are ints or symbols; a symbol ``a*b`` is the product of ``a`` and ``b``, so
    ``[batch, sequence, 64] -> [batch*sequence, 64]`` (``view(-1, C)``) pairs as
    ``([0, 1], [0]), ([2], [1])``.  Returns [(src axes, dst axes), ...] or None when the shapes
    cannot be matched (unknown dims, or products that do not divide each other).
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
        pa, pb = _Product.of(a), _Product.of(b)
        if pa is None or pb is None:
            return None
        ins, outs = [si[i]], [di[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            grow_a = pa.coef < pb.coef if not (pa.symbols or pb.symbols) else pa.divides(pb)
            if grow_a and i < len(si) and _Product.of(src[si[i]]) is not None:
                pa = pa * _Product.of(src[si[i]])
                ins.append(si[i])
                i += 1
            elif not grow_a and j < len(di) and _Product.of(dst[di[j]]) is not None and (
                    pb.divides(pa) or not (pa.symbols or pb.symbols)):
                pb = pb * _Product.of(dst[di[j]])
                outs.append(di[j])
                j += 1
            else:
                return None
        runs.append((ins, outs))
    if i < len(si) or j < len(di):
        return None
    return runs


def _couple_runs(ctx: RuleContext, x: str, y: str, xs, ys, runs, prefer=None) -> None:
    """Couple the axes of a reshape from x to y along ``runs`` (``match_reshape_axes``)."""
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


def _follows_source(ctx: RuleContext, x: str, y: str, runs, source: Optional[SizeSource], j: int) -> bool:
    """Whether output axis ``j``, sized at run time by ``source``, keeps its size when channels are
    pruned: the entry reads the size of an axis of X that maps to ``j`` (or of another tensor's axis,
    then coupled to it), times ``factor``, the product of the other X axes merged into ``j``; those
    other axes block (repeat_kv's ``reshape(b, kv * n_rep, s, hd)``)."""
    if source is None:
        return False
    ins = next((i for i, outs in runs if outs == [j]), None)
    if ins is None:
        if source.factor != 1 or source.tensor == x:
            return False
        ctx.couple(DimKey(source.tensor, source.axis), DimKey(y, j))
        return True
    xs = ctx.shape(x)
    for a in ins if source.tensor != x else [source.axis]:
        others = [b for b in ins if b != a]
        sizes = [xs[b] for b in others]
        if a in ins and all(isinstance(d, int) for d in sizes) and math.prod(sizes) == source.factor:
            break
    else:
        return False
    if source.tensor != x:
        ctx.couple(DimKey(source.tensor, source.axis), DimKey(x, a))
    for b in others:
        ctx.block(DimKey(x, b), f"merged into axis {j} whose Reshape target entry is {source.factor} x the size of "
                                f"{source.tensor}[{source.axis}]")
    return True


@register_rule("Reshape")
def reshape(ctx: RuleContext) -> None:
    """Kept axes couple 1:1; a split or merged axis couples to one factor (``RuleContext.factor``).

    The target is a constant or a Concat of constants and sizes read at run time
    (``shape_vectors``); its positive constant entries are rewritten with the new sizes (0 and -1
    stay).  A run-time entry that reads the size of an axis coupled to the one it sizes follows it
    when pruned (``view(-1, C)`` after a projection); any other run-time entry blocks its axis.
    Refused, with the node named: targets built otherwise, and shapes whose axes cannot be paired
    (unknown dims inside a regrouped run).
    """
    x, s, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    ctx.ignore(s)
    target = read_shape_vector(ctx, s)  # a constant, or a Concat of constants and run-time sizes
    if target is None:
        what = ctx.producer(s).op_type if ctx.producer(s) is not None else "a graph input"
        block_all(ctx, f"Reshape target {s} computed at run time by {what} (neither a constant nor a Concat of "
                       "constants and sizes read by Shape)")
        return
    xs, ys = ctx.require_shape(x), ctx.require_shape(y)
    runs = match_reshape_axes(xs, ys)
    if runs is None:
        block_all(ctx, f"Reshape between shapes whose axes cannot be matched ({_show(xs)} -> {_show(ys)})")
        return
    _couple_runs(ctx, x, y, xs, ys, runs)
    lead = len(ys) - len(target.values)
    for k in target.fixed_entries:
        if target.values[k] is None and _follows_source(ctx, x, y, runs, target.source(k), k + lead):
            continue
        if target.values[k] is None and target.fold(ctx, k):
            continue  # a size known in the graph (the channel-shuffle's C read from another tensor)
        reason = (f"its size in the Reshape target {target.name} is computed at run time from something other "
                  "than the size of an axis coupled to it")
        ctx.block(DimKey(y, k + lead), reason)
        source = target.source(k)
        if source is not None:  # the size it reads must not change either
            ctx.block(DimKey(source.tensor, source.axis), reason)

    def fixup(editor, node):
        new = [editor.new_size(DimKey(y, j)) if v is not None and v > 0 else v for j, v in enumerate(target.values)]
        target.write(editor, node, 1, new)

    ctx.fixup(fixup)


def _show(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


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
