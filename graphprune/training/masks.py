"""Weights that must stay zero through fine-tuning: sparsity masks and masked-out pruned channels.

Two records can mark them, both in ``model.metadata_props``:
  - ``graphprune.weight_masks`` (the sparsify pass): ``{"version": 1, "weights": {name: {...}}}``;
  - ``graphprune.pruned_channels`` (``prune --mode mask``): ``{name: {axis: [channel, ...]}}``.
A sparsified weight's mask is ``weight != 0`` at the start of training; a masked-channel weight's
mask zeroes the recorded channels along the recorded axis; a weight in both gets both.

The training graph multiplies each masked weight by its constant 0/1 mask before use, so the loss
never sees the masked entries and their gradient is exactly zero: Adam/SGD updates and decoupled
weight decay leave a zero weight at zero.  The written-back values are multiplied by the mask again,
which makes the guarantee independent of the optimizer.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Set

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.errors import UserError

__all__ = ["WEIGHT_MASKS_KEY", "PRUNED_CHANNELS_KEY", "read_masks", "mask_weights_in_graph", "apply_masks"]

WEIGHT_MASKS_KEY = "graphprune.weight_masks"
PRUNED_CHANNELS_KEY = "graphprune.pruned_channels"
_PREFIX = "graphprune.train/mask"


def _metadata(model: onnx.ModelProto, key: str):
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError:
                raise UserError(f"model metadata {key!r} is not valid JSON") from None
    return None


def _channel_masks(record: Any, weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Keep-masks from a pruned-channel record ``{name: {axis: [index, ...]}}``."""
    if not isinstance(record, dict):
        raise UserError(f"model metadata {PRUNED_CHANNELS_KEY!r} is not a mapping of weight names")
    masks: Dict[str, np.ndarray] = {}
    for name, axes in record.items():
        if name not in weights:
            continue  # frozen or removed since: nothing to keep at zero
        keep = np.ones(weights[name].shape, dtype=bool)
        try:
            for axis, indices in axes.items():
                index = [slice(None)] * keep.ndim
                index[int(axis)] = np.asarray(indices, dtype=np.int64)
                keep[tuple(index)] = False
        except (AttributeError, TypeError, ValueError, IndexError):
            raise UserError(f"model metadata {PRUNED_CHANNELS_KEY!r}: bad entry for {name!r} "
                            f"(expected {{axis: [channel indices]}} within its shape {list(keep.shape)})") from None
        masks[name] = keep
    return masks


def _weight_mask_names(model: onnx.ModelProto, known: Set[str]) -> Set[str]:
    try:  # the sparsify pass's reader knows its record (and compact storage) best
        from graphprune.sparsity.masks import read_mask_record
    except ImportError:
        record = _metadata(model, WEIGHT_MASKS_KEY)
        weights = record.get("weights", {}) if isinstance(record, dict) else {}
        return {name for name in weights if name in known}
    return {name for name in read_mask_record(model) if name in known}


def read_masks(model: onnx.ModelProto, weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Name -> boolean keep-mask for every weight in ``weights`` that a mask record names.

    Args:
        model: the model whose metadata holds the records.
        weights: the candidate weights (the trainable ones), name -> current value.
    """
    masks = {name: weights[name] != 0 for name in sorted(_weight_mask_names(model, set(weights)))}
    pruned = _metadata(model, PRUNED_CHANNELS_KEY)
    for name, keep in _channel_masks(pruned or {}, weights).items():
        masks[name] = masks[name] & keep if name in masks else keep
    return masks


def mask_weights_in_graph(graph: onnx.GraphProto, masks: Dict[str, np.ndarray]) -> List[str]:
    """Route every use of each masked weight through ``Mul(weight, mask)`` (in place); returns the names."""
    done: List[str] = []
    for name, mask in masks.items():
        mask_name, masked_name = f"{_PREFIX}/{name}", f"{_PREFIX}ed/{name}"
        for node in graph.node:
            for index, used in enumerate(node.input):
                if used == name:
                    node.input[index] = masked_name
        graph.initializer.append(numpy_helper.from_array(mask.astype(np.float32), mask_name))
        graph.node.insert(0, onnx.helper.make_node("Mul", [name, mask_name], [masked_name], name=f"{_PREFIX}/mul/{name}"))
        done.append(name)
    return done


def apply_masks(values: Dict[str, np.ndarray], masks: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``values`` with every masked entry set to exactly zero."""
    return {name: np.where(masks[name], value, 0).astype(value.dtype) if name in masks else value
            for name, value in values.items()}
