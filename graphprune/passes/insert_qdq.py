"""InsertQDQPass (``quantize``): int8 QDQ quantization placed only where it pays on ONNX Runtime."""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx

from graphprune.errors import UserError
from graphprune.passes.base import Pass, PassResult, register_pass
from graphprune.progress import progress_bar
from graphprune.quantization.budget import fit_error_budget, layer_sensitivity
from graphprune.quantization.calibration import Feeds, calibrate, calibration_feeds, nonfinite_ranges, without
from graphprune.quantization.config import QuantConfig, check_max_error, check_names
from graphprune.quantization.cost import estimate_costs, place
from graphprune.quantization.engine import insert_qdq_nodes
from graphprune.quantization.measure import (
    Candidate,
    drop_wrecked,
    measure_latencies,
    one_session_at_a_time,
    output_error,
    reference_outputs,
)
from graphprune.quantization.prepare import is_quantized, prepare
from graphprune.quantization.rules import RULES, GraphView, eligible_nodes, rule_for
from graphprune.runtime import DEFAULT_THREADS
from graphprune import weights_on_disk as on_disk
from graphprune.shapes import concrete_shapes

__all__ = ["InsertQDQPass", "insert_qdq"]

# A quantized candidate must beat float by this fraction to count as faster: run-to-run noise of
# interleaved medians on a busy machine stays under it.
_MIN_GAIN = 0.04
# Candidates within this fraction of the fastest are equally fast as far as timing can tell; among
# them the most accurate wins, so that noise does not flip the choice between near-equal placements.
_TIMING_NOISE = 0.03
# Scales of the cost model's int8 estimates whose placements are also measured (its uncertainty).
_COST_BAND = (1.4, 0.7)
# Samples used to rank layers by the error they add (one run of each model).
_SENSITIVITY_FEEDS = 4


@register_pass
class InsertQDQPass(Pass):
    """Insert QuantizeLinear/DequantizeLinear pairs so ONNX Runtime runs int8 kernels where they pay.

    Steps: ORT's pre-processing (BN folding, shapes); calibration of activation ranges on ``data``
    (seeded random inputs with a warning when there is none); placement rules (``quantization/
    rules.py``: Conv, Gemm, MatMul and the ops that let int8 flow between them); a cost model solved
    by minimum cut (``quantization/cost.py``) that keeps float the regions where QDQ borders cost
    more than int8 saves (depthwise convs, RGB stems, short runs between float activations); with
    ``max_error``, the layers that add most error stay float until the budget holds.  Then the
    candidates -- the cost-model placement, the placements with its int8 estimates scaled by 1.4
    and 0.7, and every eligible node (what ``quantize_static`` does) -- are timed against float on
    ORT (``threads`` intra-op threads, batch 1 for dynamic-batch models, CPU time per run, median of
    interleaved runs); when the fastest beats float by 4%, the most accurate candidate within 3% of
    the fastest (timing noise) that meets the budget wins; when none does, the model is returned
    unchanged (``modified=False``).  Without ``max_error``, candidates whose output error is above
    max(3x, +0.05) of the best candidate's are dropped before timing (``measure.drop_wrecked``).

    Never quantized: tensors whose calibrated range is infinite or NaN (the nodes touching them stay
    float, with that reason).  A candidate that fails to build, load or run is discarded with a
    note (``stats["discarded"]``); the others still compete.

    Weights are symmetric int8 per output channel (``per_channel=False`` for one scale per tensor),
    biases int32, activations asymmetric uint8 (``activation_type="int8"`` on request).

    Refuses models that already hold quantization (QuantizeLinear, QLinear*, *Integer ops).

    Args:
        data: calibration samples: an ``InputSet`` or an iterable of {input name: array} feeds.
        method: calibration: "minmax", "percentile" or "entropy" (ORT's calibrators).
        per_channel: per-output-channel weight scales.
        activation_type: "uint8" or "int8".
        max_error: relative L2 error budget of the outputs on ``data`` (mixed precision).
        exclude: node names that stay float.
        op_types: only these op types may be quantized (default: every type with a rule).
        input_shapes: concrete shapes for dynamic inputs when there is no data.
        measure: time the candidates on ORT (off: trust the cost model).
        threads: intra-op threads for the timing.
        calibration_samples: at most this many samples calibrate.
        seed: seed of the random inputs used without data.
        progress: show a progress bar.
        source_dir: the folder of the model's file when it was loaded without its external data
            (``load(path, load_external_data=False)``): copies then hold only the graph, sessions
            map the weights from there, each weight is read when it is quantized, and minmax
            calibration streams (``weights_on_disk.py``); the result keeps records of the
            weights left float, which ``save`` copies from there.
    """

    name = "quantize"

    def __init__(
        self,
        data: Optional[Feeds] = None,
        method: str = "minmax",
        per_channel: bool = True,
        activation_type: str = "uint8",
        max_error: Optional[float] = None,
        exclude: Sequence[str] = (),
        op_types: Optional[Sequence[str]] = None,
        input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
        measure: bool = True,
        threads: int = DEFAULT_THREADS,
        calibration_samples: int = 64,
        seed: int = 0,
        progress: bool = False,
        source_dir: Optional[str] = None,
    ):
        self.config = QuantConfig(method, bool(per_channel), activation_type, int(calibration_samples))
        self.data = data
        self.max_error = check_max_error(max_error)
        self.exclude = tuple(exclude or ())
        self.op_types = tuple(op_types) if op_types else None
        for op_type in self.op_types or ():
            if op_type not in RULES:
                raise UserError(f"op type {op_type!r} cannot be quantized (choose from {', '.join(sorted(RULES))})")
        self.input_shapes = dict(input_shapes or {})
        self.measure = bool(measure)
        self.threads = int(threads)
        self.seed = int(seed)
        self.progress = progress
        self.source_dir = source_dir

    def requires(self, model: onnx.ModelProto) -> None:
        found = is_quantized(model)
        if found:
            raise UserError(f"the model is already quantized (it contains {found}); quantize the float model instead")
        check_names("--exclude node", self.exclude, [n.name for n in model.graph.node])

    def call(self, model: onnx.ModelProto) -> PassResult:
        if self.measure and self.source_dir is not None:  # timed in turns: see return_large_buffers_at_once
            from graphprune.quantization.measure import return_large_buffers_at_once

            return_large_buffers_at_once()
        with progress_bar(total=5, desc="quantize", enabled=self.progress) as bar:
            bar.set_postfix_str("prepare")
            prepared = prepare(model, source_dir=self.source_dir)
            feeds, from_data = calibration_feeds(prepared, self.data, self.input_shapes, self.config, self.seed)
            bar.update(1)
            bar.set_postfix_str("calibrate")
            reference: List[Dict[str, np.ndarray]] = []  # filled by streamed calibration (weights on disk)
            ranges = calibrate(prepared, feeds, self.config, source_dir=self.source_dir, outputs=reference)
            if not reference:
                reference = reference_outputs(prepared, feeds, self.threads, source_dir=self.source_dir)
            bar.update(1)
            bar.set_postfix_str("place")
            planner = _Planner(prepared, ranges, feeds, reference, self)
            bar.update(1)
            bar.set_postfix_str("budget" if self.max_error else "build")
            candidates = planner.candidates()
            bar.update(1)
            bar.set_postfix_str("measure")
            chosen, latencies = planner.choose(candidates)
            bar.update(1)
        stats = planner.stats(candidates, chosen, latencies, from_data, len(feeds))
        if chosen is None:
            return PassResult(model, False, stats)
        return PassResult(chosen.model, True, stats)


def insert_qdq(model: onnx.ModelProto, data: Optional[Feeds] = None, **kwargs) -> onnx.ModelProto:
    """Functional form of ``InsertQDQPass``: the quantized model (the input itself when int8 does not pay)."""
    return InsertQDQPass(data=data, **kwargs)(model).model


class _Planner:
    """Builds, checks and times the candidate placements of one prepared model."""

    def __init__(self, prepared, ranges, feeds, reference, options: InsertQDQPass):
        self.model = prepared
        self.ranges = ranges
        self.feeds = feeds
        self.reference = reference
        self.options = options
        first = feeds[0]
        inferred = concrete_shapes(prepared, {k: tuple(v.shape) for k, v in first.items()}) or {}
        self.shapes = on_disk.observed_shapes(prepared, first, inferred, options.threads, options.source_dir)
        self.view = GraphView.of(prepared)
        self.float_reasons: Dict[str, str] = {}
        self.discarded: Dict[str, str] = {}  # candidate name -> why it is not in the running
        allowed: Set[str] = set()
        excluded = set(options.exclude)
        eligibility = eligible_nodes(prepared, self.view)
        nonfinite = nonfinite_ranges(ranges)
        self.ranges = without(ranges, nonfinite)
        self.listed: Set[str] = set(excluded)  # float nodes always listed, whatever their role
        for node in prepared.graph.node:
            reason = eligibility[node.name]
            if reason is None and nonfinite:
                reason = _nonfinite_reason(node, nonfinite, self.view)
                if reason is not None:
                    self.listed.add(node.name)
            if reason is None and node.name in excluded:
                reason = "excluded by the user (--exclude)"
            if reason is None and options.op_types is not None and node.op_type not in options.op_types:
                reason = f"{node.op_type} is not among the requested op types (--op-types)"
            if reason is None:
                allowed.add(node.name)
            elif rule_for(node) is not None or node.name in excluded:
                self.float_reasons[node.name] = reason
        self.allowed = allowed
        self.costs = estimate_costs(prepared, self.shapes, self.view.constants)
        # Large models timed one session at a time also keep one candidate in memory at a time:
        # each holds its int8 weights (a quarter of the float ones), so after its error is known it
        # keeps only its placement and is built again for timing and, if chosen, for the result.
        self.rebuild = options.measure and one_session_at_a_time({"float": prepared}, options.source_dir)
        self.compute = {n.name: n for n in prepared.graph.node if (rule := rule_for(n)) is not None and rule.role == "compute"}

    def _build(self, name: str, int8: Iterable[str], note: bool = True) -> Optional[Candidate]:
        """The candidate with its output error; None (and a note in ``discarded``) when it fails to
        build, load or run, or its outputs turn non-finite where float's are finite."""
        int8 = frozenset(int8)
        try:
            model = insert_qdq_nodes(self.model, self.ranges, int8, self.options.config, self.options.source_dir)
            error = output_error(model, self.feeds, self.reference, self.options.threads,
                                 self.options.source_dir) if int8 else 0.0
        except Exception as exc:  # a placement ORT cannot build or run must not end the command
            if note:
                self.discarded[name] = f"failed to build or run: {_first_line(exc)}"
            return None
        if not np.isfinite(error):
            if note:
                self.discarded[name] = "its outputs hold inf/NaN where the float model's are finite"
            return None
        return Candidate(name, model, int8, error=error)

    def _placement(self, forced_float: Set[str], int8_scale: float = 1.0):
        costs = self.costs
        if int8_scale != 1.0:
            costs = {n: dataclasses.replace(c, int8_ns=c.int8_ns * int8_scale) for n, c in costs.items()}
        return place(self.model, costs, self.allowed - forced_float, self.shapes, self.view.constants)

    def candidates(self) -> List[Candidate]:
        placement = self._placement(set())
        self.float_reasons.update(placement.float_reasons)
        self.estimated_saving_us = placement.estimated_saving_ns / 1e3
        found: List[Candidate] = []
        if placement.int8:
            built = self._build("cost-model", placement.int8)
            if built is not None:
                found.append(self._fit_budget(built))
                self._release(found[-1])
        if self.options.measure:
            # The cost model's unit costs are uncertain: placements at both ends of that band, and
            # every eligible node, are measured too (each distinct placement once).
            seen = {frozenset(placement.int8)}
            variants = [(f"cost-model (int8 x{scale})", self._placement(set(), scale).int8) for scale in _COST_BAND]
            variants.append(("all-eligible", self.allowed))
            for name, int8 in variants:
                if int8 and frozenset(int8) not in seen:
                    seen.add(frozenset(int8))
                    built = self._build(name, int8)
                    if built is not None:
                        found.append(self._fit_budget(built) if not found else built)
                        self._release(found[-1])
        budget = self.options.max_error
        found = [c for c in found if c.int8_nodes and (budget is None or c.error <= budget)]
        if budget is None:
            # no budget given: a placement that wrecks the outputs must not win on speed
            found, dropped = drop_wrecked(found)
            self.discarded.update(dropped)
        return found

    def _fit_budget(self, candidate: Candidate) -> Candidate:
        """Keep the layers that add most error float until ``max_error`` holds (mixed precision)."""
        budget = self.options.max_error
        if budget is None or candidate.error <= budget:
            return candidate
        layers = {
            n: (self.compute[n].input[0], self.compute[n].output[0]) for n in candidate.int8_nodes if n in self.compute
        }
        added = layer_sensitivity(self.model, candidate.model, layers, self.feeds[:_SENSITIVITY_FEEDS],
                                  self.options.source_dir)
        ranked = sorted(layers, key=lambda n: -added[n])
        built: Dict[frozenset, Candidate] = {}

        def error_of(keep_float: Set[str]) -> float:
            int8 = self._placement(keep_float).int8 if candidate.name == "cost-model" else candidate.int8_nodes - keep_float
            key = frozenset(keep_float)
            trial = self._build(candidate.name, int8, note=False)
            if trial is None:
                return float("inf")  # keep more float
            built[key] = trial
            return trial.error

        keep_float, _, _ = fit_error_budget(ranked, error_of, budget)
        for rank, n in enumerate(ranked):
            if n in keep_float:
                self.float_reasons[n] = f"error budget: adds {added[n]:.4g} relative L2 (rank {rank + 1} of {len(ranked)})"
        return built.get(frozenset(keep_float), candidate)

    def choose(self, candidates: List[Candidate]):
        """The candidate to write (None: keep float) and every latency.

        The fastest candidate must beat float by ``_MIN_GAIN``; among the candidates within
        ``_TIMING_NOISE`` of it, the one with the smallest output error is chosen.
        """
        if not candidates:
            return None, {}
        if not self.options.measure:
            return (candidates[0] if self.estimated_saving_us > 0 else None), {}
        models = {"float": self.model, **{c.name: c.build or c.model for c in candidates}}
        failures: Dict[str, str] = {}
        latencies = measure_latencies(models, self._latency_feed(), threads=self.options.threads, rounds=5,
                                      failures=failures, source_dir=self.options.source_dir)
        if "float" in failures:
            raise UserError(f"onnxruntime cannot run the float model at batch 1: {failures['float']}")
        for name, reason in failures.items():
            self.discarded[name] = f"failed to run for timing: {reason}"
        candidates[:] = [c for c in candidates if c.name in latencies]
        if not candidates:
            return None, latencies
        for c in candidates:
            c.latency = latencies[c.name]
        fastest = min(c.latency for c in candidates)
        if fastest > latencies["float"] * (1 - _MIN_GAIN):
            return None, latencies
        tied = [c for c in candidates if c.latency <= fastest * (1 + _TIMING_NOISE)]
        chosen = min(tied, key=lambda c: (c.error or 0.0, c.latency))
        if chosen.model is None and chosen.build is not None:
            chosen.model = chosen.build()
        return chosen, latencies

    def _release(self, candidate: Candidate) -> None:
        """With ``self.rebuild``, drop ``candidate``'s model (its int8 weights), keeping how to build
        it again: the build is deterministic, so the result is the same model."""
        if self.rebuild:
            int8 = candidate.int8_nodes
            candidate.model = None
            candidate.build = lambda: insert_qdq_nodes(self.model, self.ranges, int8, self.options.config,
                                                       self.options.source_dir)

    def _latency_feed(self) -> Dict[str, np.ndarray]:
        """The first feed, cut to one sample on dynamic-batch inputs: latency is judged at batch 1."""
        declared = {vi.name: vi.type.tensor_type.shape.dim for vi in self.model.graph.input}
        feed = {}
        for name, value in self.feeds[0].items():
            dims = declared.get(name)
            fixed = dims is not None and len(dims) > 0 and dims[0].HasField("dim_value") and dims[0].dim_value > 0
            feed[name] = value if fixed or value.ndim == 0 else value[:1]
        return feed

    def stats(self, candidates, chosen, latencies, from_data: bool, n_feeds: int) -> dict:
        int8 = chosen.int8_nodes if chosen is not None else frozenset()
        ops = collections.Counter(n.op_type for n in self.model.graph.node if n.name in int8)
        float_nodes = {
            n: self.float_reasons.get(n, "kept float: int8 did not beat float on the measured runtime")
            for n in self.compute
            if n not in int8
        }
        for name, reason in self.float_reasons.items():
            if name in self.listed:
                float_nodes[name] = reason
        return {
            "chosen": chosen.name if chosen is not None else "float",
            "nodes_quantized": len(int8),
            "quantized_ops": dict(sorted(ops.items())),
            "float_layers": float_nodes,
            "error": chosen.error if chosen is not None else 0.0,
            "candidates": {
                c.name: {"int8_nodes": len(c.int8_nodes), "error": c.error, "latency_ms": _ms(c.latency)}
                for c in candidates
            },
            "discarded": dict(self.discarded),
            "float_latency_ms": _ms(latencies.get("float")),
            "timing": "median CPU time per run (interleaved)",
            "threads": self.options.threads,
            "estimated_saving_us": round(self.estimated_saving_us, 2),
            "calibration": {"method": self.options.config.method, "feeds": n_feeds, "from_data": from_data},
        }


def _nonfinite_reason(node: onnx.NodeProto, nonfinite, view: GraphView) -> Optional[str]:
    """Why ``node`` stays float when one of its activations has an infinite or NaN range, else None."""
    for name in list(node.input) + list(node.output):
        if name in nonfinite and not view.is_constant(name):
            low, high = nonfinite[name]
            return f"calibrated range of {name!r} is not finite ({low:g}, {high:g}): int8 cannot hold it"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1e3, 4)
