"""``prune --target-macs/--target-params/--target-latency F``, ``--save-ratios`` and ``--group-ratios``:
per-group ratios chosen from measured sensitivity and cost instead of one uniform ratio."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Dict, Optional

from graphprune.cli.common import parse_number, write_model
from graphprune.errors import UserError
from graphprune.model_io import atomic_write_text
from graphprune.pruning.group_ratios import ratios_document, read_ratios_file

__all__ = ["add_budget_options", "BudgetPlan", "budget_plan", "run_budget", "batch_one_shapes", "check_jobs", "RANDOM_SAMPLES"]

# Seeded random inputs a budget run measures damage on when no --data is given.
RANDOM_SAMPLES = 32
_TARGET_FLAGS = (("target_macs", "macs"), ("target_params", "params"), ("target_latency", "latency"))


def add_budget_options(p) -> None:
    g = p.add_argument_group("budgets", "per-group ratios chosen from measured sensitivity and cost "
                             "(instead of --ratio; see graphprune sensitivity)")
    g.add_argument("--target-macs", metavar="F", help="keep at most this fraction of the original MACs (0 < F <= 1)")
    g.add_argument("--target-params", metavar="F", help="keep at most this fraction of the original parameters")
    g.add_argument("--target-latency", metavar="F",
                   help="keep at most this fraction of the original latency (measured, 1 thread, batch 1)")
    g.add_argument("--metric", default="rel-l2", metavar="rel-l2|top1|python:FILE.py:FUNCTION",
                   help="damage measured per group for a budget (default rel-l2 of the outputs)")
    g.add_argument("--jobs", type=int, metavar="N", help="worker processes for the measurements (default min(2, CPUs))")
    g.add_argument("--budget-ratios", metavar="R,R,...",
                   help="ratios each group is measured at and may get (default 0.1,0.2,...,0.8; fewer: a faster run)")
    g.add_argument("--sensitivity", metavar="REPORT.json",
                   help="allocate from a report of graphprune sensitivity --by group instead of measuring")
    g.add_argument("--save-ratios", metavar="FILE.json", help="write the chosen per-group ratios (re-apply with --group-ratios)")
    g.add_argument("--group-ratios", metavar="FILE.json", help="prune each group at the ratio a --save-ratios file gives")


@dataclasses.dataclass
class BudgetPlan:
    """What the budget options ask: a target (and fraction), or ratios read from a file."""

    target: Optional[str] = None
    fraction: float = 1.0
    group_ratios: Optional[Dict[str, float]] = None
    report: Optional[dict] = None
    ratios: Optional[tuple] = None


def budget_plan(args) -> Optional[BudgetPlan]:
    """Check the budget options (before any work); None when none is given."""
    targets = [(flag, kind) for flag, kind in _TARGET_FLAGS if getattr(args, flag, None) is not None]
    if len(targets) > 1:
        raise UserError("give one budget: " + " or ".join("--" + f.replace("_", "-") for f, _ in targets))
    check_jobs(args.jobs)
    if not targets and args.group_ratios is None:
        for flag, value in (("--save-ratios", args.save_ratios), ("--sensitivity", args.sensitivity),
                            ("--budget-ratios", args.budget_ratios)):
            if value:
                raise UserError(f"{flag} needs a budget (--target-macs, --target-params or --target-latency)")
        return None
    others = [flag for flag, value in (("--ratio", args.ratio), ("--heads-ratio", args.heads_ratio),
                                       ("--ffn-ratio", args.ffn_ratio), ("--hidden-ratio", args.hidden_ratio))
              if value is not None]
    others += ["--global"] * bool(args.global_ranking) + ["--exclude"] * bool(args.exclude)
    chooser = "--" + targets[0][0].replace("_", "-") if targets else "--group-ratios"
    if targets and args.group_ratios is not None:
        raise UserError(f"{chooser} chooses the ratios itself: drop --group-ratios")
    if others:
        raise UserError(f"{chooser} sets each group's ratio: drop {', '.join(others)}")
    if args.save_ratios:
        _check_ratios_path(args)
    if not targets:
        return BudgetPlan(group_ratios=read_ratios_file(args.group_ratios))
    flag, kind = targets[0]
    fraction = parse_number(getattr(args, flag), "--" + flag.replace("_", "-"), 0.0, 1.0, high_inclusive=True)
    if fraction <= 0:
        raise UserError(f"--{flag.replace('_', '-')} {fraction:g} must be above 0")
    ratios = None
    if args.budget_ratios is not None:
        from graphprune.sensitivity.run import check_ratios

        try:
            ratios = check_ratios([float(t) for t in args.budget_ratios.split(",") if t.strip()], "--budget-ratios")
        except ValueError:
            raise UserError(f"--budget-ratios {args.budget_ratios!r}: expected numbers separated by commas") from None
    return BudgetPlan(target=kind, fraction=fraction, report=_read_report(args.sensitivity) if args.sensitivity else None,
                      ratios=ratios)


def _read_report(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--sensitivity {path}: no such file")
    if os.path.getsize(path) > 256 * 1024 * 1024:
        raise UserError(f"--sensitivity {path}: larger than 256 MB, not a sensitivity report")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"--sensitivity {path}: not JSON ({' '.join(str(exc).split())[:120]})") from None


def check_jobs(jobs) -> None:
    """``--jobs``: at least 1, at most 4x the CPUs (each worker is a process holding the model)."""
    limit = 4 * (os.cpu_count() or 1)
    if jobs is not None and not 1 <= jobs <= limit:
        raise UserError(f"--jobs {jobs} is outside [1, {limit}]")


def _check_ratios_path(args) -> None:
    path = args.save_ratios
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--save-ratios {path}: output directory does not exist")
    if os.path.isdir(path):
        raise UserError(f"--save-ratios {path}: is a directory (give a file name)")
    for other in (args.model, args.output, args.data):
        if other and os.path.abspath(other) == os.path.abspath(path):
            raise UserError(f"--save-ratios {path}: is another file of this run")


def run_budget(args, plan: BudgetPlan, model, data, shapes, criterion: str, mode: str) -> int:
    """Measure, allocate, prune, write the model (and the ratios); print what was chosen."""
    from graphprune.data import random_inputs
    from graphprune.progress import progress_bar
    from graphprune.sensitivity.budget_prune import prune_to_budget

    if plan.report is not None:
        print(f"note: allocating from {args.sensitivity} (metric {plan.report.get('metric')}), not measuring")
    if data is None:
        data = random_inputs(model, batch_one_shapes(model, shapes), samples=RANDOM_SAMPLES, seed=0)
        what = "the check against a uniform ratio runs" if plan.report is not None else "damage measured"
        print(f"note: no --data: {what} on {RANDOM_SAMPLES} seeded random inputs (give --data FILE.npz for real ones)")
    with progress_bar(total=None, desc="sensitivity", enabled=sys.stderr.isatty(), unit="task") as bar:
        result = prune_to_budget(model, data, plan.target, plan.fraction, criterion=criterion, metric=args.metric,
                                 round_to=args.round_to, mode=mode, jobs=args.jobs, progress=bar.update,
                                 report=plan.report, **({"ratios": plan.ratios} if plan.ratios else {}))
    pruned, refit_line = result.model, None
    if getattr(args, "reconstruct", False):  # the budget's model is pruned from the original in one removal
        from graphprune.passes.reconstruct import ReconstructPass, describe

        refit = ReconstructPass(original=model, data=data, progress=sys.stderr.isatty())(pruned)
        pruned, refit_line = refit.model, describe(refit.stats)
    write_model(args, pruned)
    allocation = result.allocation
    if args.save_ratios:
        doc = ratios_document(allocation.ratios, target=allocation.target, fraction=allocation.fraction,
                              measured=allocation.measured, metric=args.metric, criterion=criterion,
                              model=os.path.basename(args.model))
        atomic_write_text(args.save_ratios, json.dumps(doc, indent=2) + "\n")
    print(allocation.summary())
    if refit_line:
        print(refit_line)
    stats = result.stats
    masked = " once removed (--mode mask: the written model keeps every shape, the channels zeroed)" \
        if stats["mode"] == "mask" else ""
    print(f"params: {stats['params_before']:,} -> {stats['params_after']:,}{masked}")
    if stats["macs_before"]:
        print(f"MACs: {stats['macs_before']:,} -> {stats['macs_after']:,} ({stats['macs_after'] / stats['macs_before']:.1%})")
    if args.stats:
        print(json.dumps({"allocation": allocation.to_dict(), **stats}, indent=2, default=str))
    if args.save_ratios:
        print(f"wrote {args.save_ratios}")
    print(f"wrote {args.output}")
    return 0


def batch_one_shapes(model, shapes):
    """--input-shape overrides, plus batch 1 for inputs whose only dynamic dim is the first."""
    from graphprune.data import input_specs

    out = dict(shapes or {})
    for name, _, declared in input_specs(model):
        if name in out or not declared:
            continue
        rest = declared[1:]
        if not (isinstance(declared[0], int) and declared[0] > 0) and all(isinstance(d, int) and d > 0 for d in rest):
            out[name] = (1, *rest)
    return out
