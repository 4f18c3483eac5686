"""Structured pruning on top of the dependency analysis: importance, selection, applying it."""

from graphprune.pruning.activation import activation_stats
from graphprune.pruning.apply import MODES, PRUNED_CHANNELS_KEY, Editor, apply_selection, pruned_channels, removal_masks
from graphprune.pruning.importance import CRITERIA, group_scores
from graphprune.pruning.selection import kept_count, select_channels

__all__ = [
    "activation_stats",
    "MODES",
    "PRUNED_CHANNELS_KEY",
    "Editor",
    "apply_selection",
    "pruned_channels",
    "removal_masks",
    "CRITERIA",
    "group_scores",
    "kept_count",
    "select_channels",
]
