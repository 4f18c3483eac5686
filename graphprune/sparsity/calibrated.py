"""Activation-aware weight selection for ``sparsify``: Wanda and SparseGPT over a set of layers.

``calibrated_prune`` takes the layers the pass selected, collects their input statistics in one
streamed ORT run (``graphprune.sparsity.calibration``) and returns every layer's pruned weight:

- ``wanda``: zero the smallest ``|W| * ||X||``, compared per output row (``group="row"``, the paper's
  choice, and the lower error on ResNet-50 and the BERT encoder in ``tools/bench_sparsify.py``) or
  over the whole layer (``group="layer"``); N:M within every M consecutive reduction columns;
- ``sparsegpt``: SparseGPT's OBS reconstruction with the layer Hessian; a layer whose Hessian was not
  collected (over the size cap) falls back to Wanda, listed in ``fallbacks`` with the reason.

Scope ``layer`` prunes ``round(sparsity * size)`` in each layer; ``global`` ranks Wanda scores over all
layers (each layer's scores divided by their mean, so that layers of different output scales
compare), caps each layer at ``max_layer_sparsity`` and prunes the resulting count per layer.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune.data import InputSet
from graphprune.progress import progress_bar
from graphprune.sparsity import masks as masks_mod
from graphprune.sparsity.calibration import LayerInputs, collect_layer_inputs
from graphprune.sparsity.patches import from_weight_matrix, weight_matrix
from graphprune.sparsity.sparsegpt import sparsegpt_prune
from graphprune.sparsity.targets import WeightTarget
from graphprune.sparsity.wanda import COMPARISON_GROUPS, wanda_prune, wanda_scores

__all__ = ["CRITERIA", "CALIBRATED", "COMPARISON_GROUPS", "calibrated_prune"]

CRITERIA = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")


def calibrated_prune(
    model: onnx.ModelProto,
    targets: Sequence[WeightTarget],
    weights: Dict[str, np.ndarray],
    criterion: str,
    data: InputSet,
    sparsity: float,
    pattern: masks_mod.Pattern = None,
    scope: str = "layer",
    group: str = "row",
    max_layer_sparsity: float = 0.99,
    batch_size: int = 8,
    progress: bool = False,
) -> Tuple[Dict[str, np.ndarray], List[Tuple[WeightTarget, str]], dict]:
    """(name -> pruned weight, [(target left dense, reason)], stats) for ``criterion`` wanda/sparsegpt.

    Args:
        model: the model the statistics are measured on (not modified).
        targets: the layers to prune (all float, N:M-compatible when ``pattern`` is given).
        weights: their current values.
        criterion: "wanda" or "sparsegpt".
        data: calibration samples.
        sparsity: fraction to prune (unstructured).
        pattern: ``(n, m)`` or None.
        scope: "layer" or "global" (unstructured only).
        group: Wanda's comparison group, "row" or "layer".
        max_layer_sparsity: global scope's per-layer cap.
        batch_size: calibration samples per ORT run.
        progress: progress bars.
    """
    start = time.perf_counter()
    want = ("norms", "hessian") if criterion == "sparsegpt" else ("norms",)
    inputs = collect_layer_inputs(model, targets, data, want=want, batch_size=batch_size, progress=progress)
    stats = {"criterion": criterion, "calibration_samples": len(data),
             "calibration_seconds": round(time.perf_counter() - start, 3), "fallbacks": []}
    usable, refused = [], []
    for target in targets:
        info = inputs[target.name]
        if info.form is None or info.sq_norms is None:
            refused.append((target, f"{criterion}: {info.reason or 'no calibration statistics'}"))
        else:
            usable.append(target)
    matrices = {t.name: weight_matrix(weights[t.name], inputs[t.name].form, t.reduction_axis) for t in usable}
    norms = {t.name: inputs[t.name].column_norms(matrices[t.name].shape[-1]) for t in usable}
    counts = _prune_counts(usable, matrices, norms, sparsity, pattern, scope, max_layer_sparsity)

    pruned: Dict[str, np.ndarray] = {}
    with progress_bar(total=len(usable), desc=criterion, enabled=progress, unit="layer") as bar:
        for target, count in zip(usable, counts):
            info, matrix = inputs[target.name], matrices[target.name]
            if criterion == "sparsegpt" and info.hessian is not None:
                result = np.stack([
                    sparsegpt_prune(matrix[g], info.hessian[g], count=_group_share(count, g, matrix.shape[0]),
                                    pattern=pattern)
                    for g in range(matrix.shape[0])
                ])
            else:
                if criterion == "sparsegpt":
                    stats["fallbacks"].append({"weight": target.name, "reason": f"wanda instead: {info.reason}"})
                prune = wanda_prune(matrix, norms[target.name], count, pattern, group)
                result = np.where(prune, 0, matrix)
            w = weights[target.name]
            pruned[target.name] = from_weight_matrix(result, w.shape, info.form, target.reduction_axis).astype(w.dtype)
            bar.update(1)
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return pruned, refused, stats


def _group_share(count: Optional[int], g: int, groups: int) -> Optional[int]:
    """Conv group ``g``'s part of a layer's prune count (exact in total)."""
    if count is None:
        return None
    return int(round(count * (g + 1) / groups)) - int(round(count * g / groups))


def _prune_counts(targets, matrices, norms, sparsity, pattern, scope, max_layer_sparsity) -> List[Optional[int]]:
    """Weights to prune per layer (None for N:M, where the pattern fixes it)."""
    if pattern is not None:
        return [None] * len(targets)
    if scope == "layer":
        return [int(round(sparsity * matrices[t.name].size)) for t in targets]
    scores = []
    for t in targets:
        s = wanda_scores(matrices[t.name], norms[t.name])
        mean = float(s.mean())
        scores.append(s / mean if mean > 0 else s)
    return masks_mod.global_prune_counts(scores, sparsity, max_layer_sparsity)
