"""Benchmark: what fine-tuning recovers after pruning the digits CNN, and training speed on real models.

Part 1 prunes half of the digits CNN's channels (the ``prune`` pass, L1 filter norms) and fine-tunes
the pruned model with each kind of supervision (the demo's settings: 15 epochs, lr 5e-3, batch 32,
cosine schedule, AdamW); accuracy is on the held-out split (``models/digits_test.npz``), agreement is
top-1 agreement with the unpruned original on the same images.  Part 2 times fine-tuning on plain
onnxruntime (graphprune's gradient graphs) on onnx's bundled architectures (``graphprune.testing.zoo``;
seeded weights, 8 random 224x224 images, batch 1 as their inputs fix it, distillation from the model
itself): building the training-step model and its session, and training steps per second.

    .venv/bin/python tools/bench_finetune.py [--zoo squeezenet resnet50 ...] [--json out.json]

Prints Markdown tables (docs/benchmarks.md's) and, with ``--json``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

from graphprune.data import load_inputs, random_inputs
from graphprune.metrics import count_macs
from graphprune.model_io import load
from graphprune.passes import FineTunePass
from graphprune.runtime import make_session, run_samples
from graphprune.training.gradual import gradual_prune_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
SETTINGS = {"epochs": 15, "lr": 5e-3, "batch_size": 32}


def _digits():
    model = load(os.path.join(MODELS, "digits_cnn.onnx"))
    train, train_extra = load_inputs(os.path.join(MODELS, "digits_train.npz"), model, ["labels"])
    test, test_extra = load_inputs(os.path.join(MODELS, "digits_test.npz"), model, ["labels"])
    return model, train, train_extra["labels"], test, test_extra["labels"]


def recovery_rows() -> List[Dict]:
    from graphprune.passes.prune_channels import prune_channels

    model, train, labels, test, test_labels = _digits()
    reference = run_samples(make_session(model), test)["logits"].argmax(1)
    shapes = {"images": (1, 1, 8, 8)}
    base_macs = count_macs(model, shapes)

    def row(name, candidate, seconds=None, steps=None):
        top = run_samples(make_session(candidate), test)["logits"].argmax(1)
        return {"setting": name, "accuracy": float(np.mean(top == test_labels)),
                "agreement": float(np.mean(top == reference)),
                "macs_fraction": count_macs(candidate, shapes) / base_macs, "seconds": seconds, "steps": steps}

    pruned = prune_channels(model, ratio=0.5, criterion="l1")
    rows = [row("original", model), row("pruned 50%, no fine-tuning", pruned)]
    variants = [
        ("BatchNorm statistics re-estimated only (0 epochs)", {"labels": labels, "epochs": 0}),
        ("labels (cross-entropy)", {"labels": labels}),
        ("distillation only, no labels (KL, T=2)", {"teacher": model}),
        ("labels + distillation (0.5 / 0.5)", {"labels": labels, "teacher": model}),
        ("labels + distillation, BatchNorm statistics kept", {"labels": labels, "teacher": model, "batchnorm": "keep"}),
    ]
    for name, extra in variants:
        kwargs = {**SETTINGS, **extra}
        start = time.perf_counter()
        result = FineTunePass(data=train, **kwargs)(pruned)
        rows.append(row(name, result.model, time.perf_counter() - start, result.stats.get("steps")))
    start = time.perf_counter()
    gradual = gradual_prune_pipeline(0.5, 2, data=train, prune_args={"criterion": "l1"},
                                     finetune_args={**SETTINGS, "epochs": 10, "labels": labels, "teacher": model})(model)
    steps = sum(r["stats"].get("steps", 0) for r in gradual.stats["passes"])
    rows.append(row("gradual: 2 x (prune 29.3% + 10 epochs labels + distillation)", gradual.model,
                    time.perf_counter() - start, steps))
    return rows


def zoo_rows(names: List[str]) -> List[Dict]:
    from graphprune.testing.zoo import load_light_model

    rows = []
    for name in names:
        model = load_light_model(name)
        data = random_inputs(model, None, samples=8, seed=0)
        start = time.perf_counter()
        result = FineTunePass(data=data, teacher=model, epochs=1, val_split=0, batchnorm="keep")(model)
        total = time.perf_counter() - start
        loop = result.stats["history"][-1]["seconds"]
        rows.append({"model": name, "trainable_params": result.stats["trainable_params"],
                     "ops": len({n.op_type for n in model.graph.node}), "setup_seconds": total - loop,
                     "steps": result.stats["steps"], "steps_per_second": result.stats["steps"] / loop})
    return rows


def _markdown_recovery(rows: List[Dict]) -> str:
    lines = ["| setting | held-out accuracy | agreement with original | MACs | fine-tune time | steps |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f} s"
        lines.append(f"| {r['setting']} | {r['accuracy'] * 100:.2f}% | {r['agreement'] * 100:.2f}% | "
                     f"{r['macs_fraction'] * 100:.1f}% | {seconds} | {r['steps'] or ''} |")
    return "\n".join(lines)


def _markdown_zoo(rows: List[Dict]) -> str:
    lines = ["| model | trainable params | op types | step model + session | training speed (batch 1) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['trainable_params'] / 1e6:.2f}M | {r['ops']} | "
                     f"{r['setup_seconds']:.1f} s | {r['steps_per_second']:.2f} steps/s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", nargs="*", default=["squeezenet", "shufflenet", "inception_v1", "resnet50"],
                        help="bundled architectures to time training on (none: skip part 2)")
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    recovery = recovery_rows()
    print(_markdown_recovery(recovery))
    zoo = zoo_rows(args.zoo) if args.zoo else []
    if zoo:
        print()
        print(_markdown_zoo(zoo))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"recovery": recovery, "zoo": zoo}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
