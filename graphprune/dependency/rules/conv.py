"""Rules for ops with weights: Conv (grouped, depthwise), ConvTranspose, Gemm, MatMul."""

from __future__ import annotations

from graphprune.dependency.dims import DimKey
from graphprune.dependency.index_mapping import Expand
from graphprune.dependency.kinds import FFN
from graphprune.dependency.rules.attention import activation_matmul
from graphprune.dependency.rules.common import couple_broadcast
from graphprune.dependency.rules.registry import RuleContext, register_rule

__all__ = []


def _fix_spatial(ctx: RuleContext, x: str, y: str, w: str) -> None:
    """Window axes: the input's and output's spatial axes and the kernel axes are no channels."""
    for axis in range(2, ctx.rank(x)):
        ctx.fix(DimKey(x, axis), "spatial axis")
        ctx.fix(DimKey(y, axis), "spatial axis")
    for axis in range(2, ctx.rank(w)):
        ctx.fix(DimKey(w, axis), "kernel axis")


def _set_group(new_group_of):
    def fixup(editor, node):
        editor.set_attr(node, "group", int(new_group_of(editor)))

    return fixup


@register_rule("Conv")
def conv(ctx: RuleContext) -> None:
    """X [N, Cin, ...] * W [Cout, Cin/G, k...] + B [Cout] -> Y [N, Cout, ...].

    G == 1: input channels are W's axis 1, output channels W's axis 0 and B.  Depthwise
    (G == Cin, W [m*Cin, 1, ...]): output channel o comes from input channel o // m, so input and
    output prune together and ``group`` is rewritten.  Other G: the same channels are pruned in
    every group (a virtual "per group" dim), keeping G and equal group sizes.
    """
    x, w, b, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.outputs[0]
    ctx.couple(DimKey(x, 0), DimKey(y, 0))
    _fix_spatial(ctx, x, y, w)
    if not _constant_weight(ctx, x, y, w):
        return
    ctx.couple(DimKey(w, 0), DimKey(y, 1))
    if b:
        ctx.param(b, "bias")
        ctx.couple(DimKey(b, 0), DimKey(w, 0))
    groups = int(ctx.attr("group", 1))
    cin, cout, per_group = ctx.require_shape(x)[1], ctx.require_shape(w)[0], ctx.require_shape(w)[1]
    if groups == 1:
        ctx.couple(DimKey(x, 1), DimKey(w, 1))
    elif per_group == 1 and groups == cin and isinstance(cin, int) and cout % cin == 0:
        ctx.couple(DimKey(x, 1), DimKey(y, 1), Expand(inner=cout // cin))
        ctx.leave(DimKey(w, 1))
        ctx.fixup(_set_group(lambda e: e.new_size(DimKey(x, 1))))
    else:
        ctx.couple(DimKey(w, 1), DimKey(x, 1), Expand(outer=groups))
        out_local = ctx.virtual("out_per_group", cout // groups)
        ctx.couple(out_local, DimKey(y, 1), Expand(outer=groups))


@register_rule("ConvTranspose")
def conv_transpose(ctx: RuleContext) -> None:
    """X [N, Cin, ...] * W [Cin, Cout/G, k...] + B [Cout] -> Y [N, Cout, ...] (groups as for Conv)."""
    x, w, b, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.outputs[0]
    ctx.couple(DimKey(x, 0), DimKey(y, 0))
    _fix_spatial(ctx, x, y, w)
    if ctx.attr("output_shape") is not None:
        ctx.block(DimKey(y, 1), "output_shape attribute")
    if not _constant_weight(ctx, x, y, w):
        return
    ctx.couple(DimKey(x, 1), DimKey(w, 0))
    if b:
        ctx.param(b, "bias")
        ctx.couple(DimKey(b, 0), DimKey(y, 1))
    groups = int(ctx.attr("group", 1))
    cin, per_group = ctx.require_shape(w)[0], ctx.require_shape(w)[1]
    if groups == 1:
        ctx.couple(DimKey(w, 1), DimKey(y, 1))
    elif groups == cin:
        # depthwise: output channel o comes from input channel o // m; W's axis 1 (m) stays
        ctx.couple(DimKey(x, 1), DimKey(y, 1), Expand(inner=per_group))
        ctx.block(DimKey(w, 1), "outputs per input channel of a depthwise ConvTranspose")
        ctx.fixup(_set_group(lambda e: e.new_size(DimKey(x, 1))))
    else:
        ctx.couple(DimKey(w, 1), DimKey(y, 1), Expand(outer=groups))
        in_local = ctx.virtual("in_per_group", cin // groups)
        ctx.couple(in_local, DimKey(x, 1), Expand(outer=groups))


def _contraction(ctx: RuleContext, a: DimKey, b: DimKey, constant: bool) -> None:
    """The summed-over axis: prunable when one side is a constant (``constant``: zeroing it masks exactly)."""
    if constant:
        ctx.couple(a, b)
    else:
        ctx.block(a, "contraction between two non-constant operands")
        ctx.block(b, "contraction between two non-constant operands")


def _flattened_tokens(ctx: RuleContext, name: str) -> bool:
    """Whether ``name`` is a Reshape of a rank >= 3 activation to [-1, C] (tokens flattened)."""
    node = ctx.producer(name)
    shape = ctx.shape(node.input[0]) if node is not None and node.op_type == "Reshape" else None
    return shape is not None and len(shape) >= 3 and ctx.shape(name) is not None and ctx.shape(name)[-1] == shape[-1]


@register_rule("Gemm")
def gemm(ctx: RuleContext) -> None:
    """Y [M, N] = A [M, K] (or [K, M] with transA) x B [K, N] (or [N, K] with transB) + C."""
    a, b, c, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.outputs[0]
    a_m, a_k = (1, 0) if ctx.attr("transA", 0) else (0, 1)
    b_k, b_n = (1, 0) if ctx.attr("transB", 0) else (0, 1)
    for name, role in ((a, "weight"), (b, "weight")):
        if ctx.is_param(name):
            ctx.param(name, role)
    ctx.couple(DimKey(a, a_m), DimKey(y, 0))
    ctx.couple(DimKey(b, b_n), DimKey(y, 1))
    _contraction(ctx, DimKey(a, a_k), DimKey(b, b_k), ctx.is_constant(a) or ctx.is_constant(b))
    if ctx.is_constant(b) and not ctx.is_constant(a) and _flattened_tokens(ctx, a):
        ctx.tag(DimKey(a, a_k), FFN)  # GPT-2's Conv1D: view(-1, C) -> Gemm, a token-wise projection
    if c:
        if ctx.is_param(c):
            ctx.param(c, "bias")
        couple_broadcast(ctx, y, [c])


@register_rule("MatMul")
def matmul(ctx: RuleContext) -> None:
    """Y [..., M, N] = A [..., M, K] x B [..., K, N]; batch axes broadcast."""
    # each shape and constness read once: a transformer or an MLP is mostly MatMuls
    a, b, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    shape_a, shape_b, shape_y = ctx.require_shape(a), ctx.require_shape(b), ctx.require_shape(y)
    ra, rb, ry = len(shape_a), len(shape_b), len(shape_y)
    if ra < 2 or rb < 2:
        for name in (a, b, y):
            ctx.block_tensor(name, "MatMul with a 1-D operand")
        return
    param_a, param_b = ctx.is_param(a), ctx.is_param(b)
    for name, param in ((a, param_a), (b, param_b)):
        if param:
            ctx.param(name, "weight")
    ctx.couple(DimKey(a, ra - 2), DimKey(y, ry - 2))
    ctx.couple(DimKey(b, rb - 1), DimKey(y, ry - 1))
    const_a = param_a or ctx.is_constant(a)  # a constant is one: no walk up its producers
    const_b = param_b or ctx.is_constant(b)
    if const_a or const_b:
        ctx.couple(DimKey(a, ra - 1), DimKey(b, rb - 2))  # the contraction, prunable (``_contraction``)
        if ra >= 3 and not const_a:  # a token-wise projection's input: FFN neurons, or hidden/heads
            ctx.tag(DimKey(a, ra - 1), FFN)
    else:  # Q.K^T, P.V: heads and head dims (rules/attention.py)
        activation_matmul(ctx)
    for name, shape in ((a, shape_a), (b, shape_b)):
        for axis in range(len(shape) - 2):  # the batch axes (none for 2-D operands)
            out_axis = ry - len(shape) + axis
            if shape[axis] == 1 and shape_y[out_axis] != 1:
                ctx.leave(DimKey(name, axis))
            elif shape[axis] == shape_y[out_axis] and shape[axis] is not None:
                ctx.couple(DimKey(name, axis), DimKey(y, out_axis))
            else:
                ctx.block(DimKey(name, axis), "cannot tell how the batch axis broadcasts")


def _constant_weight(ctx, x, y, w) -> bool:
    """Record ``w`` as a member weight; a computed weight blocks every channel axis it touches."""
    if not ctx.is_constant(w):
        for dim in (DimKey(x, 1), DimKey(y, 1), DimKey(w, 0), DimKey(w, 1)):
            ctx.block(dim, "weight is not a constant")
        return False
    if ctx.is_param(w):
        ctx.param(w, "weight")
    return True
