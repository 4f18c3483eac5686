"""Attention between activations: the head axes of Q.K^T and P.V, grouped-query attention, head dims.

In an exported transformer the heads are no op's own axis: the Q, K and V projections write
[B, S, heads*hd], a Reshape splits that into [B, S, heads, hd], a Transpose moves the heads in
front, and two MatMuls between activations carry them as a batch axis: Q.K^T (contracting the
head dim, then Softmax over the keys) and P.V (writing the head dim).  A Transpose and a Reshape
[B, S, heads*hd] bring the heads back to the output projection.

The Reshape rule couples a split or merged axis to one factor only (``RuleContext.factor``: the
largest prunable one).  These rules make that choice for attention by blocking the other factor:

- whole heads (default): the head dims of Q.K^T (its contraction) and P.V (V's last axis) block,
  so every split/merge Reshape couples the projections to the heads: head h is features
  h*hd .. h*hd+hd-1 of Wq, Wk, Wv (and their biases) and the same rows of the output projection;
- grouped-query attention: K/V heads repeated to the query heads (Unsqueeze, Expand, Reshape
  [B, kv*g, S, hd]) block the g copies, so the merged head axis couples to the KV heads: pruning a
  KV head prunes its g query heads with it;
- head dims (``AnalysisOptions.head_dim``): the heads block instead, and Q.K^T's contraction
  couples Q's head dim to K's, so the same dims go from every head and the head count stays.

The scores' scale (a constant, usually 1/sqrt(hd)) stays as trained: rewriting it for a pruned head
dim would change every score.  A MatMul between activations that is neither Q.K^T (its output
reaches a Softmax) nor P.V (an operand comes from one) is treated as before: its contraction blocks.
"""

from __future__ import annotations

from typing import Optional, Tuple

from graphprune.dependency.dims import DimKey
from graphprune.dependency.kinds import HEAD_DIM, HEADS
from graphprune.dependency.rules.layout import match_reshape_axes
from graphprune.dependency.rules.registry import RuleContext

__all__ = ["activation_matmul"]

# Ops between Q.K^T and its Softmax: scaling, additive masks, masked fill, casts.
_SCORE_OPS = ("Div", "Mul", "Add", "Sub", "Where", "Cast", "Identity", "Clip")
# Ops between a Softmax and P.V: dropout (exported in eval mode), casts.
_PROB_OPS = ("Dropout", "Cast", "Identity")
# Ops that keep an operand's axes in place on the way to the head-merging Reshape.
_SAME_AXES_OPS = ("Cast", "Identity", "Mul", "Div", "Add", "Sub")
_SEARCH_DEPTH = 6

WHOLE_HEADS = "head dim of attention: whole heads are pruned (--head-dim prunes inside every head instead)"
KEPT_HEADS = "attention heads are kept with --head-dim (the same dims go from every head)"
GQA_COPIES = "query heads sharing a KV head (grouped-query attention): a KV head is pruned with its query group"


def _reaches_softmax(ctx: RuleContext, name: str) -> bool:
    """Whether ``name`` flows into a Softmax over its last axis through score ops only."""
    frontier, seen = [name], set()
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for tensor in frontier:
            for node in ctx.consumers(tensor):
                if node.op_type == "Softmax":
                    return True
                if node.op_type in _SCORE_OPS and node.output[0] not in seen:
                    seen.add(node.output[0])
                    nxt.append(node.output[0])
        frontier = nxt
    return False


def _from_softmax(ctx: RuleContext, name: str) -> bool:
    """Whether ``name`` is a Softmax output, possibly through dropout or casts."""
    for _ in range(_SEARCH_DEPTH):
        node = ctx.producer(name)
        if node is None:
            return False
        if node.op_type == "Softmax":
            return True
        if node.op_type not in _PROB_OPS:
            return False
        name = node.input[0]
    return False


def _merging_reshape(ctx: RuleContext, name: str, axis: int) -> Optional[Tuple[str, list]]:
    """(reshape input, its axes merged into ``name``'s ``axis``) when ``axis`` comes from a Reshape
    that merges several axes into it (following Transposes and same-shape ops upstream)."""
    for _ in range(_SEARCH_DEPTH):
        node = ctx.producer(name)
        if node is None:
            return None
        if node.op_type == "Transpose":
            perm = next((list(x.ints) for x in node.attribute if x.name == "perm"), None)
            if perm is None:
                return None
            name, axis = node.input[0], int(perm[axis])
        elif node.op_type in _SAME_AXES_OPS:
            same = [i for i in node.input if i and ctx.shape(i) == ctx.shape(name)]
            if not same:
                return None
            name = same[0]
        elif node.op_type == "Reshape":
            xs, ys = ctx.shape(node.input[0]), ctx.shape(name)
            runs = match_reshape_axes(xs, ys) if xs is not None and ys is not None else None
            for ins, outs in runs or ():
                if outs == [axis] and len(ins) > 1:
                    return node.input[0], ins
            return None
        else:
            return None
    return None


def _block_query_copies(ctx: RuleContext, name: str, axis: int) -> None:
    """Grouped-query attention: the KV heads [.., kv, g, ..] merged into this head axis keep
    their g copies, so the merge couples to the KV heads (the first factor)."""
    found = _merging_reshape(ctx, name, axis)
    if found is None:
        return
    source, axes = found
    big = [a for a in axes if ctx.shape(source)[a] != 1]
    for a in big[1:]:
        ctx.block(DimKey(source, a), GQA_COPIES)


def activation_matmul(ctx: RuleContext) -> None:
    """The axes of a MatMul between two activations that the MatMul rule leaves to attention: the
    contraction, the head dim, the head (batch) axes.  M, N and batch axes are already coupled."""
    a, b, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    contraction = (DimKey(a, ra - 1), DimKey(b, rb - 2))
    scores = _reaches_softmax(ctx, y)
    weighted = not scores and _from_softmax(ctx, a)
    if not (scores or weighted):
        for dim in contraction:
            ctx.block(dim, "contraction between two non-constant operands")
        return
    # Q.K^T contracts the head dim; P.V contracts the keys and writes the head dim (V's last axis).
    if scores and ctx.options.head_dim:
        ctx.couple(*contraction)
        head_dims = list(contraction)
    elif scores:
        head_dims = list(contraction)
        for dim in contraction:
            ctx.block(dim, WHOLE_HEADS)
    else:
        for dim in contraction:
            ctx.block(dim, "contraction over the keys of attention")
        head_dims = [DimKey(b, rb - 1), DimKey(y, ry - 1)]
        if not ctx.options.head_dim:
            for dim in head_dims:
                ctx.block(dim, WHOLE_HEADS)
    for dim in head_dims:
        ctx.tag(dim, HEAD_DIM)
    # batch axes after the first (the samples) are heads: [B, heads, S, *] or [B, kv, g, S, *]
    for out_axis in range(1, ry - 2):
        ctx.tag(DimKey(y, out_axis), HEADS)
        if ctx.options.head_dim:
            ctx.block(DimKey(y, out_axis), KEPT_HEADS)
            continue
        for name, rank in ((a, ra), (b, rb)):
            axis = out_axis - (ry - rank)
            if axis >= 0:
                _block_query_copies(ctx, name, axis)
