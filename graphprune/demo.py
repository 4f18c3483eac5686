"""The end-to-end demo on the embedded digits CNN: prune -> fine-tune -> int8 QDQ, measured after each stage.

Stages (each on the previous stage's model):
  1. prune 50% of the channels of every prunable group (L1 filter norms), printed *before* any
     training to show what pruning alone costs;
  2. fine-tune with labels and distillation from the original (graphprune's gradient graphs on plain onnxruntime, no torch);
  3. int8 QDQ quantization calibrated on training samples.
With ``steps`` K > 1, stages 1-2 repeat K times with a per-round ratio composing to the target.
Every row reports held-out accuracy (``models/digits_test.npz``, never trained on), parameters, MACs,
serialized size and median single-image latency.  Stages whose pass is not available are skipped
with a note, so the demo runs with whatever the checkout holds.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, List, Optional

import onnx

from graphprune.data import load_inputs
from graphprune.ir import count_params
from graphprune.metrics import count_macs
from graphprune.model_io import load, save
from graphprune.passes.base import registered_passes
from graphprune.runtime import make_session, measure_latency, run_samples
from graphprune.validate import accuracy

__all__ = ["run_demo", "DemoReport", "StageResult", "format_stages", "MODELS_DIR", "TARGETS"]

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")

# The targets: final accuracy within 1 point of the original, MACs <= 30%, under 60 s.
TARGETS = {"accuracy_drop_points": 1.0, "macs_fraction": 0.30, "seconds": 60.0}

# Fine-tuning settings of the demo: enough epochs to recover a 50% prune of this small CNN.
FINETUNE_SETTINGS = {"epochs": 15, "lr": 5e-3, "batch_size": 32, "distill_weight": 0.5, "temperature": 2.0}


@dataclasses.dataclass
class StageResult:
    stage: str
    accuracy: float
    params: int
    macs: int
    size_bytes: int
    latency_ms: float
    seconds: float


@dataclasses.dataclass
class DemoReport:
    """Every stage's measurements, the stages skipped (with why), and the total wall time."""

    stages: List[StageResult]
    skipped: List[str]
    seconds: float

    @property
    def original(self) -> StageResult:
        return self.stages[0]

    @property
    def final(self) -> StageResult:
        return self.stages[-1]

    def targets(self) -> List[tuple]:
        """(description, measured text, met?) for each target."""
        drop = (self.original.accuracy - self.final.accuracy) * 100
        fraction = self.final.macs / self.original.macs
        return [
            (f"accuracy within {TARGETS['accuracy_drop_points']:g} pt of the original",
             f"{self.final.accuracy * 100:.2f}% vs {self.original.accuracy * 100:.2f}% ({-drop:+.2f} pt)",
             drop <= TARGETS["accuracy_drop_points"]),
            (f"MACs <= {TARGETS['macs_fraction'] * 100:g}% of the original", f"{fraction * 100:.1f}%",
             fraction <= TARGETS["macs_fraction"]),
            (f"whole demo < {TARGETS['seconds']:g} s", f"{self.seconds:.1f} s", self.seconds < TARGETS["seconds"]),
        ]


def _measure(stage: str, model: onnx.ModelProto, test, labels, threads: int, seconds: float, runs: int) -> StageResult:
    session = make_session(model, threads=threads)
    scores = run_samples(session, test)["logits"]
    return StageResult(
        stage=stage,
        accuracy=accuracy(scores, labels),
        params=count_params(model),
        macs=count_macs(model, {"images": (1, 1, 8, 8)}),
        size_bytes=model.ByteSize(),
        latency_ms=measure_latency(session, test.first_batch(1), warmup=20, runs=runs) * 1e3,
        seconds=seconds,
    )


def format_stages(results: List[StageResult]) -> str:
    base = results[0]
    lines = [f"{'stage':<32} {'accuracy':>9} {'params':>8} {'MACs':>9} {'MACs %':>7} {'size':>9} {'latency':>10} {'time':>6}"]
    for r in results:
        lines.append(
            f"{r.stage:<32} {r.accuracy * 100:>8.2f}% {r.params:>8,} {r.macs:>9,} {r.macs / base.macs * 100:>6.1f}% "
            f"{r.size_bytes / 1024:>7.1f}KB {r.latency_ms * 1e3:>7.1f} us {r.seconds:>5.1f}s"
        )
    return "\n".join(lines)


def _stages(original: onnx.ModelProto, train, train_labels, ratio: float, steps: int):
    """[(row name, model -> model)] for the passes this checkout has; and the skipped stages."""
    from graphprune.recipes import build_pass
    from graphprune.training.gradual import round_ratios

    available = registered_passes()
    stages, skipped = [], []
    finetune_args = dict(FINETUNE_SETTINGS, labels=train_labels, teacher=original)
    rounds = round_ratios(ratio, steps)
    for index, per_round in enumerate(rounds):
        tag = f" {index + 1}/{steps}" if steps > 1 else ""
        if "prune" in available:
            prune = build_pass("prune", {"ratio": per_round, "criterion": "l1"})
            stages.append((f"pruned {per_round * 100:.0f}%{tag} (no fine-tune)", lambda m, p=prune: p(m).model))
        elif index == 0:
            skipped.append("prune: the prune pass is not in this checkout")
        finetune = build_pass("finetune", finetune_args, context={"data": train})
        stages.append((f"fine-tuned{tag} (labels+distill)", lambda m, p=finetune: p(m).model))
    if "quantize" in available:
        # measure=False: at 10 us per image int8 kernels do not beat float, and the quantize pass would
        # then keep the model float; the demo shows the int8 model (size, accuracy) regardless.
        quantize = build_pass("quantize", {"measure": False, "calibration_samples": 128}, context={"data": train})
        stages.append(("int8 QDQ", lambda m, p=quantize: p(m).model))
    else:
        skipped.append("quantize: the quantize pass is not in this checkout")
    return stages, skipped


def run_demo(
    output_dir: Optional[str] = None,
    threads: int = 1,
    ratio: float = 0.5,
    steps: int = 1,
    latency_runs: int = 200,
    echo: Callable[[str], None] = print,
) -> DemoReport:
    """Run the pipeline on the digits CNN, print the table and the targets; returns the measurements.

    Args:
        output_dir: also write each stage's model there.
        threads: intra-op threads for latency (training uses what onnxruntime picks).
        ratio: fraction of channels to prune in total.
        steps: prune in this many rounds, fine-tuning after each.
        latency_runs: timed single-image runs per stage (after 20 warm-up runs).
    """
    start = time.perf_counter()
    original = load(os.path.join(MODELS_DIR, "digits_cnn.onnx"))
    test, test_extra = load_inputs(os.path.join(MODELS_DIR, "digits_test.npz"), original, extra_keys=["labels"])
    train, train_extra = load_inputs(os.path.join(MODELS_DIR, "digits_train.npz"), original, extra_keys=["labels"])
    labels = test_extra["labels"]
    echo(f"digits CNN: {len(train_extra['labels'])} training / {len(labels)} held-out images; "
         f"latency: median of {latency_runs} single-image runs, {threads} thread(s)")

    stages, skipped = _stages(original, train, train_extra["labels"], ratio, steps)
    for note in skipped:
        echo(f"skipped {note}")
    results = [_measure("original", original, test, labels, threads, 0.0, latency_runs)]
    model = original
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    for index, (name, apply) in enumerate(stages):
        began = time.perf_counter()
        model = apply(model)
        results.append(_measure(name, model, test, labels, threads, time.perf_counter() - began, latency_runs))
        if output_dir:
            save(model, os.path.join(output_dir, f"digits_{index + 1}_{_slug(name)}.onnx"))
    report = DemoReport(results, skipped, time.perf_counter() - start)
    echo(format_stages(results))
    for description, measured, met in report.targets():
        echo(f"target {description}: {measured} [{'met' if met else 'MISSED'}]")
    return report


def _slug(name: str) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in name.split(" (")[0])
    return "_".join(part for part in keep.split("_") if part)
