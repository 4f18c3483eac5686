"""Benchmark: reconstruction alone on the PP-OCRv3 recognizer and detector (docs/benchmarks.md, "Real trained models").

What ``tools/bench_real.py --recipes recon`` does up to its fine-tuning, with CPU times: the uniform
magnitude ratio that reaches the MAC target (the same bisection), ``prune_channels``, then
``ReconstructPass`` on the first ``SAMPLES`` unlabelled train samples; the task metric (line
accuracy / box F1, points) of the pruned and the reconstructed model on the test split, the
latency ratio original/reconstructed (``bench_real._latency_ratio``), and the models and a JSON
row per run in ``--out``.  Fine-tuning is left out: docs/benchmarks.md's fine-tuned recognizer rows run
``FineTunePass(freeze=[the first 80 weight tensors])`` on the models written here (trained whole,
the reconstructed recognizer gets worse); the detector's takes ~1 s CPU per page-step.

    PYTHONPATH=<pillow, opencv, pyclipper, shapely, six> .venv/bin/python tools/bench_real_reconstruct.py \\
        rec:0.6:128 rec:0.4:128 det:0.6:24 det:0.4:24 --out DIR

A fourth field names a per-group ratios file (``prune --group-ratios``) to prune with instead of the
uniform ratio (``det:0.6:24:plan.json --round-to 8``; the target then only labels the row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_real
import real_models

from graphprune.data import load_inputs
from graphprune.metrics import count_macs
from graphprune.passes.prune_channels import prune_channels
from graphprune.passes.reconstruct import ReconstructPass


def _clock():
    return time.perf_counter(), time.process_time()


def run(kind: str, target: float, samples: int, out: str, threads: int, plan: str = "", round_to: int = 1) -> dict:
    """One row: prune ``kind`` uniformly to ``target`` of the MACs (or by the ratios file ``plan``),
    reconstruct on ``samples``."""
    tag = os.path.join(out, f"{kind}_{int(target * 100)}_{samples}" + (f"_{os.path.basename(plan)[:-5]}" if plan else ""))
    original_path = real_models.models()[kind]
    original, shape = onnx.load(original_path), bench_real.SHAPES[kind]
    data, _ = load_inputs(real_models.data(kind, "train")[0], original, [])
    data = data.subset(np.arange(min(samples, len(data))))
    wall, cpu = _clock()
    if plan:
        with open(plan) as fh:
            ratio = json.load(fh)
        ratio = ratio.get("groups", ratio)
        pruned = prune_channels(original, ratio=0.0, group_ratios=ratio, round_to=round_to)
    else:
        ratio = bench_real._uniform_ratio(original, shape, target)
        pruned = prune_channels(original, ratio=ratio, round_to=round_to)
    onnx.save(pruned, tag + "_pruned.onnx")
    wall2, cpu2 = _clock()
    result = ReconstructPass(original=original, data=data, threads=threads)(pruned)
    wall3, cpu3 = _clock()
    onnx.save(result.model, tag + "_rec.onnx")
    row = {"model": kind, "target": target, "ratio": ratio, "samples": len(data),
           "macs": count_macs(pruned, {"x": shape}) / count_macs(original, {"x": shape}),
           "search_prune_wall": wall2 - wall, "search_prune_cpu": cpu2 - cpu,
           "reconstruct_wall": wall3 - wall2, "reconstruct_cpu": cpu3 - cpu2,
           "stats": {k: v for k, v in result.stats.items() if k != "per_layer"},
           "no_recovery": real_models.evaluate(kind, tag + "_pruned.onnx") * 100,
           "reconstructed": real_models.evaluate(kind, tag + "_rec.onnx") * 100,
           "latency_speedup": bench_real._latency_ratio(original_path, tag + "_rec.onnx", shape),
           "per_layer": result.stats.get("per_layer")}
    with open(tag + ".json", "w") as fh:
        json.dump(row, fh, indent=1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="KIND:TARGET:SAMPLES[:RATIOS.json], e.g. rec:0.6:128 (kind rec, det or cls)")
    parser.add_argument("--round-to", type=int, default=1, help="kept channel counts at multiples of N")
    parser.add_argument("--out", required=True, help="folder for the models and the JSON rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for spec in args.runs:
        kind, target, samples, *plan = spec.split(":", 3)
        row = run(kind, float(target), int(samples), args.out, args.threads, plan[0] if plan else "", args.round_to)
        print({k: v for k, v in row.items() if k != "per_layer"}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
