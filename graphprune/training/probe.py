"""Weights whose own gradient step overshoots: found by one probe step before training, then frozen.

A weight tensor whose step alone, at the peak learning rate, raises the loss of the very batch the
step was computed on is in a region of the loss whose curvature along its gradient exceeds what that
learning rate can follow (a step of size lr is stable only below curvature 2 / lr).  Adam gives
every tensor a step of about lr whatever its gradient, so one such tensor undoes what the others
win.  The PP-OCRv3 recognizer after ``reconstruct``: its early backbone (the 12-48-channel stages)
is ~25x more sensitive than the original's (a relative change of 1e-5 of ``conv2d_40.w_0`` moves
the output probabilities by 0.010, 0.0004 on the original); with its six most sensitive tensors
held, one AdamW step at lr 1e-4 on 8 lines still raised their loss from 5.167 to 5.570, with the
first 80 of its 139 weight tensors held it lowered it to 5.126.  Frozen tensors keep their values; the rest train as before.  A model far from its
target (pruned, not refit) has no overshooting tensor and trains whole.

Opt-in (``FineTunePass(freeze="auto")``, which freezes every tensor up to the last one named here):
on that recognizer at lr 1e-4 the prefix is 42 of its 139 tensors and an epoch of 512 lines still
raised the validation loss (0.189 -> 0.271); the first 80 frozen (given by name), it fell to 0.119
and the line accuracy rose 87.6% -> 95.6% (2,000 lines, 2 epochs: 99.6%, the original 99.2%).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

__all__ = ["overshooting_weights"]

# A tensor is frozen when its step alone raises the probe batch's loss by more than this fraction of
# the loss itself (float32 noise of a recomputed loss is ~1e-6 relative).
_TOLERANCE = 1e-5


def _copies(values: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    # The session may keep the arrays it is given as its buffers (no copy): hand it its own.
    return {name: np.array(value, copy=True) for name, value in values.items()}


def overshooting_weights(session, feeds: Dict[str, np.ndarray], lr: float) -> List[str]:
    """The trainable tensors of ``session`` (a ``TrainingSession``) whose step on ``feeds`` at ``lr``,
    applied alone, raises the loss on ``feeds``.  The session is left with its starting weights but a
    used optimizer state: build a new one to train."""
    start = _copies(session.weights())
    before = session.eval_step(feeds)[0]
    session.train_step(feeds, lr)
    stepped = session.weights()
    frozen = []
    for name in start:
        if np.array_equal(stepped[name], start[name]):
            continue
        session.load_weights(_copies({**start, name: stepped[name]}))
        after = session.eval_step(feeds)[0]
        if not np.isfinite(after) or after - before > _TOLERANCE * max(abs(before), 1e-12):
            frozen.append(name)
    session.load_weights(_copies(start))
    return frozen
