"""Index lookups: Gather (embedding tables, picking a token such as BERT's [CLS])."""

from __future__ import annotations

from graphprune.dependency.dims import DimKey
from graphprune.dependency.rules.registry import RuleContext, register_rule

__all__ = []


@register_rule("Gather")
def gather(ctx: RuleContext) -> None:
    """Y = data indexed along ``axis`` by ``indices``: Y's axes are data[:axis], indices' axes,
    data[axis+1:].

    The other axes of ``data`` pass through (an embedding table [vocab, hidden] gives the hidden
    axis of every looked-up token); the indexed axis is never pruned: a table's rows (the vocabulary)
    are no channel axis at all, an activation's indexed axis blocks.  The indices' axes are the
    lookups' batch/sequence axes.  Constant indices are never zeroed by ``mask`` (0 is an index).
    """
    data, indices, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    rank = ctx.rank(data)
    axis = int(ctx.attr("axis", 0)) % rank
    index_rank = ctx.rank(indices)
    for a in range(rank):
        if a < axis:
            ctx.couple(DimKey(data, a), DimKey(y, a))
        elif a > axis:
            ctx.couple(DimKey(data, a), DimKey(y, a + index_rank - 1))
        elif ctx.is_constant(data):
            ctx.fix(DimKey(data, a), "rows of a table looked up by Gather")
        else:
            ctx.block(DimKey(data, a), "indexed by Gather")
    if ctx.is_param(indices):
        ctx.param(indices, "divisor")
    for k in range(index_rank):
        ctx.couple(DimKey(indices, k), DimKey(y, axis + k))
