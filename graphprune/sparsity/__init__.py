"""Weight sparsification helpers: weight selection, magnitude / Wanda / SparseGPT pruning, calibration
statistics (layer-input norms and Hessians), mask record, compact storage, report."""

from graphprune.sparsity.calibration import LayerInputs, collect_layer_inputs
from graphprune.sparsity.masks import MASKS_KEY, parse_pattern, read_weight_masks
from graphprune.sparsity.storage import compact_initializers, expand_compact_weights, stored_weights
from graphprune.sparsity.targets import DEFAULT_OP_TYPES, WEIGHT_RULES, find_weights

__all__ = [
    "LayerInputs",
    "collect_layer_inputs",
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
