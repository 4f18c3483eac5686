"""Group kinds: what a group's channels are in a transformer (attention heads, FFN neurons, hidden size).

Rules tag the dims they recognise (``RuleContext.tag``): the attention rules tag head axes, the
LayerNorm rules the hidden size, token-wise projections their output features.  A group's kind is
the strongest tag among its members; untagged groups are plain ``channels``.  The prune pass picks
each group's ratio by kind (``--heads-ratio``, ``--ffn-ratio``, ``--hidden-ratio``).
"""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["CHANNELS", "HEADS", "HEAD_DIM", "FFN", "HIDDEN", "KINDS", "kind_of", "stronger"]

CHANNELS = "channels"  # anything else: conv channels, MLP features
HEADS = "heads"  # whole attention heads (Q/K/V columns and output-projection rows of each head)
HEAD_DIM = "head_dim"  # the same dims inside every head (head count kept): pruning with --head-dim
FFN = "ffn"  # neurons between a token-wise up-projection and its down-projection
HIDDEN = "hidden"  # the residual stream, coupled through every layer and LayerNorm (lossy)
KINDS = (CHANNELS, HEADS, HEAD_DIM, FFN, HIDDEN)

# A group touched by several tags is named by the first: the hidden stream also holds the outputs
# of token-wise projections (tagged ffn), and a heads group holds the Q/K/V projections' outputs.
_PRECEDENCE = (HIDDEN, HEADS, HEAD_DIM, FFN)


def stronger(a: Optional[str], b: Optional[str]) -> Optional[str]:
    """The tag that names a group holding dims tagged ``a`` and ``b`` (None is no tag)."""
    for kind in _PRECEDENCE:
        if kind in (a, b):
            return kind
    return a or b


def kind_of(tags: Iterable[Optional[str]]) -> str:
    """The kind of a group whose members carry ``tags``: ``stronger`` folded over them, in one pass
    over a set (called for every group, several times per prune)."""
    tags = list(tags)
    present = set(tags)
    for kind in _PRECEDENCE:
        if kind in present:
            return kind
    return next((tag for tag in tags if tag is not None), None) or CHANNELS
