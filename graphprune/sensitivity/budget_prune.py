"""``prune_to_budget``: measure sensitivity by group, allocate per-group ratios, prune (``prune --target-*``)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import onnx

from graphprune import ir
from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.metrics import count_macs
from graphprune.passes.prune_channels import PruneChannelsPass
from graphprune.pruning.budget import DEFAULT_BUDGET_RATIOS, Allocation, allocate
from graphprune.runtime import make_session, run_samples
from graphprune.sensitivity.cost_model import modeled_cost
from graphprune.sensitivity.damage import call_metric, load_metric
from graphprune.sensitivity.measure import cpu_latency_ratio, inner_runs, reference_outputs
from graphprune.sensitivity.run import feed_shapes, sensitivity

__all__ = ["BudgetResult", "prune_to_budget"]

# Interleaved timing rounds (blocks of runs) when latency is the budget: a whole plan is measured
# once per build, so more rounds than a table entry (the median of 11 paired ratios).
_LATENCY_ROUNDS = 11
# Paired rounds per entry of the per-group latency table (one group pruned at one ratio).
_TABLE_ROUNDS = 7
# Bisection steps for the uniform ratio a per-group plan is checked against (0.95 / 2**10 ~ 0.001).
_UNIFORM_STEPS = 10


@dataclasses.dataclass
class BudgetResult:
    """The pruned model, the allocation that made it, and the sensitivity report it was chosen from."""

    model: onnx.ModelProto
    allocation: Allocation
    report: dict
    stats: dict


def prune_to_budget(
    model: onnx.ModelProto,
    data: InputSet,
    target: str,
    fraction: float,
    criterion: str = "l2",
    metric: str = "rel-l2",
    ratios: Sequence[float] = DEFAULT_BUDGET_RATIOS,
    round_to: int = 1,
    mode: str = "remove",
    jobs: Optional[int] = None,
    use_ray: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    report: Optional[dict] = None,
    speed: Optional[bool] = None,
) -> BudgetResult:
    """Prune ``model`` to ``fraction`` of its MACs / params / latency with per-group ratios.

    Args:
        model: the model (not modified).
        data: calibration samples (the damage of each group is measured on them).
        target: ``macs``, ``params`` or ``latency``; ``fraction`` of the original to keep, in (0, 1].
        criterion: which channels of a group go first.
        metric: the damage metric (``rel-l2``, ``top1``, ``python:FILE.py:FUNCTION``).
        ratios: the ratios each group is measured at, hence the ratios it can get.
        round_to: kept channel counts are multiples of this (checked by the final measurement).
        mode: ``remove`` or ``mask`` for the model returned (costs are measured removed).
        jobs, use_ray, progress: as for ``graphprune.sensitivity.sensitivity``.
        report: a sensitivity report by group of this model (``graphprune sensitivity --by group``)
            to allocate from instead of measuring; its metric is used.
        speed: the MAC budget's speed tie-break (``graphprune.pruning.budget.SPEED_DAMAGE``): among
            plans within twice the least damage, the least modeled time.  Default: on with
            ``round_to`` > 1 (channel counts chosen for the runtime's blocked kernels: a build for
            speed, which fine-tuning then recovers), off otherwise, where the least damage is all
            (the digits CNN unrecovered at 60% of the MACs: 80.3% least damage, 54.2% with it).

    Raises ``UserError`` when the budget cannot be met without pruning blocked groups.
    """
    if target == "macs" and not count_macs(model, feed_shapes(data)):
        raise UserError("--target-macs: the model's MACs cannot be counted at the shapes of the data "
                        "(no Conv/Gemm/MatMul with known shapes); use --target-params or --target-latency")
    if report is None:
        report = sensitivity(model, data, ratios=ratios, by="group", metric=metric, criterion=criterion, jobs=jobs,
                             use_ray=use_ray, latency_rounds=_TABLE_ROUNDS if target == "latency" else 0, progress=progress,
                             round_to=round_to)
    else:
        check_reusable(report, model, target, criterion, round_to)
        metric = report["metric"]
    shapes = feed_shapes(data)
    original = {"macs": report["original"]["macs"], "params": report["original"]["params"]}

    def build(group_ratios: Dict[str, float], how: str) -> onnx.ModelProto:
        return PruneChannelsPass(ratio=0.0, criterion=criterion, round_to=round_to, mode=how, data=data,
                                 group_ratios=group_ratios)(model).model

    latency = {}
    reference = reference_outputs(model, data)
    hook = load_metric(metric)

    def damage(pruned: onnx.ModelProto) -> float:
        return call_metric(hook, metric, reference, run_samples(make_session(pruned, threads=1), data))

    def measure(group_ratios: Dict[str, float]) -> float:
        pruned = build(group_ratios, "remove")
        if target == "macs":
            macs = count_macs(pruned, shapes)
            if macs is None:  # a pruned model whose shapes no longer resolve: our bug, not the user's
                raise RuntimeError("MACs of the pruned model could not be counted")
            return macs / original["macs"]
        if target == "params":
            return ir.count_params(pruned) / original["params"]
        if "base" not in latency:
            latency["base"] = make_session(model, threads=1, spinning=False)
        feed = data.first_batch(1)
        if "inner" not in latency:
            latency["inner"] = inner_runs(latency["base"], feed)
        return cpu_latency_ratio(latency["base"], make_session(pruned, threads=1, spinning=False), feed,
                                 _LATENCY_ROUNDS, latency["inner"])

    blocked = report["blocked"]
    first = blocked[0]["reasons"][0] if blocked and blocked[0]["reasons"] else ""
    speed = round_to > 1 if speed is None else bool(speed)
    allocation = allocate(report, target, fraction, measure, analysis_blocked=len(blocked), first_reason=first,
                          speed=speed)
    if target != "latency" and any(allocation.ratios.values()):
        timed = None
        if allocation.modeled is not None:  # the speed tie-break chose the plan: uniform must not be slower
            base = modeled_cost(model, shapes)
            timed = lambda ratios: modeled_cost(build(ratios, "remove"), shapes) / base  # noqa: E731
        _against_uniform(allocation, fraction, measure, lambda ratios: damage(build(ratios, "mask")), timed)
    result = build(allocation.ratios, mode)
    removed = result if mode == "remove" else build(allocation.ratios, "remove")  # mask keeps shapes: count removed
    stats = {
        "mode": mode,
        "macs_before": original["macs"], "macs_after": count_macs(removed, shapes),
        "params_before": original["params"], "params_after": ir.count_params(removed),
    }
    return BudgetResult(result, allocation, report, stats)


def check_reusable(report: dict, model: onnx.ModelProto, target: str, criterion: str, round_to: int = 1) -> None:
    """``UserError`` unless ``report`` is a sensitivity report by group of ``model``, measured with
    ``criterion`` and ``round_to`` (and with latency for a latency budget)."""
    from graphprune.sensitivity.measure import analyse

    if not isinstance(report, dict) or report.get("version") != 1 or not isinstance(report.get("units"), list):
        raise UserError("--sensitivity: not a graphprune sensitivity report (report.json)")
    if report.get("by") != "group":
        raise UserError(f"--sensitivity: the report is by {report.get('by')}; a budget needs one by group (--by group)")
    if report.get("criterion") != criterion:
        raise UserError(f"--sensitivity: the report ranked channels by {report.get('criterion')}, not {criterion} "
                        "(give the same --criterion)")
    if int(report.get("round_to", 1)) != int(round_to):
        raise UserError(f"--sensitivity: the report kept channel counts at multiples of {report.get('round_to', 1)}, "
                        f"not {round_to} (give the same --round-to)")
    mine = set(analyse(model).keys.values())
    theirs = {u.get("name") for u in report["units"]}
    if mine != theirs:
        differ = sorted(mine ^ theirs)
        raise UserError(f"--sensitivity: the report's groups are not this model's ({len(differ)} differ, first: "
                        f"{differ[0]}); measured on another model?")
    if target == "latency" and any(e.get("latency_fraction") is None for u in report["units"] for e in u["entries"]):
        raise UserError("--sensitivity: the report has no latency (measured with --latency-rounds 0)")


def _against_uniform(allocation: Allocation, fraction: float, measure, damage, timed=None,
                     steps: int = _UNIFORM_STEPS) -> None:
    """Keep the per-group plan only if it beats one uniform ratio at the same budget on the calibration data.

    One-group damages add up only roughly (errors compound through a residual stream), so the plan
    is checked: the smallest uniform ratio over the groups the plan may prune that meets the budget
    (bisection, ``steps`` builds) and both plans' damage measured on the whole calibration set; the
    lower damage wins and ``allocation`` is updated in place.  With ``timed`` (ratios -> modeled time
    fraction; the speed tie-break chose the plan) the uniform plan must also be modeled no slower.
    """
    allowed = [k for k in allocation.ratios if k not in allocation.blocked]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        plan = {k: (round(mid, 4) if k in allowed else 0.0) for k in allocation.ratios}
        cost = measure(plan)
        if cost <= fraction + 1e-12:
            hi, best = mid, (plan, cost)
        else:
            lo = mid
    if best is None:
        return
    mine, theirs = damage(allocation.ratios), damage(best[0])
    allocation.checked = {"knapsack": mine, "uniform": theirs, "uniform_ratio": round(hi, 4), "uniform_cost": best[1]}
    slower = False
    if timed is not None:
        allocation.checked["knapsack_modeled"], allocation.checked["uniform_modeled"] = timed(allocation.ratios), timed(best[0])
        slower = allocation.checked["uniform_modeled"] > allocation.checked["knapsack_modeled"] + 1e-9
    if theirs < mine and not slower:
        allocation.plan, allocation.ratios, allocation.measured = "uniform", best[0], best[1]
        if timed is not None:
            allocation.modeled = allocation.checked["uniform_modeled"]
