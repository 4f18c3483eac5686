"""Weight sparsification helpers: weight selection, magnitude masks, mask record, compact storage, report."""

from graphprune.sparsity.masks import MASKS_KEY, parse_pattern, read_weight_masks
from graphprune.sparsity.storage import compact_initializers, expand_compact_weights, stored_weights
from graphprune.sparsity.targets import DEFAULT_OP_TYPES, WEIGHT_RULES, find_weights

__all__ = [
    "MASKS_KEY",
    "parse_pattern",
    "read_weight_masks",
    "compact_initializers",
    "expand_compact_weights",
    "stored_weights",
    "DEFAULT_OP_TYPES",
    "WEIGHT_RULES",
    "find_weights",
]
