"""The benchmark's report: onnxruntime profile summaries, the markdown table, the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from train_bench.models import TITLES


def profile_summary(path: str, forward_ops: dict) -> dict:
    """Kernel microseconds per step by op type (and by emitting rule for graphprune's gradient nodes).

    Each node's time is its median over the profiled runs, so the first run's allocations do not count."""
    with open(path) as f:
        events = json.load(f)
    runs: dict = {}
    ops: dict = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        runs.setdefault(node, []).append(float(event.get("dur", 0)))
        ops[node] = event.get("args", {}).get("op_name", "?")
    by_op: dict = {}
    by_rule: dict = {}
    for node, durations in runs.items():
        dur = statistics.median(durations)
        for table, key in ((by_op, ops[node]), (by_rule, f"{_emitting_rule(node, forward_ops)} -> {ops[node]}")):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += dur
            entry[1] += 1
    total = sum(statistics.median(d) for d in runs.values())
    slowest = sorted(runs, key=lambda n: -statistics.median(runs[n]))[:25]

    def rows(table):
        return sorted(([k, round(v[0], 1), v[1]] for k, v in table.items()), key=lambda r: -r[1])

    return {"total_us": round(total, 1), "by_op": rows(by_op), "by_rule": rows(by_rule),
            "slowest_nodes": [[n, ops[n], round(statistics.median(runs[n]), 1)] for n in slowest]}


def _emitting_rule(node: str, forward_ops: dict) -> str:
    """Which part of the step a node belongs to: forward, the optimizer, or the rule of a forward op."""
    if node.startswith("graphprune.step/opt/"):
        return "optimizer"
    if node.startswith("graphprune.step/next/"):
        return "step outputs"
    if node.startswith("graphprune.grad/"):
        owner = node[len("graphprune.grad/"):]
        while "/" in owner:  # onnxruntime's fusions append to the emitted name: find the forward node
            owner = owner.rsplit("/", 1)[0]
            if owner in forward_ops:
                return f"grad of {forward_ops[owner]}"
        return "gradient"
    if node.startswith("graphprune.train/"):
        return "loss"
    if "_Grad/" in node or node.endswith("_Grad"):
        return "gradient"
    return "forward"


def _cell(stats: dict) -> str:
    if "error" in stats:
        return "fails"
    if "wall_ms" not in stats:
        return "-"
    return f"{stats['wall_ms']:.1f} ms (cpu {stats['cpu_ms']:.1f})"


def _ratio(row: dict, other: str) -> str:
    if f"ours_over_{other}" not in row:
        return "-"
    return f"{row[f'ours_over_{other}']:.2f}x (cpu {row[f'ours_over_{other}_cpu']:.2f}x)"


def _goal(row: dict) -> str:
    """Whether ours <= 1.0x ORT-training and <= 1.5x torch, on wall-clock and on CPU time."""
    if "ours_over_ortt" not in row or "ours_over_torch" not in row:
        return "-"
    met = {clock: row[f"ours_over_ortt{suffix}"] <= 1.0 and row[f"ours_over_torch{suffix}"] <= 1.5
           for clock, suffix in (("wall", ""), ("cpu", "_cpu"))}
    if all(met.values()) or not any(met.values()):
        return "met" if met["wall"] else "missed"
    return f"met on {'wall' if met['wall'] else 'cpu'} time only"


def markdown(rows) -> str:
    header = ["model", "trained params", "batch", "threads", "ours", "ORT-training 1.19.2", "torch eager",
              "ours / ORT-training", "ours / torch", "peak RSS growth: ours / ORT-T / torch", "goal (<=1.0x, <=1.5x)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        fw = row["frameworks"]
        memory = " / ".join(f"{fw[k]['peak_rss_growth_mb']:.0f}" if "peak_rss_growth_mb" in fw.get(k, {}) else "-"
                            for k in ("ours", "ortt", "torch"))
        goal = _goal(row)
        cells = [row["title"], f"{row['trainable_params'] / 1e6:.2f}M", row["batch"], row["threads"],
                 *(_cell(fw.get(k, {})) for k in ("ours", "ortt", "torch")), _ratio(row, "ortt"), _ratio(row, "torch"),
                 f"{memory} MB", goal]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def profile_text(rows, top: int = 40) -> str:
    out = []
    for row in rows:
        for kind in ("ours", "ortt"):
            prof = row["frameworks"].get(kind, {}).get("profile")
            if not prof:
                continue
            out.append(f"\n{row['title']}, {row['threads']} thread(s), {TITLES[kind]}: "
                       f"{prof['total_us'] / 1000:.1f} ms of kernels per step")
            out.append("  by op type (ms/step, nodes): " + ", ".join(
                f"{op} {us / 1000:.1f} ({n})" for op, us, n in prof["by_op"][:top]))
            if kind == "ours":
                parts: dict = {}
                for key, us, _ in prof["by_rule"]:
                    part = "gradient" if key.startswith(("grad of", "gradient")) else key.split(" -> ")[0]
                    parts[part] = parts.get(part, 0.0) + us
                out.append("  by part (ms/step): " + ", ".join(
                    f"{part} {us / 1000:.1f}" for part, us in sorted(parts.items(), key=lambda p: -p[1])))
                out.append("  by rule -> op (ms/step, nodes): " + ", ".join(
                    f"{key} {us / 1000:.1f} ({n})" for key, us, n in prof["by_rule"][:top]))
    return "\n".join(out)


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
