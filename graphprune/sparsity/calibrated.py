"""Activation-aware weight selection for ``sparsify``: Wanda and SparseGPT over a set of layers.

``calibrate`` collects the input statistics of the layers the pass selected in one streamed ORT run
(``graphprune.sparsity.calibration``); ``calibrated_prune`` then prunes them one layer at a time:

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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune.data import InputSet
from graphprune.progress import progress_bar
from graphprune.sparsity import masks as masks_mod
from graphprune.sparsity.calibration import LayerInputs, collect_layer_inputs
from graphprune.sparsity.patches import from_weight_matrix, weight_matrix
from graphprune.sparsity.selection import LazyWeights
from graphprune.sparsity.sparsegpt import sparsegpt_prune
from graphprune.sparsity.targets import WeightTarget
from graphprune.sparsity.wanda import COMPARISON_GROUPS, wanda_prune, wanda_scores

__all__ = ["CRITERIA", "CALIBRATED", "COMPARISON_GROUPS", "calibrate", "calibrated_prune"]

CRITERIA = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")


def calibrate(model: onnx.ModelProto, targets: Sequence[WeightTarget], criterion: str, data: InputSet,
              batch_size: int = 8, progress: bool = False,
              source_dir: Optional[str] = None) -> Tuple[Dict[str, LayerInputs], dict]:
    """(weight -> LayerInputs, stats): the statistics ``criterion`` needs, from one streamed ORT run.

    Run it before copying the model: the ONNX Runtime session holds its own copy of the weights.
    ``source_dir``: where weights left on disk are (see ``collect_layer_inputs``).
    """
    start = time.perf_counter()
    want = ("norms", "hessian") if criterion == "sparsegpt" else ("norms",)
    inputs = collect_layer_inputs(model, targets, data, want=want, batch_size=batch_size, progress=progress,
                                  source_dir=source_dir)
    return inputs, {"criterion": criterion, "calibration_samples": len(data),
                    "calibration_seconds": round(time.perf_counter() - start, 3), "fallbacks": []}


def calibrated_prune(
    targets: Sequence[WeightTarget],
    load: Callable[[str], np.ndarray],
    store: Callable[[WeightTarget, np.ndarray], None],
    inputs: Dict[str, LayerInputs],
    stats: dict,
    criterion: str,
    sparsity: float,
    pattern: masks_mod.Pattern = None,
    scope: str = "layer",
    group: str = "row",
    max_layer_sparsity: float = 0.99,
    progress: bool = False,
) -> List[Tuple[WeightTarget, str]]:
    """Prune every usable layer of ``targets`` by ``criterion``; return the ones left dense, with why.

    Weights are read by ``load(name)`` and each pruned one handed to ``store(target, value)`` as soon
    as it is done, so that only one layer's copy is alive at a time (``scope="global"`` also keeps
    every layer's scores while it ranks them).

    Args:
        targets: the layers to prune (all float, N:M-compatible when ``pattern`` is given).
        load: name -> the weight's current value.
        store: receives each pruned weight.
        inputs: ``calibrate``'s statistics.
        stats: ``calibrate``'s stats, completed here (fallbacks, seconds).
        criterion: "wanda" or "sparsegpt".
        sparsity: fraction to prune (unstructured).
        pattern: ``(n, m)`` or None.
        scope: "layer" or "global" (unstructured only).
        group: Wanda's comparison group, "row" or "layer".
        max_layer_sparsity: global scope's per-layer cap.
        progress: a progress bar over the layers.
    """
    start = time.perf_counter()
    usable, refused = [], []
    for target in targets:
        info = inputs[target.name]
        if info.form is None or info.sq_norms is None:
            refused.append((target, f"{criterion}: {info.reason or 'no calibration statistics'}"))
        else:
            usable.append(target)
    counts = _prune_counts(usable, load, inputs, sparsity, pattern, scope, max_layer_sparsity)
    with progress_bar(total=len(usable), desc=criterion, enabled=progress, unit="layer") as bar:
        for target, count in zip(usable, counts):
            info = inputs[target.name]
            w = load(target.name)
            matrix = weight_matrix(w, info.form, target.reduction_axis)
            if criterion == "sparsegpt" and info.hessian is not None:
                result = np.stack([
                    sparsegpt_prune(matrix[g], info.hessian[g], count=_group_share(count, g, matrix.shape[0]),
                                    pattern=pattern)
                    for g in range(matrix.shape[0])
                ])
            else:
                if criterion == "sparsegpt":
                    stats["fallbacks"].append({"weight": target.name, "reason": f"wanda instead: {info.reason}"})
                norms = info.column_norms(matrix.shape[-1])
                result = np.where(wanda_prune(matrix, norms, count, pattern, group), 0, matrix)
            store(target, from_weight_matrix(result, w.shape, info.form, target.reduction_axis).astype(w.dtype, copy=False))
            del w, matrix, result
            bar.update(1)
    stats["seconds"] = round(stats["calibration_seconds"] + time.perf_counter() - start, 3)
    return refused


def _group_share(count: Optional[int], g: int, groups: int) -> Optional[int]:
    """Conv group ``g``'s part of a layer's prune count (exact in total)."""
    if count is None:
        return None
    return int(round(count * (g + 1) / groups)) - int(round(count * g / groups))


def _prune_counts(targets, load, inputs, sparsity, pattern, scope, max_layer_sparsity) -> List[Optional[int]]:
    """Weights to prune per layer (None for N:M, where the pattern fixes it)."""
    if pattern is not None:
        return [None] * len(targets)
    if scope == "layer":
        return [int(round(sparsity * int(np.prod(t.shape)))) for t in targets]

    def scores(i: int) -> np.ndarray:
        t = targets[i]
        matrix = weight_matrix(load(t.name), inputs[t.name].form, t.reduction_axis)
        s = wanda_scores(matrix, inputs[t.name].column_norms(matrix.shape[-1]))  # float32
        mean = float(s.mean())
        return s / mean if mean > 0 else s

    # Scores recomputed layer by layer at each pass of the ranking, never all held (they are as
    # large as the weights).
    lazy = LazyWeights([int(np.prod(t.shape, dtype=np.int64)) for t in targets], [np.dtype(np.float32)] * len(targets),
                       scores, owned=True)
    return masks_mod.global_prune_counts(lazy, sparsity, max_layer_sparsity)
