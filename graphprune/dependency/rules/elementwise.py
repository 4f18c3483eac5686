"""Rules for elementwise ops: unary activations and broadcasting binary/variadic ops."""

from __future__ import annotations

from graphprune.dependency.rules.common import couple_broadcast, couple_same_shape
from graphprune.dependency.rules.registry import RuleContext, register_rule

__all__ = ["UNARY_OPS", "BROADCAST_OPS"]

UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Softplus", "Softsign",
    "Mish", "Elu", "Selu", "Celu", "ThresholdedRelu", "Cast", "CastLike", "Identity", "Exp", "Log", "Abs", "Neg",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf", "Shrink",
)

# op -> role of a constant operand at each input position (None: the op's own default below)
BROADCAST_OPS = {
    "Add": ("shift", "shift"),
    "Sub": ("shift", "shift"),
    "Mul": ("scale", "scale"),
    "Div": ("shift", "divisor"),
    "Sum": ("shift",),
    "Mean": ("shift",),
    "Max": ("shift",),
    "Min": ("shift",),
    "Pow": ("shift", "divisor"),
    "PRelu": ("shift", "scale"),
    "Where": ("divisor", "shift", "shift"),
    "Equal": ("divisor", "divisor"),
    "Less": ("divisor", "divisor"),
    "Greater": ("divisor", "divisor"),
    "LessOrEqual": ("divisor", "divisor"),
    "GreaterOrEqual": ("divisor", "divisor"),
    "And": ("divisor", "divisor"),
    "Or": ("divisor", "divisor"),
    "Xor": ("divisor", "divisor"),
    "Mod": ("shift", "divisor"),
}


@register_rule(*UNARY_OPS)
def unary(ctx: RuleContext) -> None:
    """Y has X's shape and channel c of Y depends only on channel c of X."""
    couple_same_shape(ctx, ctx.input(0), ctx.outputs[0])


@register_rule("Dropout")
def dropout(ctx: RuleContext) -> None:
    """Identity at inference; the optional mask output has X's shape; ratio/training are scalars."""
    couple_same_shape(ctx, ctx.input(0), ctx.outputs[0])
    for mask in ctx.outputs[1:]:
        if ctx.used(mask):
            couple_same_shape(ctx, ctx.input(0), mask)
        else:
            ctx.ignore(mask)
    ctx.ignore(*ctx.inputs[1:])


@register_rule("Clip")
def clip(ctx: RuleContext) -> None:
    """Clip's min/max inputs are scalars."""
    couple_same_shape(ctx, ctx.input(0), ctx.outputs[0])
    ctx.ignore(*ctx.inputs[1:])


@register_rule(*BROADCAST_OPS)
def broadcast(ctx: RuleContext) -> None:
    """Numpy broadcasting: per-channel constants ([C,1,1]) and SE scales ([N,C,1,1]) couple on C.

    A constant operand is a member of the group (its channels are deleted with the others); its
    role says whether ``mask`` may zero it (never a divisor or a comparison operand).
    """
    roles = BROADCAST_OPS[ctx.op_type]
    for i, name in enumerate(ctx.inputs):
        if name and ctx.is_param(name):
            ctx.param(name, roles[min(i, len(roles) - 1)])
    couple_broadcast(ctx, ctx.outputs[0], ctx.inputs)
