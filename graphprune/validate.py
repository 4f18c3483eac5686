"""Validation of a candidate model against its original: output agreement, accuracy, size, MACs, latency."""

from __future__ import annotations

import dataclasses
import json
from typing import List, Mapping, Optional, Tuple

import numpy as np
import onnx

from graphprune.data import InputSet, random_inputs
from graphprune.errors import UserError
from graphprune.metrics import ModelStats, model_stats
from graphprune.runtime import DEFAULT_THREADS, iter_outputs, make_session, measure_latency

__all__ = ["OutputComparison", "ValidationReport", "validate", "compare_outputs", "accuracy"]


@dataclasses.dataclass
class OutputComparison:
    """How one candidate output differs from the original's."""

    name: str
    shape: List[int]
    max_abs_diff: float
    rel_l2: float
    cosine: float
    top1_agreement: Optional[float]  # only for [N, classes] outputs


@dataclasses.dataclass
class ValidationReport:
    """Everything ``graphprune validate`` prints; ``to_dict`` is the JSON report."""

    samples: int
    outputs: List[OutputComparison]
    before: ModelStats
    after: ModelStats
    latency_before: Optional[float]
    latency_after: Optional[float]
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    threads: int = DEFAULT_THREADS

    @property
    def worst_rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def speedup(self) -> Optional[float]:
        if self.latency_before and self.latency_after:
            return self.latency_before / self.latency_after
        return None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["speedup"] = self.speedup
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)

    def format_table(self) -> str:
        return format_report(self)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, classes] scores against integer labels."""
    return float(np.mean(np.argmax(scores.reshape(len(labels), -1), axis=1) == labels.reshape(-1)))


def compare_outputs(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputComparison:
    """Max abs diff, relative L2 error (||c - r|| / ||r||), cosine similarity, top-1 agreement:
    ``_Agreement`` over one batch (the same sums, so the same numbers as ``validate`` streams)."""
    if reference.shape != candidate.shape:
        raise UserError(
            f"output {name!r}: candidate shape {list(candidate.shape)} differs from original {list(reference.shape)}"
        )
    agreement = _Agreement(name, reference)
    agreement.add(reference, candidate)
    return agreement.result()


class _Agreement:
    """``compare_outputs`` summed batch by batch: one batch of each model's outputs is held, never all
    of them.  The sums of squares and products give the norms (the whole arrays' numbers up to
    float64 rounding); the maximum and the top-1 agreement are exact."""

    def __init__(self, name: str, first: np.ndarray):
        self.name, self.rest, self.rows = name, first.shape[1:], [0, 0]
        self.top1 = first.ndim == 2 and first.shape[1] > 1 and np.issubdtype(first.dtype, np.floating)
        self.sums = np.zeros(4)  # |r|^2, |c|^2, |c - r|^2, r.c
        self.max_abs, self.agree, self.matched, self.scalar = 0.0, 0, True, first.ndim == 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        self.rows[0] += reference.shape[0] if reference.ndim else 1
        self.rows[1] += candidate.shape[0] if candidate.ndim else 1
        self.matched = self.matched and reference.shape == candidate.shape
        if not self.matched:
            return  # reported with the whole shapes once every batch has run
        r = reference.astype(np.float64).ravel()  # copies (astype): ours to overwrite
        c = candidate.astype(np.float64).ravel()
        products = (r @ r, c @ c, r @ c)
        diff = np.subtract(c, r, out=c)
        self.sums += (products[0], products[1], diff @ diff, products[2])
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff, out=diff))))
        if self.top1:
            self.agree += int(np.count_nonzero(reference.argmax(axis=1) == candidate.argmax(axis=1)))

    def result(self) -> OutputComparison:
        shapes = [[] if self.scalar else [rows, *self.rest] for rows in self.rows]
        if not self.matched:
            raise UserError(f"output {self.name!r}: candidate shape {shapes[1]} differs from original {shapes[0]}")
        norm_r, norm_c, norm_d = (float(np.sqrt(v)) for v in self.sums[:3])
        return OutputComparison(
            name=self.name,
            shape=shapes[0],
            max_abs_diff=self.max_abs,
            rel_l2=norm_d / norm_r if norm_r > 0 else norm_d,
            cosine=float(self.sums[3] / (norm_r * norm_c)) if norm_r > 0 and norm_c > 0 else float(norm_r == norm_c),
            top1_agreement=self.agree / self.rows[0] if self.top1 and self.rows[0] else None,
        )


def _compare_streamed(sess_a, sess_b, data: InputSet, labels: Optional[np.ndarray], progress: bool):
    """(comparisons, accuracy of a, accuracy of b): both models run on the same batches, each batch
    compared and dropped (``runtime.iter_outputs``), never all outputs held."""
    agreements: dict = {}
    pairs: dict = {}
    correct, start, row = [0, 0], 0, None
    batches = zip(iter_outputs(sess_a, data, progress=progress), iter_outputs(sess_b, data))
    for (count, out_a), (_, out_b) in batches:
        if not agreements:
            if len(out_a) != len(out_b):
                raise UserError(f"the models have different outputs: original {list(out_a)}, candidate {list(out_b)}")
            names_b = list(out_b)  # outputs pair by name; a renamed output pairs by position
            pairs = {name: name if name in out_b else names_b[i] for i, name in enumerate(out_a)}
            agreements = {name: _Agreement(name, value) for name, value in out_a.items()}
        for name, value in out_a.items():
            agreements[name].add(value, out_b[pairs[name]])
        if labels is not None:  # the first output's scores, one row of ``row`` values per sample
            first = next(iter(out_a))
            scores = (out_a[first], out_b[pairs[first]])
            row = row or (scores[0].size // count if scores[0].ndim else 0)
            if not row or any(s.ndim == 0 or s.size != count * row for s in scores):
                raise UserError(f"labels: output {first!r} does not hold one row of scores per sample "
                                f"(shape {list(scores[0].shape)} for {count} sample(s))")
            for side, values in enumerate(scores):
                correct[side] += int(np.count_nonzero(
                    np.argmax(values.reshape(count, row), axis=1) == labels.reshape(-1)[start:start + count]))
        start += count
    comparisons = [agreement.result() for agreement in agreements.values()]
    if labels is None:
        return comparisons, None, None
    return comparisons, correct[0] / len(labels), correct[1] / len(labels)


def validate(
    original: onnx.ModelProto,
    candidate: onnx.ModelProto,
    data: Optional[InputSet] = None,
    input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
    labels: Optional[np.ndarray] = None,
    samples: int = 8,
    seed: int = 0,
    threads: int = DEFAULT_THREADS,
    latency: bool = True,
    latency_runs: int = 20,
    sizes: Tuple[Optional[int], Optional[int]] = (None, None),
    progress: bool = False,
) -> ValidationReport:
    """Run both models in ORT on the same inputs and compare them.

    Args:
        original, candidate: the models (the candidate must keep the original's input names).
        data: samples to run; without it, ``samples`` seeded random feeds from the declared shapes
            (dynamic dims from ``input_shapes``).
        labels: integer class labels, one per sample, to report accuracy of both models.
        threads: intra-op threads for every session (fixed so latency compares).
        latency: measure the median latency of one feed (3 warm-up runs, ``latency_runs`` runs).
        sizes: file sizes in bytes (defaults to the serialized sizes).
        progress: show progress bars over the samples (the CLI does on a terminal).
    """
    if data is None:
        data = random_inputs(original, input_shapes, samples=samples, seed=seed)
    if labels is not None and len(labels) != len(data):
        raise UserError(f"labels: {len(labels)} labels for {len(data)} samples")
    first = data.first_batch(1)
    shapes = {name: tuple(arr.shape) for name, arr in first.items()}
    _check_same_inputs(original, candidate)

    sess_a = make_session(original, threads=threads)
    sess_b = make_session(candidate, threads=threads)
    comparisons, acc_a, acc_b = _compare_streamed(sess_a, sess_b, data, labels, progress)

    lat_a = lat_b = None
    if latency:
        lat_a = measure_latency(sess_a, first, runs=latency_runs)
        lat_b = measure_latency(sess_b, first, runs=latency_runs)
    return ValidationReport(
        samples=len(data),
        outputs=comparisons,
        before=model_stats(original, shapes, size_bytes=sizes[0]),
        after=model_stats(candidate, shapes, size_bytes=sizes[1]),
        latency_before=lat_a,
        latency_after=lat_b,
        accuracy_before=acc_a,
        accuracy_after=acc_b,
        threads=threads,
    )


def _check_same_inputs(original: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    from graphprune.ir import real_inputs

    a = {vi.name for vi in real_inputs(original.graph)}
    b = {vi.name for vi in real_inputs(candidate.graph)}
    if a != b:
        raise UserError(f"the models take different inputs: original {sorted(a)}, candidate {sorted(b)}")


def _fmt_count(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_ratio(a, b) -> str:
    if not a or b is None:
        return ""
    return f"{b / a:.3f}x"


def format_report(report: ValidationReport) -> str:
    """The before/after table printed by ``graphprune validate``."""
    lines = [f"outputs compared on {report.samples} sample(s):"]
    lines.append(f"  {'output':<24} {'max abs diff':>13} {'rel L2':>10} {'cosine':>9} {'top-1 agree':>12}")
    for o in report.outputs:
        top1 = f"{o.top1_agreement * 100:.1f}%" if o.top1_agreement is not None else "-"
        lines.append(f"  {o.name[:24]:<24} {o.max_abs_diff:>13.4g} {o.rel_l2:>10.4g} {o.cosine:>9.5f} {top1:>12}")
    b, a = report.before, report.after
    rows = [
        ("params", _fmt_count(b.params), _fmt_count(a.params), _fmt_ratio(b.params, a.params)),
        ("size", _fmt_count(b.size_bytes) + "B", _fmt_count(a.size_bytes) + "B", _fmt_ratio(b.size_bytes, a.size_bytes)),
        ("MACs", _fmt_count(b.macs), _fmt_count(a.macs), _fmt_ratio(b.macs, a.macs)),
    ]
    if report.latency_before is not None:
        rows.append(
            (
                f"latency ({report.threads} thr)",
                f"{report.latency_before * 1e3:.3f} ms",
                f"{report.latency_after * 1e3:.3f} ms",
                f"{report.speedup:.2f}x speedup",
            )
        )
    if report.accuracy_before is not None:
        rows.append(
            ("accuracy", f"{report.accuracy_before * 100:.2f}%", f"{report.accuracy_after * 100:.2f}%",
             f"{(report.accuracy_after - report.accuracy_before) * 100:+.2f} pt")
        )
    lines.append(f"  {'':<18} {'original':>14} {'candidate':>14} {'ratio':>14}")
    for label, x, y, r in rows:
        lines.append(f"  {label:<18} {x:>14} {y:>14} {r:>14}")
    return "\n".join(lines)
