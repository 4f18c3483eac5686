"""``sensitivity(model, data, ...)``: the whole sensitivity analysis as one JSON-able report."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Optional, Sequence, Tuple

import onnx

from graphprune import ir
from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.metrics import count_macs
from graphprune.sensitivity.cost_model import modeled_cost
from graphprune.sensitivity.damage import check_metric
from graphprune.sensitivity.measure import analyse, default_jobs, reference_outputs, run_tasks
from graphprune.sensitivity.units import build_units

__all__ = ["sensitivity", "DEFAULT_RATIOS", "REPORT_VERSION", "feed_shapes"]

DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7)
REPORT_VERSION = 1


def feed_shapes(data: InputSet) -> dict:
    """Input name -> shape of one feed (batch 1, or the model's fixed batch): where MACs are counted."""
    return {name: tuple(value.shape) for name, value in data.first_batch(1).items()}


def _batched(model: onnx.ModelProto, data: InputSet) -> InputSet:
    """Samples fed in batches when every input's first dim is dynamic (random inputs made at batch 1
    say batch 1 is fixed): the damage runs take a fraction of the time."""
    from graphprune.data import input_specs

    declared = [shape for _, _, shape in input_specs(model) if shape]
    if data.fixed_batch and declared and all(not (isinstance(s[0], int) and s[0] > 0) for s in declared):
        return InputSet(data.arrays, None)
    return data


def check_ratios(ratios: Sequence[float], what: str = "--ratios") -> Tuple[float, ...]:
    values = sorted({float(r) for r in ratios})
    if not values or any(not 0.0 < r < 1.0 for r in values):
        raise UserError(f"{what}: each ratio must be in (0, 1), got {', '.join(f'{r:g}' for r in ratios) or 'none'}")
    return tuple(values)


def sensitivity(
    model: onnx.ModelProto,
    data: InputSet,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    by: str = "group",
    metric: str = "rel-l2",
    criterion: str = "l2",
    jobs: Optional[int] = None,
    use_ray: bool = False,
    latency_rounds: int = 5,
    progress: Optional[Callable[[int], None]] = None,
    round_to: int = 1,
) -> dict:
    """Prune each unit alone at each ratio and measure what it costs and saves.

    Args:
        model: the model (not modified).
        data: calibration samples; the damage is measured on all of them.
        ratios: fractions of each group's channels to prune, each in (0, 1); ratio 0 (the original)
            is always the first entry of every unit.
        by: ``group`` (each prunable group), ``kind`` or ``stage`` (all groups of one kind / of one
            activation resolution together).
        metric: ``rel-l2``, ``top1`` or ``python:FILE.py:FUNCTION`` (``graphprune.sensitivity.damage``).
        criterion: which channels of a group go first (``l1``, ``l2``, ``bn``, ``activation``).
        jobs: worker processes; default min(2, CPUs), used when the first task says the whole run
            would take over 10 s in one process; ``use_ray``: a Ray cluster instead.
        latency_rounds: interleaved timing rounds per task; 0 skips latency.
        progress: called with the number of tasks finished.
        round_to: kept channel counts are multiples of this, as ``prune --round-to`` builds them (a
            budget's tables must measure the models it will build: 37 channels instead of 40 can
            cost ONNX Runtime its blocked-layout kernels and make a group's removal slower).

    Returns the report: ``units`` (each with ``entries`` per ratio: ``damage``, ``macs``, ``params``,
    ``modeled`` (``cost_model.modeled_cost``), ``latency_fraction``, ``channels_removed``), ``original`` totals and ``blocked`` groups.
    """
    start = time.perf_counter()
    ratios = check_ratios(ratios)
    data = _batched(model, data)
    analysis = analyse(model, criterion, data)
    units = build_units(analysis.dep, analysis.prunable, analysis.keys, by)
    reference = reference_outputs(model, data)
    self_damage = check_metric(metric, reference)  # a broken hook fails here, before any measuring
    shapes = feed_shapes(data)
    macs, params = count_macs(model, shapes), ir.count_params(model)
    payload = {
        "model": model.SerializeToString(), "arrays": data.arrays, "fixed_batch": data.fixed_batch,
        "criterion": criterion, "reference": reference, "metric": metric, "input_shapes": shapes,
        "latency_rounds": int(latency_rounds), "round_to": int(round_to),
    }
    tasks = [(i * len(ratios) + j, unit.groups, r) for i, unit in enumerate(units) for j, r in enumerate(ratios)]
    adaptive = jobs is None  # an explicit job count is obeyed; the default spares small models the start-up
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    measured = run_tasks(payload, tasks, jobs=jobs, use_ray=use_ray, progress=progress, adaptive=adaptive)
    modeled = modeled_cost(model, shapes)
    baseline = {"ratio": 0.0, "channels_removed": 0, "damage": self_damage, "macs": macs, "params": params,
                "modeled": modeled, "latency_fraction": 1.0}
    report_units = []
    for i, unit in enumerate(units):
        entries = [dict(baseline)] + [measured[i * len(ratios) + j] for j in range(len(ratios))]
        report_units.append({**unit.to_dict(), "entries": entries})
    return {
        "version": REPORT_VERSION,
        "metric": metric,
        "by": by,
        "criterion": criterion,
        "ratios": [0.0, *ratios],
        "round_to": int(round_to),
        "samples": len(data),
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "original": {"macs": macs, "params": params, "modeled": modeled, "metric_on_itself": self_damage},
        "units": report_units,
        "blocked": [{"kind": g.kind, "channels": g.channels, "params": g.param_names()[:4], "reasons": g.reasons[:3]}
                    for g in analysis.blocked],
        "jobs": "ray" if use_ray else jobs,
        "latency": "CPU time per run, 1 thread, batch 1, interleaved with the original" if latency_rounds else None,
        "seconds": round(time.perf_counter() - start, 3),
    }


def entry_at(unit: Mapping, ratio: float) -> Optional[dict]:
    """The unit's entry measured at ``ratio`` (None if that ratio was not measured)."""
    return next((e for e in unit["entries"] if abs(e["ratio"] - ratio) < 1e-9), None)
