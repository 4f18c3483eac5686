"""Benchmark: reconstruction without training (issue 12, item 3), "Reconstruction without training" in docs/benchmarks.md.

For each model, ratio (0.3, 0.5) and criterion (l2, output): the metric after plain pruning and
after ``prune --reconstruct`` (the same pass objects the CLI uses), with the CPU and wall time of
pruning and of reconstruction.  The digits CNN is trained (``models/``): held-out accuracy, the
calibration set its training images.  ResNet-18 and ResNet-50 are graphprune.testing's seeded
fixtures on random inputs: output agreement with the original only (relative L2 error and top-1
agreement on held-out inputs).  Also one row per model with BatchNorm statistics re-estimated
after reconstruction (``batchnorm=recalibrate``).

    python tools/bench_reconstruct.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a developer tool run from a checkout

from graphprune.data import InputSet, load_inputs  # noqa: E402
from graphprune.model_io import load  # noqa: E402
from graphprune.passes import PruneChannelsPass, ReconstructPass  # noqa: E402
from graphprune.runtime import make_session, run_samples  # noqa: E402
from graphprune.testing.fixtures_cnn import resnet  # noqa: E402


def _outputs(model, data: InputSet) -> np.ndarray:
    return list(run_samples(make_session(model, threads=1), data, batch_size=64).values())[0]


def _cases(quick: bool, which, widths):
    """(name, original, calibration, held-out, labels or None)."""
    if "digits" in which:
        digits = load(os.path.join(ROOT, "models", "digits_cnn.onnx"))
        train, _ = load_inputs(os.path.join(ROOT, "models", "digits_train.npz"), digits, extra_keys=["labels"])
        test, extra = load_inputs(os.path.join(ROOT, "models", "digits_test.npz"), digits, extra_keys=["labels"])
        yield "digits CNN (trained)", digits, train, test, extra["labels"]
    image, calibration, held = (32, 32, 16) if quick else (32, 128, 64)
    for depth in (18, 50):
        if f"resnet{depth}" not in which:
            continue
        rng = np.random.default_rng(depth)  # the same inputs whichever models one process runs
        width = widths.get(depth, 1.0)
        model = resnet(depth, width=width, image=image, num_classes=1000, dynamic_batch=True, seed=0)
        name = model.graph.input[0].name
        x = rng.standard_normal((calibration + held, 3, image, image)).astype(np.float32)
        yield (f"ResNet-{depth}{'' if width == 1.0 else f' width {width}'} (seeded, {image}x{image})", model, InputSet({name: x[:calibration]}),
               InputSet({name: x[calibration:]}), None)


def _metric(model, held: InputSet, reference: np.ndarray, labels) -> dict:
    out = _outputs(model, held)
    result = {"rel_l2": float(np.linalg.norm(out - reference) / np.linalg.norm(reference)),
              "top1_agreement": float((out.argmax(1) == reference.argmax(1)).mean())}
    if labels is not None:
        result["accuracy"] = float((out.argmax(1) == labels).mean())
    return result


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    value = fn()
    return value, round(time.process_time() - cpu, 2), round(time.perf_counter() - wall, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images and sample counts (a smoke run)")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--models", default="digits,resnet18,resnet50",
                        help="comma-separated subset of digits,resnet18,resnet50 (to run them in parallel processes)")
    parser.add_argument("--resnet50-width", type=float, default=1.0,
                        help="channel width of the ResNet-50 (0.5: 4x fewer MACs; its refits cost ~8x less)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    print(f"commit {commit}; load average at start {os.getloadavg()[0]:.1f}; times are CPU s (wall s) of this process")
    for name, original, calibration, held, labels in _cases(args.quick, args.models.split(","), {50: args.resnet50_width}):
        reference = _outputs(original, held)
        base = _metric(original, held, reference, labels)
        print(f"\n{name}: {len(calibration)} calibration / {len(held)} held-out samples; original "
              + (f"accuracy {base['accuracy']:.2%}" if labels is not None else "(reference)"))
        variants = [(r, c, "keep") for r in (0.3, 0.5) for c in ("l2", "output")]
        if "ResNet-50" not in name:  # BatchNorm re-estimation: one row per model but the largest (time)
            variants.append((0.5, "l2", "recalibrate"))
        for ratio, criterion, batchnorm in variants:
            prune = PruneChannelsPass(ratio=ratio, criterion=criterion, data=calibration)
            pruned, prune_cpu, prune_wall = _timed(lambda: prune(original).model)
            refit = ReconstructPass(original=original, data=calibration, batchnorm=batchnorm)
            result, cpu, wall = _timed(lambda: refit(pruned))
            row = {"model": name, "ratio": ratio, "criterion": criterion, "batchnorm": batchnorm,
                   "samples": len(calibration), "pruned": _metric(pruned, held, reference, labels),
                   "reconstructed": _metric(result.model, held, reference, labels),
                   "prune_seconds": [prune_cpu, prune_wall], "reconstruct_seconds": [cpu, wall],
                   "layers": result.stats["layers"], "rounds": result.stats.get("rounds"),
                   "original": base, "commit": commit}
            rows.append(row)
            key = "accuracy" if labels is not None else "rel_l2"
            fmt = (lambda v: f"{v:.2%}") if labels is not None else (lambda v: f"{v:.3f}")
            print(f"  ratio {ratio} {criterion:<6} bn={batchnorm:<11} {key} pruned {fmt(row['pruned'][key])} -> "
                  f"reconstructed {fmt(row['reconstructed'][key])}; top-1 agreement {row['pruned']['top1_agreement']:.1%} -> "
                  f"{row['reconstructed']['top1_agreement']:.1%}; prune {prune_cpu}s ({prune_wall}s), "
                  f"reconstruct {cpu}s ({wall}s), {row['layers']} layers in {row['rounds']} rounds", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
