"""``graphprune demo``: the end-to-end pipeline on the embedded digits CNN."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="optimize the embedded digits CNN and print before/after numbers")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="also write each stage's model here")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    from graphprune.demo import run_demo

    run_demo(output_dir=args.output_dir, threads=args.threads)
    return 0
