"""Magnitude masks (unstructured per layer, global with a per-layer cap, N:M) and the mask record.

A mask is a boolean array shaped like its weight: True keeps the weight, False zeroes it.  The record
in ``model.metadata_props[MASKS_KEY]`` lists which initializers were sparsified and how, so that a later
fine-tuning keeps pruned weights at zero; the mask itself is ``weight != 0`` (pruned weights are exactly
zero), which ``read_weight_masks`` returns.
"""

from __future__ import annotations

import json
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune.errors import UserError
from graphprune.sparsity.selection import LazyWeights, smallest_counts

__all__ = [
    "MASKS_KEY",
    "Pattern",
    "parse_pattern",
    "pattern_label",
    "unstructured_mask",
    "global_prune_counts",
    "n_m_mask",
    "n_m_fit_reason",
    "read_mask_record",
    "write_mask_record",
    "read_weight_masks",
]

MASKS_KEY = "graphprune.weight_masks"
_RECORD_VERSION = 1

# (N, M) for an N:M pattern, None for unstructured.
Pattern = Optional[Tuple[int, int]]


def parse_pattern(text: str) -> Pattern:
    """``"unstructured"`` -> None, ``"2:4"`` -> (2, 4); N must be in [1, M) and M at most 64."""
    text = str(text).strip()
    if text.lower() == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise UserError(f"pattern {text!r} is neither 'unstructured' nor N:M (e.g. 2:4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise UserError(f"pattern {text}: N:M needs 1 <= N < M (got N={n}, M={m})")
    if m > 64:
        raise UserError(f"pattern {text}: M={m} is larger than 64; N:M groups are small (2:4, 1:4, 4:8)")
    return n, m


def pattern_label(pattern: Pattern) -> str:
    return "unstructured" if pattern is None else f"{pattern[0]}:{pattern[1]}"


def unstructured_mask(weight: np.ndarray, prune_count: int) -> np.ndarray:
    """Keep all but the ``prune_count`` smallest-magnitude weights (ties broken by position)."""
    return ~_smallest(np.abs(weight).ravel(), prune_count).reshape(weight.shape)


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` smallest ``values``, ties to the earlier position: a stable argsort's
    first ``count``, found by one O(n) partition (a full sort of 10^8 weights takes minutes)."""
    chosen = np.zeros(values.size, dtype=bool)
    if count <= 0:
        return chosen
    if count >= values.size:
        chosen[:] = True
        return chosen
    threshold = np.partition(values, count - 1)[count - 1]
    if np.isnan(threshold):  # NaN sorts last: the stable sort's order is the reference
        chosen[np.argsort(values, kind="stable")[:count]] = True
        return chosen
    np.less(values, threshold, out=chosen)
    ties = np.flatnonzero(values == threshold)[: count - np.count_nonzero(chosen)]
    chosen[ties] = True
    return chosen


def global_prune_counts(weights: "Sequence[np.ndarray] | LazyWeights", sparsity: float,
                        max_layer_sparsity: float) -> List[int]:
    """How many weights to prune in each layer for one global magnitude threshold.

    The ``round(sparsity * total)`` smallest magnitudes over all layers are pruned, except that no
    layer loses more than ``floor(max_layer_sparsity * size)`` weights (and always keeps one): a
    capped layer's excess is taken from the others, in global magnitude order.  The total is exact
    whenever ``max_layer_sparsity >= sparsity``.

    ``weights`` are arrays, or a ``selection.LazyWeights`` read one at a time (models whose weights
    stay on disk): past ``selection.IN_MEMORY_LIMIT`` weights the ranking streams them (radix
    select) instead of concatenating their magnitudes, with the same result.
    """
    source = weights if isinstance(weights, LazyWeights) else LazyWeights.of(weights)
    sizes = [int(n) for n in source.sizes]
    target = int(round(sparsity * sum(sizes)))
    caps = [min(int(math.floor(max_layer_sparsity * n)), n - 1) for n in sizes]
    counts = [0] * len(sizes)
    capped: set = set()
    while True:
        # Water-filling: the pool is every uncapped layer; capped layers sit at their cap.
        free = [i for i in range(len(sizes)) if i not in capped]
        budget = target - sum(caps[i] for i in capped)
        if not free or budget <= 0:
            break
        per_layer = smallest_counts(source, free, budget)
        newly_capped = [free[j] for j in range(len(free)) if per_layer[j] > caps[free[j]]]
        if not newly_capped:
            for j, i in enumerate(free):
                counts[i] = int(per_layer[j])
            break
        capped.update(newly_capped)
    for i in capped:
        counts[i] = caps[i]
    return counts


def n_m_fit_reason(shape: Sequence[int], axis: int, m: int) -> Optional[str]:
    """Why an N:M pattern with group size ``m`` does not fit a weight, or None when it does."""
    if not shape:
        return "scalar weight"
    length = shape[axis]
    if length % m:
        return f"reduction axis {axis} has length {length}, not divisible by M={m}"
    return None


def n_m_mask(weight: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the ``n`` largest magnitudes in every group of ``m`` consecutive weights along ``axis``."""
    moved = np.moveaxis(np.abs(weight), axis, -1)
    groups = moved.reshape(-1, m)
    # Stable sort keeps the earlier of equal magnitudes pruned first: deterministic masks.
    order = np.argsort(groups, axis=1, kind="stable")
    keep = np.ones_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, : m - n], False, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def read_mask_record(model: onnx.ModelProto) -> Dict[str, dict]:
    """The ``weights`` entries of the mask record (empty when the model has none).

    A malformed record (not JSON, no ``weights`` mapping, another version) is ignored with a warning.
    """
    import warnings

    for prop in model.metadata_props:
        if prop.key == MASKS_KEY:
            try:
                record = json.loads(prop.value)
            except (json.JSONDecodeError, RecursionError):
                warnings.warn(f"model metadata {MASKS_KEY!r} is not valid JSON: ignored")
                return {}
            if not isinstance(record, dict) or not isinstance(record.get("weights"), dict):
                warnings.warn(f"model metadata {MASKS_KEY!r} has no 'weights' mapping: ignored")
                return {}
            if record.get("version") != _RECORD_VERSION:
                warnings.warn(f"model metadata {MASKS_KEY!r} has version {str(record.get('version'))[:20]!r} "
                              f"(expected {_RECORD_VERSION}): ignored")
                return {}
            return {str(name): entry for name, entry in record["weights"].items()}
    return {}


def write_mask_record(model: onnx.ModelProto, entries: Dict[str, dict]) -> None:
    """Merge ``entries`` (name -> {"pattern", "sparsity"}) into the model's mask record, in place."""
    weights = read_mask_record(model)
    weights.update(entries)
    value = json.dumps({"version": _RECORD_VERSION, "weights": weights}, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == MASKS_KEY:
            prop.value = value
            return
    model.metadata_props.add(key=MASKS_KEY, value=value)


def read_weight_masks(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    """Name -> boolean mask (``weight != 0``) of every weight listed in the mask record.

    Weights stored compactly (``--storage sparse``) are decoded.  A listed weight that is no longer
    in the model (renamed or removed by a later pass) is left out.
    """
    from graphprune.sparsity.storage import stored_weights

    names = list(read_mask_record(model))
    values = stored_weights(model, names)
    return {name: values[name] != 0 for name in names if name in values}
