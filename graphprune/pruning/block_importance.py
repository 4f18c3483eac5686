"""Importance of residual blocks: 1 - cosine similarity between a block's input and output on data.

A block that barely turns its input (cosine near 1) changes the stream least; removing it costs least
(ShortGPT's "block influence").  All block boundaries are measured in one ONNX Runtime session that
lists them as extra outputs, fed batch by batch, so memory holds one batch of activations at a time.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.ir import has_external_data
from graphprune.progress import progress_bar
from graphprune.pruning.blocks import Block
from graphprune.weights_on_disk import session as disk_session
from graphprune.runtime import run

__all__ = ["block_scores", "row_cosines"]


def row_cosines(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    """Cosine similarity of ``x`` and ``y`` along ``axis``, one value per position of the other axes
    (per token of a [N, S, H] stream, per pixel of a [N, C, H, W] map); 1 where both rows are zero."""
    a = np.moveaxis(x.astype(np.float64, copy=False), axis, -1).reshape(-1, x.shape[axis])
    b = np.moveaxis(y.astype(np.float64, copy=False), axis, -1).reshape(-1, y.shape[axis])
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)


def _feature_axis(block: Block, rank: int) -> int:
    """The axis a block's features lie on: the last for transformer streams, 1 (channels) for conv maps."""
    if rank < 2:
        return 0
    return rank - 1 if block.kind != "residual" else 1


def block_scores(
    model: onnx.ModelProto,
    blocks: Sequence[Block],
    data: InputSet,
    batch_size: int = 8,
    source_dir: Optional[str] = None,
    progress: bool = False,
) -> Tuple[Dict[int, float], Dict[int, str]]:
    """(block index -> 1 - mean cosine between its input and output over every row of ``data``,
    block index -> why it cannot be removed after all: its input and output shapes differ at run time).

    Args:
        model: the model (its outputs are extended for the run and restored; nothing else changes).
        blocks: the blocks to measure.
        data: calibration samples, fed ``batch_size`` at a time (or the model's fixed batch).
        source_dir: the folder of a model loaded without its external data: ONNX Runtime reads the
            weights from there (no copy of them is made here).
        progress: a progress bar over the batches.
    """
    names: List[str] = []
    for block in blocks:
        for name in (block.input, block.output):
            if name not in names:
                names.append(name)
    session = _session(model, names, source_dir)
    sums = {b.index: 0.0 for b in blocks}
    counts = {b.index: 0 for b in blocks}
    refused: Dict[int, str] = {}
    batches = data.batches(batch_size)
    steps = -(-len(data) // (data.fixed_batch or batch_size))
    with progress_bar(steps, "block importance", enabled=progress) as bar:
        for feed in batches:
            values = run(session, feed, names)
            for block in blocks:
                x, y = values[block.input], values[block.output]
                if x.shape != y.shape:
                    refused[block.index] = f"input shape {list(x.shape)} differs from output shape {list(y.shape)} at run time"
                    continue
                cos = row_cosines(x, y, _feature_axis(block, x.ndim))
                sums[block.index] += float(cos.sum())
                counts[block.index] += cos.size
            bar.update(1)
    scores = {i: 1.0 - sums[i] / counts[i] for i in sums if counts[i] and i not in refused}
    return scores, refused


def _session(model: onnx.ModelProto, names: Sequence[str], source_dir: Optional[str]):
    """A session of ``model`` that also outputs ``names``.  The outputs are appended to ``model`` for
    the time it takes to serialize it (a copy of a large model just to add outputs would double it)."""
    present = {o.name for o in model.graph.output}
    added = [n for n in names if n not in present]
    for name in added:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        if has_external_data(model) and source_dir is None:
            raise UserError("block importance: the model's weights are on disk; give the folder it was read from")
        return disk_session(model, source_dir, threads=None, prepacking=True)
    finally:
        if added:
            del model.graph.output[len(model.graph.output) - len(added):]


