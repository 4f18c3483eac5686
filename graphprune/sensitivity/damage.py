"""Damage metrics: how far a pruned model's outputs are from the original's, 0 = unchanged.

A metric is ``f(original_outputs, pruned_outputs) -> float`` over dicts output name -> array
(every sample stacked on axis 0), larger meaning more damage:

- ``rel-l2``: the worst relative L2 error ``||pruned - original|| / ||original||`` over the outputs;
- ``top1``: ``1 - top-1 agreement`` of the first float output shaped ``[N, C]`` (class scores) or
  ``[N, T, C]`` (per-position scores of a sequence head, e.g. CTC), C > 1;
- ``python:FILE.py:FUNCTION``: the user's function, loaded from the file.  It must return a finite
  number, 0 for identical outputs and larger for worse (e.g. ``1 - accuracy``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Callable, Dict

import numpy as np

from graphprune.errors import UserError

__all__ = ["METRICS", "load_metric", "check_metric", "call_metric", "rel_l2", "top1_disagreement"]

Outputs = Dict[str, np.ndarray]
METRICS = ("rel-l2", "top1")


def rel_l2(original: Outputs, pruned: Outputs) -> float:
    worst = 0.0
    for name, ref in original.items():
        r = ref.astype(np.float64).ravel()
        d = pruned[name].astype(np.float64).ravel() - r
        norm = np.linalg.norm(r)
        worst = max(worst, float(np.linalg.norm(d) / norm) if norm > 0 else float(np.linalg.norm(d)))
    return worst


def top1_disagreement(original: Outputs, pruned: Outputs) -> float:
    for name, ref in original.items():
        # [N, C] class scores or [N, T, C] per-position scores; a [N, 1, H, W] map is no classifier
        if ref.ndim in (2, 3) and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
            return float(np.mean(ref.argmax(axis=-1) != pruned[name].argmax(axis=-1)))
    raise UserError("--metric top1: no output has class scores (a float [N, C] or [N, T, C] output, C > 1)")


def load_metric(spec: str) -> Callable[[Outputs, Outputs], float]:
    """The metric named by ``spec`` (``rel-l2``, ``top1`` or ``python:FILE.py:FUNCTION``)."""
    if spec == "rel-l2":
        return rel_l2
    if spec == "top1":
        return top1_disagreement
    if not spec.startswith("python:"):
        raise UserError(f"--metric {spec!r}: choose rel-l2, top1 or python:FILE.py:FUNCTION")
    path, sep, func = spec[len("python:"):].rpartition(":")
    if not sep or not path or not func:
        raise UserError(f"--metric {spec!r}: expected python:FILE.py:FUNCTION")
    if not os.path.isfile(path):
        raise UserError(f"--metric {spec!r}: no such file {path}")
    try:
        module_spec = importlib.util.spec_from_file_location("_graphprune_user_metric", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error in it is bad input
        raise UserError(f"--metric {spec!r}: cannot load {path}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserError(f"--metric {spec!r}: {path} defines no function {func}")
    return fn


def call_metric(fn: Callable, spec: str, original: Outputs, pruned: Outputs) -> float:
    """``fn(original, pruned)`` as a float; a hook that raises or returns no finite number is bad input."""
    try:
        value = float(fn(original, pruned))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--metric {spec}: the metric hook failed: {type(exc).__name__}: {exc}") from None
    if not math.isfinite(value):
        raise UserError(f"--metric {spec}: the metric hook returned {value}, not a finite number")
    return value


def check_metric(spec: str, original: Outputs) -> float:
    """Load the metric and call it once on the original outputs against themselves (before any
    pruning, so a broken hook stops the run before minutes of measuring); its value there."""
    return call_metric(load_metric(spec), spec, original, original)
