"""Measuring candidate placements on ONNX Runtime: CPU time per run (interleaved, fixed threads) and output error."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune import weights_on_disk as on_disk
from graphprune.runtime import DEFAULT_THREADS, make_session, run

__all__ = [
    "Candidate",
    "output_error",
    "reference_outputs",
    "measure_latencies",
    "cpu_clock",
    "error_limit",
    "drop_wrecked",
    "ERROR_GUARD_FACTOR",
    "ERROR_GUARD_MARGIN",
    "ONE_SESSION_BYTES",
]

# Without an error budget, a candidate whose output error is above max(3 x best, best + 0.05)
# relative L2 is dropped before the speed choice: int8 that wrecks the outputs never wins on speed
# (GPT-2: all-eligible at 0.657 against the cost model's 0.030).  The margin keeps near-exact
# candidates (0.001 vs 0.004) comparable: there the factor alone would judge noise.
ERROR_GUARD_FACTOR = 3.0
ERROR_GUARD_MARGIN = 0.05
# Models with this many bytes of weights (or with weights left on disk) are timed one session at a
# time: each timing session holds a pre-packed copy of the weights.
ONE_SESSION_BYTES = 512 * 2**20


@dataclasses.dataclass
class Candidate:
    """One way to quantize the model and what it measured."""

    name: str
    model: onnx.ModelProto
    int8_nodes: frozenset
    latency: Optional[float] = None  # CPU seconds per run, median over interleaved runs
    error: Optional[float] = None  # worst relative L2 over outputs
    # Builds ``model`` again when it was dropped to save memory (large models, ``model`` None).
    build: Optional[Callable[[], onnx.ModelProto]] = None


def reference_outputs(model: onnx.ModelProto, feeds: List[Dict[str, np.ndarray]], threads: int = DEFAULT_THREADS,
                      source_dir: Optional[str] = None):
    """Outputs of ``model`` for each feed (a list of name -> array dicts); ``source_dir``: the folder
    of the weights left on disk (``on_disk.session``)."""
    session = _session(model, source_dir, threads=threads)
    return [run(session, feed) for feed in feeds]


def output_error(
    model: onnx.ModelProto,
    feeds: List[Dict[str, np.ndarray]],
    reference: List[Mapping[str, np.ndarray]],
    threads: int = DEFAULT_THREADS,
    source_dir: Optional[str] = None,
) -> float:
    """Worst relative L2 error (||y - y_ref|| / ||y_ref|| over all feeds) among the outputs.

    Elements the reference itself holds as inf/NaN are left out (a model may output -inf by design);
    a non-finite value where the reference is finite makes the error infinite.
    """
    session = _session(model, source_dir, threads=threads)
    diff: Dict[str, float] = {}
    norm: Dict[str, float] = {}
    for feed, ref in zip(feeds, reference):
        for name, value in run(session, feed).items():
            r = ref[name].astype(np.float64)
            v = np.asarray(value).astype(np.float64)
            finite = np.isfinite(r)
            if not np.isfinite(v[finite]).all():
                return float("inf")
            diff[name] = diff.get(name, 0.0) + float(np.sum((v[finite] - r[finite]) ** 2))
            norm[name] = norm.get(name, 0.0) + float(np.sum(r[finite] ** 2))
    errors = [np.sqrt(diff[k] / norm[k]) if norm[k] > 0 else np.sqrt(diff[k]) for k in diff]
    return float(max(errors, default=0.0))


def _session(model: onnx.ModelProto, source_dir: Optional[str], threads: Optional[int], spinning: bool = True,
             prepacking: bool = False):
    """``runtime.make_session``, or ``on_disk.session`` for a model with weights left on disk."""
    if source_dir is None or not on_disk.has_weights_on_disk(model):
        return make_session(model, threads=threads, **({} if spinning else {"spinning": False}))
    return on_disk.session(model, source_dir, threads=threads, spinning=spinning, prepacking=prepacking)


def error_limit(best: float) -> float:
    """The largest output error a candidate may have when the best candidate has ``best``."""
    return max(ERROR_GUARD_FACTOR * best, best + ERROR_GUARD_MARGIN)


def drop_wrecked(candidates: Sequence[Candidate]) -> Tuple[List[Candidate], Dict[str, str]]:
    """(candidates kept, name -> reason for each dropped): those whose error exceeds ``error_limit``
    of the most accurate one's."""
    if not candidates:
        return [], {}
    best = min(c.error for c in candidates)
    limit = error_limit(best)
    kept = [c for c in candidates if c.error <= limit]
    dropped = {
        c.name: f"output rel L2 {c.error:.4g} is far above the best candidate's {best:.4g} "
        f"(limit {limit:.4g} = max({ERROR_GUARD_FACTOR:g}x, +{ERROR_GUARD_MARGIN:g}); --max-error sets a budget)"
        for c in candidates
        if c.error > limit
    }
    return kept, dropped


def cpu_clock(threads: Optional[int]) -> Callable[[], float]:
    """The clock that times one run: CPU time, which a busy machine cannot inflate the way it
    stretches wall time (a descheduled thread's CPU clock stops).

    With one intra-op thread ORT computes in the calling thread, so that thread's CPU time is the
    run's.  With more, the process's CPU time counts every worker (the timing sessions do not
    spin-wait): the work of a run summed over threads, not its wall latency.
    """
    return time.thread_time if threads == 1 else time.process_time


def measure_latencies(
    models: Mapping[str, onnx.ModelProto],
    feed: Dict[str, np.ndarray],
    threads: int = DEFAULT_THREADS,
    rounds: int = 3,
    budget_seconds: float = 2.0,
    failures: Optional[Dict[str, str]] = None,
    source_dir: Optional[str] = None,
) -> Dict[str, float]:
    """Median CPU seconds per run of each model (``cpu_clock``), runs interleaved model by model.

    Each round runs every model once in turn, ``runs`` times, starting from a different model each
    round, so that whatever else the machine does hits every model alike; the median over all runs
    counts.  ``runs`` adapts so that all rounds take about ``budget_seconds`` (at least 5 per round).

    Args:
        models: name -> model.
        feed: one input feed.
        threads: intra-op threads of every session.
        rounds: rounds of interleaved runs.
        budget_seconds: rough CPU time of the whole measurement.
        failures: when given, a model that cannot be loaded or run is left out of the result and its
            reason recorded here instead of raising.
        source_dir: the folder of weights left on disk (their sessions map them; pre-packing on, as deployed).

    Models whose weights were left on disk, or hold ``ONE_SESSION_BYTES`` or more, are timed one
    session at a time instead (``_measure_in_turns``): each session pre-packs a copy of its weights.
    """
    clock = cpu_clock(threads)
    if one_session_at_a_time(models, source_dir):
        return _measure_in_turns(models, feed, threads, budget_seconds, failures, source_dir, clock)
    sessions = {}
    one_run = {}
    for name, model in models.items():
        try:
            session = _session(model, source_dir, threads=threads, spinning=False, prepacking=True)
            session.run(None, feed)  # first run allocates
            start = clock()
            session.run(None, feed)
            one_run[name] = max(clock() - start, 1e-6)
        except Exception as exc:
            if failures is None:
                raise
            failures[name] = _first_line(exc)
            continue
        sessions[name] = session
    per_round = budget_seconds / max(rounds, 1)
    runs = max(5, int(per_round / max(sum(one_run.values()), 1e-6)))
    names = list(sessions)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for _ in range(runs):
            for name in order:
                start = clock()
                sessions[name].run(None, feed)
                times[name].append(clock() - start)
    return {name: float(statistics.median(t)) for name, t in times.items()}


def one_session_at_a_time(models: Mapping[str, object], source_dir: Optional[str]) -> bool:
    """Whether holding every model's session at once would hold several copies of large weights
    (models given as builders, see ``_measure_in_turns``, are left out of the question)."""
    from graphprune.ir import weight_bytes

    return any((source_dir is not None and on_disk.has_weights_on_disk(m)) or weight_bytes(m) >= ONE_SESSION_BYTES
               for m in models.values() if isinstance(m, onnx.ModelProto))


def _measure_in_turns(models, feed, threads, budget_seconds, failures, source_dir, clock) -> Dict[str, float]:
    """Median CPU seconds per run of each model, with one session alive at a time.

    A session with weight pre-packing (as deployed: it changes the kernels' speed, e.g. 10% on a
    conv stack) holds a packed copy of its weights, so sessions are not kept side by side: the
    models are visited in order and then in reverse (A B C C B A), each visit a new session, a
    warm-up run and a block of timed runs, so that a drift of the machine's load over the
    measurement hits every model alike on average; the median over both visits counts (the two
    adjacent visits of the last model are one, with twice the runs).  A model may be given as a
    zero-argument builder (a candidate whose int8 weights are not kept between visits): it is
    built for each visit and dropped after it.  Peak memory: one session and its model on top of
    the models held.
    """
    names = list(models)
    times: Dict[str, List[float]] = {name: [] for name in names}
    visits = [(name, 1) for name in names[:-1]] + [(names[-1], 2)] + [(name, 1) for name in names[-2::-1]] if names else []
    runs = None
    for name, blocks in visits:
        if name not in times:
            continue  # failed on its first visit
        session = model = None
        _return_freed_memory()  # the last visit's session and model, before the next is built
        try:
            model = models[name]() if callable(models[name]) else models[name]
            session = _session(model, source_dir, threads=threads, spinning=False, prepacking=True)
            session.run(None, feed)  # first run allocates
            if runs is None:  # the block size from the first model's run (float: the slowest)
                start = clock()
                session.run(None, feed)
                per_visit = budget_seconds / (2 * max(len(names), 1))
                runs = max(5, int(per_visit / max(clock() - start, 1e-6)))
            for _ in range(runs * blocks):
                start = clock()
                session.run(None, feed)
                times[name].append(clock() - start)
        except Exception as exc:
            if failures is None:
                raise
            failures[name] = _first_line(exc)
            del times[name]
        finally:
            del session, model  # released before the next model's session is built
    return {name: float(statistics.median(t)) for name, t in times.items()}


def return_large_buffers_at_once() -> None:
    """Have glibc hand freed buffers of 128 KiB or more back to the system at once (a fixed
    ``M_MMAP_THRESHOLD``; its default rises with the buffers freed, and the runtime threads'
    arenas then keep them).  Process-wide and from the first allocation it should cover: called
    before calibration when a large model will be timed in turns (conv 0.5 GB: 0.77 -> 0.74 GB)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc keeps them for reuse, and the next
    session's weights go to fresh mappings that cannot reuse them): a peak-memory concern only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
