"""Gradient rules: normalization (BatchNorm, LayerNorm, InstanceNorm, GroupNorm, RMSNorm, MVN, LpNorm).

(LRN, a channel-window op, has its rule with the pooling ops in ``spatial.py``.)

The standardizing ops share two helpers: ``_standardize`` recomputes ``xhat = (x - mean) * inv``
over the normalized axes (the forward keeps no statistics unless LayerNormalization outputs them),
and ``_standardized_grad`` turns the gradient of ``xhat`` into the gradient of ``x`` with the usual
closed form ``inv * (g - mean(g) - xhat * mean(g * xhat))`` — a handful of big elementwise and
reduction kernels, as onnxruntime-training's LayerNormalizationGrad computes it.  Scale and bias
gradients are sums of ``g * xhat`` and ``g`` over the axes they are shared across.

Statistics are recomputed in the input's element type (``stash_type`` asks for float32 statistics
of 16-bit inputs; the float32 and float64 graphs that train are unaffected).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from graphprune.autodiff.registry import vjp
from graphprune.errors import UserError


def _standardize(ctx, x: str, axes: Sequence[int], epsilon: float):
    """``(xhat, inv)``: ``x`` standardized over ``axes`` and ``1 / sqrt(var + epsilon)`` (axes kept)."""
    centered = ctx.op("Sub", x, ctx.reduce("ReduceMean", x, axes))
    variance = ctx.reduce("ReduceMean", ctx.op("Mul", centered, centered), axes)
    inv = ctx.op("Reciprocal", ctx.op("Sqrt", ctx.op("Add", variance, ctx.const(epsilon, like=x))))
    return ctx.op("Mul", centered, inv), inv


def _standardized_grad(ctx, g: str, xhat: str, inv: str, axes: Sequence[int], g_xhat: Optional[str] = None,
                       projection: Optional[str] = None) -> str:
    """The gradient of ``x`` given ``g``, the gradient of ``xhat = (x - mean) * inv`` over ``axes``.

    ``inv`` may carry a factor constant over ``axes`` (a per-channel scale); ``g_xhat`` is ``g * xhat``
    when the caller computed it already, ``projection`` its mean over ``axes``.
    """
    if projection is None:
        projection = ctx.reduce("ReduceMean", g_xhat or ctx.op("Mul", g, xhat), axes)
    centered = ctx.op("Sub", g, ctx.reduce("ReduceMean", g, axes))
    projected = ctx.op("Mul", xhat, projection)
    return ctx.op("Mul", inv, ctx.op("Sub", centered, projected))


def _known_rank(ctx, node) -> int:
    rank = ctx.rank(node.input[0])
    if rank is None:
        raise UserError(f"{node.op_type} node {node.name!r}: the rank of its input is unknown; give the model's "
                        "inputs a known rank")
    return rank


class _Channels:
    """How an [N, C, ...] input meets its per-channel ([C]) parameters.

    With a known rank, tensors keep their shape and parameters become [C, 1, ..., 1].  With an
    unknown rank (shapes computed upstream that inference could not follow) tensors are viewed as
    [N, C, -1] and reshaped back at the end, so such exports still train.
    """

    def __init__(self, ctx, x: str):
        self.ctx, self.x = ctx, x
        rank = ctx.rank(x)
        self.flat = rank is None
        self.rank = 3 if rank is None else rank
        self.spatial = list(range(2, self.rank))

    def view(self, t: str) -> str:
        """``t``, shaped like x, in the working layout."""
        return self.ctx.op("Reshape", t, self.ctx.ints([0, 0, -1])) if self.flat else t

    def restore(self, t: str) -> str:
        """``t``, in the working layout, shaped like x again."""
        return self.ctx.op("Reshape", t, self.ctx.shape_of(self.x)) if self.flat else t

    def param(self, p: str) -> str:
        """A [C] tensor shaped to broadcast against the working layout."""
        return self.ctx.unsqueeze(p, list(range(1, self.rank - 1))) if self.rank > 2 else p

    def sum(self, t: str) -> str:
        """``t`` in the working layout summed to [C]."""
        return self.ctx.reduce_sum(t, [0] + self.spatial, keepdims=False)


def _wanted(wants: List[bool], index: int) -> bool:
    return len(wants) > index and wants[index]


# ----- batch statistics of the channels ------------------------------------------------------------

@vjp("BatchNormalization")
def _batch_norm(ctx, node, dy, wants):
    if ctx.attr(node, "training_mode", 0):
        return _batch_norm_training(ctx, node, dy, wants)
    # Inference: y = (x - mean) * k + bias with k = scale / sqrt(var + eps), all per channel.
    (x, scale, _bias, mean, var), ch = node.input[:5], _Channels(ctx, node.input[0])
    g = ch.view(dy[0])
    epsilon = float(ctx.attr(node, "epsilon", 1e-5))
    inv = ctx.op("Reciprocal", ctx.op("Sqrt", ctx.op("Add", var, ctx.const(epsilon, like=var))))
    k = ctx.op("Mul", scale, inv)
    grads: List[Optional[str]] = [None] * 5
    if wants[0]:
        grads[0] = ch.restore(ctx.op("Mul", g, ch.param(k)))
    sum_g = ch.sum(g) if wants[2] or wants[3] else None
    grads[2] = sum_g if wants[2] else None
    if wants[3]:  # the running mean, for models that train it (it is a constant of the forward)
        grads[3] = ctx.op("Neg", ctx.op("Mul", sum_g, k))
    if wants[1] or wants[4]:
        # sum(g * (x - mean)) per channel, centered before the product so float32 does not cancel.
        moment = ch.sum(ctx.op("Mul", g, ctx.op("Sub", ch.view(x), ch.param(mean))))
        grads[1] = ctx.op("Mul", moment, inv) if wants[1] else None
        if wants[4]:  # d k / d var = -k * inv^2 / 2
            half_k = ctx.op("Mul", k, ctx.const(-0.5, like=var))
            grads[4] = ctx.op("Mul", moment, ctx.op("Mul", half_k, ctx.op("Mul", inv, inv)))
    return grads


def _batch_norm_training(ctx, node, dy, wants):
    # Batch statistics over N and the spatial axes; input_mean/var only feed the running outputs.
    if any(g is not None for g in dy[1:]):
        raise UserError(f"BatchNormalization node {node.name!r}: a loss depends on its running statistics "
                        "(training-mode outputs 1 and 2): only its normalized output Y is differentiated")
    return _per_channel_standardized(ctx, node, dy[0], wants, [0])


@vjp("InstanceNormalization")
def _instance_norm(ctx, node, dy, wants):
    return _per_channel_standardized(ctx, node, dy[0], wants, [])


def _per_channel_standardized(ctx, node, g: str, wants, batch_axes: List[int]) -> List[Optional[str]]:
    """Gradients of X, scale and B for y = xhat * scale + B, with x standardized over ``batch_axes``
    and the spatial axes and scale, B per channel (BatchNormalization training, InstanceNormalization)."""
    (x, scale), ch = node.input[:2], _Channels(ctx, node.input[0])
    axes = batch_axes + ch.spatial
    g = ch.view(g)
    xhat, inv = _standardize(ctx, ch.view(x), axes, float(ctx.attr(node, "epsilon", 1e-5)))
    g_xhat = ctx.op("Mul", g, xhat)
    grads: List[Optional[str]] = [None] * len(node.input)
    if wants[0]:  # the per-channel scale is constant over the normalized axes: folded into inv
        scaled_inv = ctx.op("Mul", inv, ch.param(scale))
        grads[0] = ch.restore(_standardized_grad(ctx, g, xhat, scaled_inv, axes, g_xhat))
    grads[1] = ch.sum(g_xhat) if wants[1] else None
    grads[2] = ch.sum(g) if wants[2] else None
    return grads


@vjp("GroupNormalization")
def _group_norm(ctx, node, dy, wants):
    # Statistics over each group of C / G channels, computed on x viewed as [N, G, C/G * spatial].
    # Opset 18-20 scales and shifts per group ([G]); opset 21 per channel ([C]).
    (x, scale, _bias), g, ch = node.input[:3], dy[0], _Channels(ctx, node.input[0])
    groups = int(ctx.attr(node, "num_groups"))
    per_group = ctx.opset < 21
    grouped = ctx.ints([0, groups, -1])
    xhat3, inv3 = _standardize(ctx, ctx.op("Reshape", x, grouped), [2], float(ctx.attr(node, "epsilon", 1e-5)))
    g3 = ctx.op("Reshape", g, grouped)
    g_view = None if per_group else ch.view(g)
    grads: List[Optional[str]] = [None, None, None]
    if wants[0]:
        if per_group:  # the scale is constant over each group: folded into inv
            g_in, inv_in = g3, ctx.op("Mul", inv3, ctx.unsqueeze(scale, [1]))
        else:
            g_in, inv_in = ctx.op("Reshape", ctx.op("Mul", g_view, ch.param(scale)), grouped), inv3
        grads[0] = ctx.op("Reshape", _standardized_grad(ctx, g_in, xhat3, inv_in, [2]), ctx.shape_of(x))
    if wants[1]:
        if per_group:
            grads[1] = ctx.reduce_sum(ctx.op("Mul", g3, xhat3), [0, 2], keepdims=False)
        else:
            xhat = ch.view(ctx.op("Reshape", xhat3, ctx.shape_of(x)))
            grads[1] = ch.sum(ctx.op("Mul", g_view, xhat))
    if wants[2]:
        grads[2] = ctx.reduce_sum(g3, [0, 2], keepdims=False) if per_group else ch.sum(g_view)
    return grads


# ----- statistics of the trailing axes -----------------------------------------------------------

def _trailing_axes(ctx, node) -> List[int]:
    """The axes from the node's ``axis`` (default -1) to the last, negative when the rank is unknown."""
    axis = int(ctx.attr(node, "axis", -1))
    if axis < 0:
        return list(range(axis, 0))
    return list(range(axis, _known_rank(ctx, node)))


def _scale_bias_grads(ctx, node, g: str, xhat: str, wants, g_xhat: Optional[str] = None) -> List[Optional[str]]:
    """Gradients of the Scale and (optional) B inputs of LayerNormalization/RMSNormalization."""
    y = node.output[0]
    grads: List[Optional[str]] = [None] * (len(node.input) - 1)
    if _wanted(wants, 1):
        grads[0] = ctx.reduce_to(g_xhat or ctx.op("Mul", g, xhat), node.input[1], y)
    if _wanted(wants, 2) and node.input[2]:
        grads[1] = ctx.reduce_to(g, node.input[2], y)
    return grads


@vjp("LayerNormalization")
def _layer_norm(ctx, node, dy, wants):
    x, scale, g = node.input[0], node.input[1], dy[0]
    axes = _trailing_axes(ctx, node)
    outputs = list(node.output) + ["", ""]
    mean, inv_std = outputs[1], outputs[2]
    if mean and inv_std and ctx.elem_type(mean) == ctx.elem_type(x):
        # The forward computed the statistics already: reuse them.
        xhat, inv = ctx.op("Mul", ctx.op("Sub", x, mean), inv_std), inv_std
    else:
        xhat, inv = _standardize(ctx, x, axes, float(ctx.attr(node, "epsilon", 1e-5)))
    g = g or ctx.zeros_like(node.output[0])
    grad_x = g_xhat = None
    if wants[0]:
        g_xhat, projection = _last_axis_projection(ctx, node, g, xhat, axes) if _wanted(wants, 1) else (None, None)
        grad_x = _standardized_grad(ctx, ctx.op("Mul", g, scale), xhat, inv, axes, projection=projection)
        extra = _statistics_grad(ctx, x, xhat, inv, dy[1:])
        grad_x = ctx.op("Add", grad_x, extra) if extra else grad_x
    return [grad_x] + _scale_bias_grads(ctx, node, g, xhat, wants, g_xhat)


def _last_axis_projection(ctx, node, g: str, xhat: str, axes: Sequence[int]):
    """``(g * xhat, mean(g * scale * xhat) over the last axis)`` for a [D] scale over the last axis.

    ``g * xhat`` is what the scale gradient sums anyway; the mean is then ``(g * xhat) @ scale / D``,
    a matrix-vector product, instead of one more elementwise pass and a reduction.  Other layouts:
    ``(None, None)`` (the caller computes the mean from ``g * scale``)."""
    scale, shape_x, shape_s = node.input[1], ctx.shape(node.input[0]), ctx.shape(node.input[1])
    if list(axes) not in ([-1], [len(shape_x or ()) - 1]) or not shape_x or shape_s is None or len(shape_s) != 1:
        return None, None
    depth = shape_x[-1] or shape_s[0]
    if not depth:
        return None, None
    g_xhat = ctx.op("Mul", g, xhat)
    column = ctx.op("Mul", ctx.unsqueeze(scale, [1]), ctx.const(1.0 / depth, like=scale))  # [D, 1], small
    return g_xhat, ctx.op("MatMul", g_xhat, column)


def _statistics_grad(ctx, x: str, xhat: str, inv: str, stat_grads) -> Optional[str]:
    """The gradient of ``x`` through LayerNormalization's Mean and InvStdDev outputs, when used.

    d mean / d x_i = 1 / n and d inv / d x_i = -inv^2 * xhat_i / n over the n normalized elements."""
    d_mean, d_inv = (list(stat_grads) + [None, None])[:2]
    if d_mean is None and d_inv is None:
        return None
    d_mean = d_mean and (d_mean if ctx.elem_type(d_mean) == ctx.elem_type(x) else ctx.cast_like(d_mean, x))
    d_inv = d_inv and (d_inv if ctx.elem_type(d_inv) == ctx.elem_type(x) else ctx.cast_like(d_inv, x))
    count = ctx.op("Div", ctx.cast_like(ctx.op("Size", x), x), ctx.cast_like(ctx.op("Size", inv), x))
    total = None
    if d_inv is not None:
        total = ctx.op("Mul", xhat, ctx.op("Neg", ctx.op("Mul", d_inv, ctx.op("Mul", inv, inv))))
    if d_mean is not None:
        total = d_mean if total is None else ctx.op("Add", total, d_mean)
    return ctx.op("Div", total, count)


@vjp("RMSNormalization")
def _rms_norm(ctx, node, dy, wants):
    # y = x * inv * scale with inv = 1 / sqrt(mean(x^2) + eps): the centred formula without centring.
    x, scale, g = node.input[0], node.input[1], dy[0]
    axes = _trailing_axes(ctx, node)
    square = ctx.reduce("ReduceMean", ctx.op("Mul", x, x), axes)
    inv = ctx.op("Reciprocal", ctx.op("Sqrt", ctx.op("Add", square, ctx.const(float(ctx.attr(node, "epsilon", 1e-5)),
                                                                             like=x))))
    xhat = ctx.op("Mul", x, inv)
    grad_x = None
    if wants[0]:
        g_scaled = ctx.op("Mul", g, scale)
        projected = ctx.op("Mul", xhat, ctx.reduce("ReduceMean", ctx.op("Mul", g_scaled, xhat), axes))
        grad_x = ctx.op("Mul", inv, ctx.op("Sub", g_scaled, projected))
    return [grad_x] + _scale_bias_grads(ctx, node, g, xhat, wants)[:1]


@vjp("MeanVarianceNormalization")
def _mean_variance_norm(ctx, node, dy, wants):
    # y = c / (s + 1e-9) with c = x - mean, s = sqrt(mean(c^2)) (the epsilon of the ONNX function):
    # dx = r (g - mean(g)) - c * mean(g c) * r^2 / s with r = 1 / (s + 1e-9).
    x, g = node.input[0], dy[0]
    axes = list(ctx.attr(node, "axes", [0, 2, 3]))
    centered = ctx.op("Sub", x, ctx.reduce("ReduceMean", x, axes))
    std = ctx.op("Sqrt", ctx.reduce("ReduceMean", ctx.op("Mul", centered, centered), axes))
    r = ctx.op("Reciprocal", ctx.op("Add", std, ctx.const(1e-9, like=x)))
    direct = ctx.op("Mul", r, ctx.op("Sub", g, ctx.reduce("ReduceMean", g, axes)))
    moment = ctx.reduce("ReduceMean", ctx.op("Mul", g, centered), axes)
    through_std = ctx.op("Mul", centered, ctx.op("Div", ctx.op("Mul", moment, ctx.op("Mul", r, r)), std))
    return [ctx.op("Sub", direct, through_std)]


@vjp("LpNormalization")
def _lp_norm(ctx, node, dy, wants):
    # y = x / n along one axis, n = ||x||_p: dx = (g - dn/dx * sum(g * y)) / n with dn/dx = y (p = 2)
    # or sign(x) (p = 1).
    x, y, g = node.input[0], node.output[0], dy[0]
    axis, p = int(ctx.attr(node, "axis", -1)), int(ctx.attr(node, "p", 2))
    if p not in (1, 2):
        raise UserError(f"LpNormalization node {node.name!r}: p={p} (ONNX defines p = 1 and p = 2)")
    norm = ctx.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [axis])
    direction = y if p == 2 else ctx.op("Sign", x)
    dot = ctx.reduce_sum(ctx.op("Mul", g, y), [axis])
    return [ctx.op("Div", ctx.op("Sub", g, ctx.op("Mul", direction, dot)), norm)]

