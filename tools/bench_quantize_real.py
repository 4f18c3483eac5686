"""Benchmark: static int8 quantization of the PP-OCRv3 models (trained, real data): accuracy, size, CPU time.

Developer-only (needs ``tools/real_models.py``'s cached models and rendered data):

    .venv/bin/python tools/bench_quantize_real.py [--kinds rec det cls] [--rounds 15] [--out /tmp/q-real]

The detector's box F1 runs rapidocr's ``DBPostProcess``, which imports shapely, pyclipper, cv2 and
six: not dependencies of graphprune, e.g. ``pip install --target DIR shapely pyclipper`` and
``pip install --no-deps --target DIR opencv-python-headless six``, then ``PYTHONPATH=DIR``.

For each model, these files side by side:

- ``float``: the Paddle export as cached (opset 11/12, hard-swish written out as Add/Clip/Div/Mul);
- ``float canonicalized``: ``CanonicalizePass`` (constants folded, the hard-swish patterns fused into
  ``HardSwish``, opset 14), the float model a user gets from ``graphprune run ... canonicalize``;
- ``ours``: ``graphprune quantize float -o OUT --data TRAIN`` (what the README's quick start runs);
- ``ours on canonicalized``: the same command on the canonicalized model (HardSwish reaches the
  placement rules as one op);
- ``quantize_static``: ORT's ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel int8
  weights, uint8 activations, MinMax) on the same first 64 training samples ours calibrates on.

Reports the task metric on the test split (``real_models.score``), the file size and the CPU time
per run at batch 1 on 1 intra-op thread (thread time; median of ``--rounds`` interleaved rounds,
the order reversed every other round) with the speedup against ``float``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_models  # noqa: E402  (developer tools beside this one)
from bench_fallback import _session  # noqa: E402
from bench_quantize import ort_quantize_static  # noqa: E402

CALIBRATION_SAMPLES = 64  # quantize's default --calibration-samples


def build(kind: str, out: str) -> dict:
    """{label: path} of the five models of ``kind`` (module docstring), built into ``out``."""
    import onnx

    from graphprune.cli import main as cli
    from graphprune.data import InputSet
    from graphprune.model_io import load, save
    from graphprune.passes.canonicalize import CanonicalizePass

    original = real_models.models()[kind]
    train, _ = real_models.data(kind, "train")
    x = np.load(train)["x"]
    shape = "x=1x" + "x".join(str(d) for d in x.shape[1:])
    files = {"float": original, "float canonicalized": os.path.join(out, f"{kind}_canonical.onnx"),
             "ours": os.path.join(out, f"{kind}_ours.onnx"),
             "ours on canonicalized": os.path.join(out, f"{kind}_ours_canonical.onnx"),
             "quantize_static": os.path.join(out, f"{kind}_static.onnx")}
    save(CanonicalizePass()(load(original)).model, files["float canonicalized"])
    for label, source in (("ours", original), ("ours on canonicalized", files["float canonicalized"])):
        start = time.process_time()
        report = files[label] + ".json"
        if cli(["quantize", source, "-o", files[label], "--data", train, "--input-shape", shape,
                "--report", report]) != 0:
            raise SystemExit(f"quantize failed on {source}")
        print(f"{kind} {label}: quantize took {time.process_time() - start:.1f} s CPU (this process)", flush=True)
    calib = InputSet({"x": x[:CALIBRATION_SAMPLES]})
    onnx.save(ort_quantize_static(onnx.load(original), calib), files["quantize_static"])
    return files


def accuracy(kind: str, path: str) -> float:
    test, truth = real_models.data(kind, "test")
    x = np.load(test)["x"]
    session = _session(path)
    batch = 8 if kind == "det" else 64
    outputs = np.concatenate([session.run(None, {"x": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return real_models.score(kind, outputs, truth)


def cpu_times(kind: str, files: dict, rounds: int, runs: int) -> dict:
    """Median thread CPU ms per run at batch 1, ``rounds`` interleaved rounds of ``runs`` runs."""
    test, _ = real_models.data(kind, "test")
    one = {"x": np.load(test)["x"][:1]}
    sessions = {label: _session(path) for label, path in files.items()}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, one)
    times = {label: [] for label in sessions}
    order = list(sessions)
    for r in range(rounds):
        for label in order if r % 2 == 0 else order[::-1]:
            start = time.thread_time()
            for _ in range(runs):
                sessions[label].run(None, one)
            times[label].append((time.thread_time() - start) / runs * 1e3)
    return {label: float(np.median(values)) for label, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["rec", "det", "cls"], choices=["rec", "det", "cls"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=10, help="runs per model per round (default 10)")
    parser.add_argument("--out", default="/tmp/graphprune-quantize-real")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for kind in args.kinds:
        print(f"{kind}: load average at start {os.getloadavg()}", flush=True)
        files = build(kind, args.out)
        scores = {label: accuracy(kind, path) for label, path in files.items()}
        ms = cpu_times(kind, files, args.rounds, args.runs)
        print(f"| model | file | {'line accuracy' if kind == 'rec' else 'box F1' if kind == 'det' else 'accuracy'} "
              f"| bytes | CPU ms | speedup vs float |")
        print("|---|---|---:|---:|---:|---:|")
        for label, path in files.items():
            print(f"| {kind} | {label} | {scores[label] * 100:.1f} | {os.path.getsize(path):,} | {ms[label]:.3f} "
                  f"| {ms['float'] / ms[label]:.2f}x |", flush=True)
        print(f"{kind}: load average at end {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
