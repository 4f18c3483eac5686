"""Benchmark depth pruning (``prune --blocks-ratio``): whole residual blocks removed, chosen by measured importance.

Usage:
    /tmp/hfenv/bin/python tools/bench_depth.py --export      # once: GPT-2 and Llama ONNX files (needs torch + transformers)
    .venv/bin/python tools/bench_depth.py [--ratio 0.25] [--runs 20] [--seq 128] [--json out.json]

Models (seeded random weights, no hub download):
  - ``gpt2``: transformers' GPT2LMHeadModel, 12 layers, hidden 768, 12 heads, vocab 50257 (GPT-2 small's
    shape; pre-LayerNorm), exported by torch's TorchScript exporter (opset 17) with dynamic batch and
    sequence, into ``~/.cache/graphprune-bench/depth/gpt2.onnx``;
  - ``llama``: LlamaForCausalLM, 12 layers, hidden 768, 12 query / 4 KV heads, SwiGLU 2048, vocab 32000
    (pre-RMSNorm), exported the same way (``llama.onnx``);
  - ``bert``: ``graphprune.testing.bert_base_like()`` (post-LayerNorm encoder, BERT-base size);
  - ``resnet50``: ``graphprune.testing.resnet(50)`` at 224 px (12 identity-shortcut bottlenecks of 16).

For each: ``PruneBlocksPass(ratio=--ratio)`` on 16 random calibration samples (importance = 1 - cosine
between each block's input and output), and the same number of blocks removed from the end instead
(``indices=`` the last ones) and the highest-scored ones; each block removed alone (output rel L2 on 2
held-out samples, its Spearman rank correlation with the scores); MACs and params ratios, latency at batch 1 (the original and the two
pruned models timed in turns, ``--runs`` runs after 3 warm-ups, one thread; wall and process CPU
time), output agreement with the original on held-out inputs (relative L2 and cosine), pass time.
All numbers come from one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import time

CACHE = os.path.expanduser("~/.cache/graphprune-bench/depth")


def export_models(out: str = CACHE) -> None:
    """GPT-2 and Llama with seeded weights -> ONNX (TorchScript exporter, opset 17); runs in the hfenv venv."""
    import sys

    import onnx
    import torch

    # torchvision in the side venv may not match its torch (its ops fail to register): transformers
    # only needs it for image models, so it is kept out
    sys.modules.setdefault("torchvision", None)
    import transformers

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            mask = torch.ones_like(input_ids)  # transformers 5.x without a mask looks for packed sequences
            return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True).logits

    configs = {
        "gpt2": (transformers.GPT2LMHeadModel,
                 transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
        "llama": (transformers.LlamaForCausalLM,
                  transformers.LlamaConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                           num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                                           max_position_embeddings=1024, tie_word_embeddings=False)),
    }
    os.makedirs(out, exist_ok=True)
    for name, (cls, config) in configs.items():
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = Wrapper(cls(config).eval())
        with torch.no_grad():  # no two parameters equal: the exporter would share one initializer between them
            for param in model.parameters():
                param.add_(0.02 * torch.randn_like(param))
        path = os.path.join(out, f"{name}.onnx")
        ids = torch.randint(0, 100, (1, 8))
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        with torch.no_grad():
            torch.onnx.export(model, (ids,), path, dynamo=False, opset_version=17, dynamic_axes=axes,
                              input_names=["input_ids"], output_names=["logits"])
        onnx.checker.check_model(path, full_check=True)
        print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", action="store_true", help="write the GPT-2 and Llama ONNX files (hfenv)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama", "bert", "resnet50"])
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    if args.export:
        export_models()
        return
    import subprocess

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load: {load}", flush=True)
    results = [bench(name, args) for name in args.models]
    print(f"load after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


# name -> (builder, token vocabulary or None for images, the output to compare)
def _models():
    import onnx

    from graphprune.testing import bert_base_like, resnet

    return {
        "gpt2": (lambda: onnx.load(os.path.join(CACHE, "gpt2.onnx")), 50257, "logits"),
        "llama": (lambda: onnx.load(os.path.join(CACHE, "llama.onnx")), 32000, "logits"),
        "bert": (bert_base_like, 30522, "last_hidden_state"),
        "resnet50": (lambda: resnet(50, image=224, dynamic_batch=True), None, "output"),
    }


def _inputs(vocab, count: int, seq: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    if vocab is None:
        return {"input": rng.standard_normal((count, 3, 224, 224)).astype(np.float32)}
    return {"input_ids": rng.integers(0, vocab, size=(count, seq)).astype(np.int64)}


def _latencies(models, feed, runs: int, warmup: int = 3):
    """Median wall and process-CPU ms per run of each model, timed in turns (one run each, ``runs``
    times) on one intra-op thread without spinning (so CPU time is the work, not the waiting)."""
    import statistics

    from graphprune.runtime import make_session

    sessions = [make_session(m, threads=1, spinning=False) for m in models]
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feed)
    wall = [[] for _ in sessions]
    cpu = [[] for _ in sessions]
    for _ in range(runs):
        for i, session in enumerate(sessions):
            w, c = time.perf_counter(), time.process_time()
            session.run(None, feed)
            cpu[i].append(time.process_time() - c)
            wall[i].append(time.perf_counter() - w)
    return [statistics.median(t) * 1e3 for t in wall], [statistics.median(t) * 1e3 for t in cpu]


def _agreement(reference, candidate, images: bool) -> dict:
    """Relative L2 and cosine of the whole output, mean per-row cosine, and top-1 agreement (per token
    of LM logits, per image of class logits)."""
    import numpy as np

    from graphprune.pruning.block_importance import row_cosines

    r, c = reference.astype(np.float64), candidate.astype(np.float64)
    return {
        "rel_l2": float(np.linalg.norm(c - r) / np.linalg.norm(r)),
        "cosine": float((r.ravel() @ c.ravel()) / (np.linalg.norm(r) * np.linalg.norm(c))),
        "row_cosine": float(row_cosines(r, c, r.ndim - 1).mean()),
        "top1": float(np.mean(r.argmax(-1) == c.argmax(-1))),
    }


def bench(name: str, args) -> dict:
    from graphprune.data import InputSet
    from graphprune.ir import count_params
    from graphprune.metrics import count_macs
    from graphprune.passes.prune_blocks import PruneBlocksPass
    from graphprune.runtime import make_session, run

    build, vocab, output = _models()[name]
    model = build()
    calibration = InputSet(_inputs(vocab, 16, args.seq, seed=0))
    start = time.perf_counter()
    chosen = PruneBlocksPass(ratio=args.ratio, data=calibration, batch_size=4)(model)
    pass_seconds = time.perf_counter() - start
    count = chosen.stats["blocks_removed"]
    removable = [e["index"] for e in chosen.stats["blocks"] if e["removable"]]
    scores = {e["index"]: e["score"] for e in chosen.stats["blocks"] if "score" in e}
    highest = sorted(scores, key=lambda i: -scores[i])[:count]
    last = PruneBlocksPass(indices=removable[-count:])(model)
    candidates = {"importance": chosen.model, "last": last.model,
                  "highest": PruneBlocksPass(indices=highest)(model).model}
    feed = {k: v[:1] for k, v in _inputs(vocab, 1, args.seq, seed=1).items()}
    shapes = {k: v.shape for k, v in feed.items()}
    macs = count_macs(model, shapes)
    result = {
        "model": name, "blocks_found": chosen.stats["blocks_found"], "blocks_removed": count,
        "removed": chosen.stats["removed"], "last_indices": removable[-count:], "highest_indices": sorted(highest),
        "scores": {e["index"]: e.get("score") for e in chosen.stats["blocks"]},
        "pass_seconds": round(pass_seconds, 2), "params": count_params(model), "macs": macs,
    }
    held_out = _inputs(vocab, 8, args.seq, seed=2)
    reference = run(make_session(model, threads=None), held_out)[output]
    for key, pruned in candidates.items():
        outputs = run(make_session(pruned, threads=None), held_out)[output]
        result[key] = {"params_ratio": count_params(pruned) / result["params"],
                       "macs_ratio": count_macs(pruned, shapes) / macs,
                       **_agreement(reference, outputs, vocab is None)}
    # each block removed alone: does its score rank the output error it causes?
    sweep = {k: v[:2] for k, v in held_out.items()}
    reference = run(make_session(model, threads=None), sweep)[output]
    errors = {}
    for index in sorted(scores):
        alone = PruneBlocksPass(indices=[index])(model).model
        errors[index] = _agreement(reference, run(make_session(alone, threads=None), sweep)[output], False)["rel_l2"]
    result["single_block_rel_l2"] = errors
    result["spearman"] = _spearman([scores[i] for i in sorted(scores)], [errors[i] for i in sorted(scores)])
    wall, cpu = _latencies([model, chosen.model, last.model], feed, args.runs)
    result["latency_ms"] = {"original": [wall[0], cpu[0]], "importance": [wall[1], cpu[1]], "last": [wall[2], cpu[2]]}
    _print(result)
    return result


def _spearman(a, b) -> float:
    import numpy as np

    ranks = [np.argsort(np.argsort(v)) for v in (a, b)]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def _print(r: dict) -> None:
    lat = r["latency_ms"]
    print(f"\n{r['model']}: {r['blocks_removed']} of {r['blocks_found']} blocks removed, pass {r['pass_seconds']} s; "
          f"chosen {[e['index'] for e in r['removed']]}, last {r['last_indices']}", flush=True)
    print("  scores: " + ", ".join(f"{i}:{s:.4f}" for i, s in r["scores"].items() if s is not None))
    print(f"  {'':12}{'params':>8}{'MACs':>8}{'wall ms':>10}{'cpu ms':>10}{'rel L2':>9}{'cosine':>9}{'row cos':>9}{'top-1':>8}")
    print(f"  {'original':12}{1:>8.3f}{1:>8.3f}{lat['original'][0]:>10.1f}{lat['original'][1]:>10.1f}")
    for key in ("importance", "last", "highest"):
        row = r[key]
        wall, cpu = lat[key] if key in lat else (float("nan"), float("nan"))
        print(f"  {key:12}{row['params_ratio']:>8.3f}{row['macs_ratio']:>8.3f}{wall:>10.1f}{cpu:>10.1f}"
              f"{row['rel_l2']:>9.3f}{row['cosine']:>9.3f}{row['row_cosine']:>9.3f}{row['top1']:>8.1%}", flush=True)
    print(f"  highest-scored {r['highest_indices']}; one block removed at a time, output rel L2: "
          + ", ".join(f"{i}:{e:.3f}" for i, e in r["single_block_rel_l2"].items())
          + f"; Spearman(score, rel L2) = {r['spearman']:.3f}", flush=True)


if __name__ == "__main__":
    main()
