"""Benchmark structured channel pruning (graphprune's ``prune`` pass).

Usage:
    .venv/bin/python tools/bench_prune.py [--threads 1] [--runs 20] [--json out.json] [--skip-corpus]
        [--torch-python /tmp/tp/bin/python]

Sections:
  1. ResNet-50 (torch-style fixture, 1x3x224x224) pruned 50% uniformly (l2): MACs, params and ORT
     latency before/after, the speedup, and a hand-built width-0.5 ResNet-50 for reference.
  2. Analysis + pruning time on ResNet-50 (the pass on an in-memory model: no file I/O, no checker),
     split into analysis / scoring+selection / applying, then the same for ResNets with 2x, 4x and
     8x the blocks per stage: it must grow linearly with the node count.
  3. Per corpus model at 50%: channel groups found and blocked, params, MACs and latency before/after
     (onnx's light models with seeded weights, then the project's fixtures; dynamic dims at batch 1,
     64 px).
With ``--torch-python`` (a throwaway venv holding torch and torch-pruning, never the project's), the
same job in Torch-Pruning is timed in the same run: a torchvision-equivalent ResNet-50 pruned 50% with
``MagnitudePruner`` (L2, fc ignored), dependency graph construction and ``step()`` included.
Latency is the median of ``--runs`` runs after 3 warm-up runs at a fixed thread count, the models
being compared timed in turns (one run each, repeated) so that load from other processes hits them
alike; pruning timings are the best of 5 runs (3 for the largest nets), Torch-Pruning's too.  All
numbers come from one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.pop("GRAPHPRUNE_DEBUG", None)  # the full checker is not part of the timed work

from graphprune.data import random_inputs  # noqa: E402
from graphprune.dependency import build_dependency_graph, reported_groups  # noqa: E402
from graphprune.metrics import count_macs  # noqa: E402
from graphprune.ir import count_params  # noqa: E402
from graphprune.passes.prune_channels import PruneChannelsPass  # noqa: E402
from graphprune.pruning import apply_selection, group_scores, removal_masks, select_channels  # noqa: E402
from graphprune.runtime import interleaved_latencies  # noqa: E402

STAGES = (3, 4, 6, 3)  # ResNet-50 blocks per stage


def resnet50(width: float = 1.0, blocks=STAGES):
    from graphprune.testing import fixtures

    return fixtures.resnet(depth=50, width=width, image=224, blocks=tuple(blocks))



def input_shape(model):
    """Concrete input shape: batch 1, other dynamic dims (spatial) 64."""
    vi = model.graph.input[0]
    dims = vi.type.tensor_type.shape.dim
    return {vi.name: tuple(d.dim_value if d.dim_value > 0 else (1 if i == 0 else 64) for i, d in enumerate(dims))}


def best_time(fn, repeats=5) -> float:
    """Fastest wall time of ``repeats`` runs (the machine is shared: the minimum is the least disturbed)."""
    return best_times(fn, repeats)[0]


def best_times(fn, repeats=5):
    """(fastest wall time, fastest CPU time of this process) over ``repeats`` runs.

    CPU time does not count the time other processes on the shared machine take the cores away, so
    it shows how the work itself grows with depth.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def stage_times(model, ratio=0.5):
    """Best-of-5 seconds of analysis, scoring+selection and applying (remove mode)."""
    state = {}

    def analyse():
        dep = build_dependency_graph(model)
        state["dep"], state["groups"] = dep, [g for g in reported_groups(dep.groups()) if g.prunable]

    def score():
        scores = group_scores(state["dep"], state["groups"], "l2")
        state["masks"] = removal_masks(state["groups"], select_channels(state["groups"], scores, ratio))

    def apply():
        apply_selection(state["dep"], state["masks"], "remove")

    return {"analysis": best_time(analyse), "scoring": best_time(score), "apply": best_time(apply)}


def bench_resnet50(threads, runs):
    model = resnet50()
    shapes = input_shape(model)
    feed = random_inputs(model, shapes).first_batch(1)
    result = PruneChannelsPass(ratio=0.5)(model)
    pruned = result.model
    half = resnet50(width=0.5)
    original_s, pruned_s, half_s = interleaved_latencies([model, pruned, half], feed, threads, runs)
    row = {
        "params": [count_params(model), count_params(pruned)],
        "macs": [count_macs(model, shapes), count_macs(pruned, shapes)],
        "latency_ms": [original_s * 1e3, pruned_s * 1e3],
        "hand_built_half_latency_ms": half_s * 1e3,
        "hand_built_half_macs": count_macs(half, shapes),
        "groups_pruned": result.stats["groups_pruned"],
    }
    row["macs_ratio"] = row["macs"][1] / row["macs"][0]
    row["speedup"] = row["latency_ms"][0] / row["latency_ms"][1]
    row["hand_built_half_speedup"] = row["latency_ms"][0] / row["hand_built_half_latency_ms"]
    return row


def bench_depth():
    rows = []
    for factor in (1, 2, 4, 8):
        model = resnet50(blocks=[b * factor for b in STAGES])
        wall, cpu = best_times(lambda: PruneChannelsPass(ratio=0.5)(model), repeats=3 if factor > 2 else 5)
        rows.append({"blocks": factor, "nodes": len(model.graph.node), "seconds": wall, "cpu_seconds": cpu,
                     "cpu_us_per_node": cpu / len(model.graph.node) * 1e6, **stage_times(model)})
    return rows


def corpus():
    from graphprune.testing.zoo import load_light_model

    models = {f"light {name}": (lambda n=name: load_light_model(n)) for name in
              ("resnet50", "shufflenet", "densenet121", "inception_v1", "inception_v2", "squeezenet", "vgg19")}
    try:
        from graphprune.testing import fixtures

        models.update(fixtures.fixture_corpus())
    except (ImportError, AttributeError):
        pass
    return models


def bench_corpus(threads, runs):
    rows = []
    for name, build in corpus().items():
        model = build()
        shapes = input_shape(model)
        feed = random_inputs(model, shapes).first_batch(1)
        result = PruneChannelsPass(ratio=0.5)(model)
        s = result.stats
        rows.append({
            "model": name, "groups": s["groups_found"], "blocked": s["groups_blocked"],
            "params": [s["params_before"], s["params_after"]],
            "macs": [count_macs(model, shapes), count_macs(result.model, shapes)],
            "latency_ms": [t * 1e3 for t in interleaved_latencies([model, result.model], feed, threads, runs)],
        })
    return rows


# Runs in the torch venv: a torchvision ResNet-50 (Bottleneck v1.5) and Torch-Pruning's MagnitudePruner.
TORCH_SCRIPT = r'''
import json, statistics, sys, time
import torch, torch.nn as nn
import torch_pruning as tp

torch.set_num_threads(1)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False); self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False); self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False); self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True); self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False); self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True); self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for i, n in enumerate(blocks):
            planes, stride = 64 * 2 ** i, 1 if i == 0 else 2
            down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            stage = [Bottleneck(inplanes, planes, stride, down)]
            inplanes = planes * 4
            stage += [Bottleneck(inplanes, planes) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1); self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layers(x)), 1))


def prune_once(blocks):
    model = ResNet(blocks).eval()
    example = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    return time.perf_counter() - start


out = {}
for factor in [int(f) for f in sys.argv[1:]] or [1]:
    blocks = tuple(b * factor for b in (3, 4, 6, 3))
    times = [prune_once(blocks) for _ in range(5 if factor <= 2 else 3)]
    out[factor] = min(times)
print(json.dumps(out))
'''


def bench_torch_pruning(python: str, factors=(1, 2, 4, 8)):
    """Median seconds of Torch-Pruning on ResNet-50 with each block factor (None if unavailable)."""
    proc = subprocess.run([python, "-c", TORCH_SCRIPT, *map(str, factors)], capture_output=True, text=True)
    if proc.returncode:
        print(f"torch-pruning benchmark failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _m(n):
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", metavar="OUT.json")
    parser.add_argument("--skip-corpus", action="store_true")
    parser.add_argument("--torch-python", metavar="PYTHON", help="python of a venv with torch + torch-pruning")
    args = parser.parse_args()
    report = {"threads": args.threads}

    r = report["resnet50"] = bench_resnet50(args.threads, args.runs)
    print(f"## ResNet-50 (torch-style, 1x3x224x224) pruned 50% uniformly, {args.threads} thread(s)")
    print("| | params | MACs | latency | speedup |\n|---|---|---|---|---|")
    print(f"| original | {_m(r['params'][0])} | {r['macs'][0] / 1e9:.2f}G | {r['latency_ms'][0]:.1f} ms | 1.00x |")
    print(f"| pruned 50% | {_m(r['params'][1])} | {r['macs'][1] / 1e9:.2f}G ({r['macs_ratio']:.1%}) "
          f"| {r['latency_ms'][1]:.1f} ms | {r['speedup']:.2f}x |")
    print(f"| hand-built width 0.5 | | {r['hand_built_half_macs'] / 1e9:.2f}G | "
          f"{r['hand_built_half_latency_ms']:.1f} ms | {r['hand_built_half_speedup']:.2f}x |")

    rows = report["depth"] = bench_depth()
    torch_times = report["torch_pruning"] = bench_torch_pruning(args.torch_python) if args.torch_python else None
    print("\n## Analysis + pruning time (best of 5, no file I/O) vs depth")
    print("| blocks per stage | nodes | wall | CPU | CPU per node | analysis | scoring | apply | Torch-Pruning |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        torch_time = f"{torch_times[row['blocks']]:.3f} s" if torch_times else "-"
        print(f"| {row['blocks']}x | {row['nodes']} | {row['seconds']:.3f} s | {row['cpu_seconds']:.3f} s "
              f"| {row['cpu_us_per_node']:.0f} us | {row['analysis']:.3f} s | {row['scoring']:.3f} s "
              f"| {row['apply']:.3f} s | {torch_time} |")

    if not args.skip_corpus:
        rows = report["corpus"] = bench_corpus(args.threads, args.runs)
        print("\n## Corpus at 50% (l2, uniform)")
        print("| model | groups | blocked | params | MACs | latency |\n|---|---|---|---|---|---|")
        for row in rows:
            p, m, t = row["params"], row["macs"], row["latency_ms"]
            macs = f"{_m(m[0])} -> {_m(m[1])} ({m[1] / m[0]:.0%})" if m[0] and m[1] is not None else "n/a"
            print(f"| {row['model']} | {row['groups']} | {row['blocked']} | {_m(p[0])} -> {_m(p[1])} | {macs} "
                  f"| {t[0]:.2f} -> {t[1]:.2f} ms ({t[0] / t[1]:.2f}x) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
