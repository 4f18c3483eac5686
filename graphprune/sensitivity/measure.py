"""Sensitivity measurement: prune each unit alone at each ratio, measure damage, MACs, params, latency.

Every (unit, ratio) is independent, so the measurements fan out over worker processes
(``concurrent.futures``, ``jobs``) or a Ray cluster (``use_ray``).  A worker re-analyses the model
once (analysis is deterministic: the same groups, names and importance scores as the parent's),
then for each task:

- **damage**: the unit's channels *masked* (zeroed, shapes kept: one fast edit) and the outputs on
  the calibration samples compared with the original's by the metric (``damage.py``);
- **MACs and params**: the unit's channels *removed* and counted (``graphprune.metrics``), and the
  removed model's modeled time (``cost_model``: MACs in the runtime's channel blocks, elementwise work);
- **latency**: the removed model against the original on ONNX Runtime, one thread, batch 1,
  timed in turns by the calling thread's CPU time (ORT computes in it with one thread), which a
  busy machine inflates less than wall time; the fraction pruned / original is the median of the
  per-round ratios (``cpu_latency_ratio``), each round timing both models back to back, so that
  load which comes and goes between rounds cancels out of each ratio.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune import ir
from graphprune.data import InputSet
from graphprune.dependency import build_dependency_graph, reported_groups
from graphprune.errors import UserError
from graphprune.metrics import count_macs
from graphprune.pruning import apply_selection, group_scores, removal_masks
from graphprune.pruning.group_ratios import group_keys
from graphprune.pruning.selection import select_channels
from graphprune.runtime import make_session, run_samples
from graphprune.sensitivity.cost_model import modeled_cost
from graphprune.sensitivity.damage import call_metric, load_metric

__all__ = ["Analysis", "analyse", "reference_outputs", "run_tasks", "default_jobs", "cpu_latency",
           "cpu_latency_ratio", "inner_runs"]

# Each latency sample is a block of runs lasting about this long (tiny models run in microseconds;
# thread CPU time is counted in scheduler ticks, and a block of a few ms is mostly tick noise).
_BLOCK_SECONDS = 0.01
# Below this estimated total, the default (adaptive) run measures everything in its own process.
_LOCAL_SECONDS = 10.0


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class Analysis:
    """The model's prunable groups, their stable names and importance scores (parent and workers alike)."""

    def __init__(self, model: onnx.ModelProto, criterion: str = "l2", data: Optional[InputSet] = None,
                 round_to: int = 1):
        self.model = model
        self.round_to = max(1, int(round_to))
        self.dep = build_dependency_graph(model)
        groups = reported_groups(self.dep.groups())
        self.blocked = [g for g in groups if g.blocked]
        self.prunable = [g for g in groups if g.prunable]
        self.keys = group_keys(self.prunable)
        self.by_key = {self.keys[g.id]: g for g in self.prunable}
        from graphprune.passes.prune_channels import criterion_stats  # the pass's own ranking, data criteria too

        stats = criterion_stats(model, self.prunable, criterion, data) if self.prunable else None
        self.scores = group_scores(self.dep, self.prunable, criterion, stats)

    def masks(self, ratios: Dict[str, float]):
        """Dim masks for group name -> ratio (each group ranked alone), and the channels chosen."""
        selected = {}
        for key, ratio in ratios.items():
            if ratio > 0:
                selected.update(select_channels([self.by_key[key]], self.scores, ratio, False, self.round_to))
        return removal_masks(self.prunable, selected), int(sum(s.sum() for s in selected.values()))

    def pruned(self, ratios: Dict[str, float], mode: str) -> Tuple[onnx.ModelProto, int]:
        masks, removed = self.masks(ratios)
        if not masks:
            return self.model, 0
        return apply_selection(self.dep, masks, mode)[0], removed


def analyse(model: onnx.ModelProto, criterion: str = "l2", data: Optional[InputSet] = None) -> Analysis:
    """The parent's analysis; ``UserError`` when nothing at all is prunable."""
    analysis = Analysis(model, criterion, data)
    if not analysis.prunable:
        first = analysis.blocked[0].reasons[0] if analysis.blocked and analysis.blocked[0].reasons else "no channel groups"
        raise UserError(f"nothing prunable: every group is blocked (graphprune inspect MODEL --groups lists why; first: {first})")
    return analysis


def reference_outputs(model: onnx.ModelProto, data: InputSet) -> Dict[str, np.ndarray]:
    return run_samples(make_session(model, threads=1), data)


def cpu_latency(sessions: Sequence, feed: Dict[str, np.ndarray], rounds: int, inner: int) -> List[float]:
    """Median CPU seconds per run of each session, timed in turns (``rounds`` blocks of ``inner`` runs)."""
    for s in sessions:
        for _ in range(2):
            s.run(None, feed)
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            start = time.thread_time()
            for _ in range(inner):
                s.run(None, feed)
            times[i].append((time.thread_time() - start) / inner)
    return [statistics.median(t) for t in times]


def cpu_latency_ratio(base, other, feed: Dict[str, np.ndarray], rounds: int, inner: int) -> float:
    """Median over ``rounds`` of CPU time ``other`` / ``base``, the two timed back to back in each round
    (in alternating order: the second of a pair runs with the first one's data in cache).

    A ratio of two medians taken over the whole run mixes rounds of different load: on a machine
    shared with other jobs the budget's per-group table then promised savings that whole plans did
    not show (or missed ones they did); a per-round ratio compares like with like.
    """
    for s in (base, other):
        for _ in range(2):
            s.run(None, feed)
    ratios = []
    for r in range(max(1, rounds)):
        pair = {}
        for key, s in (("base", base), ("other", other)) if r % 2 == 0 else (("other", other), ("base", base)):
            start = time.thread_time()
            for _ in range(inner):
                s.run(None, feed)
            pair[key] = time.thread_time() - start
        if pair["base"] > 0:
            ratios.append(pair["other"] / pair["base"])
    return statistics.median(ratios) if ratios else 1.0


def inner_runs(session, feed: Dict[str, np.ndarray]) -> int:
    """Runs per timing block so that a block lasts about ``_BLOCK_SECONDS``."""
    one = cpu_latency([session], feed, 3, 1)[0]
    return max(1, min(200, int(_BLOCK_SECONDS / max(one, 1e-7))))


class Worker:
    """Measures (unit, ratio) tasks; one per process, built from a picklable payload."""

    def __init__(self, payload: dict):
        self.model = onnx.load_from_string(payload["model"])
        self.data = InputSet(payload["arrays"], payload["fixed_batch"])
        self.analysis = Analysis(self.model, payload["criterion"], self.data, payload.get("round_to", 1))
        self.reference = payload["reference"]
        self.metric_spec = payload["metric"]
        self.metric = load_metric(self.metric_spec)
        self.input_shapes = payload["input_shapes"]
        self.latency_rounds = payload["latency_rounds"]
        self._base = None

    def _base_session(self):
        if self._base is None:
            session = make_session(self.model, threads=1, spinning=False)
            feed = self.data.first_batch(1)
            self._base = (session, feed, inner_runs(session, feed))
        return self._base

    def measure(self, groups: Sequence[str], ratio: float) -> dict:
        ratios = {key: ratio for key in groups}
        masked, removed = self.analysis.pruned(ratios, "mask")
        outputs = run_samples(make_session(masked, threads=1), self.data)
        damage = call_metric(self.metric, self.metric_spec, self.reference, outputs)
        smaller, _ = self.analysis.pruned(ratios, "remove")
        entry = {"ratio": ratio, "channels_removed": removed, "damage": damage,
                 "macs": count_macs(smaller, self.input_shapes or None), "params": ir.count_params(smaller),
                 "modeled": modeled_cost(smaller, self.input_shapes or None), "latency_fraction": None}
        if self.latency_rounds > 0 and removed:
            base, feed, inner = self._base_session()
            entry["latency_fraction"] = cpu_latency_ratio(base, make_session(smaller, threads=1, spinning=False),
                                                          feed, self.latency_rounds, inner)
        elif removed == 0:
            entry["latency_fraction"] = 1.0
        return entry


_WORKER: Optional[Worker] = None


def _init_worker(payload: dict) -> None:
    global _WORKER
    _WORKER = Worker(payload)


def _run_task(task: Tuple[int, Sequence[str], float]) -> Tuple[int, dict]:
    index, groups, ratio = task
    return index, _WORKER.measure(groups, ratio)


def run_tasks(payload: dict, tasks: List[Tuple[int, Sequence[str], float]], jobs: int = 1,
              use_ray: bool = False, progress=None, adaptive: bool = False) -> Dict[int, dict]:
    """Task index -> measured entry.

    ``jobs`` > 1: worker processes (spawned: a forked child would inherit the parent's onnxruntime
    threads).  With ``adaptive`` the first task is measured here and the rest stay in this process
    when they would take under ``_LOCAL_SECONDS`` (starting a worker imports onnxruntime and
    re-analyses the model: seconds that a small model's whole run does not take).  ``use_ray``:
    remote tasks on the Ray cluster (``ray.init()`` joins the one ``RAY_ADDRESS`` names, else
    starts a local one).
    """
    done: Dict[int, dict] = {}
    if use_ray:
        return _run_ray(payload, tasks, jobs, progress)
    worker, rest = None, list(tasks)
    if jobs <= 1 or len(tasks) <= 1 or adaptive:
        worker = Worker(payload)
        start = time.perf_counter()
        index, groups, ratio = rest.pop(0)
        done[index] = worker.measure(groups, ratio)
        if progress:
            progress(1)
        if jobs <= 1 or (time.perf_counter() - start) * len(rest) < _LOCAL_SECONDS:
            for index, groups, ratio in rest:
                done[index] = worker.measure(groups, ratio)
                if progress:
                    progress(1)
            return done
    done.update(_run_pool(payload, rest, jobs, progress))
    return done


def _run_pool(payload: dict, tasks, jobs: int, progress) -> Dict[int, dict]:
    done: Dict[int, dict] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                                                initargs=(payload,)) as pool:
        futures = [pool.submit(_run_task, task) for task in tasks]
        try:
            for future in concurrent.futures.as_completed(futures):
                index, entry = future.result()  # a UserError raised in a worker comes back as itself
                done[index] = entry
                if progress:
                    progress(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return done


def _run_ray(payload: dict, tasks, jobs: int, progress) -> Dict[int, dict]:
    try:
        import ray
    except ImportError:
        raise UserError("--ray: ray is not installed (pip install 'ray[default]'; without --ray the "
                        "measurements run in local processes)") from None
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    shared = ray.put(payload)
    chunks = max(1, min(len(tasks), int(ray.cluster_resources().get("CPU", jobs))))

    @ray.remote
    def measure_chunk(payload_ref, chunk):
        worker = Worker(payload_ref)
        return [(index, worker.measure(groups, ratio)) for index, groups, ratio in chunk]

    refs = [measure_chunk.remote(shared, tasks[i::chunks]) for i in range(chunks)]
    done: Dict[int, dict] = {}
    for result in ray.get(refs):
        for index, entry in result:
            done[index] = entry
            if progress:
                progress(1)
    return done
