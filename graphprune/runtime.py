"""ONNX Runtime sessions, batched execution and latency measurement."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune.errors import UserError
from graphprune.ir import approx_bytes, is_large
from graphprune.model_io import EXTERNAL_DATA_THRESHOLD, for_ort

__all__ = [
    "ort",
    "share_malloc_arena",
    "make_session",
    "session_options",
    "run",
    "run_samples",
    "iter_outputs",
    "measure_latency",
    "interleaved_latencies",
    "DEFAULT_THREADS",
    "DISABLED_OPTIMIZERS",
]

# Latency is measured with a fixed thread count so that before/after numbers compare.
DEFAULT_THREADS = 1
# ORT >= 1.21 quantizes the float weights of a Conv/ConvTranspose/Gemm whose input comes from a
# per-tensor DequantizeLinear.  graphprune measures the float layers it chose as float: the QDQ
# models it writes do not trigger it (quantization/engine.py), and its own sessions never run it.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
# Severity of the runtime's own log lines (3: errors; the command line sets 4, fatal only, and reports errors itself).
LOG_SEVERITY = 3


# glibc's mallopt parameter: how many malloc arenas threads may create.
_M_ARENA_MAX = -8


def share_malloc_arena() -> bool:
    """Make the threads started from now on allocate from the main thread's malloc arena.

    glibc gives each thread an arena of its own, so memory the main thread freed (the weights a
    pass read) cannot serve a thread: a session built on one (``result_check.result_check``) took
    fresh memory beside the freed, 0.1 GB more peak memory and the page faults of a 20,000-node
    graph's runtime structures.  Returns whether the setting took (glibc only; a no-op elsewhere).
    """
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError, TypeError):
        return False


def ort():
    """The onnxruntime module, or a clear error telling which extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime") from None
    # ORT's optimizer logs expected non-events (e.g. "cannot remove node") at warning level.
    onnxruntime.set_default_logger_severity(LOG_SEVERITY)
    return onnxruntime


def session_options(threads: Optional[int] = DEFAULT_THREADS, optimization: str = "all", spinning: bool = True,
                    prepacking: bool = True):
    """The ``SessionOptions`` graphprune's CPU sessions share (see ``make_session`` for the arguments).

    ``prepacking=False`` keeps ORT from holding a second, packed copy of every weight (sessions over
    weights left on disk, where memory is the point).
    """
    rt = ort()
    opts = rt.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {
        "all": rt.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": rt.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": rt.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.log_severity_level = LOG_SEVERITY
    return opts


@contextlib.contextmanager
def runtime_refusal() -> Iterator[None]:
    """Creating a session: the runtime's refusal becomes one ``UserError`` line (its first line; ORT's
    messages run to several, with the model's internals)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot load the model: {first}") from None


def make_session(
    model: onnx.ModelProto,
    threads: Optional[int] = DEFAULT_THREADS,
    optimization: str = "all",
    optimized_model_path: Optional[str] = None,
    spinning: bool = True,
):
    """An ``InferenceSession`` for ``model`` on the CPU, without the optimizers in ``DISABLED_OPTIMIZERS``.

    Args:
        model: the model; relabelled for the installed runtime when needed (see ``runtime_support.for_ort``).
        threads: intra-op threads (None lets ORT decide).
        optimization: "all", "extended", "basic" or "disabled".
        optimized_model_path: where ORT writes the graph it actually runs (for fusion checks).
        spinning: idle intra-op workers spin-wait (ORT's default); off when CPU time is measured.
    """
    rt = ort()
    opts = session_options(threads, optimization, spinning)
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    model = for_ort(model)
    with runtime_refusal():
        kwargs = dict(providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS))
        if not is_large(model) and approx_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            return rt.InferenceSession(model.SerializeToString(), opts, **kwargs)
        # Large models go through a file written tensor by tensor, whose data the runtime maps:
        # from serialized bytes it parses a second copy and keeps a third (0.5 GB MLP: +1.5 GB
        # against +0.5 GB).  Past 2 GiB there are no bytes to give (ByteSize() fails).
        from graphprune.model_io import save

        with tempfile.TemporaryDirectory() as tmp:
            path = save(model, os.path.join(tmp, "model.onnx"), external_data=True)
            return rt.InferenceSession(path, opts, **kwargs)


def run(session, feeds: Dict[str, np.ndarray], output_names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """One ``session.run`` returning a name -> array dict."""
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    return dict(zip(names, values))


def iter_outputs(session, samples, batch_size: int = 32, progress: bool = False
                 ) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
    """Run every sample of a ``graphprune.data.InputSet`` batch by batch, yielding (samples in the
    batch, its outputs by name): callers that only reduce over samples (agreement, accuracy,
    statistics) hold one batch of outputs, never all of them."""
    from graphprune.progress import progress_bar

    with progress_bar(total=len(samples), desc="inference", enabled=progress, unit="sample") as bar:
        for feed in samples.batches(batch_size):
            batched = [v for v in feed.values() if v.ndim]
            count = len(batched[0]) if batched else 1  # only scalar inputs: one sample
            yield count, run(session, feed)
            bar.update(count)


def run_samples(session, samples, batch_size: int = 32, progress: bool = False) -> Dict[str, np.ndarray]:
    """Run every sample of a ``graphprune.data.InputSet`` (in batches its shapes allow); outputs stacked on axis 0.

    Each batch's outputs are written into arrays allocated at the first batch (sized for every
    sample), so the outputs are held once: collecting the batches and concatenating them held
    them twice (GBs for a text recognizer's per-step scores).  An output whose first axis does
    not follow the batch's samples is collected and concatenated as before.
    """
    stacks: Dict[str, _Stack] = {}
    for count, outputs in iter_outputs(session, samples, batch_size, progress):
        for name, value in outputs.items():
            if name not in stacks:
                stacks[name] = _Stack(value, count, len(samples))
            else:
                stacks[name].add(value, count)
    return {name: stack.result() for name, stack in stacks.items()}


class _Stack:
    """One output's batches stacked on axis 0: written into one array allocated at the first batch
    when every batch's first axis is ``rows`` per sample (the same result as ``np.concatenate``)."""

    def __init__(self, first: np.ndarray, count: int, total: int):
        self.filled, self.parts, self.whole = 0, None, None
        rows, exact = divmod(first.shape[0], count) if first.ndim and count else (0, 1)
        if count >= total or exact or not rows:  # one batch (kept as it is), or no per-sample rows
            self.parts = [first]
            return
        self.rows = rows
        self.whole = np.empty((rows * total,) + first.shape[1:], dtype=first.dtype)
        self.add(first, count)

    def add(self, value: np.ndarray, count: int) -> None:
        if self.whole is not None:
            end = self.filled + self.rows * count
            fits = value.dtype == self.whole.dtype and value.shape == (self.rows * count,) + self.whole.shape[1:]
            if fits and end <= len(self.whole):
                self.whole[self.filled:end] = value
                self.filled = end
                return
            self.parts, self.whole = [self.whole[:self.filled]], None  # not per sample after all
        self.parts.append(value)

    def result(self) -> np.ndarray:
        if self.whole is not None:
            return self.whole if self.filled == len(self.whole) else self.whole[:self.filled]
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts, axis=0)


def measure_latency(session, feed: Dict[str, np.ndarray], warmup: int = 3, runs: int = 20) -> float:
    """Median wall time of ``runs`` runs of ``feed`` after ``warmup`` runs, in seconds."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_latencies(models: Sequence[onnx.ModelProto], feed: Dict[str, np.ndarray], threads: Optional[int] = DEFAULT_THREADS,
                          runs: int = 20, warmup: int = 3) -> List[float]:
    """Median seconds per run of each model, timed in turns (one run of each, ``runs`` times).

    Benchmarks compare models this way so that load from other processes hits every model alike.
    """
    sessions = [make_session(m, threads=threads) for m in models]
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feed)
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
