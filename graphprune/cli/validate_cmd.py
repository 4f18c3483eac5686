"""``graphprune validate ORIGINAL CANDIDATE``: the before/after table."""

from __future__ import annotations

import sys

from graphprune.cli.common import add_data_options, add_report_option, check_report_path, read_inputs, write_report
from graphprune.errors import UserError
from graphprune.model_io import load, model_file_size
from graphprune.validate import validate


def register(sub) -> None:
    p = sub.add_parser("validate", help="compare a candidate model with its original in ONNX Runtime")
    p.add_argument("original", help="the reference model")
    p.add_argument("candidate", help="the optimized model")
    add_data_options(p)
    p.add_argument("--labels", metavar="KEY", help="array in --data with integer labels: report accuracy")
    p.add_argument("--samples", type=int, default=8, help="random samples when no --data (default 8)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (default 1)")
    p.add_argument("--runs", type=int, default=20, help="timed runs for the median latency (default 20)")
    add_report_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_report_path(args)
    original = load(args.original)
    candidate = load(args.candidate)
    args.model = args.original
    if args.labels and not args.data:
        raise UserError("--labels needs --data")
    data, shapes, extras = read_inputs(args, original, extra_keys=[args.labels] if args.labels else [])
    report = validate(
        original,
        candidate,
        data=data,
        input_shapes=shapes,
        labels=extras.get(args.labels) if args.labels else None,
        samples=args.samples,
        threads=args.threads,
        latency_runs=args.runs,
        sizes=(model_file_size(args.original), model_file_size(args.candidate)),
        progress=sys.stderr.isatty(),
    )
    print(report.format_table())
    write_report(args, report.to_dict())
    return 0
