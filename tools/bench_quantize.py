"""Benchmark: fp32 vs ORT quantize_static vs graphprune's quantize pass, side by side, one run.

For each model of the corpus, both quantizers calibrate on the same samples (MinMax, per-channel int8
weights, uint8 activations); latency is the median of interleaved rounds on ONNX Runtime with a
fixed intra-op thread count (1 by default) and output error is the relative L2 distance to fp32 on
held-out samples.  ``quantize_static`` gets ORT's documented pre-processing (``quant_pre_process``)
so the baseline is the one ORT recommends.  The last row prunes ResNet-50 by half (the ``prune``
pass) and then quantizes it.

    .venv/bin/python tools/bench_quantize.py [--models resnet50 mobilenet_v2 ...] [--json out.json]

Prints a Markdown table (docs/benchmarks.md's) and, with ``--json``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import onnx

from graphprune.data import InputSet, load_inputs, random_inputs
from graphprune.model_io import load
from graphprune.progress import progress_bar
from graphprune.quantization.calibration import as_feeds
from graphprune.quantization.measure import measure_latencies
from graphprune.runtime import make_session, run_samples
from graphprune.validate import compare_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIBRATION_SAMPLES = 16
EVAL_SAMPLES = 16


def _fixtures():
    """``graphprune.testing.fixtures``, or its per-family modules when the umbrella module is absent."""
    import importlib
    import types

    try:
        return importlib.import_module("graphprune.testing.fixtures")
    except ImportError:
        merged = types.SimpleNamespace()
        for family in ("fixtures_cnn", "fixtures_transformer"):
            try:
                module = importlib.import_module(f"graphprune.testing.{family}")
            except ImportError:
                continue
            for key in dir(module):
                if not key.startswith("_"):
                    setattr(merged, key, getattr(module, key))
        return merged


def _random_pair(model: onnx.ModelProto) -> Tuple[InputSet, InputSet]:
    shapes = _batch1_shapes(model)
    calib = random_inputs(model, shapes, samples=CALIBRATION_SAMPLES, seed=1)
    held_out = random_inputs(model, shapes, samples=EVAL_SAMPLES, seed=2)
    return calib, held_out


def _batch1_shapes(model: onnx.ModelProto) -> Dict[str, Tuple[int, ...]]:
    """Concrete shapes with batch 1 for inputs whose dims are symbolic (sequence length 128)."""
    from graphprune.data import input_specs

    shapes = {}
    for name, _, declared in input_specs(model):
        if declared and not all(isinstance(d, int) and d > 0 for d in declared):
            shapes[name] = tuple(d if isinstance(d, int) and d > 0 else (1 if i == 0 else 128) for i, d in enumerate(declared))
    return shapes


def _digits() -> Tuple[onnx.ModelProto, InputSet, InputSet]:
    model = load(os.path.join(ROOT, "models", "digits_cnn.onnx"))
    train, _ = load_inputs(os.path.join(ROOT, "models", "digits_train.npz"), model)
    test, _ = load_inputs(os.path.join(ROOT, "models", "digits_test.npz"), model)
    return model, train.subset(range(256)), test.subset(range(256))


def corpus() -> Dict[str, Callable[[], Tuple[onnx.ModelProto, InputSet, InputSet]]]:
    """Name -> builder of (model, calibration samples, held-out samples)."""
    def from_fixture(builder: str, **kwargs):
        def make():
            model = getattr(_fixtures(), builder)(**kwargs)
            return (model,) + _random_pair(model)

        return make

    return {
        "ResNet-50": from_fixture("resnet", depth=50),
        "MobileNetV2": from_fixture("mobilenet_v2"),
        "MobileNetV3-style": from_fixture("mobilenet_v3_block_net"),
        "YOLOv8-style": from_fixture("yolov8_c2f_net"),
        "digits CNN": _digits,
        "BERT-style encoder (4 layers, hidden 256, seq 128)": from_fixture(
            "bert_encoder", layers=4, hidden=256, heads=4, ffn=1024
        ),
    }


def ort_quantize_static(model: onnx.ModelProto, calib: InputSet) -> onnx.ModelProto:
    """The baseline: quant_pre_process then quantize_static (QDQ, per-channel int8 weights, uint8 activations)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from graphprune.quantization.prepare import save_for_tool

    feeds = as_feeds(calib)

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (os.path.join(tmp, n) for n in ("in.onnx", "pre.onnx", "out.onnx"))
        from graphprune.model_io import default_opset

        if (default_opset(model) or 13) < 13:  # per-channel QDQ needs opset 13
            model = onnx.version_converter.convert_version(model, 13)
        save_for_tool(model, src)
        cwd = os.getcwd()
        os.chdir(tmp)  # symbolic shape inference dumps sym_shape_infer_temp.onnx into the cwd when it gives up
        try:
            try:
                quant_pre_process(src, pre)
            except Exception:  # symbolic shape inference refuses some graphs; ORT's docs then skip it
                quant_pre_process(src, pre, skip_symbolic_shape=True)
        finally:
            os.chdir(cwd)
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(out)


def ours(model: onnx.ModelProto, calib: InputSet, threads: int) -> Tuple[onnx.ModelProto, dict]:
    from graphprune.passes.insert_qdq import InsertQDQPass

    result = InsertQDQPass(data=calib, method="minmax", threads=threads)(model)
    return result.model, result.stats


def error(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: InputSet) -> float:
    a = run_samples(make_session(reference), data)
    b = run_samples(make_session(candidate), data)
    return max(compare_outputs(k, a[k], b[k]).rel_l2 for k in a)


def size(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def bench_model(name, build, threads: int, seconds: float) -> dict:
    model, calib, held_out = build()
    start = time.perf_counter()
    static = ort_quantize_static(model, calib)
    t_static = time.perf_counter() - start
    start = time.perf_counter()
    mine, stats = ours(model, calib, threads)
    t_ours = time.perf_counter() - start
    feed = held_out.first_batch(1)
    timed = {"fp32": model, "static": static}
    if mine is not model:  # an unchanged model is the fp32 file itself: same latency by identity
        timed["ours"] = mine
    lat = measure_latencies(timed, feed, threads=threads, rounds=15, budget_seconds=seconds)
    lat.setdefault("ours", lat["fp32"])
    return {
        "model": name,
        "fp32_ms": lat["fp32"] * 1e3,
        "static_ms": lat["static"] * 1e3,
        "ours_ms": lat["ours"] * 1e3,
        "static_speedup": lat["fp32"] / lat["static"],
        "ours_speedup": lat["fp32"] / lat["ours"],
        "static_error": error(model, static, held_out),
        "ours_error": error(model, mine, held_out) if mine is not model else 0.0,
        "ours_choice": stats["chosen"],
        "ours_int8_nodes": stats["nodes_quantized"],
        "quantize_seconds": {"static": t_static, "ours": t_ours},
        "size_bytes": {"fp32": size(model), "static": size(static), "ours": size(mine)},
    }


def bench_pruned(threads: int, seconds: float) -> Optional[dict]:
    """ResNet-50 pruned 50% (canonicalize -> prune 0.5 -> quantize) against the fp32 original."""
    from graphprune.passes.base import registered_passes
    from graphprune.recipes import build_pipeline, load_recipe

    if "prune" not in registered_passes():
        return None
    model = _fixtures().resnet(depth=50)
    calib, held_out = _random_pair(model)
    pipeline = build_pipeline(load_recipe("prune-quantize"), context={"data": calib})
    result = pipeline(model)
    feed = held_out.first_batch(1)
    lat = measure_latencies({"fp32": model, "pq": result.model}, feed, threads=threads, rounds=15, budget_seconds=seconds)
    return {
        "model": "ResNet-50 pruned 50% + quantized",
        "fp32_ms": lat["fp32"] * 1e3,
        "ours_ms": lat["pq"] * 1e3,
        "ours_speedup": lat["fp32"] / lat["pq"],
        "size_ratio": size(model) / size(result.model),
        "size_bytes": {"fp32": size(model), "ours": size(result.model)},
    }


def table(rows: List[dict], pruned: Optional[dict], threads: int) -> str:
    lines = [
        "| model | fp32 ms | quantize_static ms (x) | ours ms (x) | rel L2 static | rel L2 ours | ours placed |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['fp32_ms']:.3g} | {r['static_ms']:.3g} ({r['static_speedup']:.2f}x) | "
            f"{r['ours_ms']:.3g} ({r['ours_speedup']:.2f}x) | {r['static_error']:.4f} | {r['ours_error']:.4f} | "
            f"{r['ours_choice']}, {r['ours_int8_nodes']} int8 nodes |"
        )
    if pruned:
        lines.append(
            f"| {pruned['model']} | {pruned['fp32_ms']:.3g} | | {pruned['ours_ms']:.3g} ({pruned['ours_speedup']:.2f}x) "
            f"| | | file {pruned['size_ratio']:.1f}x smaller |"
        )
    lines.append(f"\nONNX Runtime {_ort_version()}, {threads} intra-op thread(s), CPU: {_cpu()}")
    return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="subset of the corpus (names as in the table)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per model (default 6)")
    parser.add_argument("--no-pruned", action="store_true", help="skip the pruned ResNet-50 row")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    models = corpus()
    names = args.models or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        parser.error(f"unknown models {unknown} (have: {list(models)})")
    rows = []
    with progress_bar(total=len(names) + (0 if args.no_pruned else 1), desc="bench", enabled=True) as bar:
        skipped = []
        for name in names:
            bar.set_postfix_str(name)
            try:
                rows.append(bench_model(name, models[name], args.threads, args.seconds))
            except AttributeError as exc:  # a corpus builder graphprune.testing does not provide (yet)
                skipped.append(f"{name}: {exc}")
            bar.update(1)
        pruned = None
        if not args.no_pruned:
            bar.set_postfix_str("pruned ResNet-50")
            pruned = bench_pruned(args.threads, args.seconds)
            bar.update(1)
    print(table(rows, pruned, args.threads))
    for note in skipped:
        print(f"(skipped {note})")
    if pruned is None and not args.no_pruned:
        print("(pruned row skipped: the prune pass is not registered)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "pruned": pruned, "threads": args.threads}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
