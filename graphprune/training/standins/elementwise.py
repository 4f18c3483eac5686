"""Stand-ins for activations and variadic Sum / Mean: the same function in ops that have gradients."""

from __future__ import annotations

import numpy as np

from graphprune.training.standins.builder import StandinBuilder, standin


def _hard_sigmoid_of(b: StandinBuilder, x: str, alpha: float, beta: float, out: str = "") -> str:
    affine = b.op("Add", b.op("Mul", x, b.const(np.float32(alpha))), b.const(np.float32(beta)))
    return b.clip(affine, 0.0, 1.0, out=out)


@standin("HardSigmoid")
def _hard_sigmoid(b):
    _hard_sigmoid_of(b, b.x, b.attr("alpha", 0.2), b.attr("beta", 0.5), out=b.y)


@standin("HardSwish")
def _hard_swish(b):
    b.op("Mul", b.x, _hard_sigmoid_of(b, b.x, 1.0 / 6.0, 0.5), out=b.y)


@standin("Softplus")
def _softplus(b):
    b.op("Identity", b.softplus(b.x), out=b.y)


@standin("Mish")
def _mish(b):
    b.op("Mul", b.x, b.op("Tanh", b.softplus(b.x)), out=b.y)


def _exp_minus_one_of_negative_part(b: StandinBuilder, scale: float) -> str:
    """e^(min(x,0) / scale) - 1: the negative branch of Elu/Celu/Selu (0 for x >= 0)."""
    negative = b.min_zero(b.x)
    if scale != 1.0:
        negative = b.op("Mul", negative, b.const(np.float32(1.0 / scale)))
    return b.op("Sub", b.op("Exp", negative), b.const(np.float32(1)))


@standin("Elu")
def _elu(b):
    alpha = b.attr("alpha", 1.0)
    tail = b.op("Mul", _exp_minus_one_of_negative_part(b, 1.0), b.const(np.float32(alpha)))
    b.op("Add", b.op("Relu", b.x), tail, out=b.y)


@standin("Celu")
def _celu(b):
    alpha = b.attr("alpha", 1.0)
    tail = b.op("Mul", _exp_minus_one_of_negative_part(b, alpha), b.const(np.float32(alpha)))
    b.op("Add", b.op("Relu", b.x), tail, out=b.y)


@standin("Selu")
def _selu(b):
    alpha = b.attr("alpha", 1.67326319217681884765625)
    gamma = b.attr("gamma", 1.05070102214813232421875)
    tail = b.op("Mul", _exp_minus_one_of_negative_part(b, 1.0), b.const(np.float32(alpha)))
    b.op("Mul", b.op("Add", b.op("Relu", b.x), tail), b.const(np.float32(gamma)), out=b.y)


@standin("Softsign")
def _softsign(b):
    b.op("Div", b.x, b.op("Add", b.const(np.float32(1)), b.op("Abs", b.x)), out=b.y)


@standin("PRelu")
def _prelu(b):
    slope = b.node.input[1]
    b.op("Sub", b.op("Relu", b.x), b.op("Mul", slope, b.op("Relu", b.op("Neg", b.x))), out=b.y)


@standin("Sum", "Mean")
def _variadic_sum(b):
    # Old exporters write residual additions as Sum, which has no gradient builder; Add does.
    total = b.node.input[0]
    for other in b.node.input[1:]:
        total = b.op("Add", total, other)
    if b.node.op_type == "Mean" and len(b.node.input) > 1:
        total = b.op("Mul", total, b.const(np.float32(1.0 / len(b.node.input))))
    b.op("Identity", total, out=b.y)
