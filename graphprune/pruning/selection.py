"""Choosing which channels to prune: per group (uniform ratio) or ranked across groups (global)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from graphprune.dependency import Group

__all__ = ["select_channels", "kept_count"]


def kept_count(channels: int, remove: int, round_to: int = 1) -> int:
    """Channels kept when removing ``remove`` of ``channels``: at least one, rounded up to a
    multiple of ``round_to`` (never more than ``channels``)."""
    keep = max(channels - remove, 1)
    if round_to > 1:
        keep = min(channels, math.ceil(keep / round_to) * round_to)
    return keep


def _lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` lowest scores (ties: lower index first)."""
    removed = np.zeros(len(scores), dtype=bool)
    if count > 0:
        removed[np.argsort(scores, kind="stable")[:count]] = True
    return removed


def _lowest_of_each(items: List[Tuple[np.ndarray, int]]) -> List[np.ndarray]:
    """``_lowest(scores, count)`` of each item; the score vectors of one length and dtype are sorted
    as the rows of one array (a stable sort of each row is that row's own stable sort: the order
    is fully determined), not one numpy call per group of a 5,000-group graph."""
    out: List[Optional[np.ndarray]] = [None] * len(items)
    rows: Dict[tuple, List[int]] = {}
    for i, (scores, _) in enumerate(items):
        if isinstance(scores, np.ndarray) and scores.ndim == 1:
            rows.setdefault((scores.size, scores.dtype), []).append(i)
        else:
            out[i] = _lowest(scores, items[i][1])
    for (size, _), members in rows.items():
        if len(members) == 1:
            out[members[0]] = _lowest(*items[members[0]])
            continue
        order = np.argsort(np.stack([items[i][0] for i in members]), axis=1, kind="stable")
        counts = np.array([items[i][1] for i in members])
        removed = np.arange(size) < counts[:, None]  # the first ``count`` places of each order...
        masks = np.zeros((len(members), size), dtype=bool)
        np.put_along_axis(masks, order, removed, axis=1)  # ...marked at the indices they hold
        for i, mask in zip(members, masks):
            out[i] = mask
    return out


def select_channels(
    groups: List[Group],
    scores: Dict[int, np.ndarray],
    ratio: float,
    global_ranking: bool = False,
    round_to: int = 1,
    max_group_ratio: float = 0.9,
) -> Dict[int, np.ndarray]:
    """Group id -> boolean mask over its channels, True = prune.

    Args:
        groups: prunable groups.
        scores: importance per channel (``importance.group_scores``).
        ratio: fraction of channels to prune: of each group (uniform), or of all channels of all
            groups together (global).
        global_ranking: rank channels across groups (scores normalized per group to mean 1), each
            group losing at most ``max_group_ratio`` of its channels.
        round_to: kept counts are multiples of this (hardware alignment); at least one stays.
    """
    if not global_ranking:
        count: Dict[int, int] = {}  # channels -> how many go: the same for every group of that size
        for g in groups:
            if g.channels not in count:
                count[g.channels] = g.channels - kept_count(g.channels, int(math.floor(g.channels * ratio + 1e-9)),
                                                            round_to)
        lowest = _lowest_of_each([(scores[g.id], count[g.channels]) for g in groups])
        return {g.id: removed for g, removed in zip(groups, lowest)}
    normalized, owner = [], []
    for i, g in enumerate(groups):
        s = scores[g.id]
        mean = s.mean()
        s = s / mean if mean > 0 else s
        order = np.argsort(s, kind="stable")
        cap = g.channels - kept_count(g.channels, int(math.floor(g.channels * max_group_ratio + 1e-9)))
        normalized.append(s[order[:cap]])
        owner.append(np.full(cap, i))
    total = sum(g.channels for g in groups)
    target = int(math.floor(total * ratio + 1e-9))
    all_scores = np.concatenate(normalized) if normalized else np.zeros(0)
    all_owner = np.concatenate(owner) if owner else np.zeros(0, int)
    picked = np.argsort(all_scores, kind="stable")[: min(target, len(all_scores))]
    counts = np.bincount(all_owner[picked], minlength=len(groups))
    lowest = _lowest_of_each([(scores[g.id], g.channels - kept_count(g.channels, int(counts[i]), round_to))
                              for i, g in enumerate(groups)])
    return {g.id: removed for g, removed in zip(groups, lowest)}
