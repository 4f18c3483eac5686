"""Gradient rules: broadcasting arithmetic, pointwise math, selection and identity-like ops.

Each binary rule computes the gradient at the broadcast output shape and hands it to
``ctx.reduce_to``, the one place broadcasting is undone.
"""

from __future__ import annotations

from graphprune.autodiff.registry import vjp


@vjp("Add")
def _add(ctx, node, dy, wants):
    (g,), (a, b), y = dy, node.input, node.output[0]
    return [ctx.reduce_to(g, a, y) if wants[0] else None, ctx.reduce_to(g, b, y) if wants[1] else None]


@vjp("Sub")
def _sub(ctx, node, dy, wants):
    (g,), (a, b), y = dy, node.input, node.output[0]
    return [ctx.reduce_to(g, a, y) if wants[0] else None,
            ctx.reduce_to(ctx.op("Neg", g), b, y) if wants[1] else None]


@vjp("Mul")
def _mul(ctx, node, dy, wants):
    (g,), (a, b), y = dy, node.input, node.output[0]
    return [ctx.reduce_to(ctx.op("Mul", g, b), a, y) if wants[0] else None,
            ctx.reduce_to(ctx.op("Mul", g, a), b, y) if wants[1] else None]


@vjp("Div")
def _div(ctx, node, dy, wants):
    (g,), (a, b), y = dy, node.input, node.output[0]
    ga = ctx.op("Div", g, b) if any(wants) else None
    grad_b = None
    if wants[1]:  # d(a/b)/db = -y/b
        grad_b = ctx.reduce_to(ctx.op("Neg", ctx.op("Mul", ga, y)), b, y)
    return [ctx.reduce_to(ga, a, y) if wants[0] else None, grad_b]


@vjp("Pow")
def _pow(ctx, node, dy, wants):
    (g,), (a, b), y = dy, node.input, node.output[0]
    grad_a = grad_b = None
    if wants[0]:  # b * a^(b-1), written as b * y / a would fail at a = 0
        b_like_a = b if ctx.elem_type(b) == ctx.elem_type(a) else ctx.cast_like(b, a)
        power = ctx.op("Pow", a, ctx.op("Sub", b_like_a, ctx.const(1.0, like=a)))
        grad_a = ctx.reduce_to(ctx.op("Mul", g, ctx.op("Mul", b_like_a, power)), a, y)
    if wants[1]:  # y * log(a)
        grad_b = ctx.reduce_to(ctx.op("Mul", g, ctx.op("Mul", y, ctx.op("Log", a))), b, y)
    return [grad_a, grad_b]


@vjp("Neg")
def _neg(ctx, node, dy, wants):
    return [ctx.op("Neg", dy[0])]


@vjp("Identity", "Dropout")
def _identity(ctx, node, dy, wants):
    # Inference-mode Dropout (the only mode a deployed graph holds) is the identity.
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        training = ctx.value(node.input[2])
        if training is None or bool(training):
            from graphprune.errors import UserError

            raise UserError(f"Dropout node {node.name!r} runs in training mode: only inference-mode Dropout trains")
    return [dy[0]]


@vjp("Abs")
def _abs(ctx, node, dy, wants):
    return [ctx.op("Mul", dy[0], ctx.op("Sign", node.input[0]))]


@vjp("Sqrt")
def _sqrt(ctx, node, dy, wants):
    y = node.output[0]
    return [ctx.op("Div", dy[0], ctx.op("Mul", y, ctx.const(2.0, like=y)))]


@vjp("Exp")
def _exp(ctx, node, dy, wants):
    return [ctx.op("Mul", dy[0], node.output[0])]


@vjp("Log")
def _log(ctx, node, dy, wants):
    return [ctx.op("Div", dy[0], node.input[0])]


@vjp("Reciprocal")
def _reciprocal(ctx, node, dy, wants):
    y = node.output[0]
    return [ctx.op("Neg", ctx.op("Mul", dy[0], ctx.op("Mul", y, y)))]


@vjp("Relu")
def _relu(ctx, node, dy, wants):
    x = node.input[0]
    positive = ctx.op("Cast", ctx.op("Greater", x, ctx.const(0.0, like=x)), to=ctx.elem_type(x))
    return [ctx.op("Mul", dy[0], positive)]


@vjp("Sigmoid")
def _sigmoid(ctx, node, dy, wants):
    y = node.output[0]
    return [ctx.op("Mul", dy[0], ctx.op("Mul", y, ctx.op("Sub", ctx.const(1.0, like=y), y)))]


@vjp("Tanh")
def _tanh(ctx, node, dy, wants):
    y = node.output[0]
    return [ctx.op("Mul", dy[0], ctx.op("Sub", ctx.const(1.0, like=y), ctx.op("Mul", y, y)))]


@vjp("Clip")
def _clip(ctx, node, dy, wants):
    # The gradient passes where the input lies strictly inside [min, max] (and at the bounds when
    # they are absent); min and max themselves are treated as constants, as exporters write them.
    x = node.input[0]
    inside = None
    for index, compare in ((1, "Greater"), (2, "Less")):
        if len(node.input) > index and node.input[index]:
            test = ctx.op(compare, x, node.input[index])
            inside = test if inside is None else ctx.op("And", inside, test)
    if inside is None:
        return [dy[0]]
    return [ctx.op("Mul", dy[0], ctx.op("Cast", inside, to=ctx.elem_type(x)))]


@vjp("Sum")
def _sum(ctx, node, dy, wants):
    y = node.output[0]
    return [ctx.reduce_to(dy[0], x, y) if want else None for x, want in zip(node.input, wants)]


@vjp("Mean")
def _mean(ctx, node, dy, wants):
    y = node.output[0]
    scaled = ctx.op("Div", dy[0], ctx.const(float(len(node.input)), like=y))
    return [ctx.reduce_to(scaled, x, y) if want else None for x, want in zip(node.input, wants)]


@vjp("Max", "Min")
def _max_min(ctx, node, dy, wants):
    # The gradient goes to the inputs equal to the result, shared equally among ties (as torch does).
    y = node.output[0]
    hits = [ctx.op("Cast", ctx.op("Equal", x, y), to=ctx.elem_type(y)) for x in node.input]
    count = hits[0] if len(hits) == 1 else ctx.op("Sum", *hits)
    share = ctx.op("Div", dy[0], count)
    return [ctx.reduce_to(ctx.op("Mul", share, hit), x, y) if want else None
            for x, hit, want in zip(node.input, hits, wants)]


@vjp("Where")
def _where(ctx, node, dy, wants):
    (g,), (cond, a, b), y = dy, node.input, node.output[0]
    zero = ctx.const(0.0, like=y)
    return [None,
            ctx.reduce_to(ctx.op("Where", cond, g, zero), a, y) if wants[1] else None,
            ctx.reduce_to(ctx.op("Where", cond, zero, g), b, y) if wants[2] else None]


@vjp("Cast", "CastLike")
def _cast(ctx, node, dy, wants):
    x = node.input[0]
    return [ctx.cast_like(dy[0], x)] + [None] * (len(node.input) - 1)


@vjp("Sign", "Floor", "Ceil", "Round")
def _piecewise_constant(ctx, node, dy, wants):
    # Zero almost everywhere: the gradient stops here (torch returns zeros too).
    return [ctx.zeros_like(node.input[0])]
