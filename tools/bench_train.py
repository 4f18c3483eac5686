"""Benchmark: time per fine-tuning step (forward + backward + AdamW) — graphprune's gradient graphs
on the newest onnxruntime against torch eager and onnxruntime-training 1.19.2.

    .venv/bin/python tools/bench_train.py [--models digits resnet18 bert] [--threads 1 2] [--rounds 9]
        [--round-seconds 1.5] [--round-steps 100] [--max-rounds 60] [--ours-without-rewrites] [--profile]
        [--json out.json]

Models (each with a cross-entropy loss on its logits, added by ``losses.add_loss_graph``):
  - ``digits``: the digits CNN (``models/digits_cnn.onnx``, 8x8 images, 10 classes), batch 32;
  - ``resnet18``: ResNet-18 (``graphprune.testing.resnet(depth=18)``: 64-128-256-512 channels, 1000
    classes) on 64x64 images, batch 32;
  - ``bert``: the BERT-style encoder of ``graphprune.testing.bert_encoder`` at BERT-mini size (4 layers,
    hidden 256, 4 heads, FFN 1024, vocab 30522), sequence 128, batch 8, CE on its 2-class classifier.
Trained weights are the ones fine-tuning trains (``training.trainable.find_trainable``: Conv/Gemm/
MatMul weights and biases, normalization scale/bias; BatchNorm statistics and embeddings frozen, so
BatchNorm runs in its inference form in all three).

Columns:
  - ours: ``autodiff.build_training_step`` + ``StepSession`` (one InferenceSession run per step;
    ``--ours-without-rewrites`` leaves out the step's forward rewrites: ``gather_pushdown``, which
    runs BERT's last layer for the pooled position only, and ``linear_gemm``);
  - torch: the same architecture written as a torch module here, the ONNX weights loaded by name,
    ``F.cross_entropy``, ``torch.optim.AdamW`` (its default, single-tensor implementation on CPU);
  - ORT-training: onnxruntime-training-cpu 1.19.2 (``generate_artifacts`` with the loss already the
    first output, ``api.Module`` / ``api.Optimizer``), the way graphprune used it before: BatchNorm in
    its frozen-statistics form and LayerNormalization with the mean / inv-std outputs its gradient needs.
    It runs in a side virtualenv this script builds on first use with python3.11 (in
    ``~/.cache/graphprune-bench/ortt``); it is never a dependency of graphprune.
All use AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01) and the same fixed batch.

Each framework runs in its own long-lived worker process per model and thread count, driven over
stdin/stdout: a worker builds its session and takes warm-up steps, then the rounds alternate
ours / torch / ORT-training (order rotated each round) so that machine load hits all three alike.  A
round runs about ``--round-seconds`` of steps, at most ``--round-steps``: a model with
millisecond steps (digits) gets short rounds and more of them (as many as give every framework
``--rounds`` x ``--round-seconds`` of timed steps, at most ``--max-rounds``), so load that drifts
within a round-trip hits its three columns alike.  The table shows the median over rounds of the
per-step wall-clock time and of the per-step process CPU time (all threads of the worker); the ratio
columns are the median over rounds of the round's own ratio (each round's three timings are seconds
apart, so a change of load between rounds cancels out).  Peak memory is the growth of the worker's
peak RSS (``ru_maxrss``) over its RSS after imports.  The first step's loss of each column is
printed as a check that the three train the same function.

The parts live in ``tools/train_bench/``: ``models`` (forward + loss graph, the batch), ``twins``
(the torch modules), ``ortt`` (the side venv and the ORT-training step), ``workers`` (the worker
processes and their channel), ``report`` (profiles, the table).

``--profile`` adds onnxruntime's per-op profile of one ours step model and one ORT-training step
(kernel time by op type, and for ours by the gradient rule that emitted the nodes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile

from train_bench.models import FRAMEWORKS, MODELS, TITLES, prepare
from train_bench.ortt import SIDE_VENV, ensure_side_venv, merged_profile
from train_bench.report import machine, markdown, profile_text
from train_bench.workers import Worker, worker_main


def _rounds(workers: dict, args) -> tuple:
    """Steps per round for each framework and the number of rounds (see the module docstring)."""
    probes = {kind: worker.ask(cmd="run", steps=1)["wall"][0] for kind, worker in workers.items()}
    steps = {kind: max(1, min(args.round_steps, round(args.round_seconds / max(probe, 1e-4))))
             for kind, probe in probes.items()}
    round_seconds = max(steps[kind] * probes[kind] for kind in workers) if workers else args.round_seconds
    wanted = math.ceil(args.rounds * args.round_seconds / max(round_seconds, 1e-3))
    return steps, max(args.rounds, min(args.max_rounds, wanted))


def measure(name: str, threads: int, args, side_python: str) -> dict:
    """One row: the three frameworks on ``name`` at ``threads``, interleaved rounds."""
    workdir = tempfile.mkdtemp(prefix=f"bench-train-{name}-")
    meta = prepare(name, workdir)
    if args.ours_without_rewrites:
        meta["ours_without_rewrites"] = True
        with open(os.path.join(workdir, "meta.json"), "w") as f:
            json.dump(meta, f)
    row = {"model": name, "title": MODELS[name]["title"], "threads": threads, "batch": meta["batch"],
           "trainable_params": meta["trainable_params"], "frameworks": {}}
    pythons = {"ours": sys.executable, "torch": sys.executable, "ortt": side_python}
    workers = {}
    for kind in args.frameworks:
        try:
            workers[kind] = Worker(kind, pythons[kind], workdir, threads)
            row["frameworks"][kind] = {"setup_s": workers[kind].ready["setup_s"],
                                       "first_loss": workers[kind].ready["first_loss"], "rounds": []}
        except RuntimeError as exc:
            row["frameworks"][kind] = {"error": str(exc)}
            print(f"{row['title']}: {TITLES[kind]} fails: {exc}", file=sys.stderr)
    steps, rounds = _rounds(workers, args)
    row["rounds"] = rounds
    for r in range(rounds):
        order = list(workers)
        order = order[r % len(order):] + order[: r % len(order)]
        for kind in order:
            reply = workers[kind].ask(cmd="run", steps=steps[kind])
            row["frameworks"][kind]["rounds"].append(
                {"wall": sum(reply["wall"]) / len(reply["wall"]), "cpu": sum(reply["cpu"]) / len(reply["cpu"]),
                 "steps": len(reply["wall"])})
    for kind, worker in workers.items():
        stats = row["frameworks"][kind]
        memory = worker.ask(cmd="memory")
        stats["peak_rss_growth_mb"] = max(0, memory["peak"] - memory["baseline"]) / 2**20
        stats["steady_rss_growth_mb"] = max(0, memory["now"] - memory["baseline"]) / 2**20
        stats["wall_ms"] = 1000 * statistics.median(x["wall"] for x in stats["rounds"])
        stats["cpu_ms"] = 1000 * statistics.median(x["cpu"] for x in stats["rounds"])
        if args.profile and kind == "ours":
            stats["profile"] = worker.ask(cmd="profile", steps=5)
        worker.close()
    if args.profile and "ortt" in workers:
        prefix = os.path.join(workdir, "ortt-prof")
        worker = Worker("ortt", side_python, workdir, threads, profile_prefix=prefix)
        worker.ask(cmd="run", steps=3)
        worker.close()
        row["frameworks"]["ortt"]["profile"] = merged_profile(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    _ratios(row)
    return row


def _ratios(row: dict) -> None:
    """Ours over each other column: the median of the per-round ratios, and the ratio of the medians."""
    fw = row["frameworks"]
    for other in ("ortt", "torch"):
        if "wall_ms" not in fw.get("ours", {}) or "wall_ms" not in fw.get(other, {}):
            continue
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            paired = [a[clock] / b[clock] for a, b in zip(fw["ours"]["rounds"], fw[other]["rounds"])]
            row[f"ours_over_{other}{suffix}"] = statistics.median(paired)
            row[f"ours_over_{other}{suffix}_of_medians"] = fw["ours"][f"{clock}_ms"] / fw[other][f"{clock}_ms"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--rounds", type=int, default=9, help="rounds at least (more for millisecond steps)")
    parser.add_argument("--round-seconds", type=float, default=1.5, help="steps per round: about this long")
    parser.add_argument("--round-steps", type=int, default=100, help="steps per round at most")
    parser.add_argument("--max-rounds", type=int, default=60)
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=list(FRAMEWORKS))
    parser.add_argument("--side-venv", default=SIDE_VENV)
    parser.add_argument("--side-python", default="python3.11", help="python that builds the side venv")
    parser.add_argument("--profile", action="store_true", help="per-op profiles of ours and ORT-training")
    parser.add_argument("--ours-without-rewrites", action="store_true",
                        help="ours without the step's forward rewrites (gather_pushdown, linear_gemm): for A/B")
    parser.add_argument("--json")
    parser.add_argument("--worker", choices=list(FRAMEWORKS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-profile", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.workdir, args.worker_threads, args.worker_profile)
        return 0
    side_python = ensure_side_venv(args.side_venv, args.side_python) if "ortt" in args.frameworks else ""
    rows = []
    for name in args.models:
        for threads in args.threads:
            row = measure(name, threads, args, side_python)
            rows.append(row)
            losses = ", ".join(f"{TITLES[k]} {stats['first_loss']:.6g}" for k, stats in row["frameworks"].items()
                               if "first_loss" in stats)
            print(f"{row['title']} at {threads} thread(s), {row['rounds']} rounds: first-step loss {losses}",
                  file=sys.stderr)
    info = machine()
    print(f"\n{info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}, torch {info['torch']}; "
          f"{info['date']}; medians over interleaved rounds (ratios: median of the per-round ratios)\n")
    print(markdown(rows))
    if args.profile:
        print(profile_text(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
