"""Where to stop freezing: the early layers whose step overshoots are found by probe steps before training.

A weight tensor whose step, at the peak learning rate, raises the loss of the very batch the step
was computed on is in a region of the loss whose curvature along its gradient exceeds what that
learning rate can follow (a step of size lr is stable only below curvature 2 / lr).  Adam gives
every tensor a step of about lr whatever its gradient, so such tensors undo what the others win.
The PP-OCRv3 recognizer after ``reconstruct``: its early backbone (the 12-48-channel stages) is ~25x
more sensitive than the original's (a relative change of 1e-5 of ``conv2d_40.w_0`` moves the output
probabilities by 0.010, 0.0004 on the original).

Judging each tensor's step alone (``overshooting_weights``) misses most of it: steps that are each
harmless add up along the chain.  On that recognizer (lr 1e-4) the prefix through the last tensor
whose own step raises the loss is 42 of its 139 tensors, and with those frozen an epoch of 512 lines
still raised the validation loss (0.189 -> 0.271).  ``freeze_boundary`` judges the joint step of the
tensors left to train instead, on the step's own batch and on held-out ones, and places the boundary
(graph order) where that step lowers every batch's loss, and the most: 78 tensors on the recognizer,
and the same epoch lowered the validation loss 0.189 -> 0.119, line accuracy 87.6% -> 95.6% (as
with the first 80 frozen by hand).  Frozen tensors keep their values;
the rest train as before.  A model far from its target (pruned, not refit; the digits CNN) has no
such boundary and trains whole.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["freeze_boundary", "overshooting_weights"]

# A step raises a loss when it changes it by more than -this fraction of the loss itself (float32
# noise of a recomputed loss is ~1e-6 relative): a boundary's step must lower every loss by more.
_TOLERANCE = 1e-5


def _overshoots(session, feeds, before: float, start, stepped, name: str) -> bool:
    """Whether ``name``'s step alone (the others at ``start``) raises the loss of ``feeds``."""
    return not np.array_equal(stepped[name], start[name]) and max(
        _changes(session, [feeds], [before], {**start, name: stepped[name]})) > _TOLERANCE


def overshooting_weights(session, feeds: Dict[str, np.ndarray], lr: float) -> List[str]:
    """The trainable tensors of ``session`` (a ``TrainingSession``) whose step on ``feeds`` at ``lr``,
    applied alone, raises the loss on ``feeds`` (a diagnostic: ``FineTunePass`` uses
    ``freeze_boundary``).  The session is left with its starting weights but a used optimizer
    state: build a new one to train."""
    start = session.weights()  # copies; load_weights copies too
    before = session.eval_step(feeds)[0]
    session.train_step(feeds, lr)
    stepped = session.weights()
    try:
        return [name for name in start if _overshoots(session, feeds, before, start, stepped, name)]
    finally:
        session.load_weights(start)


# Candidate boundaries per probe: this many, evenly spread over the trainable tensors.
_CANDIDATES = 16


def _changes(session, batches, before, values) -> List[float]:
    """Relative loss change of each probe batch at the weights ``values`` (inf when not finite)."""
    session.load_weights(values)
    changes = []
    for feeds, start in zip(batches, before):
        after = session.eval_step(feeds)[0]
        changes.append((after - start) / max(abs(start), 1e-12) if np.isfinite(after) else np.inf)
    return changes


def freeze_boundary(session, batches: Sequence[Dict[str, np.ndarray]], lr: float,
                    names: Optional[Sequence[str]] = None) -> int:
    """How many leading trainable tensors of ``session`` (graph order) to freeze so that the joint step
    of the others, computed on ``batches[0]`` at ``lr``, lowers the loss of every batch (the step's own
    and held-out ones: a step that only fits its few samples is not one that trains).

    Adam's first step is per element (about lr times the gradient's sign), and a tensor's gradient
    at the starting point does not depend on which others train: the joint step of any suffix is the
    full step restricted to it, so one training step serves every candidate boundary and each costs
    a forward pass per batch.  0 when the full step already lowers every batch's loss, and when no
    tensor's step alone raises the loss of its own batch (the overshoot is then the sum of steps
    each within their curvature, which the warm-up and Adam's next steps absorb: the digits CNN at
    lr 3e-3, whose full step raises 2 of 3 batches' losses by 75-90%, trains best whole); otherwise, of
    ``_CANDIDATES`` boundaries spread over the tensors, the one whose step lowers the losses most
    (mean relative change) while lowering each.  The first boundary that lowers each loss is a
    marginal one (the recognizer: its batches' losses +0.41/+0.27/+0.42 with none frozen, all
    falling from ~70 of its 139 tensors, most near 80-90), and the last tensors' steps are too small to tell
    from noise, so the deepest fall is taken rather than the first.  0 too when no candidate lowers
    every loss (nothing to gain: train whole; the best epoch guards the result).  The session is
    left with its starting weights but a used optimizer state: build a new one to train.
    ``names``: the trainable tensors in graph order."""
    names = list(names if names is not None else session.weights())
    start = session.weights()  # copies; load_weights copies too
    before = [session.eval_step(feeds)[0] for feeds in batches]
    session.train_step(batches[0], lr)
    stepped = session.weights()

    def changes(boundary: int) -> List[float]:
        return _changes(session, batches, before, {n: start[n] if i < boundary else stepped[n]
                                                   for i, n in enumerate(names)})

    def falls(change: List[float]) -> bool:
        return max(change) < -_TOLERANCE

    def overshoots(name: str) -> bool:  # its step alone raises the loss of the step's own batch
        return _overshoots(session, batches[0], before[0], start, stepped, name)

    try:
        if len(names) < 2 or falls(changes(0)) or not any(overshoots(name) for name in names):
            return 0
        best, deepest = 0, 0.0
        for boundary in sorted({len(names) * i // _CANDIDATES for i in range(1, _CANDIDATES)} - {0}):
            change = changes(boundary)
            if falls(change) and float(np.mean(change)) < deepest:
                best, deepest = boundary, float(np.mean(change))
        return best
    finally:
        session.load_weights(start)
