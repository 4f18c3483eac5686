"""``graphprune sensitivity MODEL --data D.npz -o REPORT_DIR``: prune each group (kind, stage) alone at
several ratios; damage, MACs, params and latency as a table, report.json, a PNG plot and an HTML page."""

from __future__ import annotations

import json
import os
import sys
import tempfile

from graphprune.cli.budget_opts import batch_one_shapes, check_jobs
from graphprune.cli.common import add_data_options, read_inputs
from graphprune.errors import UserError
from graphprune.model_io import atomic_write_text, load
from graphprune.pruning import CRITERIA

__all__ = ["register", "run"]

REPORT_FILES = ("report.json", "sensitivity.png", "report.html")
_RANDOM_SAMPLES = 32


def register(sub) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="prune each channel group alone at several ratios and measure the damage, MACs and latency",
        description="Sensitivity analysis: each prunable group (or all groups of a kind, or of a stage) is pruned "
        "alone at each ratio; the damage to the outputs on --data (relative L2, top-1 disagreement or your "
        "metric), the MACs and params left and the measured latency are reported as a table, report.json, "
        "sensitivity.png and report.html in REPORT_DIR. prune --target-macs uses the same measurements.",
    )
    p.add_argument("model", help="the ONNX model")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_DIR",
                   help="folder for report.json, sensitivity.png and report.html (created if missing)")
    p.add_argument("--ratios", default="0.1,0.3,0.5,0.7", metavar="R,R,...",
                   help="fractions of each unit's channels to prune, each in (0, 1) (default 0.1,0.3,0.5,0.7)")
    p.add_argument("--by", default="group", metavar="group|kind|stage",
                   help="unit pruned alone: each group (default), each kind (channels, heads, ffn), or each stage "
                   "(groups whose activations share a spatial size)")
    p.add_argument("--metric", default="rel-l2", metavar="rel-l2|top1|python:FILE.py:FUNCTION",
                   help="damage: worst relative L2 error of the outputs (default), 1 - top-1 agreement, or "
                   "FUNCTION(original_outputs, pruned_outputs) -> float (0 = unchanged, larger = worse)")
    p.add_argument("--criterion", default="l2", metavar="|".join(CRITERIA), help="which channels go first (default l2)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="worker processes (default min(2, CPUs), used when the run would take over 10 s in one)")
    p.add_argument("--ray", action="store_true", help="run the measurements on a Ray cluster (needs ray installed)")
    p.add_argument("--samples", type=int, metavar="N",
                   help="use the first N samples of --data (default all), or N seeded random inputs without --data (32)")
    p.add_argument("--latency-rounds", type=int, default=5, metavar="K",
                   help="interleaved timing rounds per measurement (default 5; 0 skips latency)")
    add_data_options(p, "calibration samples (.npz); without it, seeded random inputs (and a note)")
    p.set_defaults(func=run)


def _ratios(text: str):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--ratios {text!r}: expected numbers separated by commas, e.g. 0.1,0.3,0.5") from None
    from graphprune.sensitivity.run import check_ratios

    return check_ratios(values)


def _check_report_dir(args) -> None:
    out = args.output
    if not out:
        raise UserError("-o: empty path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"-o {out}: exists and is not a folder (give a folder for the report files)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"-o {out}: its parent folder does not exist")
    for path in (args.model, args.data):
        if path and os.path.exists(path) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(out) \
                and os.path.basename(path) in REPORT_FILES:
            raise UserError(f"-o {out}: writing the report would replace {path}, a file of this run")


def _write_bytes(path: str, data: bytes) -> None:
    """Atomically, as ``atomic_write_text`` does for text: a temporary beside it, then a rename."""
    from graphprune import tempfiles

    fd, tmp = tempfile.mkstemp(prefix=tempfiles.HIDDEN_PREFIX, dir=os.path.dirname(os.path.abspath(path)))
    tempfiles.track(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tempfiles.remove(tmp)
        raise
    tempfiles.untrack(tmp)


def run(args) -> int:
    # every argument is checked before the model is read or anything is measured
    from graphprune.sensitivity.units import BY

    ratios = _ratios(args.ratios)
    if args.by not in BY:
        raise UserError(f"--by {args.by!r}: choose from {', '.join(BY)}")
    if args.criterion not in CRITERIA:
        raise UserError(f"unknown --criterion {args.criterion!r} (choose from {', '.join(CRITERIA)})")
    check_jobs(args.jobs)
    if args.latency_rounds < 0:
        raise UserError(f"--latency-rounds {args.latency_rounds} must be at least 0")
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("--ray: ray is not installed (pip install 'ray[default]'); without --ray the "
                            "measurements run in local processes") from None
    if args.metric.startswith("python:"):
        from graphprune.sensitivity.damage import load_metric

        load_metric(args.metric)  # a missing file or function is refused before any work
    _check_report_dir(args)
    model = load(args.model)
    data, shapes, _ = read_inputs(args, model)
    if data is None:
        from graphprune.data import random_inputs

        count = args.samples or _RANDOM_SAMPLES
        data = random_inputs(model, batch_one_shapes(model, shapes), samples=count, seed=0)
        print(f"note: no --data: damage measured on {count} seeded random inputs (give --data FILE.npz for real ones)")
    elif args.samples:
        data = data.subset(range(min(args.samples, len(data))))
    from graphprune.progress import progress_bar
    from graphprune.sensitivity import sensitivity
    from graphprune.sensitivity.plot import plot_png
    from graphprune.sensitivity.report import format_html, format_table

    with progress_bar(total=None, desc="sensitivity", enabled=sys.stderr.isatty(), unit="task") as bar:
        report = sensitivity(model, data, ratios=ratios, by=args.by, metric=args.metric, criterion=args.criterion,
                             jobs=args.jobs, use_ray=args.ray, latency_rounds=args.latency_rounds,
                             progress=bar.update)
    report["model"] = os.path.basename(args.model)
    png = plot_png(report)
    os.makedirs(args.output, exist_ok=True)
    atomic_write_text(os.path.join(args.output, "report.json"), json.dumps(report, indent=2) + "\n")
    if png is not None:
        _write_bytes(os.path.join(args.output, "sensitivity.png"), png)
    atomic_write_text(os.path.join(args.output, "report.html"),
                      format_html(report, png, f"graphprune sensitivity: {report['model']}"))
    print(format_table(report))
    if png is None:
        print("note: plot skipped: matplotlib is not installed (pip install 'graphprune[plot]')")
    written = [f for f in REPORT_FILES if png is not None or f != "sensitivity.png"]
    print(f"wrote {', '.join(os.path.join(args.output, f) for f in written)} ({report['seconds']:.1f} s)")
    return 0
