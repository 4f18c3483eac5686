"""Benchmark weight-only int4/int8 (and Wanda, depth pruning when available) on a BERT-base encoder and a 0.5B decoder LLM.

Usage:
    .venv/bin/python tools/bench_llm.py [--llm ~/.cache/graphprune-bench/llm/llama.onnx]
        [--dir ~/.cache/graphprune-bench/llm/out] [--rounds 7] [--threads 1,2]
        [--variants int4,int4nbits,int4i8,int4dispatch,int8,int8dq,int8i8,wanda50,wanda24,depth25] [--interleave]
        [--skip-bert | --skip-llm]
        [--bert-variants int4,int8,int4-awq,int4-gptq,int8dq] [--json out.json]
    .venv/bin/python tools/bench_llm.py --kernels   # one FFN MatMul: fp32 vs MatMulNBits variants, M = 1 and 128
                                                    # (tools/bench_llm_kernels.py)

The LLM is made by ``tools/make_llm_fixture.py`` (Llama-style, GQA, 0.5B parameters, 2.0 GB of
fp32 weights in one external data file).  Every graphprune command runs in its own process under
GNU time; its peak RSS is time's ``%M`` and "x size" is peak RSS over the input model's bytes on
disk.  Sizes are the files on disk (model + data files).  Each written model's session is created
once in a fresh process (1 thread): CPU seconds, peak RSS and RSS once built (``session_cost``).
Variants: ``int4`` and ``int8`` are the default ``--kernel auto`` (timed on this machine);
``int4nbits`` / ``int8dq`` pin ``--kernel matmulnbits`` (int8: DequantizeLinear, fused by ONNX
Runtime into 8-bit ``MatMulNBits``), ``int4i8`` / ``int8i8`` the int8 kernel
(``DynamicQuantizeMatMul``), ``int4dispatch`` both int4 kernels behind one ``If`` on the row count
(``--kernel dispatch``).  A command's first stdout lines (the kernel chosen and why) are kept.

Latency: batch 1, ``input_ids`` of 1 token (the weight-bound regime of decoding) and of 128 tokens,
on ``--threads`` intra-op threads (no spinning); fp32 and the variant are timed alternately
(``--rounds`` rounds, several runs each), CPU time (``time.process_time``) and wall time per run,
medians; the speedup is fp32 / variant.  With ``--interleave`` fp32 and every variant are timed
alternately in one group per thread count and row count instead (a machine whose load changes
during the run then changes all of them alike).  ``session_cost`` also reports the RSS after
glibc's ``malloc_trim`` (what the session holds; ONNX Runtime's freed constant-folding
intermediates otherwise stay in the process's heap).  Agreement on 2 sequences of 128 seeded
random tokens: relative L2 of the logits and top-1 agreement of the next-token prediction at every
position; and on 32 seeded single tokens (``agreement_1_token``: a form whose kernels depend on
the row count, ``--kernel dispatch``, runs its other kernel there).
BERT: ``graphprune.testing.bert_base_like()`` (110M parameters), int4 (block 32; RTN, AWQ and GPTQ
on 16 seeded random sequences) and int8 weight-only, file size and output rel L2 on 4 other
sequences of 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

GB = 10**9
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [os.path.join(os.path.dirname(sys.executable), "graphprune")]
TIME = "/usr/bin/time"  # GNU time, for the commands' peak RSS
VARIANTS = {
    "int4": ["quantize", "--weights-only", "int4", "--block-size", "32"],  # --kernel auto (the default)
    "int4nbits": ["quantize", "--weights-only", "int4", "--block-size", "32", "--kernel", "matmulnbits"],
    "int8": ["quantize", "--weights-only", "int8"],  # --kernel auto (the default)
    "int8dq": ["quantize", "--weights-only", "int8", "--kernel", "matmulnbits"],
    "int4i8": ["quantize", "--weights-only", "int4", "--block-size", "32", "--kernel", "int8"],
    "int4dispatch": ["quantize", "--weights-only", "int4", "--block-size", "32", "--kernel", "dispatch"],
    "int8i8": ["quantize", "--weights-only", "int8", "--kernel", "int8"],
    "wanda50": ["sparsify", "--criterion", "wanda", "--sparsity", "0.5", "--data", "{data}"],
    "wanda24": ["sparsify", "--criterion", "wanda", "--pattern", "2:4", "--data", "{data}"],
    "depth25": ["prune", "--blocks-ratio", "0.25", "--data", "{data}"],
}


def files_size(path: str) -> int:
    """Bytes of a model and the data files it refers to."""
    from graphprune.external_data import data_files

    return os.path.getsize(path) + sum(os.path.getsize(p) for p in data_files(path))


def measured_command(argv: List[str]) -> Dict[str, object]:
    """One graphprune command in its own process: exit code, wall time, peak RSS, first stdout
    lines, last stderr line.

    Peak RSS comes from GNU time (``%M``), which forks the command from its own small process: a
    child forked from this (large) process would report this process's RSS at the fork as its
    ``ru_maxrss`` (Linux keeps the high-water mark across exec).
    """
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        proc = subprocess.run([TIME, "-f", "%M", "-o", rss.name] + CLI + argv, capture_output=True, text=True, cwd=ROOT)
        kib = rss.read().strip().splitlines()
    peak = int(kib[-1]) * 1024 if kib and kib[-1].isdigit() else None
    return {"exit": proc.returncode, "wall_s": round(time.perf_counter() - start, 1), "peak_rss": peak,
            "stdout": proc.stdout.strip().splitlines()[:3], "error": (proc.stderr.strip().splitlines() or [""])[-1]}


_SESSION_COST = """
import resource, sys, time
import onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.log_severity_level = 3
start = time.process_time()
s = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
cpu = time.process_time() - start
def rss():
    return 1024 * next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
held = rss()
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(cpu, held, rss())
"""


def session_cost(path: str) -> Dict[str, object]:
    """Creating a 1-thread session of ``path`` in a fresh process: CPU seconds, peak RSS (GNU time's
    ``%M``: the constant folding of an expansion is held until the session is built) and the RSS
    once it is built."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        proc = subprocess.run([TIME, "-f", "%M", "-o", rss.name, sys.executable, "-c", _SESSION_COST, path],
                              capture_output=True, text=True)
        kib = rss.read().strip().splitlines()
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [""])[-1]}
    cpu, held, trimmed = proc.stdout.split()
    return {"cpu_s": round(float(cpu), 2), "peak_rss": int(kib[-1]) * 1024, "rss_after": int(held),
            "rss_after_trim": int(trimmed)}


def session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # CPU time = work done
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def interleaved(sessions: Dict[str, object], feed, rounds: int, runs: int) -> Dict[str, Dict[str, float]]:
    """Median CPU and wall ms per run of each session, timed alternately."""
    for s in sessions.values():
        s.run(None, feed)  # warm-up (first-run allocations, prepacking)
    cpu = {k: [] for k in sessions}
    wall = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            c, w = time.process_time(), time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            cpu[name].append((time.process_time() - c) / runs * 1e3)
            wall[name].append((time.perf_counter() - w) / runs * 1e3)
    return {k: {"cpu_ms": float(np.median(cpu[k])), "wall_ms": float(np.median(wall[k]))} for k in sessions}


def agreement(reference: List[np.ndarray], path: str, ids: Optional[List[np.ndarray]] = None) -> Dict[str, float]:
    """Logits rel L2 and top-1 agreement against ``reference`` (fp32's logits on ``ids``, by default
    ``_agreement_ids()``)."""
    s = session(path, 2)
    got = [s.run(None, {"input_ids": x})[0] for x in (ids or _agreement_ids())]
    del s
    num = sum(float(np.square(g - r).sum()) for g, r in zip(got, reference))
    den = sum(float(np.square(r).sum()) for r in reference)
    top1 = np.mean(np.concatenate([(g.argmax(-1) == r.argmax(-1)).ravel() for g, r in zip(got, reference)]))
    return {"rel_l2": float(np.sqrt(num / den)), "top1_agreement": float(top1)}


def _agreement_ids() -> List[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 32000, (1, 128)).astype(np.int64) for _ in range(2)]


def _one_token_ids() -> List[np.ndarray]:
    """32 seeded single tokens: what a form that runs other kernels for one row computes there."""
    return [np.array([[t]], np.int64) for t in np.random.default_rng(4).integers(0, 32000, 32)]


BERT_VARIANTS = ("int4", "int8", "int4-awq", "int4-gptq")


def bench_bert(folder: str, variants=BERT_VARIANTS) -> Dict[str, object]:
    import onnx

    from graphprune.testing.fixtures_transformer import bert_base_like

    src = os.path.join(folder, "bert_base.onnx")
    if not os.path.exists(src):
        onnx.save(bert_base_like(), src)
    feed = {"input_ids": np.random.default_rng(0).integers(0, 30522, (4, 128)).astype(np.int64)}
    data = os.path.join(folder, "bert_calib.npz")  # other seeded tokens than the evaluation's
    np.savez(data, input_ids=np.random.default_rng(3).integers(0, 30522, (16, 128)).astype(np.int64))
    ref = session(src, 2).run(None, feed)
    rows = {"fp32": {"bytes": files_size(src)}}
    for name in variants:
        out = os.path.join(folder, f"bert_base_{name}.onnx")
        argv = VARIANTS[name.split("-")[0]] + (["--algorithm", name.split("-")[1], "--data", data] if "-" in name else [])
        row = measured_command(argv[:1] + [src, "-o", out] + argv[1:])
        row["rss_x_size"] = row["peak_rss"] / files_size(src) if row["peak_rss"] else None
        if row["exit"] == 0:
            got = session(out, 2).run(None, feed)
            row.update(bytes=files_size(out), ratio=files_size(out) / files_size(src),
                       rel_l2={o.name: float(np.linalg.norm(g - r) / np.linalg.norm(r))
                               for o, g, r in zip(onnx.load(src, load_external_data=False).graph.output, got, ref)})
        rows[name] = row
        print(f"bert {name}: {json.dumps(row)}", flush=True)
    return rows


def bench_llm(llm: str, folder: str, variants: List[str], threads: List[int], rounds: int,
              together: bool = False) -> Dict[str, object]:
    data = os.path.join(folder, "calib.npz")
    np.savez(data, input_ids=np.random.default_rng(2).integers(0, 32000, (8, 128)).astype(np.int64))
    size = files_size(llm)
    rows: Dict[str, Dict[str, object]] = {"fp32": {"bytes": size}}
    reference = reference_1 = None
    for name in variants:
        out = os.path.join(folder, f"llama_{name}.onnx")
        argv = [a.replace("{data}", data) for a in VARIANTS[name]]
        row = measured_command(argv[:1] + [llm, "-o", out] + argv[1:])
        row["rss_x_size"] = row["peak_rss"] / size if row["peak_rss"] else None
        rows[name] = row
        print(f"llm {name}: command {json.dumps(row)}", flush=True)
        if row["exit"] != 0:
            continue
        row.update(bytes=files_size(out), ratio=files_size(out) / size)
        if "session" not in rows["fp32"]:
            rows["fp32"]["session"] = session_cost(llm)
            print(f"llm fp32 session: {json.dumps(rows['fp32']['session'])}", flush=True)
        row["session"] = session_cost(out)
        print(f"llm {name} session: {json.dumps(row['session'])}", flush=True)
        if reference is None:
            ref = session(llm, 2)
            reference = [ref.run(None, {"input_ids": ids})[0] for ids in _agreement_ids()]
            reference_1 = [ref.run(None, {"input_ids": ids})[0] for ids in _one_token_ids()]
            del ref
        row["agreement"] = agreement(reference, out)
        row["agreement_1_token"] = agreement(reference_1, out, _one_token_ids())
        row["path"] = out
        if together:
            continue
        row["latency"] = {}
        for t in threads:
            pair = {"fp32": session(llm, t), name: session(out, t)}
            for seq, runs in ((1, 5), (128, 1)):
                feed = {"input_ids": (np.arange(seq, dtype=np.int64)[None] * 7 + 3) % 32000}
                timed = interleaved(pair, feed, rounds, runs)
                timed["speedup_cpu"] = timed["fp32"]["cpu_ms"] / timed[name]["cpu_ms"]
                timed["speedup_wall"] = timed["fp32"]["wall_ms"] / timed[name]["wall_ms"]
                row["latency"][f"{t}t_{seq}tok"] = timed
                print(f"llm {name} {t} thread(s) {seq} token(s): {json.dumps(timed)}", flush=True)
            del pair
        print(f"llm {name}: {json.dumps({k: v for k, v in row.items() if k != 'latency'})}", flush=True)
    if together:
        timed_together(llm, rows, threads, rounds)
    return rows


def timed_together(llm: str, rows: Dict[str, Dict[str, object]], threads: List[int], rounds: int) -> None:
    """fp32 and every written variant timed alternately in one group (``--interleave``); each row's
    ``latency`` as in the pairwise timing, the speedups over the fp32 of the same group."""
    written = [name for name, row in rows.items() if name != "fp32" and row.get("path")]
    for name in written:
        rows[name]["latency"] = {}
    for t in threads:
        group = {"fp32": session(llm, t), **{name: session(rows[name]["path"], t) for name in written}}
        for seq, runs in ((1, 5), (128, 1)):
            feed = {"input_ids": (np.arange(seq, dtype=np.int64)[None] * 7 + 3) % 32000}
            timed = interleaved(group, feed, rounds, runs)
            for name in written:
                rows[name]["latency"][f"{t}t_{seq}tok"] = {
                    "fp32": timed["fp32"], name: timed[name],
                    "speedup_cpu": timed["fp32"]["cpu_ms"] / timed[name]["cpu_ms"],
                    "speedup_wall": timed["fp32"]["wall_ms"] / timed[name]["wall_ms"]}
            print(f"llm together {t} thread(s) {seq} token(s): {json.dumps(timed)}", flush=True)
        del group


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = os.path.expanduser("~/.cache/graphprune-bench/llm")
    parser.add_argument("--llm", default=os.path.join(cache, "llama.onnx"))
    parser.add_argument("--dir", default=os.path.join(cache, "out"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--interleave", action="store_true",
                        help="time fp32 and all LLM variants alternately in one group (not pairwise)")
    parser.add_argument("--skip-bert", action="store_true")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--bert-variants", default=",".join(BERT_VARIANTS))
    parser.add_argument("--kernels", action="store_true", help="only the MatMul vs MatMulNBits micro-benchmark")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    if not os.path.exists(args.llm):
        print(f"{args.llm}: missing; build it with /tmp/hfenv/bin/python tools/make_llm_fixture.py", file=sys.stderr)
        return 2
    print(f"load average at start: {os.getloadavg()}", flush=True)
    result = {"loadavg_start": os.getloadavg()}
    if args.kernels:
        from bench_llm_kernels import kernel_microbench  # noqa: PLC0415 - beside this file

        result["kernels"] = kernel_microbench(args.rounds)
        result["loadavg_end"] = os.getloadavg()
        print(f"load average at end: {result['loadavg_end']}", flush=True)
    else:
        if not args.skip_bert:
            result["bert"] = bench_bert(args.dir, args.bert_variants.split(","))
        if not args.skip_llm:
            result["llm"] = bench_llm(args.llm, args.dir, args.variants.split(","),
                                      [int(t) for t in args.threads.split(",")], args.rounds, args.interleave)
        result["loadavg_end"] = os.getloadavg()
        print(f"load average at end: {result['loadavg_end']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
