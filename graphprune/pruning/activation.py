"""Calibration statistics for ``--criterion activation``: mean |activation| per channel, from ORT."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional

import numpy as np
import onnx

from graphprune.data import InputSet
from graphprune.dependency import DimKey
from graphprune.progress import progress_bar
from graphprune.runtime import make_session, run

__all__ = ["activation_stats"]


def activation_stats(
    model: onnx.ModelProto, dims: Iterable[DimKey], data: InputSet, batch_size: int = 16, progress: bool = False,
    source_dir: Optional[str] = None,
) -> Dict[DimKey, np.ndarray]:
    """(tensor, axis) -> mean |value| of each index over the samples and every other axis.

    Runs a copy of ``model`` whose outputs also list the intermediate tensors of ``dims``.

    Args:
        model: the model (not modified).
        dims: the activation dims to measure (graph inputs and constants are skipped).
        data: calibration samples.
        batch_size: samples per run when the batch axis is dynamic.
        progress: show a progress bar over the batches.
        source_dir: the folder of weights ``model`` left on disk (the session maps them from there).
    """
    constants = {i.name for i in model.graph.initializer}
    axes: Dict[str, List[int]] = defaultdict(list)
    for dim in dims:
        if not dim.is_virtual and dim.tensor not in constants:
            axes[dim.tensor].append(dim.axis)
    if not axes:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in axes:
        if name not in present:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    if source_dir is None:
        session = make_session(probe, threads=None)
    else:  # the probe holds records only: the runtime maps the weights from the input's file
        from graphprune.weights_on_disk import session as session_on_disk

        session = session_on_disk(probe, source_dir, threads=None)
    sums: Dict[DimKey, np.ndarray] = {}
    count = 0
    names = list(axes)
    batches = list(data.batches(batch_size))
    with progress_bar(len(batches), "activations", enabled=progress) as bar:
        for feed in batches:
            values = run(session, feed, names)
            for name, value in values.items():
                magnitude = np.abs(value.astype(np.float32, copy=False))
                for axis in axes[name]:
                    other = tuple(a for a in range(magnitude.ndim) if a != axis)
                    per_index = magnitude.mean(axis=other) if other else magnitude
                    key = DimKey(name, axis)
                    sums[key] = sums.get(key, 0) + per_index.astype(np.float64)
            count += 1
            bar.update(1)
    return {key: total / count for key, total in sums.items()}
