"""Benchmark: accuracy that survives pruning on real trained models (PP-OCRv3, ``tools/real_models.py``).

For each model (``--kinds``: cls = orientation classifier, rec = text recognizer, det = text
detector) and each MAC target (``--targets``, fractions of the original's MACs), two recipes run
side by side in the same process:

  - ``uniform``: magnitude pruning with one ``--ratio`` for every group (the ratio that reaches the
    target, found by bisection on ``graphprune.metrics.count_macs``), then today's fine-tuning
    (output distillation from the original, ``features="none"``);
  - ``budget``: ``prune --target-macs`` (per-group ratios from a sensitivity run on the calibration
    samples), ``--reconstruct`` (least-squares refit to the original's activations), then
    distillation with intermediate features matched to the original's;
  - ``recon`` (``--recipes``): the uniform ratio with ``--reconstruct`` and feature distillation (no
    sensitivity run: for models whose budget search does not fit the time at hand).

Each row gives the task metric on the held-out test split (line accuracy / accuracy / box F1, in
points) with no recovery, after reconstruction and after distillation; the MAC fraction; the
latency ratio original/pruned (CPU time, batch 1, 1 thread, the two models timed in turns); the
unlabelled samples used; and the wall time of the recovery (prune + reconstruct + fine-tune).

    PYTHONPATH=<pillow, opencv, pyclipper, shapely, six> .venv/bin/python tools/bench_real.py \
        [--kinds cls rec det] [--targets 0.6 0.4] [--samples 2000] [--epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_models  # noqa: E402

from graphprune.data import load_inputs  # noqa: E402
from graphprune.metrics import count_macs  # noqa: E402
from graphprune.passes.canonicalize import CanonicalizePass  # noqa: E402
from graphprune.passes.finetune import FineTunePass  # noqa: E402
from graphprune.passes.prune_channels import prune_channels  # noqa: E402
from graphprune.runtime import make_session  # noqa: E402

SHAPES = {"cls": (1, 3, 48, 192), "rec": (1, 3, 48, 320), "det": (1, 3) + real_models.DET_SHAPE}
CLI = [os.path.join(os.path.dirname(sys.executable), "graphprune")]


def _cli(*args: str) -> None:
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"graphprune {' '.join(args)}: {proc.stderr.strip().splitlines()[-1:]}")


def _uniform_ratio(model: onnx.ModelProto, shape, target: float) -> float:
    """The smallest uniform ratio whose pruned model keeps at most ``target`` of the MACs (bisection)."""
    base = count_macs(model, {"x": shape})
    low, high = 0.0, 0.9
    for _ in range(6):
        mid = (low + high) / 2
        frac = count_macs(prune_channels(model, ratio=mid), {"x": shape}) / base
        low, high = (mid, high) if frac > target else (low, mid)
    return high


def _latency_ratio(original: str, pruned: str, shape, rounds: int = 15, runs: int = 5, canonical: bool = True,
                   fuse_pruned: bool = True) -> float:
    """Median over rounds of CPU time original / pruned, batch 1, one thread, timed in turns.

    ``canonical``: both models canonicalized first (HardSwish fused, opset raised: ~1.5x on the
    classifier by itself), so the ratio is what pruning adds, not the fusion a user gets unpruned
    too; ``fuse_pruned=False`` fuses only the original (the pruned model timed as it is: with
    ``pruned == original``, the fusion's own speed-up)."""
    fuse = [canonical, canonical and fuse_pruned]
    sessions = [make_session(CanonicalizePass()(onnx.load(p)).model if f else onnx.load(p), threads=1)
                for p, f in zip((original, pruned), fuse)]
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for s in sessions:
        s.run(None, feed)
    ratios = []
    for _ in range(rounds):
        cpu = []
        for s in sessions:
            start = time.process_time()
            for _ in range(runs):
                s.run(None, feed)
            cpu.append(time.process_time() - start)
        ratios.append(cpu[0] / max(cpu[1], 1e-9))
    return float(np.median(ratios))


def _fusion_speedup(original: str, shape) -> float:
    """CPU time of ``original`` as exported / canonicalized (HardSwish fused), timed in turns."""
    return 1.0 / _latency_ratio(original, original, shape, fuse_pruned=False)


def _finetune(model_path: str, teacher: onnx.ModelProto, data, features: str, args, batchnorm: str = "recalibrate",
              epochs: int = 0) -> tuple:
    """Distil ``model_path`` from ``teacher``.  After ``--reconstruct`` the BatchNorm statistics are kept:
    the refit layers were fit to the original's activations, and statistics re-estimated from a few
    thousand rendered lines move even the unpruned classifier (98.4% -> 81.2%)."""
    model = onnx.load(model_path)
    start, cpu = time.perf_counter(), time.process_time()  # CPU: this process's threads (ORT's included)
    result = FineTunePass(data=data, teacher=teacher, epochs=epochs or args.epochs, lr=args.lr, batch_size=args.batch_size,
                          features=features, patience=args.patience, threads=args.threads, batchnorm=batchnorm)(model)
    seconds = time.perf_counter() - start
    result.stats["cpu_seconds"] = time.process_time() - cpu
    out = model_path.replace(".onnx", f"_ft_{features}.onnx")
    onnx.save(result.model, out)
    return out, seconds, result.stats


def bench_kind(kind: str, args, work: str) -> List[Dict]:
    paths = real_models.models()
    original_path = paths[kind]
    original = onnx.load(original_path)
    shape = SHAPES[kind]
    train_npz, _ = real_models.data(kind, "train")
    data, _ = load_inputs(train_npz, original, [])
    data = data.subset(np.arange(min(args.samples, len(data))))
    calib = os.path.join(work, f"{kind}_calib.npz")
    np.savez(calib, x=data.arrays["x"][: args.calib])
    base_macs = count_macs(original, {"x": shape})
    metric = lambda p: real_models.evaluate(kind, p) * 100  # noqa: E731
    rows = [{"model": kind, "recipe": "original", "metric": metric(original_path),
             "fusion_speedup": _fusion_speedup(original_path, shape)}]
    print(rows[0], flush=True)
    for target in args.targets:
        tag = f"{kind}_{int(target * 100)}"
        # uniform magnitude pruning + today's fine-tuning (output distillation only)
        start = time.perf_counter()
        ratio = _uniform_ratio(original, shape, target)
        search_s = time.perf_counter() - start
        if "budget" in args.recipes or "recon" in args.recipes:
            rows.append(_recovered(kind, tag, target, ratio, original_path, original, data, calib, shape, base_macs,
                                   metric, work, args, budget="budget" in args.recipes))
            print(rows[-1], flush=True)
        if "uniform" not in args.recipes:
            continue
        start = time.perf_counter() - search_s
        uni = os.path.join(work, f"{tag}_uniform.onnx")
        _cli("prune", original_path, "-o", uni, "--ratio", f"{ratio:.4f}", "--input-shape", "x=" + "x".join(map(str, shape)))
        prune_s = time.perf_counter() - start
        ft, ft_s, stats = _finetune(uni, original, data, "none", args, epochs=_epochs(args, target))
        rows.append({"model": kind, "recipe": f"uniform --ratio {ratio:.3f} + output distillation", "target": target,
                     "macs": count_macs(onnx.load(uni), {"x": shape}) / base_macs, "no_recovery": metric(uni),
                     "reconstructed": None, "distilled": metric(ft), "latency_speedup": _latency_ratio(original_path, uni, shape),
                     "samples": len(data), "epochs_run": len(stats.get("history", [])) - 1,
                     "seconds": prune_s + ft_s, "prune_seconds": prune_s, "finetune_seconds": ft_s,
                     "finetune_cpu_seconds": stats.get("cpu_seconds")})
        print(rows[-1], flush=True)
    return rows


def _recovered(kind, tag, target, ratio, original_path, original, data, calib, shape, base_macs, metric, work,
               args, budget: bool) -> Dict:
    """Budget (or uniform) pruning, reconstruction, feature distillation: one row."""
    start = time.perf_counter()
    pruned, ratios = os.path.join(work, f"{tag}_pruned.onnx"), os.path.join(work, f"{tag}_ratios.json")
    common = ["--data", calib, "--input-shape", "x=" + "x".join(map(str, shape))]
    # channel counts at multiples of --round-to (ONNX Runtime's blocked-layout kernels), --blocks first
    shaping = ["--round-to", str(args.round_to)] + (["--blocks", str(args.blocks)] if budget and args.blocks else [])
    reused = os.path.join(args.reuse_ratios or "", f"{tag}_ratios.json")
    if budget and args.reuse_ratios and os.path.exists(reused):  # a budget search of an earlier run
        how = ["--group-ratios", reused, *shaping]
        _cli("prune", original_path, "-o", pruned, *how, *common)
    elif budget:
        search = ["--budget-ratios", args.budget_ratios] if args.budget_ratios else []
        _cli("prune", original_path, "-o", pruned, "--target-macs", str(target), "--save-ratios", ratios, *shaping,
             *search, *common)
        how = ["--group-ratios", ratios, *shaping]
    else:
        how = ["--ratio", f"{ratio:.4f}"]
        _cli("prune", original_path, "-o", pruned, *how, *common)
    rec = os.path.join(work, f"{tag}_rec.onnx")
    _cli("prune", original_path, "-o", rec, *how, "--reconstruct", *common)
    prune_s = time.perf_counter() - start
    ft, ft_s, stats = _finetune(rec, original, data, "auto", args, batchnorm="keep", epochs=_epochs(args, target))
    recipe = ("--target-macs" if budget else f"uniform --ratio {ratio:.3f}") + " + --reconstruct + feature distillation"
    if budget:  # the options that shaped the plan (defaults left out)
        recipe += "".join(f" {flag} {value}" for flag, value, default in (("--round-to", args.round_to, 1),
                                                                          ("--blocks", args.blocks, 0)) if value != default)
    return {"model": kind, "recipe": recipe, "target": target, "macs": count_macs(onnx.load(rec), {"x": shape}) / base_macs,
            "no_recovery": metric(pruned), "reconstructed": metric(rec), "distilled": metric(ft),
            "latency_speedup": _latency_ratio(original_path, rec, shape), "samples": len(data),
            "epochs_run": len(stats.get("history", [])) - 1, "features": stats.get("features"),
            "finetune_cpu_seconds": stats.get("cpu_seconds"), "val_loss": [h.get("val_loss") for h in stats.get("history", [])],
            "seconds": prune_s + ft_s, "prune_seconds": prune_s, "finetune_seconds": ft_s,
            "ratios_reused": bool(budget and args.reuse_ratios and os.path.exists(reused))}


def _epochs(args, target: float) -> int:
    """Fine-tuning epochs at ``target``: ``--epochs-at T=N`` where given, else ``--epochs``."""
    for spec in args.epochs_at:
        at, epochs = spec.split("=")
        if abs(float(at) - target) < 1e-9:
            return int(epochs)
    return args.epochs


def markdown(rows: List[Dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| model | recipe | MACs | no recovery | reconstructed | distilled | speedup | samples | epochs | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["recipe"] == "original":
            lines.append(f"| {r['model']} | original | 100% | {fmt(r['metric'])} | | | 1.00x "
                         f"(fused: {r['fusion_speedup']:.2f}x) | | | |")
            continue
        lines.append(f"| {r['model']} | {r['recipe']} | {r['macs'] * 100:.1f}% | {fmt(r['no_recovery'])} | "
                     f"{fmt(r['reconstructed'])} | {fmt(r['distilled'])} | {r['latency_speedup']:.2f}x | {r['samples']} | "
                     f"{r['epochs_run']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="*", default=["cls", "rec", "det"])
    parser.add_argument("--targets", nargs="*", type=float, default=[0.6, 0.4])
    parser.add_argument("--samples", type=int, default=2000, help="unlabelled training samples (at most the split)")
    parser.add_argument("--calib", type=int, default=128, help="of which calibration samples for the budget and reconstruction")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--epochs-at", nargs="*", default=["0.4=6"], metavar="T=N",
                        help="epochs at a target (default 0.4=6: at 40%% of the MACs 4 epochs stop short, 94.6%% vs 95.8%%)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", nargs="*", default=["uniform", "budget"], choices=["uniform", "budget", "recon"])
    parser.add_argument("--round-to", type=int, default=1, help="budget recipe: kept channel counts at multiples of N")
    parser.add_argument("--blocks", type=int, default=0, help="budget recipe: remove the K least important residual "
                        "blocks first (prune --blocks K with the budget)")
    parser.add_argument("--budget-ratios", help="budget recipe: the ratios each group is measured at (R,R,...)")
    parser.add_argument("--reuse-ratios", metavar="DIR", help="apply the per-group ratios an earlier run saved "
                        "(<model>_<target%%>_ratios.json) instead of searching the budget again")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--work", metavar="DIR", help="keep the models and ratios files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_real_") as scratch:
        work = args.work or scratch
        os.makedirs(work, exist_ok=True)
        for kind in args.kinds:
            rows.extend(bench_kind(kind, args, work))
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
