"""Per-kind pruning ratios: plain channels, attention heads (or head dims), FFN neurons, hidden size.

``--ratio`` applies to channel, head and FFN groups; ``--heads-ratio`` and ``--ffn-ratio`` override
it for their kind; the hidden size is pruned only when ``--hidden-ratio`` asks (it is lossy).  Each
kind is selected on its own (uniformly per group, or ranked across the groups of that kind), so a
global ranking never trades heads against FFN neurons whose scores mean different things.

Heads: at least one head stays in every attention layer (with grouped-query attention a channel is
a KV head with its query group, so one group stays); a heads ratio of 1 keeps exactly one, and the
selection says so.  Head counts are not rounded to ``round_to`` (that aligns feature widths).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from graphprune.dependency import Group
from graphprune.dependency.kinds import CHANNELS, FFN, HEAD_DIM, HEADS, HIDDEN, KINDS
from graphprune.errors import UserError
from graphprune.pruning.selection import select_channels

__all__ = ["KindRatios", "select_by_kind"]


def _check(value, what: str, allow_one: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"prune: {what} {value!r} is not a number") from None
    ok = 0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0
    if not ok:
        raise UserError(f"prune: {what} {value} is outside [0, 1{']' if allow_one else ')'}")
    return value


@dataclasses.dataclass(frozen=True)
class KindRatios:
    """Fraction of channels to prune in the groups of each kind.

    Attributes:
        channels: plain channel groups (convolutions, MLPs, classifier heads).
        heads: attention heads, or head dims with head-dim pruning; 1.0 keeps one head per layer.
        ffn: FFN neurons (the inner axis of token-wise up/down projections, gated ones included).
        hidden: the hidden size (residual stream); lossy.
        asked: the kinds given a ratio of their own (a note says when the model has none of them).
    """

    channels: float = 0.0
    heads: float = 0.0
    ffn: float = 0.0
    hidden: float = 0.0
    asked: frozenset = frozenset()

    @classmethod
    def from_options(
        cls,
        ratio: float,
        heads_ratio: Optional[float] = None,
        ffn_ratio: Optional[float] = None,
        hidden_ratio: Optional[float] = None,
    ) -> "KindRatios":
        """``ratio`` for channels, heads and FFN neurons unless overridden; hidden only when asked.

        Raises ``UserError`` for a value that is no number or outside [0, 1) ([0, 1] for heads).
        """
        ratio = _check(ratio, "ratio")
        return cls(
            channels=ratio,
            heads=ratio if heads_ratio is None else _check(heads_ratio, "heads ratio", allow_one=True),
            ffn=ratio if ffn_ratio is None else _check(ffn_ratio, "ffn ratio"),
            hidden=0.0 if hidden_ratio is None else _check(hidden_ratio, "hidden ratio"),
            asked=frozenset(kind for kind, value in ((HEADS, heads_ratio), (FFN, ffn_ratio), (HIDDEN, hidden_ratio))
                            if value is not None and float(value) > 0),
        )

    def for_kind(self, kind: str) -> float:
        return {CHANNELS: self.channels, HEADS: self.heads, HEAD_DIM: self.heads, FFN: self.ffn, HIDDEN: self.hidden}[kind]

    @property
    def nothing(self) -> bool:
        """No kind is pruned at all."""
        return not any((self.channels, self.heads, self.ffn, self.hidden))


def select_by_kind(
    groups: List[Group],
    scores: Dict[int, np.ndarray],
    ratios: KindRatios,
    global_ranking: bool = False,
    round_to: int = 1,
    max_group_ratio: float = 0.9,
) -> Tuple[Dict[int, np.ndarray], List[str]]:
    """(group id -> boolean mask of channels to prune, notes for the report).

    Args:
        groups: prunable groups of every kind.
        scores: importance per channel (``importance.group_scores``).
        ratios: the ratio of each kind.
        global_ranking: rank channels across the groups of each kind.
        round_to: kept counts are multiples of this (not for heads).
        max_group_ratio: cap per group for ``global_ranking``.
    """
    selected: Dict[int, np.ndarray] = {}
    notes: List[str] = []
    present = {g.kind for g in groups}
    for kind in sorted(ratios.asked):
        if kind not in present and not (kind == HEADS and HEAD_DIM in present):
            notes.append(f"{kind} ratio {ratios.for_kind(kind):g} unused: the model has no prunable {kind} groups")
    for kind in KINDS:
        members = [g for g in groups if g.kind == kind]
        ratio = ratios.for_kind(kind)
        if not members or ratio == 0:
            continue
        align = 1 if kind == HEADS else round_to
        cap = max_group_ratio
        if kind == HEADS and ratio >= 1.0:
            cap = 1.0  # "every head": the per-group minimum of one keeps a head in each layer
        selected.update(select_channels(members, scores, ratio, global_ranking, align, cap))
        if kind == HEADS:
            whole = [g for g in members if math.floor(g.channels * ratio + 1e-9) >= g.channels]
            if whole:
                notes.append(f"heads ratio {ratio:g} would remove every head of {len(whole)} attention "
                             f"layer(s): kept 1 head in each")
        if kind == HIDDEN:
            notes.append("hidden size pruned: lossy (LayerNorm statistics change), fine-tune afterwards")
    return selected, notes
