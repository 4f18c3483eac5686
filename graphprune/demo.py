"""The end-to-end demo on the embedded digits CNN: each stage's held-out accuracy, params, MACs, size, latency."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, List, Optional

import numpy as np
import onnx

from graphprune.data import load_inputs
from graphprune.metrics import count_macs
from graphprune.ir import count_params
from graphprune.model_io import load, save
from graphprune.passes import CanonicalizePass
from graphprune.runtime import make_session, measure_latency, run_samples
from graphprune.validate import accuracy

__all__ = ["run_demo", "StageResult", "MODELS_DIR"]

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


@dataclasses.dataclass
class StageResult:
    stage: str
    accuracy: float
    params: int
    macs: int
    size_bytes: int
    latency_ms: float
    seconds: float


def _measure(stage: str, model: onnx.ModelProto, test, labels, threads: int, seconds: float) -> StageResult:
    session = make_session(model, threads=threads)
    scores = run_samples(session, test)["logits"]
    return StageResult(
        stage=stage,
        accuracy=accuracy(scores, labels),
        params=count_params(model),
        macs=count_macs(model, {"images": (1, 1, 8, 8)}),
        size_bytes=model.ByteSize(),
        latency_ms=measure_latency(session, test.first_batch(1), warmup=20, runs=200) * 1e3,
        seconds=seconds,
    )


def format_stages(results: List[StageResult]) -> str:
    base = results[0]
    lines = [f"{'stage':<22} {'accuracy':>9} {'params':>8} {'MACs':>9} {'MACs %':>7} {'size':>9} {'latency':>10} {'time':>6}"]
    for r in results:
        lines.append(
            f"{r.stage:<22} {r.accuracy * 100:>8.2f}% {r.params:>8,} {r.macs:>9,} {r.macs / base.macs * 100:>6.1f}% "
            f"{r.size_bytes / 1024:>7.1f}KB {r.latency_ms * 1e3:>7.1f} us {r.seconds:>5.1f}s"
        )
    return "\n".join(lines)


def run_demo(output_dir: Optional[str] = None, threads: int = 1, echo: Callable[[str], None] = print) -> List[StageResult]:
    """Run every stage that exists on the digits CNN and print the table; returns the measurements.

    Stages run in pipeline order, each on the previous stage's model; accuracy is on the held-out
    split (``models/digits_test.npz``), latency is the median of 200 single-image runs.
    """
    original = load(os.path.join(MODELS_DIR, "digits_cnn.onnx"))
    test, extras = load_inputs(os.path.join(MODELS_DIR, "digits_test.npz"), original, extra_keys=["labels"])
    labels = extras["labels"]
    echo(f"digits CNN: {len(labels)} held-out images, {threads} thread(s) for latency")

    stages = [("canonicalize", lambda m: CanonicalizePass()(m).model)]
    results = [_measure("original", original, test, labels, threads, 0.0)]
    model = original
    for name, apply in stages:
        start = time.perf_counter()
        model = apply(model)
        elapsed = time.perf_counter() - start
        results.append(_measure(name, model, test, labels, threads, elapsed))
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            save(model, os.path.join(output_dir, f"digits_{name}.onnx"))
    echo(format_stages(results))
    return results
