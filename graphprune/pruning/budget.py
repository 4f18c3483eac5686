"""Budgets instead of a uniform ratio: per-group ratios that keep a fraction of MACs, params or latency.

The allocation is a multiple-choice knapsack on measured numbers.  A sensitivity run
(``graphprune.sensitivity``, by group) gives, for every group and ratio, the damage of pruning that
group alone and what it saves (MACs, params, or measured latency).  Each group takes one of its
measured ratios (or 0) so that the summed savings meet the budget with the least summed damage,
solved exactly by dynamic programming over savings in steps of 1/2000 of the original cost (each
saving rounded down).  Damages are summed as they are, except relative L2 errors, which add in
energy (their squares) when independent groups change the outputs.  The least damage per unit of
cost saved goes first, but a group whose damage saturates is not pruned to the bone just because
its last steps are free.

Costs measured one group at a time do not add up exactly: a conv between two pruned groups loses
``a + b - ab`` of its MACs, not ``a + b``.  So the result is then built and **measured**; when it
misses the budget, the savings asked of the estimate are raised by the miss and the knapsack
solved again, until the measured cost meets the budget (at most 12 rounds).  Then groups are stepped
back down one ratio at a time, largest damage saved first, while the measured cost still meets the
budget (at most 8 builds): the knapsack's last jump often saves more than the budget needs.  MACs and params must
end at or below the budget; latency, a noisy measurement, within ``LATENCY_TOLERANCE`` of it.
Rounding: a group at ratio r loses ``floor(r * channels)`` channels (at least one stays), the same
rounding the sensitivity measurements used, and the final check counts the model as built
(``round_to`` included).

**Speed tie-break** (``speed``: MAC budgets built with ``round_to`` > 1, for the runtime's blocked
kernels, when the report has ``graphprune.sensitivity.cost_model``'s modeled times): plans of the same MACs differ in speed (channel counts inside one of the runtime's
16-channel blocks, elementwise and squeeze-excitation work that MACs do not count), and one-group
damages rank plans only roughly, so among the plans that meet the budget (saving at most
``_SPEED_OVER`` more) with at most ``SPEED_DAMAGE`` times the least summed damage, the one of least
modeled time is built; steps back down then only take moves that cost no modeled time.

One-group damages add up only roughly (errors compound through a residual stream), so
``graphprune.sensitivity.budget_prune`` then checks the plan against one uniform ratio meeting the
same budget and keeps whichever damages the calibration outputs less (``Allocation.plan``; after
the speed tie-break the uniform plan must also be modeled no slower).

Never pruned: groups the dependency analysis blocks, and groups whose damage *dominates*: at the
lowest ratio that removes channels, more than ``DOMINANCE`` times the median damage of all groups (a stem conv,
a classifier's last hidden layer).  When the budget cannot be met without them, ``UserError``:
"budget cannot be met without pruning blocked groups (...)".
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Callable, Dict, List, Optional

import numpy as np

from graphprune.errors import UserError

__all__ = ["TARGETS", "Allocation", "allocate", "saved_fraction", "dominating_groups", "DOMINANCE",
           "LATENCY_TOLERANCE", "DEFAULT_BUDGET_RATIOS", "SPEED_DAMAGE"]

TARGETS = ("macs", "params", "latency")
# A group whose damage at the lowest ratio is above this multiple of the median is never pruned.
DOMINANCE = 4.0
# Latency is measured: the budget counts as met within this fraction of the original.
LATENCY_TOLERANCE = 0.03
# Ratios a budget run measures each group at: fine enough to spend a budget, 0.8 at most.
DEFAULT_BUDGET_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_MAX_ROUNDS = 12
# Resolution of the knapsack over savings: 1/2000 of the original cost.
_BINS = 2000
# Builds spent stepping groups back down once the budget is met (each one a prune + count).
_TRIM_TRIES = 8
# Speed tie-break (MAC budgets): a plan may have up to this multiple of the least summed damage if its
# modeled time is lower.  One-group damages rank plans only roughly: on PP-OCR's classifier at 60%
# of the MACs the least-damage plan (0.42) and a hand plan of 5x its damage (2.2) both recovered to
# 98.0-98.4% after reconstruction and distillation, the hand plan 1.42-1.49x faster, the other 1.35-1.40x.
SPEED_DAMAGE = 2.0
# Weights of modeled time against damage tried, in units of the least damage per unit of cost saved.
_SPEED_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# With the tie-break a plan may save at most this much more of the budget's cost than asked.
_SPEED_OVER = 0.02


@dataclasses.dataclass
class Allocation:
    """Per-group ratios for a budget, and how they were found.

    Attributes:
        target: ``macs``, ``params`` or ``latency``; ``fraction``: of the original to keep.
        ratios: group name -> ratio (0 for groups left whole).
        estimated: cost fraction estimated from the one-group measurements.
        measured: cost fraction measured on the pruned model.
        damage: the summed one-group damages of the chosen ratios (an estimate, for ranking).
        blocked: group name -> why it was never pruned (dominating damage).
        rounds: models built and measured (knapsack rounds, then steps back down).
        plan: ``knapsack``, or ``uniform`` when one ratio for every allowed group met the same
            budget with less damage measured on the calibration data.
        checked: the damage measured on the calibration data for each plan compared (and the
            uniform plan's ratio), when the comparison was made.
        modeled: the plan's modeled time as a fraction of the original's (estimated from the
            one-group entries, ``graphprune.sensitivity.cost_model``) when the speed tie-break chose it.
    """

    target: str
    fraction: float
    ratios: Dict[str, float]
    estimated: float
    measured: float
    damage: float
    blocked: Dict[str, str]
    rounds: int
    plan: str = "knapsack"
    checked: Optional[dict] = None
    modeled: Optional[float] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        pruned = {k: r for k, r in self.ratios.items() if r > 0}
        lines = [f"budget: {self.target} <= {self.fraction:g} of the original: measured {self.measured:.4f} "
                 f"(estimated {self.estimated:.4f}, {self.rounds} round(s)); {len(pruned)} of {len(self.ratios)} "
                 f"groups pruned"]
        if self.modeled is not None:
            lines.append(f"speed tie-break: modeled time {self.modeled:.3f} of the original (channel blocks and "
                         f"elementwise work; damage at most {SPEED_DAMAGE:g}x the least)")
        if self.checked:
            c = self.checked
            lines.append(f"plan: {self.plan} (damage on the calibration data: per-group ratios {c['knapsack']:.4g}, "
                         f"uniform ratio {c['uniform_ratio']:g} at the same budget {c['uniform']:.4g})")
            if "uniform_modeled" in c:
                lines.append(f"modeled time: per-group ratios {c['knapsack_modeled']:.3f}, uniform ratio "
                             f"{c['uniform_modeled']:.3f} (the uniform plan is taken only when not slower)")
        for key, ratio in sorted(self.ratios.items(), key=lambda kv: -kv[1]):
            why = f"  (never pruned: {self.blocked[key]})" if key in self.blocked else ""
            lines.append(f"  {ratio:4.2f}  {key}{why}")
        return "\n".join(lines)


def saved_fraction(entry: dict, original: dict, target: str) -> float:
    """Fraction of the original cost an entry of a sensitivity report saves."""
    if target == "latency":
        lf = entry.get("latency_fraction")
        return 0.0 if lf is None else 1.0 - float(lf)
    base = original[target]
    return (base - entry[target]) / base if base else 0.0


def dominating_groups(report: dict, dominance: float = DOMINANCE) -> Dict[str, str]:
    """Group name -> reason, for groups whose damage at the lowest ratio dominates the others'.

    "Lowest ratio" is the lowest that removes a channel: with ``round_to`` (or a small group) the
    first ratios may remove none, and such zero damages would pull the median down until every
    group that does lose channels looks dominating (PP-OCR's classifier at ``--round-to 8``: 10 of
    25 groups, every wide expansion among them)."""
    units, first = [], []
    for u in report["units"]:
        removing = [e for e in u["entries"][1:] if e.get("channels_removed", 1) > 0]
        if removing:
            units.append(u)
            first.append(removing[0])
    if len(first) < 2:
        return {}
    median = statistics.median(e["damage"] for e in first)
    out = {}
    for unit, e in zip(units, first):
        if e["damage"] > dominance * median and e["damage"] > 1e-6:
            ratio = f"{median and e['damage'] / median:.1f}x the median" if median > 0 else "the median is 0"
            out[unit["name"]] = f"damage {e['damage']:.3g} at ratio {e['ratio']:g}, {ratio}"
    return out


def allocate(report: dict, target: str, fraction: float, measure: Callable[[Dict[str, float]], float],
             tolerance: Optional[float] = None, analysis_blocked: int = 0, first_reason: str = "",
             speed: bool = False) -> Allocation:
    """Per-group ratios meeting ``target <= fraction`` of the original, checked by ``measure``.

    Args:
        report: a sensitivity report by group (``graphprune.sensitivity.sensitivity``).
        target: ``macs``, ``params`` or ``latency``.
        fraction: of the original cost to keep, in (0, 1].
        measure: group name -> ratio  =>  the cost fraction of the model pruned so.
        tolerance: how far above ``fraction`` the measured cost may end (default 0, or
            ``LATENCY_TOLERANCE`` for latency).
        analysis_blocked, first_reason: groups the dependency analysis blocked, for the message.
        speed: the speed tie-break (MAC budgets, reports with modeled times; ``SPEED_DAMAGE``).
    """
    if target not in TARGETS:
        raise UserError(f"budget: unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if report.get("by") != "group":
        raise UserError("budget: the sensitivity report must be measured by group")
    tolerance = (LATENCY_TOLERANCE if target == "latency" else 0.0) if tolerance is None else tolerance
    names = [u["name"] for u in report["units"]]
    entries = {u["name"]: u["entries"] for u in report["units"]}
    blocked = dominating_groups(report)
    original = report["original"]
    saved = {n: [saved_fraction(e, original, target) for e in entries[n]] for n in names}
    # relative L2 errors of independent changes add in energy (squares), other damages add as they are
    power = 2 if report.get("metric") == "rel-l2" else 1
    damage = {n: [float(e["damage"]) ** power for e in entries[n]] for n in names}
    allowed = {n: (1 if n in blocked else len(entries[n])) for n in names}  # blocked: ratio 0 only
    faster = _time_saved(report, names) if speed and target == "macs" else None
    need = 1.0 - fraction  # fraction of the original cost to save (estimated), tightened by misses
    measured, rounds = 1.0, 0
    while rounds < _MAX_ROUNDS:
        rounds += 1
        level = _knapsack(names, saved, damage, allowed, need)
        if level is not None and faster is not None:
            level = _speed_plan(names, saved, damage, allowed, need, faster, level)
        if level is None:
            break
        ratios = {n: float(entries[n][level[n]]["ratio"]) for n in names}
        measured = measure(ratios) if any(ratios.values()) else 1.0
        if measured <= fraction + tolerance + 1e-12:
            measured, extra = _trim(names, entries, damage, level, measured, fraction + tolerance, measure,
                                    faster=faster)
            ratios = {n: float(entries[n][level[n]]["ratio"]) for n in names}
            estimated = 1.0 - sum(saved[n][level[n]] for n in names)
            total = sum(damage[n][level[n]] - damage[n][0] for n in names)
            modeled = None if faster is None else 1.0 - sum(faster[n][level[n]] for n in names)
            return Allocation(target, fraction, ratios, estimated, measured, total, blocked, rounds + extra,
                              modeled=modeled)
        # Tighten by the miss, and past this plan's own estimate: the next round must change the plan.
        planned = sum(saved[n][level[n]] for n in names)
        need = max(need + (measured - fraction), planned + 1.0 / _BINS)
    raise UserError(_unreachable(target, fraction, measured, blocked, analysis_blocked, first_reason))


def _time_saved(report: dict, names: List[str]) -> Optional[Dict[str, List[float]]]:
    """Group -> modeled time fraction each entry saves, when the report has the cost model's numbers."""
    base = report["original"].get("modeled")
    units = {u["name"]: u["entries"] for u in report["units"]}
    if not base or any(e.get("modeled") is None for n in names for e in units[n]):
        return None  # a report from before the cost model (--sensitivity): MACs alone, as then
    return {n: [1.0 - float(e["modeled"]) / base for e in units[n]] for n in names}


def _speed_plan(names, saved, damage, allowed, need: float, faster, least: Dict[str, int]) -> Dict[str, int]:
    """Among plans saving ``need`` (and at most ``_SPEED_OVER`` more), the one of least modeled time
    whose summed damage is at most ``SPEED_DAMAGE`` times the least (``least``'s).

    MACs miss where the time goes (channel blocks, elementwise and squeeze-excitation work): plans of
    the same MACs differ by 10% in speed.  Candidates come from the knapsack with damage minus
    ``w * time saved`` for a ladder of weights ``w`` (in units of the least plan's damage per unit
    of cost saved, so the ladder fits any damage metric's scale).
    """
    def total(level, table):
        return sum(table[n][level[n]] - table[n][0] for n in names)

    floor = total(least, damage)
    unit = max(floor, 1e-12) / max(need, 1e-6)
    best, best_time = least, -total(least, faster)
    for weight in _SPEED_WEIGHTS:
        bonus = {n: [weight * unit * t for t in faster[n]] for n in names}
        level = _knapsack(names, saved, damage, allowed, need, bonus=bonus, over=_SPEED_OVER)
        if level is None or total(level, damage) > SPEED_DAMAGE * floor + 1e-12:
            continue
        time_left = -total(level, faster)
        if time_left < best_time - 1e-9:
            best, best_time = level, time_left
    return best


def _trim(names, entries, damage, level, measured: float, limit: float, measure, tries: int = _TRIM_TRIES,
          faster=None):
    """Step groups back down while the *measured* cost stays within ``limit``: the plan's last jump
    often saves more than the budget needs.  The largest damage reductions are tried first, at
    most ``tries`` builds; with the speed tie-break (``faster``), only steps that cost no modeled time
    (a channel count that stays in the same blocks).  Returns (measured cost, builds made)."""
    made = 0
    while made < tries:
        moves = sorted(((damage[n][level[n]] - damage[n][level[n] - 1], n) for n in names if level[n] > 0
                        and (faster is None or faster[n][level[n] - 1] >= faster[n][level[n]] - 1e-9)),
                       reverse=True)
        accepted = False
        for gain, n in moves:
            if made >= tries or gain <= 0:
                break
            level[n] -= 1
            made += 1
            cost = measure({m: float(entries[m][level[m]]["ratio"]) for m in names})
            if cost <= limit + 1e-12:
                measured, accepted = cost, True
                break
            level[n] += 1
        if not accepted:
            break
    return measured, made


def _knapsack(names: List[str], saved: Dict[str, List[float]], damage: Dict[str, List[float]],
              allowed: Dict[str, int], need: float, bonus: Optional[Dict[str, List[float]]] = None,
              over: Optional[float] = None) -> Optional[Dict[str, int]]:
    """Group -> level (index into its entries) saving at least ``need`` with the least summed damage.

    A multiple-choice knapsack solved exactly by dynamic programming over savings in steps of
    1/``_BINS`` of the original cost, each saving rounded *down* (the estimate never flatters).
    None when even the highest allowed levels cannot save ``need``.  ``bonus`` (group -> per level)
    is subtracted from the damage: the objective of the speed tie-break, which would save more than
    the budget asks for its sake, so with it ``over`` bounds the savings to ``need + over``.
    """
    cap = int(math.ceil(max(need, 0.0) * _BINS - 1e-9))
    if cap == 0 and bonus is None:
        return {n: 0 for n in names}
    top = cap if over is None else cap + int(math.ceil(over * _BINS))
    inf = float("inf")
    best = np.full(top + 1, inf)  # best[b]: least damage saving b bins (without ``over``, cap: at least cap)
    best[0] = 0.0
    bins = np.arange(top + 1)
    trail = []  # per group: (level picked, bin it came from) for every bin
    for n in names:
        new, pick, source = np.full(top + 1, inf), np.zeros(top + 1, np.int64), np.zeros(top + 1, np.int64)
        for level in range(allowed[n]):
            step = max(int(math.floor(saved[n][level] * _BINS + 1e-9)), 0)
            cost = max(damage[n][level] - damage[n][0], 0.0)  # noise below the original counts as none
            if bonus is not None:
                cost -= bonus[n][level]
            shifted, src = np.full(top + 1, inf), bins - step
            if over is not None:  # bounded: a plan saving past the top is dropped
                if step <= top:
                    shifted[step:] = best[: top + 1 - step]
            else:
                if step < cap:
                    shifted[step:cap] = best[: cap - step]
                low = max(cap - step, 0)  # every bin from here reaches the cap
                src[cap] = low + int(np.argmin(best[low:]))
                shifted[cap] = best[src[cap]]
            shifted += cost
            better = shifted < new
            new[better], pick[better], source[better] = shifted[better], level, src[better]
        trail.append((pick, source))
        best = new
    at = cap + int(np.argmin(best[cap:]))
    if not np.isfinite(best[at]):
        return None
    level = {}
    for n, (pick, source) in zip(reversed(names), reversed(trail)):
        level[n] = int(pick[at])
        at = int(source[at])
    return level


def _unreachable(target: str, fraction: float, measured: float, blocked: Dict[str, str], analysis_blocked: int,
                 first_reason: str) -> str:
    parts = []
    if blocked:
        shown = "; ".join(f"{k}: {v}" for k, v in list(blocked.items())[:3])
        parts.append(f"{len(blocked)} by their damage: {shown}" + (" ..." if len(blocked) > 3 else ""))
    if analysis_blocked:
        parts.append(f"{analysis_blocked} by the analysis" + (f", first: {first_reason}" if first_reason else ""))
    what = "; ".join(parts) or "none; every prunable group is at its highest ratio"
    return (f"budget cannot be met without pruning blocked groups ({what}): {target} reach {measured:.3f} of "
            f"the original at best, the budget is {fraction:g}")
