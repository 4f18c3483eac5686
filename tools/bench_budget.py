"""Benchmark: budgets (per-group ratios from sensitivity) against one uniform ratio at the same MACs.

For each model and budget (``--targets``, fractions of the original MACs): ``prune_to_budget`` (the
``prune --target-macs`` path: sensitivity by group on calibration samples, knapsack, measured until
met), then the uniform ``--ratio`` whose MACs are closest to the budget result's without exceeding
them (bisection on the ratio), both with the same criterion (l2) and no fine-tuning.  Both are
compared with the original on held-out samples: accuracy (digits, with labels), top-1 agreement and
relative L2 error of the outputs.

Models: the demo digits CNN (calibration: 256 images of ``models/digits_train.npz``; held out:
``models/digits_test.npz``), and ResNet-18 / ResNet-50 from ``graphprune.testing`` (seeded, untrained
weights, so agreement and rel. L2 are the measures; calibration and held-out inputs are seeded random
images of different seeds).

    .venv/bin/python tools/bench_budget.py [--models digits resnet18 resnet50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from graphprune.data import load_inputs, random_inputs
from graphprune.metrics import count_macs
from graphprune.model_io import load
from graphprune.passes.prune_channels import PruneChannelsPass
from graphprune.runtime import make_session, run_samples
from graphprune.sensitivity import prune_to_budget
from graphprune.testing import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _models(names, image):
    for name in names:
        if name == "digits":
            model = load(os.path.join(ROOT, "models", "digits_cnn.onnx"))
            train, _ = load_inputs(os.path.join(ROOT, "models", "digits_train.npz"), model)
            test, extra = load_inputs(os.path.join(ROOT, "models", "digits_test.npz"), model, extra_keys=["labels"])
            yield name, model, train.subset(range(256)), test, extra["labels"], {"images": (1, 1, 8, 8)}
        else:
            depth = int(name.replace("resnet", ""))
            model = resnet(depth=depth, width=0.5 if depth == 18 else 0.25, image=image, num_classes=100,
                           dynamic_batch=True)
            shape = {"input": (1, 3, image, image)}
            yield (f"{name} (width {0.5 if depth == 18 else 0.25}, {image}x{image})", model,
                   random_inputs(model, shape, samples=32, seed=1), random_inputs(model, shape, samples=64, seed=2),
                   None, shape)


def _compare(original_out, out, labels):
    ref, got = next(iter(original_out.values())), next(iter(out.values()))
    row = {"agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
           "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}
    if labels is not None:
        row["accuracy"] = float(np.mean(got.argmax(-1) == labels))
    return row


def _uniform_at(model, macs_limit, shapes):
    """The smallest uniform ratio whose MACs are at most ``macs_limit`` (bisection), and its model."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        pruned = PruneChannelsPass(ratio=mid)(model).model
        if count_macs(pruned, shapes) <= macs_limit:
            hi, best = mid, (mid, pruned)
        else:
            lo = mid
    if best is None:
        best = (hi, PruneChannelsPass(ratio=hi)(model).model)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18", "resnet50"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.4])
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--metric", default="rel-l2")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    print("| model | MACs budget | method | MACs kept | accuracy | top-1 agreement | rel. L2 | time |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, model, calib, test, labels, shapes in _models(args.models, args.image):
        macs0 = count_macs(model, shapes)
        original_out = run_samples(make_session(model), test)
        for target in args.targets:
            start = time.perf_counter()
            budget = prune_to_budget(model, calib, "macs", target, metric=args.metric, jobs=args.jobs)
            seconds = time.perf_counter() - start
            macs_b = count_macs(budget.model, shapes)
            ratio, uniform = _uniform_at(model, macs_b, shapes)
            macs_u = count_macs(uniform, shapes)
            for method, pruned, macs, secs in (("budget", budget.model, macs_b, seconds),
                                               (f"uniform --ratio {ratio:.3f}", uniform, macs_u, None)):
                row = {"model": name, "target": target, "method": method, "macs": macs / macs0, "seconds": secs,
                       **_compare(original_out, run_samples(make_session(pruned), test), labels)}
                if method == "budget":
                    row["ratios"] = budget.allocation.ratios
                    row["groups"] = len(budget.allocation.ratios)
                rows.append(row)
                acc = f"{row['accuracy']:.2%}" if "accuracy" in row else "-"
                print(f"| {name} | {target:g} | {method} | {row['macs']:.3f} | {acc} | {row['agreement']:.2%} | "
                      f"{row['rel_l2']:.3f} | {'' if secs is None else f'{secs:.1f} s'} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
