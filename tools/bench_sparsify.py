"""Benchmark weight sparsification on ResNet-50: file size raw and gzipped, output error, load time, latency.

Usage:
    .venv/bin/python tools/bench_sparsify.py [--samples 8] [--threads 1] [--json out.json]
    OPENBLAS_NUM_THREADS=1 .venv/bin/python tools/bench_sparsify.py --calibrated [--calibration 16]
        [--bert-layers 12] [--peer-python /tmp/h1/simenv/bin/python]

``--calibrated``: output error of magnitude, Wanda and SparseGPT at 50% unstructured and 2:4 on
ResNet-50 and a BERT-base-sized encoder, calibrated on seeded random inputs and measured on other
seeded random inputs (``--model M.onnx --calibration-data C.npz --eval-data E.npz [--models none]``:
a trained model from a file, on real samples), with the CPU time of each pass (and of the whole ``sparsify`` command on
ResNet-50); with ``--peer-python``, onnxsim's own magnitude / Wanda / SparseGPT on the same models
and calibration samples, run by that interpreter, in the same run.

Rows: the original; 80% and 90% unstructured (global threshold) and 2:4, each with dense storage
(zeros in place) and compact storage (``--storage sparse``); 90% followed by int8 QDQ quantization
(graphprune's ``quantize`` pass) with dense and compact int8 weights; int8 alone for reference; and
ONNX's own ``sparse_initializer`` form for comparison.  Sizes are of the saved file; "gzip" is the
file compressed with deflate at gzip's default level 6.  Output error is the relative L2 error of
the logits against the original on seeded random inputs (the weights are not trained, so accuracy
cannot be measured; top-1 agreement is given as an indication).  Compact storage is checked to give
bit-identical outputs to dense storage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.data import random_inputs
from graphprune.model_io import save
from graphprune.passes.sparsify_weights import SparsifyWeightsPass
from graphprune.runtime import make_session, measure_latency, run_samples
from graphprune.sparsity.report import file_sizes
from graphprune.validate import compare_outputs


def load_resnet50():
    """ResNet-50 from the test corpus: the torch-style fixture, else onnx's light model at opset 13."""
    try:
        from graphprune.testing import fixtures

        return fixtures.resnet(depth=50), "graphprune.testing.fixtures.resnet(depth=50)"
    except (ImportError, AttributeError):
        from onnx import version_converter

        from graphprune.testing.zoo import load_light_model

        # The light model imports opset 9; compact storage needs CumSum/ScatterElements (opset 11).
        model = version_converter.convert_version(load_light_model("resnet50"), 13)
        return model, "graphprune.testing.zoo.load_light_model('resnet50') converted to opset 13"


def quantize(model, data, threads):
    """int8 QDQ with graphprune's quantize pass; ORT's quantize_static when the pass is missing."""
    try:
        from graphprune.passes.insert_qdq import InsertQDQPass
    except ImportError:
        InsertQDQPass = None
    if InsertQDQPass is not None:
        result = InsertQDQPass(data=data, method="minmax", per_channel=True, threads=threads)(model)
        if result.modified:
            return result.model, "graphprune quantize pass"
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = data.batches(1)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "f.onnx"), os.path.join(tmp, "q.onnx")
        onnx.save(model, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        return onnx.load(dst), "onnxruntime quantize_static (stand-in)"


def onnx_sparse_initializer_form(model):
    """ONNX's own sparse_initializer (COO, int64 linear indices) for every weight that is >50% zeros."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    keep, sparse = [], []
    for init in work.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.ndim >= 2 and np.mean(value == 0) > 0.5:
            flat = value.ravel()
            idx = np.flatnonzero(flat)
            sparse.append(helper.make_sparse_tensor(
                numpy_helper.from_array(flat[idx], init.name),
                numpy_helper.from_array(idx.astype(np.int64), init.name + ".indices"), list(value.shape)))
        else:
            keep.append(init)
    del work.graph.initializer[:]
    work.graph.initializer.extend(keep)
    work.graph.sparse_initializer.extend(sparse)
    return work


class Bench:
    def __init__(self, original, data, threads, tmp):
        self.original, self.data, self.threads, self.tmp = original, data, threads, tmp
        self.reference = self._logits(run_samples(make_session(original, threads=threads), data))
        self.rows = []
        self.sessions = {}

    def measure(self, label, model, equal_to=None, time_it=False):
        path = os.path.join(self.tmp, f"{len(self.rows)}.onnx")
        save(model, path)
        row = {"model": label, **file_sizes(path)}
        try:
            onnx.checker.check_model(path, full_check=True)
            row["full_check"] = True
        except Exception as exc:  # the sparse_initializer form is expected to fail here
            row["full_check"] = False
            row["check_error"] = str(exc).strip().splitlines()[0][:160]
        loads = []
        for _ in range(3):  # median of three session creations from the file
            start = time.perf_counter()
            sess = make_session(onnx.load(path), threads=self.threads)
            loads.append(time.perf_counter() - start)
        row["load_s"] = statistics.median(loads)
        out = self._logits(run_samples(sess, self.data))
        cmp = compare_outputs("logits", self.reference, out)
        row.update(rel_l2=cmp.rel_l2, cosine=cmp.cosine, top1_agreement=cmp.top1_agreement)
        if equal_to is not None:
            row["identical_to_dense"] = bool(np.array_equal(out, equal_to))
        if time_it:
            self.sessions[label] = sess
        self.rows.append(row)
        print(_format_row(row, self.rows[0]), flush=True)
        return row, out

    def _logits(self, outputs):
        return outputs[next(iter(outputs))]

    def latencies(self, rounds=7, runs=10):
        """Median latency per timed model, rounds interleaved so that load from other work hits all alike."""
        feed = self.data.first_batch(1)
        times = {label: [] for label in self.sessions}
        for _ in range(rounds):
            for label, sess in self.sessions.items():
                times[label].append(measure_latency(sess, feed, runs=runs))
        return {label: 1000 * statistics.median(t) for label, t in times.items()}


def _format_row(row, base):
    ratio = base["gzip_bytes"] / row["gzip_bytes"]
    raw_ratio = base["bytes"] / row["bytes"]
    extra = ""
    if "identical_to_dense" in row:
        extra = f" identical={row['identical_to_dense']}"
    return (f"{row['model']:<50} {row['bytes'] / 1e6:7.2f} MB ({raw_ratio:5.2f}x) gzip {row['gzip_bytes'] / 1e6:6.2f} MB "
            f"({ratio:5.2f}x) relL2 {row['rel_l2']:.3f} cos {row['cosine']:.3f} top1 {row.get('top1_agreement') or 0:.3f} "
            f"load {row['load_s']:.2f}s check={row['full_check']}{extra}")


def digits_accuracy_table():
    """Held-out accuracy of the trained digits CNN after sparsification, without fine-tuning."""
    from graphprune.data import load_inputs
    from graphprune.model_io import load
    from graphprune.validate import accuracy

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    model = load(os.path.join(root, "digits_cnn.onnx"))
    data, extras = load_inputs(os.path.join(root, "digits_test.npz"), model, extra_keys=["labels"])
    train, train_extras = load_inputs(os.path.join(root, "digits_train.npz"), model, extra_keys=["labels"])
    rows = []
    for label, kwargs in (("original", None), ("50% global", {"sparsity": 0.5}), ("50% per layer", {"sparsity": 0.5, "scope": "layer"}),
                          ("80% global", {"sparsity": 0.8}), ("80% per layer", {"sparsity": 0.8, "scope": "layer"}),
                          ("90% global", {"sparsity": 0.9}), ("2:4", {"pattern": "2:4"})):
        result = SparsifyWeightsPass(**kwargs)(model) if kwargs else None
        candidate = result.model if result else model
        scores = run_samples(make_session(candidate), data)
        row = {"model": label, "accuracy": accuracy(scores[next(iter(scores))], extras["labels"]),
               "sparsity": result.stats["overall_sparsity"] if result else 0.0,
               "skipped": [s["node"] for s in result.stats["skipped"]] if result else []}
        rows.append(row)
        if kwargs and "global" in label or label == "2:4":
            # The fine-tuning pass keeps the recorded masks: pruned weights stay exactly zero.
            from graphprune.passes.finetune import FineTunePass

            tuned = FineTunePass(data=train, labels=train_extras["labels"], epochs=5)(candidate).model
            scores = run_samples(make_session(tuned), data)
            zeros = sum(int(np.sum(numpy_helper.to_array(i) == 0)) for i in tuned.graph.initializer
                        if i.name in {r["weight"] for r in result.stats["layers"]})
            row["accuracy_finetuned"] = accuracy(scores[next(iter(scores))], extras["labels"])
            row["zeros_kept"] = zeros >= sum(r["zeros"] for r in result.stats["layers"])
        print(f"digits CNN {label:<16} accuracy {row['accuracy'] * 100:6.2f}%  sparsity {row['sparsity'] * 100:5.1f}%"
              + (f"  fine-tuned 5 epochs {row['accuracy_finetuned'] * 100:6.2f}% zeros kept={row['zeros_kept']}"
                 if "accuracy_finetuned" in row else "")
              + (f"  skipped {row['skipped']}" if row["skipped"] else ""), flush=True)
    return rows


def logits_model(model):
    """Drop a final Softmax so that errors are measured on logits (probabilities saturate)."""
    last = model.graph.node[-1]
    if last.op_type != "Softmax" or last.output[0] != model.graph.output[0].name:
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    del work.graph.node[-1]
    work.graph.output[0].name = last.input[0]
    return work


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--calibrated", action="store_true",
                        help="only the magnitude / Wanda / SparseGPT table (ResNet-50 and the BERT encoder)")
    parser.add_argument("--calibration", type=int, default=16, help="calibration samples (--calibrated)")
    parser.add_argument("--bert-layers", type=int, default=12, help="encoder layers of the BERT model (--calibrated)")
    parser.add_argument("--seq", type=int, default=128, help="BERT sequence length (--calibrated)")
    parser.add_argument("--peer-python", help="a Python with onnxsim installed: measure its pruning in the same run")
    parser.add_argument("--peer-timeout", type=int, default=900, help="wall seconds allowed to each peer pruning call")
    parser.add_argument("--models", default="resnet50,bert", help="--calibrated: which of resnet50,bert to run")
    parser.add_argument("--model", help="--calibrated: also (or, with --models none, only) this ONNX file, calibrated "
                        "on --calibration-data and measured on --eval-data (a trained model and real samples)")
    parser.add_argument("--calibration-data", help="--model's calibration samples (.npz, one array per input)")
    parser.add_argument("--eval-data", help="--model's held-out samples (.npz), the error is measured on them")
    parser.add_argument("--sparsities", default="0.5", help="--model: unstructured sparsities (comma list)")
    parser.add_argument("--skip-depthwise", action="store_true",
                        help="--model: leave depthwise convolutions (group > 1) dense (no peer rows then)")
    args = parser.parse_args()
    if args.calibrated:
        from bench_sparsify_calibrated import calibrated_main

        return calibrated_main(args)

    digits = digits_accuracy_table()
    model, source = load_resnet50()
    model = logits_model(model)
    print(f"model: {source}; error measured on logits, {args.samples} random samples")
    data = random_inputs(model, None, samples=args.samples, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(model, data, args.threads, tmp)
        bench.measure("original (float32)", model, time_it=True)
        dense90 = None
        for label, kwargs in (("80% unstructured", {"sparsity": 0.8}), ("90% unstructured", {"sparsity": 0.9}),
                              ("2:4", {"pattern": "2:4"})):
            start = time.perf_counter()
            dense = SparsifyWeightsPass(**kwargs)(model)
            seconds = time.perf_counter() - start
            row, out = bench.measure(f"{label}, dense storage", dense.model, time_it="80%" not in label)
            row.update(sparsify_s=seconds, overall_sparsity=dense.stats["overall_sparsity"],
                       skipped=len(dense.stats["skipped"]))
            compact = SparsifyWeightsPass(storage="sparse", **kwargs)(model).model
            bench.measure(f"{label}, sparse storage", compact, equal_to=out, time_it="90%" in label)
            if kwargs.get("sparsity") == 0.9:
                dense90 = dense.model
                bench.measure("90%, ONNX sparse_initializer form", onnx_sparse_initializer_form(dense.model))
                layer = SparsifyWeightsPass(scope="layer", **kwargs)(model).model
                bench.measure("90% unstructured, layer scope", layer)
        int8, how = quantize(model, data, args.threads)
        bench.measure(f"int8 QDQ only [{how}]", int8, time_it=True)
        q90, how = quantize(dense90, data, args.threads)
        row, out = bench.measure(f"90% + int8 QDQ, dense int8 [{how}]", q90, time_it=True)
        compact_q = SparsifyWeightsPass(sparsity=0.0, storage="sparse")(q90)
        bench.measure("90% + int8 QDQ, sparse storage", compact_q.model, equal_to=out, time_it=True)
        latencies = bench.latencies()
        for label, ms in latencies.items():
            print(f"latency {label:<50} {ms:7.1f} ms ({args.threads} thread(s), median of 7 interleaved rounds)")
        rows = bench.rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": source, "samples": args.samples, "threads": args.threads, "rows": rows,
                       "latency_ms": latencies, "digits_cnn": digits}, f, indent=2)

if __name__ == "__main__":
    main()
