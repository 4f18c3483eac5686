"""Gradient rules: Einsum (each operand's gradient is an Einsum with its slot left open)."""

from __future__ import annotations

from typing import List, Optional

from graphprune.autodiff.registry import vjp
from graphprune.autodiff.rules._shape_helpers import refuse

# ----- Einsum ----------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _einsum_terms(ctx, node):
    """(input terms, output term) with any ellipsis spelled out as letters, and implicit output made explicit."""
    equation = ctx.attr(node, "equation")
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    spare = [c for c in _LETTERS if c not in equation]
    width = 0
    if "..." in equation:
        widths = []
        for term, x in zip(terms, node.input):
            rank = ctx.rank(x) if "..." in term else len(term)
            if rank is None:
                raise refuse(node, "an ellipsis on an input of unknown rank")
            widths.append(rank - len(term) + 3 if "..." in term else 0)
        width = max(widths)
        # Ellipsis dims align on the right, as in numpy.
        terms = [t.replace("...", "".join(spare[width - w:width])) for t, w in zip(terms, widths)]
    if not arrow:  # implicit output: the ellipsis, then the letters used once, sorted
        letters = "".join(terms)
        once = sorted(c for c in set(letters) if letters.count(c) == 1 and c not in spare)
        out = "".join(spare[:width]) + "".join(once)
    else:
        out = out.replace("...", "".join(spare[:width]))
    return terms, out


@vjp("Einsum")
def _einsum(ctx, node, dy, wants):
    # d x_i = einsum(dy, the other operands -> term_i): the contraction with x_i's slot left open.
    terms, out = _einsum_terms(ctx, node)
    _check_sizes(ctx, node, terms)
    grads: List[Optional[str]] = []
    for i, (term, x, want) in enumerate(zip(terms, node.input, wants)):
        if not want:
            grads.append(None)
            continue
        if len(set(term)) != len(term):
            raise refuse(node, f"a repeated index in {term!r} (diagonal or trace) has no gradient rule")
        others = [(t, name) for j, (t, name) in enumerate(zip(terms, node.input)) if j != i]
        available = set(out).union(*[set(t) for t, _ in others])
        kept = "".join(c for c in term if c in available)
        if kept == out and not others:
            grad = dy[0]
        else:
            equation = ",".join([out] + [t for t, _ in others]) + "->" + kept
            grad = ctx.op("Einsum", dy[0], *[name for _, name in others], equation=equation)
        if kept != term:  # indices only x_i has were summed away: broadcast the gradient over them
            missing = [k for k, c in enumerate(term) if c not in available]
            grad = ctx.op("Expand", ctx.unsqueeze(grad, missing) if kept else grad, ctx.shape_of(x))
        grads.append(grad)
    return grads


def _check_sizes(ctx, node, terms) -> None:
    """Refuse an index whose static sizes differ between operands (torch-style 1-vs-n broadcasting):
    ONNX Einsum does not define it and onnx's shape inference types the output wrongly."""
    sizes = {}
    for term, x in zip(terms, node.input):
        shape = ctx.shape(x) or [None] * len(term)
        for c, dim in zip(term, shape):
            if dim is not None and sizes.setdefault(c, dim) != dim:
                raise refuse(node, f"index {c!r} has sizes {sizes[c]} and {dim} in different operands "
                                    "(broadcast indices have no gradient rule)")
