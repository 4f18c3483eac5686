"""``graphprune demo``: prune -> fine-tune -> int8 QDQ on the embedded digits CNN, measured after each stage."""

from __future__ import annotations

from graphprune.cli.common import parse_number
from graphprune.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("demo", help="optimize the embedded digits CNN and print before/after numbers")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="also write each stage's model here")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (default 1)")
    p.add_argument("--ratio", default="0.5", help="fraction of channels to prune (default 0.5)")
    p.add_argument("--steps", type=int, default=1, metavar="K", help="prune in K rounds, fine-tuning after each (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from graphprune.demo import run_demo

    ratio = parse_number(args.ratio, "--ratio", 0.0, 1.0)
    if ratio <= 0:
        raise UserError(f"--ratio must be in (0, 1), got {ratio}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"{args.output_dir}: exists and is not a directory")
    run_demo(output_dir=args.output_dir, threads=args.threads, ratio=ratio, steps=args.steps)
    return 0
