"""Gradient rules: activations (piecewise, smooth and softmax-like) and pointwise trigonometry.

Each rule multiplies the output gradient by the op's local derivative, written with the forward
output where that is cheaper and exact (Sigmoid-like ops, Elu, Softmax) and with the input where
the output would lose information (x / y is undefined at 0).  Kinks take the one-sided derivative
torch takes (the derivative of the branch that holds for ``x > 0``).  Constants follow the input's
element type, so one rule serves float32 training and float64 checks.
"""

from __future__ import annotations

import math

import numpy as np

from graphprune.autodiff.registry import vjp
from graphprune.errors import UserError


def _mask(ctx, condition: str, like: str) -> str:
    """A boolean tensor as 0/1 in ``like``'s element type."""
    return ctx.op("Cast", condition, to=ctx.elem_type(like))


def _positive(ctx, x: str) -> str:
    return ctx.op("Greater", x, ctx.const(0.0, like=x))


# ----- piecewise linear ----------------------------------------------------------------------------

@vjp("LeakyRelu")
def _leaky_relu(ctx, node, dy, wants):
    x = node.input[0]
    alpha = float(ctx.attr(node, "alpha", 0.01))
    return [ctx.op("Where", _positive(ctx, x), dy[0], ctx.op("Mul", dy[0], ctx.const(alpha, like=x)))]


@vjp("PRelu")
def _prelu(ctx, node, dy, wants):
    # slope broadcasts to x (per channel as [C, 1, 1], or scalar); its gradient is summed back by reduce_to.
    (g,), (x, slope), y = dy, node.input, node.output[0]
    positive = _positive(ctx, x)
    zero = ctx.const(0.0, like=x)
    grad_x = ctx.op("Where", positive, g, ctx.op("Mul", g, slope)) if wants[0] else None
    grad_slope = None
    if wants[1]:
        grad_slope = ctx.reduce_to(ctx.op("Where", positive, zero, ctx.op("Mul", g, x)), slope, y)
    return [grad_x, grad_slope]


@vjp("ThresholdedRelu")
def _thresholded_relu(ctx, node, dy, wants):
    x = node.input[0]
    alpha = float(ctx.attr(node, "alpha", 1.0))
    return [ctx.op("Mul", dy[0], _mask(ctx, ctx.op("Greater", x, ctx.const(alpha, like=x)), x))]


@vjp("HardSigmoid")
def _hard_sigmoid(ctx, node, dy, wants):
    # y = clip(alpha * x + beta, 0, 1): slope alpha strictly inside the clip range, read off y.
    y = node.output[0]
    alpha = float(ctx.attr(node, "alpha", 0.2))
    inside = ctx.op("And", ctx.op("Greater", y, ctx.const(0.0, like=y)), ctx.op("Less", y, ctx.const(1.0, like=y)))
    return [ctx.op("Mul", dy[0], ctx.op("Where", inside, ctx.const(alpha, like=y), ctx.const(0.0, like=y)))]


@vjp("HardSwish")
def _hard_swish(ctx, node, dy, wants):
    # y = x * hardsigmoid(x) with hardsigmoid(x) = clip(alpha x + 1 / 2, 0, 1), alpha = 1 / 6: inside
    # |x| < 3 the derivative is 2 alpha x + 1 / 2; outside it equals hardsigmoid(x) (0 below, 1 above).
    # alpha is the float32 1/6 of ONNX's function body (HardSigmoid's float attribute), which every
    # runtime evaluates, also in float64.
    x = node.input[0]
    alpha = float(np.float32(1.0 / 6.0))
    inside = ctx.op("Less", ctx.op("Abs", x), ctx.const(3.0, like=x))
    ramp = ctx.op("Add", ctx.op("Mul", x, ctx.const(2.0 * alpha, like=x)), ctx.const(0.5, like=x))
    outside = ctx.op("HardSigmoid", x, alpha=alpha, beta=0.5)
    return [ctx.op("Mul", dy[0], ctx.op("Where", inside, ramp, outside))]


# ----- exponential family ----------------------------------------------------------------------------

@vjp("Elu")
def _elu(ctx, node, dy, wants):
    # For x <= 0, y = alpha * (exp(x) - 1), so dy/dx = y + alpha.
    x, y = node.input[0], node.output[0]
    alpha = float(ctx.attr(node, "alpha", 1.0))
    negative = ctx.op("Mul", dy[0], ctx.op("Add", y, ctx.const(alpha, like=y)))
    return [ctx.op("Where", _positive(ctx, x), dy[0], negative)]


@vjp("Selu")
def _selu(ctx, node, dy, wants):
    # For x <= 0, y = gamma * alpha * (exp(x) - 1), so dy/dx = y + gamma * alpha; gamma above 0.
    x, y = node.input[0], node.output[0]
    alpha = float(ctx.attr(node, "alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr(node, "gamma", 1.05070102214813232421875))
    negative = ctx.op("Add", y, ctx.const(gamma * alpha, like=y))
    slope = ctx.op("Where", _positive(ctx, x), ctx.const(gamma, like=x), negative)
    return [ctx.op("Mul", dy[0], slope)]


@vjp("Celu")
def _celu(ctx, node, dy, wants):
    # For x <= 0, y = alpha * (exp(x / alpha) - 1), so dy/dx = exp(x / alpha) = y / alpha + 1.
    x, y = node.input[0], node.output[0]
    alpha = float(ctx.attr(node, "alpha", 1.0))
    negative = ctx.op("Add", ctx.op("Mul", y, ctx.const(1.0 / alpha, like=y)), ctx.const(1.0, like=y))
    return [ctx.op("Mul", dy[0], ctx.op("Where", _positive(ctx, x), ctx.const(1.0, like=x), negative))]


@vjp("Softplus")
def _softplus(ctx, node, dy, wants):
    return [ctx.op("Mul", dy[0], ctx.op("Sigmoid", node.input[0]))]


@vjp("Softsign")
def _softsign(ctx, node, dy, wants):
    x = node.input[0]
    denominator = ctx.op("Add", ctx.op("Abs", x), ctx.const(1.0, like=x))
    return [ctx.op("Div", dy[0], ctx.op("Mul", denominator, denominator))]


@vjp("Mish")
def _mish(ctx, node, dy, wants):
    # y = x * t with t = tanh(softplus(x)); dt/dx = (1 - t^2) * sigmoid(x).
    x = node.input[0]
    t = ctx.op("Tanh", ctx.op("Softplus", x))
    dt = ctx.op("Mul", ctx.op("Sub", ctx.const(1.0, like=x), ctx.op("Mul", t, t)), ctx.op("Sigmoid", x))
    return [ctx.op("Mul", dy[0], ctx.op("Add", t, ctx.op("Mul", x, dt)))]


@vjp("Swish")
def _swish(ctx, node, dy, wants):
    # y = x * s with s = sigmoid(alpha * x): dy/dx = s + alpha * x * s * (1 - s) = s + alpha * y * (1 - s).
    x, y = node.input[0], node.output[0]
    alpha = float(ctx.attr(node, "alpha", 1.0))
    s = ctx.op("Sigmoid", ctx.op("Mul", x, ctx.const(alpha, like=x)) if alpha != 1.0 else x)
    scaled_y = ctx.op("Mul", y, ctx.const(alpha, like=y)) if alpha != 1.0 else y
    slope = ctx.op("Add", s, ctx.op("Mul", scaled_y, ctx.op("Sub", ctx.const(1.0, like=x), s)))
    return [ctx.op("Mul", dy[0], slope)]


# ----- Gaussian ----------------------------------------------------------------------------------

@vjp("Erf")
def _erf(ctx, node, dy, wants):
    # d erf(x) / dx = 2 / sqrt(pi) * exp(-x^2), computed as dy / exp(x^2) times the constant: four
    # passes over the tensor instead of five (no Neg).  exp(x^2) overflows to inf for |x| > 9.4,
    # where the density is below float32's range anyway and dy / inf is the 0 it should be.
    x = node.input[0]
    scaled = ctx.op("Div", dy[0], ctx.op("Exp", ctx.op("Mul", x, x)))
    return [ctx.op("Mul", scaled, ctx.const(2.0 / math.sqrt(math.pi), like=x))]


@vjp("Gelu")
def _gelu(ctx, node, dy, wants):
    x = node.input[0]
    approximate = ctx.attr(node, "approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate == "tanh":
        return [ctx.op("Mul", dy[0], _gelu_tanh_slope(ctx, x))]
    if approximate != "none":
        raise UserError(f"Gelu node {node.name!r}: approximate={approximate!r} is not an ONNX Gelu mode")
    # y = x * Phi(x): dy/dx = Phi(x) + x * phi(x), Phi the normal CDF and phi its density.
    cdf = ctx.op("Add", ctx.op("Mul", ctx.op("Erf", ctx.op("Mul", x, ctx.const(math.sqrt(0.5), like=x))),
                                     ctx.const(0.5, like=x)), ctx.const(0.5, like=x))
    density = ctx.op("Exp", ctx.op("Mul", ctx.op("Mul", x, x), ctx.const(-0.5, like=x)))
    x_density = ctx.op("Mul", x, ctx.op("Mul", density, ctx.const(1.0 / math.sqrt(2.0 * math.pi), like=x)))
    return [ctx.op("Mul", dy[0], ctx.op("Add", cdf, x_density))]


def _gelu_tanh_slope(ctx, x: str) -> str:
    # y = x / 2 * (1 + t), t = tanh(u), u = c * (x + k x^3):
    # dy/dx = (1 + t) / 2 + x / 2 * (1 - t^2) * c * (1 + 3 k x^2).
    c, k = math.sqrt(2.0 / math.pi), 0.044715
    square = ctx.op("Mul", x, x)
    inner = ctx.op("Mul", x, ctx.op("Add", ctx.op("Mul", square, ctx.const(c * k, like=x)), ctx.const(c, like=x)))
    t = ctx.op("Tanh", inner)
    du = ctx.op("Add", ctx.op("Mul", square, ctx.const(3.0 * c * k, like=x)), ctx.const(c, like=x))
    half_x = ctx.op("Mul", x, ctx.const(0.5, like=x))
    one = ctx.const(1.0, like=x)
    slope_t = ctx.op("Mul", ctx.op("Mul", half_x, ctx.op("Sub", one, ctx.op("Mul", t, t))), du)
    return ctx.op("Add", ctx.op("Mul", ctx.op("Add", t, one), ctx.const(0.5, like=x)), slope_t)


# ----- softmax family --------------------------------------------------------------------------

def _softmax_axes(ctx, node):
    """The axes a Softmax-like node normalizes over: its axis since opset 13; before, every axis
    from ``axis`` on (the input was coerced to 2-D there)."""
    if ctx.opset >= 13:
        return [int(ctx.attr(node, "axis", -1))]
    axis = int(ctx.attr(node, "axis", 1))
    rank = ctx.rank(node.input[0])
    if rank is None:
        raise UserError(f"{node.op_type} node {node.name!r}: opset {ctx.opset} {node.op_type} on an input of unknown "
                        "rank (it flattens the axes from its axis on)")
    return list(range(axis % rank, rank))


@vjp("Softmax")
def _softmax(ctx, node, dy, wants):
    # dx = y * (g - sum(g * y)) over the softmax axes.
    g, y = dy[0], node.output[0]
    dot = ctx.reduce_sum(ctx.op("Mul", g, y), _softmax_axes(ctx, node), keepdims=True)
    return [ctx.op("Mul", y, ctx.op("Sub", g, dot))]


@vjp("LogSoftmax")
def _log_softmax(ctx, node, dy, wants):
    # dx = g - softmax(x) * sum(g), and softmax(x) = exp(y).
    g, y = dy[0], node.output[0]
    total = ctx.reduce_sum(g, _softmax_axes(ctx, node), keepdims=True)
    return [ctx.op("Sub", g, ctx.op("Mul", ctx.op("Exp", y), total))]


@vjp("Hardmax")
def _hardmax(ctx, node, dy, wants):
    # A one-hot of the arg max: constant almost everywhere, so no gradient flows (torch agrees).
    return [ctx.zeros_like(node.input[0])]


# ----- trigonometry ----------------------------------------------------------------------------

@vjp("Sin")
def _sin(ctx, node, dy, wants):
    return [ctx.op("Mul", dy[0], ctx.op("Cos", node.input[0]))]


@vjp("Cos")
def _cos(ctx, node, dy, wants):
    return [ctx.op("Neg", ctx.op("Mul", dy[0], ctx.op("Sin", node.input[0])))]
