"""Measuring candidate placements on ONNX Runtime: latency (interleaved, fixed threads) and output error."""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Mapping, Optional

import numpy as np
import onnx

from graphprune.runtime import DEFAULT_THREADS, make_session, run

__all__ = ["Candidate", "output_error", "reference_outputs", "measure_latencies"]


@dataclasses.dataclass
class Candidate:
    """One way to quantize the model and what it measured."""

    name: str
    model: onnx.ModelProto
    int8_nodes: frozenset
    latency: Optional[float] = None  # seconds, best of the rounds' medians
    error: Optional[float] = None  # worst relative L2 over outputs


def reference_outputs(model: onnx.ModelProto, feeds: List[Dict[str, np.ndarray]], threads: int = DEFAULT_THREADS):
    """Outputs of ``model`` for each feed (a list of name -> array dicts)."""
    session = make_session(model, threads=threads)
    return [run(session, feed) for feed in feeds]


def output_error(
    model: onnx.ModelProto,
    feeds: List[Dict[str, np.ndarray]],
    reference: List[Mapping[str, np.ndarray]],
    threads: int = DEFAULT_THREADS,
) -> float:
    """Worst relative L2 error (||y - y_ref|| / ||y_ref|| over all feeds) among the outputs."""
    session = make_session(model, threads=threads)
    diff: Dict[str, float] = {}
    norm: Dict[str, float] = {}
    for feed, ref in zip(feeds, reference):
        for name, value in run(session, feed).items():
            r = ref[name].astype(np.float64)
            diff[name] = diff.get(name, 0.0) + float(np.sum((value.astype(np.float64) - r) ** 2))
            norm[name] = norm.get(name, 0.0) + float(np.sum(r**2))
    errors = [np.sqrt(diff[k] / norm[k]) if norm[k] > 0 else np.sqrt(diff[k]) for k in diff]
    return float(max(errors, default=0.0))


def measure_latencies(
    models: Mapping[str, onnx.ModelProto],
    feed: Dict[str, np.ndarray],
    threads: int = DEFAULT_THREADS,
    rounds: int = 3,
    budget_seconds: float = 2.0,
) -> Dict[str, float]:
    """Median latency of each model, measured in interleaved rounds; the best round counts.

    Interleaving means a burst of load from other processes hits every candidate alike.  The
    number of runs per round adapts to the model so a round takes about ``budget_seconds`` /
    ``rounds`` over all candidates (at least 5 runs each).
    """
    sessions = {name: make_session(model, threads=threads) for name, model in models.items()}
    one_run = {}
    for name, session in sessions.items():
        session.run(None, feed)  # first run allocates
        start = time.perf_counter()
        session.run(None, feed)
        one_run[name] = max(time.perf_counter() - start, 1e-6)
    per_round = budget_seconds / max(rounds, 1)
    runs = max(5, int(per_round / max(sum(one_run.values()), 1e-6)))
    best: Dict[str, float] = {name: float("inf") for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], float(np.median(times)))
    return best
