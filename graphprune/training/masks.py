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

A malformed record (not JSON, wrong structure, axes or indices outside the weight) is ignored with a
warning, entry by entry: the masks are a convenience for fine-tuning, never a reason to stop.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Dict, List, Optional, Sequence, Set

import numpy as np
import onnx
from onnx import numpy_helper


__all__ = ["WEIGHT_MASKS_KEY", "PRUNED_CHANNELS_KEY", "read_masks", "mask_weights_in_graph", "apply_masks",
           "clean_channel_record"]

WEIGHT_MASKS_KEY = "graphprune.weight_masks"
PRUNED_CHANNELS_KEY = "graphprune.pruned_channels"
_PREFIX = "graphprune.train/mask"


def _metadata(model: onnx.ModelProto, key: str):
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                return json.loads(prop.value)
            except (json.JSONDecodeError, RecursionError):
                warnings.warn(f"model metadata {key!r} is not valid JSON: ignored")
                return None
    return None


def clean_channel_record(record: Any, shapes: Dict[str, Sequence[int]]) -> Dict[str, Dict[str, List[int]]]:
    """The well-formed part of a pruned-channel record ``{name: {axis: [index, ...]}}``.

    Entries naming a tensor of ``shapes`` must have an axis within its rank and indices within that
    axis; entries for other names only need the structure.  What is dropped is named in a warning.
    """
    if record is None:
        return {}
    if not isinstance(record, dict):
        warnings.warn(f"model metadata {PRUNED_CHANNELS_KEY!r} is not a mapping of weight names: ignored")
        return {}
    clean: Dict[str, Dict[str, List[int]]] = {}
    for name, axes in record.items():
        problem = _entry_problem(axes, shapes.get(name))
        if problem:
            warnings.warn(f"model metadata {PRUNED_CHANNELS_KEY!r}: entry {str(name)[:80]!r} ignored ({problem})")
            continue
        clean[name] = {str(int(axis)): [int(i) for i in indices] for axis, indices in axes.items()}
    return clean


def _entry_problem(axes: Any, shape: Optional[Sequence[int]]) -> Optional[str]:
    if not isinstance(axes, dict):
        return "expected {axis: [channel indices]}"
    for axis, indices in axes.items():
        if not (isinstance(axis, str) and axis.lstrip("-").isdigit()) or not isinstance(indices, list):
            return "expected {axis: [channel indices]}"
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            return "indices must be non-negative integers"
        if shape is not None:
            if not 0 <= int(axis) < len(shape):
                return f"axis {axis} outside its shape {list(shape)}"
            if indices and max(indices) >= shape[int(axis)]:
                return f"index {max(indices)} outside axis {axis} of {list(shape)}"
    return None


def _channel_masks(record: Any, weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Keep-masks from a pruned-channel record ``{name: {axis: [index, ...]}}`` (malformed entries ignored)."""
    record = clean_channel_record(record, {name: value.shape for name, value in weights.items()})
    masks: Dict[str, np.ndarray] = {}
    for name, axes in record.items():
        if name not in weights:
            continue  # frozen or removed since: nothing to keep at zero
        keep = np.ones(weights[name].shape, dtype=bool)
        for axis, indices in axes.items():
            index = [slice(None)] * keep.ndim
            index[int(axis)] = np.asarray(indices, dtype=np.int64)
            keep[tuple(index)] = False
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
    for name, keep in _channel_masks(pruned, weights).items():
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
        # The product runs on flat views: onnxruntime's elementwise kernels are ~40x slower on
        # [C, K, 1, 1] (1x1 conv weights) than on the same values flat.
        flat, shape = f"{_PREFIX}/flat", f"{_PREFIX}/shape/{name}"
        graph.initializer.append(numpy_helper.from_array(mask.astype(np.float32).reshape(-1), mask_name))
        graph.initializer.append(numpy_helper.from_array(np.array(mask.shape, np.int64), shape))
        if not any(init.name == flat for init in graph.initializer):
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), flat))
        graph.node.insert(0, onnx.helper.make_node("Reshape", [f"{masked_name}/flat", shape], [masked_name],
                                                   name=f"{_PREFIX}/unflatten/{name}"))
        graph.node.insert(0, onnx.helper.make_node("Mul", [f"{name}/{_PREFIX}flat", mask_name], [f"{masked_name}/flat"],
                                                   name=f"{_PREFIX}/mul/{name}"))
        graph.node.insert(0, onnx.helper.make_node("Reshape", [name, flat], [f"{name}/{_PREFIX}flat"],
                                                   name=f"{_PREFIX}/flatten/{name}"))
        done.append(name)
    return done


def apply_masks(values: Dict[str, np.ndarray], masks: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``values`` with every masked entry set to exactly zero."""
    return {name: np.where(masks[name], value, 0).astype(value.dtype) if name in masks else value
            for name, value in values.items()}
