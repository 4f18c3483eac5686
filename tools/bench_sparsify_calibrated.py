"""Calibrated criteria (issue 14) for ``tools/bench_sparsify.py --calibrated``: magnitude vs Wanda vs SparseGPT.

Output error (relative L2) at 50% unstructured and 2:4 on ResNet-50, a BERT-base-sized encoder or a
model from a file, calibrated on one set of samples and measured on another, with the CPU time of
each pass; with ``--peer-python``, onnxsim's own pruning of the same models and samples, run by that
interpreter, in the same run.  Split from ``bench_sparsify.py``, which parses the options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

from bench_sparsify import load_resnet50, logits_model
from graphprune.data import random_inputs
from graphprune.model_io import save
from graphprune.passes.sparsify_weights import SparsifyWeightsPass
from graphprune.runtime import make_session, run_samples
from graphprune.validate import compare_outputs

# ---- Calibrated criteria (issue 14): magnitude vs Wanda vs SparseGPT, and the peer --------------------

PEER_WORKER = r'''
import sys, time, numpy as np, onnx
from onnxsim import pruning
model_path, cal_path, out_path, crit, pattern = sys.argv[1:6]
cal = np.load(cal_path)
samples = [{k: cal[k][i:i + 1] for k in cal.files} for i in range(len(cal[cal.files[0]]))]
kw = dict(n=2, m=4) if pattern == "2:4" else dict(sparsity=float(pattern))
model = onnx.load(model_path)
start = time.process_time()
if crit == "magnitude":
    out = pruning.apply_magnitude_pruning(model, **kw)
elif crit == "wanda":
    out = pruning.apply_wanda_pruning(model, calibration_data=samples, **kw)
else:
    out = pruning.apply_sparsegpt_pruning(model, calibration_data=samples, **kw)
print(time.process_time() - start)
onnx.save(out, out_path)
'''


def _peer_version(python):
    import subprocess

    done = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('onnxsim'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _run_peer(python, model_path, cal_path, out_path, criterion, pattern, timeout=900):
    """(peer model, CPU seconds of its pruning call) from the peer's own interpreter, or (None, error)."""
    import subprocess

    try:
        done = subprocess.run([python, "-c", PEER_WORKER, model_path, cal_path, out_path, criterion, pattern],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"not finished after {timeout} s wall time"
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["failed"])[-1][:160]
    return onnx.load(out_path), float(done.stdout.strip().splitlines()[-1])


def _cli_cpu(argv):
    """User + system CPU seconds of one ``graphprune`` command in a child process."""
    import resource
    import subprocess
    import sys

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = os.path.join(os.path.dirname(sys.executable), "graphprune")
    subprocess.run([command] + argv, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def calibrated_table(label, model, calibration, held_out, output, tmp, peer_python=None, cli=False, threads=1,
                     peer_timeout=900, sparsities=(0.5,), exclude=()):
    """Rows of output rel. L2 on ``held_out`` for magnitude / Wanda / SparseGPT at ``sparsities`` and 2:4
    (and top-1 agreement with the original when the output is [batch, classes]); ``exclude``: weights
    left dense (the peer prunes everything, so it runs only without)."""
    reference = run_samples(make_session(model, threads=threads), held_out)[output]
    model_path, cal_path = os.path.join(tmp, f"{label}.onnx"), os.path.join(tmp, f"{label}_cal.npz")
    save(model, model_path)
    np.savez(cal_path, **calibration.arrays)
    rows = []

    def measure(name, candidate, seconds, **extra):
        out = run_samples(make_session(candidate, threads=threads), held_out)[output]
        row = {"model": label, "method": name, "rel_l2": compare_outputs(output, reference, out).rel_l2,
               "cpu_s": seconds, **extra}
        if reference.ndim == 2:
            row["top1_agreement"] = float((out.argmax(-1) == reference.argmax(-1)).mean())
        rows.append(row)
        print(f"{label:<10} {name:<52} relL2 {row['rel_l2']:.4f}  top1 {row.get('top1_agreement', float('nan')):.3f}"
              f"  cpu {seconds:7.1f} s"
              + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)

    cases = [(f"{round(s * 100)}% unstructured", {"sparsity": s}, str(s)) for s in sparsities]
    cases.append(("2:4", {"pattern": "2:4"}, "2:4"))
    if exclude:
        peer_python = None
    for case, kwargs, peer_pattern in cases:
        for criterion in ("magnitude", "wanda", "sparsegpt"):
            options = dict(kwargs, criterion=criterion, exclude=list(exclude) or None)
            if criterion != "magnitude":
                options["data"] = calibration
            # Global scope for magnitude and Wanda only: SparseGPT's per-layer counts would come from the
            # same Wanda ranking, at SparseGPT's cost again.
            scopes = [("layer", "row")] + ([("global", "row")] if "sparsity" in kwargs and criterion != "sparsegpt" else [])
            if criterion == "wanda" and "sparsity" in kwargs:
                scopes.append(("layer", "layer"))
            for scope, group in scopes:
                start = time.process_time()
                result = SparsifyWeightsPass(scope=scope, group=group, **options)(model) if criterion != "magnitude" \
                    else SparsifyWeightsPass(scope=scope, **options)(model)
                seconds = time.process_time() - start
                name = f"graphprune {criterion}, {case}, {scope} scope" + (", one threshold per layer" if group == "layer" else "")
                measure(name, result.model, seconds, sparsity=round(result.stats["overall_sparsity"], 4))
            if peer_python:
                peer, seconds = _run_peer(peer_python, model_path, cal_path, os.path.join(tmp, "peer.onnx"),
                                          criterion, peer_pattern, peer_timeout)
                if peer is None:
                    print(f"{label:<10} peer {criterion}, {case}: failed ({seconds})", flush=True)
                    rows.append({"model": label, "method": f"peer {criterion}, {case}", "error": seconds})
                else:
                    measure(f"peer onnxsim {criterion}, {case}", peer, seconds)
    if cli:
        out = os.path.join(tmp, "cli.onnx")
        base = ["sparsify", model_path, "-o", out, "--sparsity", "0.5"]
        for name, argv in (("CLI magnitude 50% (global)", base), ("CLI magnitude 50% --gzip-size", base + ["--gzip-size"]),
                           ("CLI wanda 50%", base + ["--criterion", "wanda", "--data", cal_path])):
            seconds = _cli_cpu(argv)
            rows.append({"model": label, "method": name, "cli_cpu_s": seconds})
            print(f"{label:<10} {name:<52} CPU {seconds:.1f} s (whole command, child process)", flush=True)
    return rows


def calibrated_main(args):
    rows = []
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "resnet50" in models:
            rows += _resnet_rows(args, tmp)
        if "bert" in models:
            rows += _bert_rows(args, tmp)
        if args.model:
            rows += _file_rows(args, tmp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peer": _peer_version(args.peer_python) if args.peer_python else None, "rows": rows}, f, indent=2)


def _resnet_rows(args, tmp):
    model, source = load_resnet50()
    model = logits_model(model)
    print(f"ResNet-50: {source}; calibration {args.calibration} seeded random images (seed 1), "
          f"error on {args.samples} other seeded random images (seed 123), logits", flush=True)
    calibration = random_inputs(model, None, samples=args.calibration, seed=1)
    held_out = random_inputs(model, None, samples=args.samples, seed=123)
    return calibrated_table("resnet50", model, calibration, held_out, model.graph.output[0].name, tmp,
                            args.peer_python, cli=True, threads=args.threads, peer_timeout=args.peer_timeout)


def _file_rows(args, tmp):
    """--model: a trained model from a file, real calibration and held-out samples (its first output)."""
    from graphprune.data import load_inputs
    from graphprune.model_io import load

    model = logits_model(load(args.model))
    calibration, _ = load_inputs(args.calibration_data, model)
    held_out, _ = load_inputs(args.eval_data, model)
    label = os.path.splitext(os.path.basename(args.model))[0]
    print(f"{label}: {args.model}; calibration {args.calibration_data}, error on {args.eval_data}, "
          f"output {model.graph.output[0].name}", flush=True)
    exclude = [n.name for n in model.graph.node if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute)] if args.skip_depthwise else []
    if exclude:
        print(f"{label}: {len(exclude)} depthwise convolutions left dense", flush=True)
    return calibrated_table(label, model, calibration, held_out, model.graph.output[0].name, tmp, args.peer_python,
                            cli=not exclude, threads=args.threads, peer_timeout=args.peer_timeout,
                            sparsities=[float(x) for x in args.sparsities.split(",")], exclude=exclude)


def _bert_rows(args, tmp):
    from graphprune.testing import bert_encoder

    layers = args.bert_layers
    bert = bert_encoder(layers=layers, hidden=768, heads=12, ffn=3072, vocab=30522, max_positions=512)
    shapes = {"input_ids": (1, args.seq)}
    print(f"BERT: bert_encoder({layers} layers, hidden 768, 12 heads, ffn 3072); calibration "
          f"{args.calibration} seeded random sequences of {args.seq} tokens, error on {args.samples} others, "
          "last_hidden_state", flush=True)
    calibration = random_inputs(bert, shapes, samples=args.calibration, seed=1)
    held_out = random_inputs(bert, shapes, samples=args.samples, seed=123)
    return calibrated_table("bert", bert, calibration, held_out, "last_hidden_state", tmp, args.peer_python,
                            threads=args.threads, peer_timeout=args.peer_timeout)
