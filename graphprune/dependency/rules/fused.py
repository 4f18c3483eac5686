"""The fused ops ORT's transformer optimizer emits (com.microsoft domain): pruned, or blocked with a reason.

- ``Attention``: Q, K, V projections in one weight [hidden, 3 * heads * hd] (and bias); whole heads
  (or, with ``AnalysisOptions.head_dim``, the same dims of every head) go from each third of the
  weight, from the output, and ``num_heads`` is rewritten.  Past state, rotary embeddings,
  unequal ``qkv_hidden_sizes``, an attention bias, or heads that do not divide the width block.
- ``MultiHeadAttention`` (projections done before it): the same for query/key/value [B, S, heads*hd].
- ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``: a residual Add, a bias and a
  LayerNorm (RMSNorm) over the hidden size: coupled as LayerNorm is (``rules/layernorm.py``).
- ``FastGelu``, ``BiasGelu``, ``Gelu``, ``QuickGelu``: elementwise, with an optional per-feature bias.
- ``EmbedLayerNormalization`` blocks: its outputs are the hidden stream and its fused mask/position
  inputs carry no prunable channels.

ONNX shape inference knows none of these ops; their outputs take their first input's shape
(``shape_info.SAME_SHAPE_OPS``), which the attention rules check against the weights.
"""

from __future__ import annotations

import math

from graphprune.dependency.dims import DimKey
from graphprune.dependency.index_mapping import Expand
from graphprune.dependency.kinds import HEAD_DIM, HEADS
from graphprune.dependency.rules.common import couple_broadcast, couple_same_shape
from graphprune.dependency.rules.layernorm import couple_hidden
from graphprune.dependency.rules.registry import RuleContext, register_rule

__all__ = []

MS = "com.microsoft"


def _block_node(ctx: RuleContext, reason: str) -> None:
    for name in ctx.inputs + ctx.outputs:
        if name:
            ctx.block_tensor(name, reason)


def _head_unit(ctx: RuleContext, heads: int, hd: int):
    """(virtual dim of the pruned unit, mapping into one [heads * hd] block, size of a block's
    index space): a head (``Expand(inner=hd)``) or, with head-dim pruning, a dim of every head."""
    if ctx.options.head_dim:
        unit = ctx.virtual("head_dim", hd)
        ctx.tag(unit, HEAD_DIM)
        return unit, heads, 1
    unit = ctx.virtual("heads", heads)
    ctx.tag(unit, HEADS)
    return unit, 1, hd


def _keep_scale(ctx: RuleContext, hd: int) -> None:
    """Head-dim pruning changes hd, and the default scale 1/sqrt(hd) with it: write the trained one."""
    if ctx.options.head_dim and ctx.attr("scale") is None:
        scale = 1.0 / math.sqrt(hd)
        ctx.fixup(lambda editor, node: editor.set_attr(node, "scale", scale))


def _rewrite_heads(ctx: RuleContext, unit: DimKey) -> None:
    if not ctx.options.head_dim:
        ctx.fixup(lambda editor, node: editor.set_attr(node, "num_heads", editor.new_size(unit)))


@register_rule("Attention", domain=MS)
def attention(ctx: RuleContext) -> None:
    """output [B, S, heads*hd] = attention(input [B, S, H] x weights [H, 3*heads*hd] + bias)."""
    x, w, bias, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.outputs[0]
    extra = [i for i in (4, 5, 6) if ctx.input(i)]
    sizes = ctx.attr("qkv_hidden_sizes")
    if extra or any(ctx.used(o) for o in ctx.outputs[1:]) or ctx.attr("do_rotary", 0):
        return _block_node(ctx, "fused Attention with past state, attention bias or rotary embedding")
    if not ctx.is_constant(w) or (bias and not ctx.is_constant(bias)):
        return _block_node(ctx, "fused Attention weights are not constants")
    if sizes is not None and len(set(sizes)) != 1:
        return _block_node(ctx, f"fused Attention with unequal qkv_hidden_sizes {list(sizes)}")
    heads, (_, width) = int(ctx.attr("num_heads")), ctx.require_shape(w)
    out = ctx.require_shape(y)
    if width % 3 or (width // 3) % heads:
        return _block_node(ctx, f"num_heads {heads} does not divide the {width // 3} features per projection")
    hidden = width // 3
    if out[-1] != hidden:
        return _block_node(ctx, f"fused Attention output width {out[-1]} is not the projections' {hidden}")
    ctx.ignore(ctx.input(3))  # mask_index: [B], [B, S] or [B, S, S]: no channels
    for o in ctx.outputs[1:]:
        ctx.ignore(o)
    if ctx.is_param(w):
        ctx.param(w, "weight")
    ctx.couple(DimKey(x, 0), DimKey(y, 0))
    ctx.couple(DimKey(x, 1), DimKey(y, 1))
    ctx.couple(DimKey(x, 2), DimKey(w, 0))
    hd = hidden // heads
    unit, outer, inner = _head_unit(ctx, heads, hd)
    ctx.couple(unit, DimKey(w, 1), Expand(outer=3 * outer, inner=inner))
    if bias:
        if ctx.is_param(bias):
            ctx.param(bias, "bias")
        ctx.couple(unit, DimKey(bias, 0), Expand(outer=3 * outer, inner=inner))
    ctx.couple(unit, DimKey(y, 2), Expand(outer=outer, inner=inner))
    _keep_scale(ctx, hd)
    _rewrite_heads(ctx, unit)
    if sizes is not None:
        ctx.fixup(lambda editor, node: editor.set_attr(node, "qkv_hidden_sizes", [editor.new_size(DimKey(y, 2))] * 3))


@register_rule("MultiHeadAttention", domain=MS)
def multi_head_attention(ctx: RuleContext) -> None:
    """output [B, S, heads*hd_v] from query [B, S, heads*hd], key [B, L, heads*hd], value [B, L, heads*hd_v]."""
    q, k, v, bias, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.input(3), ctx.outputs[0]
    if any(ctx.input(i) for i in range(5, len(ctx.inputs))) or any(ctx.used(o) for o in ctx.outputs[1:]):
        return _block_node(ctx, "fused MultiHeadAttention with past state or attention bias")
    if not (k and v) or any(len(ctx.require_shape(t)) != 3 for t in (q, k, v)) or (bias and not ctx.is_constant(bias)):
        return _block_node(ctx, "fused MultiHeadAttention with packed inputs or a computed bias")
    heads = int(ctx.attr("num_heads"))
    width, width_v = ctx.require_shape(q)[2], ctx.require_shape(v)[2]
    if not all(isinstance(s, int) and s % heads == 0 for s in (width, width_v)) or ctx.require_shape(k)[2] != width:
        return _block_node(ctx, f"num_heads {heads} does not divide the query/key/value widths")
    if width != width_v and (ctx.options.head_dim or bias):
        return _block_node(ctx, "fused MultiHeadAttention whose V head dim differs from Q/K's")
    ctx.ignore(ctx.input(4))  # key_padding_mask
    for o in ctx.outputs[1:]:
        ctx.ignore(o)
    for a in (0, 1):
        ctx.couple(DimKey(q, a), DimKey(y, a))
        ctx.couple(DimKey(k, a), DimKey(v, a))
    ctx.couple(DimKey(q, 0), DimKey(k, 0))
    hd = width // heads
    unit, outer, inner = _head_unit(ctx, heads, hd)
    for t in (q, k, v, y):
        per_head = inner * ctx.require_shape(t)[2] // width  # V (and the output) may have their own hd
        ctx.couple(unit, DimKey(t, 2), Expand(outer=outer, inner=per_head))
    if bias:
        if ctx.is_param(bias):
            ctx.param(bias, "bias")
        ctx.couple(unit, DimKey(bias, 0), Expand(outer=3 * outer, inner=inner))
    _keep_scale(ctx, hd)
    _rewrite_heads(ctx, unit)


@register_rule("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def skip_layer_norm(ctx: RuleContext) -> None:
    """output = LayerNorm(input + skip + bias) * gamma (+ beta); the optional 4th output is the sum."""
    x, skip, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    simplified = ctx.op_type.startswith("SkipSimplified")
    names = ("gamma", "bias") if simplified else ("gamma", "beta", "bias")
    roles = {"gamma": "norm_scale", "beta": "shift", "bias": "shift"}
    rank = ctx.rank(x)
    sums = [o for i, o in enumerate(ctx.outputs) if i == 3 and o]
    couple_broadcast(ctx, y, [x, skip])
    hidden = [DimKey(x, rank - 1), DimKey(y, rank - 1)]
    for s in sums:
        couple_same_shape(ctx, y, s)
    for stat in (o for i, o in enumerate(ctx.outputs) if i in (1, 2) and o):
        for a in range(rank):
            if a < rank - 1:
                ctx.couple(DimKey(x, a), DimKey(stat, a))
            else:
                ctx.leave(DimKey(stat, a))
    for index, what in enumerate(names, start=2):
        name = ctx.input(index)
        if name:
            if ctx.is_param(name):
                ctx.param(name, roles[what])
            hidden.append(DimKey(name, 0))
    couple_hidden(ctx, hidden)


@register_rule("FastGelu", "BiasGelu", "Gelu", "QuickGelu", domain=MS)
def gelu(ctx: RuleContext) -> None:
    """Y = gelu(X + bias): elementwise; the optional bias [features] couples to the last axis."""
    x, y = ctx.input(0), ctx.outputs[0]
    couple_same_shape(ctx, x, y)
    bias = ctx.input(1)
    if bias:
        if ctx.is_param(bias):
            ctx.param(bias, "bias")  # zeroed with its channel: gelu(0 + 0) = 0
        ctx.couple(DimKey(bias, 0), DimKey(y, ctx.rank(y) - 1))


@register_rule("EmbedLayerNormalization", domain=MS)
def embed_layer_norm(ctx: RuleContext) -> None:
    _block_node(ctx, "fused EmbedLayerNormalization (prune before fusing, or fuse without embed-layer-norm)")
