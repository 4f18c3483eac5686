"""Gradient rules: MatMul (batched, broadcast, 1-D operands) and Gemm.

Weight gradients of a batched activation times a 2-D weight are one Gemm over the flattened batch
(``A2^T @ G2``), not a batched MatMul followed by a ReduceSum over the batch axes.
"""

from __future__ import annotations

from graphprune.autodiff.registry import vjp
from graphprune.errors import UserError


def _swap_last_two(ctx, x: str, rank: int) -> str:
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.op("Transpose", x, perm=perm)


def _rows(ctx, x: str, like: str) -> str:
    """``x`` (shaped like ``like``) as a matrix of its last axis: [..., K] -> [prod(...), K]."""
    shape = ctx.shape(like)
    last = shape[-1] if shape else None
    if last is not None:
        return ctx.op("Reshape", x, ctx.ints([-1, last]))
    tail = ctx.op("Slice", ctx.shape_of(x), ctx.ints([-1]), ctx.ints([2**62]))
    return ctx.op("Reshape", x, ctx.op("Concat", ctx.ints([-1]), tail, axis=0))


def _same_batch(ctx, a: str, b: str, rank: int) -> bool:
    """Whether the batch dims of ``a`` and ``b`` (both of ``rank``) are provably equal: no broadcasting.

    Equal static sizes, or the same symbolic name (attention's [batch, heads, seq, d] operands), so
    neither gradient needs a reduction, not even one with axes computed at run time."""
    shape_a, shape_b = ctx.shape(a), ctx.shape(b)
    names_a = ctx.dim_names.get(a, (None,) * rank)
    names_b = ctx.dim_names.get(b, (None,) * rank)
    for i in range(rank - 2):
        if shape_a[i] is not None and shape_a[i] == shape_b[i]:
            continue
        if names_a[i] is None or names_a[i] != names_b[i]:
            return False
    return True


@vjp("MatMul")
def _matmul(ctx, node, dy, wants):
    (g,), (a, b), y = dy, node.input, node.output[0]
    rank_a, rank_b = ctx.rank(a), ctx.rank(b)
    if rank_a is None or rank_b is None:
        raise UserError(f"MatMul node {node.name!r}: the rank of its inputs is unknown; give the model's inputs "
                        "a known rank")
    # 1-D operands are promoted to matrices (and the gradient squeezed back), as MatMul defines them.
    a2, b2, g2 = a, b, g
    if rank_a == 1:
        a2, g2 = ctx.unsqueeze(a, [0]), ctx.unsqueeze(g2, [-2] if rank_b > 1 else [0])
    if rank_b == 1:
        b2, g2 = ctx.unsqueeze(b, [1]), ctx.unsqueeze(g2, [-1])
    ra, rb = max(rank_a, 2), max(rank_b, 2)
    rg = max(ra, rb)
    shape_y = ctx.shape(y)
    batch = None if shape_y is None or rank_a == 1 or rank_b == 1 else tuple(shape_y[: rg - 2])
    unbroadcast = rank_a == rank_b > 2 and _same_batch(ctx, a, b, rank_a)
    grad_a = grad_b = None
    # Attention's products (both operands transposed views of a projection): a swap of B or A would
    # merge with the forward's Transpose into one onnxruntime cannot fold into the MatMul, and be
    # copied.  The transposed product instead swaps g (folded into the MatMul) and its result (merged
    # with the gradient of the Transpose upstream): dA = (B g^T)^T, dB = (g^T A)^T.
    transposed = unbroadcast and all(ctx.producers.get(t) == "Transpose" for t in (a, b))
    if wants[0] and transposed:
        grad_a = _swap_last_two(ctx, ctx.op("MatMul", b, _swap_last_two(ctx, g, rg)), rg)
    elif wants[0]:
        da = ctx.op("MatMul", g2, _swap_last_two(ctx, b2, rb))
        if rank_a == 1:
            da = ctx.squeeze(ctx.reduce_sum(da, list(range(rg - 2)), keepdims=False) if rg > 2 else da, [0])
        elif rank_b > 2 and not unbroadcast:  # a 2-D (or 1-D) B broadcasts nothing onto A
            da = ctx.reduce_to(da, a, None if batch is None else batch + tuple(ctx.shape(a)[-2:]))
        grad_a = da
    if wants[1] and transposed:
        grad_b = _swap_last_two(ctx, ctx.op("MatMul", _swap_last_two(ctx, g, rg), a), rg)
    elif wants[1]:
        if rb == 2 and ra >= 2 and rank_b == 2:
            # Weight gradient over the flattened batch: one Gemm.
            grad_b = ctx.op("Gemm", _rows(ctx, a2, a) if ra > 2 else a2, _rows(ctx, g2, y) if rg > 2 else g2, transA=1)
        else:
            db = ctx.op("MatMul", _swap_last_two(ctx, a2, ra), g2)
            if rank_b == 1:
                db = ctx.squeeze(ctx.reduce_sum(db, list(range(rg - 2)), keepdims=False) if rg > 2 else db, [1])
            elif not unbroadcast:
                db = ctx.reduce_to(db, b, None if batch is None else batch + tuple(ctx.shape(b)[-2:]))
            grad_b = db
    return [grad_a, grad_b]


@vjp("Gemm")
def _gemm(ctx, node, dy, wants):
    (g,), y = dy, node.output[0]
    a, b = node.input[0], node.input[1]
    alpha, beta = float(ctx.attr(node, "alpha", 1.0)), float(ctx.attr(node, "beta", 1.0))
    trans_a, trans_b = int(ctx.attr(node, "transA", 0)), int(ctx.attr(node, "transB", 0))
    grads = [None] * len(node.input)
    if wants[0]:
        grads[0] = (ctx.op("Gemm", g, b, alpha=alpha, transB=1 - trans_b) if not trans_a
                    else ctx.op("Gemm", b, g, alpha=alpha, transA=trans_b, transB=1))
    if wants[1]:
        grads[1] = (ctx.op("Gemm", a, g, alpha=alpha, transA=1 - trans_a) if not trans_b
                    else ctx.op("Gemm", g, a, alpha=alpha, transA=1, transB=trans_a))
    if len(node.input) > 2 and node.input[2] and wants[2]:
        c = node.input[2]
        scaled = g if beta == 1.0 else ctx.op("Mul", g, ctx.const(beta, like=y))
        grads[2] = ctx.reduce_to(scaled, c, y)
    return grads
