"""The six case families, each generated from its own seeded ``random.Random``, and the fast subset."""

from __future__ import annotations

import io
import random
from typing import Dict, List, Sequence

import numpy as np

from graphprune.testing.fuzz.case import FAMILIES, MODEL_COMMANDS, FuzzCase
from graphprune.testing.fuzz.defects import structure_defects
from graphprune.testing.fuzz.models import (
    conv_model,
    good_x,
    model_bytes,
    npy_bytes,
    npz_bytes,
    scalar_input_model,
)


def _model_bytes_cases(rng: random.Random) -> List[FuzzCase]:
    good = model_bytes(conv_model())
    out: List[FuzzCase] = []
    commands = list(MODEL_COMMANDS)
    variants = [("empty", b""), ("garbage", bytes(rng.getrandbits(8) for _ in range(300))),
                ("npy_as_model", npy_bytes(np.zeros((2, 3), np.float32))), ("text", b"hello: world\n")]
    for cut in (1, 2, 7, 64, len(good) // 3, len(good) // 2, len(good) - 5, len(good) - 1):
        variants.append((f"truncated{cut}", good[:cut]))
    for k in range(12):
        flipped = bytearray(good)
        for _ in range(1 + k % 4):
            pos = rng.randrange(len(flipped))
            flipped[pos] ^= 1 << rng.randrange(8)
        variants.append((f"bitflip{k}", bytes(flipped)))
    data = npz_bytes(x=good_x())
    for i, (name, content) in enumerate(variants):
        for j in range(2):
            command = commands[(i * 2 + j) % len(commands)]
            out.append(FuzzCase(f"model_bytes/{name}/{command}", "model_bytes", list(MODEL_COMMANDS[command]),
                                {"model.onnx": content, "data.npz": data}, "any" if name.startswith("bitflip") else "error"))
    return out


def _structure_cases(rng: random.Random) -> List[FuzzCase]:
    out = []
    data = npz_bytes(x=good_x())
    commands = list(MODEL_COMMANDS)
    for i, (name, model, expect, isolate) in enumerate(structure_defects()):
        picks = commands if isolate else [commands[(i + k) % len(commands)] for k in range(3)]
        for command in picks:
            if command in ("finetune", "validate", "quantize") and name == "fixed_batch":
                continue  # their --input-shape x=1x3x8x8 does not fit a fixed batch of 2; prune/run cover it
            expect_here = expect
            if name.startswith(("pc_", "wm_")) and command == "finetune":
                expect_here = "any"
            out.append(FuzzCase(f"structure/{name}/{command}", "structure", list(MODEL_COMMANDS[command]),
                                {"model.onnx": model_bytes(model), "data.npz": data}, expect_here, isolate))
    return out


def _npz_cases(rng: random.Random) -> List[FuzzCase]:
    model = model_bytes(conv_model())
    x = good_x()
    nan = x.copy()
    nan[1, 0, 0, 0] = np.nan
    inf = x.copy()
    inf[0, 2, 3, 3] = -np.inf
    npy = io.BytesIO()
    np.save(npy, x)
    variants = [
        ("zero_samples", npz_bytes(x=x[:0]), "error"),
        ("nan", npz_bytes(x=nan), "error"),
        ("inf", npz_bytes(x=inf), "error"),
        ("rank3", npz_bytes(x=x[:, 0]), "error"),
        ("rank0", npz_bytes(x=np.float32(1.0)), "error"),
        ("wrong_dims", npz_bytes(x=x[:, :, :4]), "error"),
        ("wrong_channels", npz_bytes(x=np.concatenate([x, x], axis=1)), "error"),
        ("npy_as_npz", npy.getvalue(), "error"),
        ("text", b"not an npz", "error"),
        ("empty_file", b"", "error"),
        ("no_arrays", npz_bytes(), "error"),
        ("missing_key", npz_bytes(z=x), "error"),
        ("int_for_float", npz_bytes(x=x.astype(np.int32)), "error"),
        ("bool_for_float", npz_bytes(x=x > 0), "error"),
        ("float64", npz_bytes(x=x.astype(np.float64)), "ok"),
        ("complex", npz_bytes(x=x.astype(np.complex64)), "error"),
        ("object_pickle", None, "error"),
        ("truncated", npz_bytes(x=x)[:200], "error"),
    ]
    out = []
    cmds = {
        "prune": ["prune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--ratio", "0.5", "--criterion", "activation", "--data", "{d}/data.npz"],
        "quantize": MODEL_COMMANDS["quantize"][:-2] + ["--data", "{d}/data.npz"],
        "validate": ["validate", "{d}/model.onnx", "{d}/model.onnx", "--data", "{d}/data.npz", "--runs", "1"],
        "finetune": MODEL_COMMANDS["finetune"],
        "run": ["run", "{d}/model.onnx", "-o", "{d}/out.onnx", "--pass", "prune:ratio=0.25,criterion=activation",
                "--data", "{d}/data.npz"],
    }
    for i, (name, content, expect) in enumerate(variants):
        if content is None:  # an object array (needs pickle to read)
            buf = io.BytesIO()
            np.savez(buf, x=np.array([object()], dtype=object))
            content = buf.getvalue()
        for k in range(2):
            command = list(cmds)[(i + k) % len(cmds)]
            out.append(FuzzCase(f"npz/{name}/{command}", "npz", list(cmds[command]),
                                {"model.onnx": model, "data.npz": content}, expect))
    labels_cmd = ["finetune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--data", "{d}/data.npz", "--labels", "y",
                  "--epochs", "1", "--val-split", "0"]
    for name, labels, expect in [("labels_rank3", np.zeros((8, 2, 2), np.int64), "error"),
                                 ("labels_count", np.zeros(5, np.int64), "error"),
                                 ("labels_nan", np.array([np.nan] * 8, np.float32), "error"),
                                 ("labels_out_of_range", np.full(8, 50, np.int64), "error"),
                                 ("labels_negative", np.full(8, -3, np.int64), "error"),
                                 ("labels_string", np.array(["a"] * 8), "error"),
                                 ("labels_ok", np.arange(8, dtype=np.int64) % 10, "ok")]:
        out.append(FuzzCase(f"npz/{name}/finetune", "npz", list(labels_cmd),
                            {"model.onnx": model, "data.npz": npz_bytes(x=x, y=labels)}, expect))
    # scalar (rank-0) and integer inputs are first-class
    vad = model_bytes(scalar_input_model())
    vad_int = model_bytes(scalar_input_model(int_input=True))
    xs = np.random.default_rng(2).standard_normal((6, 16)).astype(np.float32)
    ids = np.arange(6, dtype=np.int64) % 20
    scalar_cmds = {
        "prune": ["prune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--ratio", "0.5", "--criterion", "activation", "--data", "{d}/data.npz"],
        "quantize": MODEL_COMMANDS["quantize"][:-2] + ["--data", "{d}/data.npz"],
        "validate": ["validate", "{d}/model.onnx", "{d}/model.onnx", "--data", "{d}/data.npz", "--runs", "1"],
        "sparsify": MODEL_COMMANDS["sparsify"],
        "validate_random": ["validate", "{d}/model.onnx", "{d}/model.onnx", "--samples", "2", "--runs", "1",
                            "--input-shape", "x=1x16"],
    }
    for name, content, expect in [
        ("scalar_shared", npz_bytes(x=xs, sr=np.array(16000, np.int64)), "ok"),
        ("scalar_per_sample", npz_bytes(x=xs, sr=np.full(6, 16000, np.int64)), "ok"),
        ("scalar_int32", npz_bytes(x=xs, sr=np.array(8000, np.int32)), "ok"),
        ("scalar_varying", npz_bytes(x=xs, sr=np.arange(6, dtype=np.int64)), "error"),
        ("scalar_rank2", npz_bytes(x=xs, sr=np.zeros((6, 2), np.int64)), "error"),
        ("scalar_float", npz_bytes(x=xs, sr=np.array(1.5, np.float32)), "error"),
    ]:
        for command in scalar_cmds:
            if command in ("sparsify", "validate_random") and name != "scalar_shared":
                continue
            out.append(FuzzCase(f"npz/{name}/{command}", "npz", list(scalar_cmds[command]),
                                {"model.onnx": vad, "data.npz": content}, expect))
    for command in ("prune", "validate", "quantize"):
        out.append(FuzzCase(f"npz/int_input/{command}", "npz", list(scalar_cmds[command]),
                            {"model.onnx": vad_int, "data.npz": npz_bytes(x=xs, sr=np.array(16000, np.int64), ids=ids)}, "ok"))
        out.append(FuzzCase(f"npz/int_input_float/{command}", "npz", list(scalar_cmds[command]),
                            {"model.onnx": vad_int, "data.npz": npz_bytes(x=xs, sr=np.array(16000, np.int64),
                                                                     ids=ids.astype(np.float32))}, "error"))
    return out


def _recipe_cases(rng: random.Random) -> List[FuzzCase]:
    model = model_bytes(conv_model())
    run = ["run", "{d}/model.onnx", "-o", "{d}/out.onnx", "--recipe", "{d}/recipe.yaml"]
    recipes = [
        ("round_to_1.5", "passes:\n  - prune: {ratio: 0.5, round_to: 1.5}\n", "error"),
        ("round_to_0", "passes:\n  - prune: {ratio: 0.5, round_to: 0}\n", "error"),
        ("round_to_str", "passes:\n  - prune: {ratio: 0.5, round_to: 'x'}\n", "error"),
        ("round_to_true", "passes:\n  - prune: {ratio: 0.5, round_to: true}\n", "error"),
        ("ratio_2", "passes:\n  - prune: {ratio: 2}\n", "error"),
        ("ratio_neg", "passes:\n  - prune: {ratio: -0.5}\n", "error"),
        ("ratio_nan", "passes:\n  - prune: {ratio: .nan}\n", "error"),
        ("ratio_inf", "passes:\n  - prune: {ratio: .inf}\n", "error"),
        ("ratio_str", "passes:\n  - prune: {ratio: half}\n", "error"),
        ("ratio_list", "passes:\n  - prune: {ratio: [1, 2]}\n", "error"),
        ("ratio_null", "passes:\n  - prune: {ratio: null}\n", "any"),
        ("sparsity_nan", "passes:\n  - sparsify: {sparsity: .nan}\n", "error"),
        ("sparsity_1", "passes:\n  - sparsify: {sparsity: 1.0}\n", "error"),
        ("pattern_bad", "passes:\n  - sparsify: {pattern: '5:4'}\n", "error"),
        ("pattern_zero", "passes:\n  - sparsify: {pattern: '0:4'}\n", "error"),
        ("unknown_pass", "passes:\n  - nosuchpass\n", "error"),
        ("unknown_arg", "passes:\n  - prune: {ratio: 0.5, color: red}\n", "error"),
        ("args_list", "passes:\n  - prune: [1, 2]\n", "error"),
        ("two_keys", "passes:\n  - {prune: {}, sparsify: {}}\n", "error"),
        ("no_passes", "other: 1\n", "error"),
        ("empty_passes", "passes: []\n", "error"),
        ("passes_str", "passes: prune\n", "error"),
        ("not_yaml", "passes: [\n  - {\n", "error"),
        ("binary", None, "error"),
        ("empty", "", "error"),
        ("list_top", "- prune\n", "error"),
        ("pass_int", "passes:\n  - 7\n", "error"),
        ("yaml_tag", "passes: !!python/object:os.system {}\n", "error"),
        ("mode_bad", "passes:\n  - prune: {ratio: 0.5, mode: shred}\n", "error"),
        ("criterion_bad", "passes:\n  - prune: {ratio: 0.5, criterion: vibes}\n", "error"),
        ("max_group_2", "passes:\n  - prune: {ratio: 0.5, global_ranking: true, max_group_ratio: 2}\n", "error"),
        ("quantize_samples0", "passes:\n  - quantize: {calibration_samples: 0, measure: false}\n", "error"),
        ("quantize_threads_neg", "passes:\n  - quantize: {threads: -2, measure: false}\n", "error"),
        ("ok", "passes:\n  - prune: {ratio: 0.5, round_to: 2}\n", "ok"),
    ]
    out = []
    for name, text, expect in recipes:
        content = bytes(rng.getrandbits(8) for _ in range(200)) if text is None else text.encode()
        out.append(FuzzCase(f"recipe/{name}", "recipe", list(run), {"model.onnx": model, "recipe.yaml": content}, expect))
    out.append(FuzzCase("recipe/huge", "recipe", list(run),
                        {"model.onnx": model, "recipe.yaml": b"passes:\n  - prune: {ratio: 0.5}\n" + b"#" * (3 << 20)}, "error"))
    out.append(FuzzCase("recipe/fifo", "recipe", list(run), {"model.onnx": model}, "error", fifos=["recipe.yaml"]))
    out.append(FuzzCase("recipe/directory", "recipe", list(run), {"model.onnx": model}, "error", dirs=["recipe.yaml"]))
    out.append(FuzzCase("recipe/missing", "recipe", list(run), {"model.onnx": model}, "error"))
    specs = [("prune:ratio=2", "error"), (":ratio=0.5", "error"), ("prune:ratio", "error"), ("nosuch", "error"),
             ("prune:round_to=1.5", "error"), ("prune:ratio=nan", "error"), ("sparsify:sparsity=inf", "error"),
             ("prune:ratio=[", "error"), ("prune:ratio=0.5,ratio=0.6", "any"), ("prune:ratio=-1", "error"),
             ("sparsify:pattern=2:4", "ok"), ("prune:ratio=0.5,exclude=[conv1", "error"), ("", "error"),
             ("prune:ratio=0.5,round_to=-4", "error"), ("quantize:calibration_samples=-1", "error"),
             ("canonicalize", "ok"), ("prune:ratio=1", "error"), ("prune:ratio=0.3", "ok")]
    for i, (spec, expect) in enumerate(specs):
        out.append(FuzzCase(f"recipe/pass{i}:{spec}", "recipe",
                            ["run", "{d}/model.onnx", "-o", "{d}/out.onnx", "--pass", spec], {"model.onnx": model}, expect))
    return out


def _args_cases(rng: random.Random) -> List[FuzzCase]:
    model = model_bytes(conv_model())
    files = {"model.onnx": model, "data.npz": npz_bytes(x=good_x(), y=np.arange(8, dtype=np.int64) % 10)}
    prune = ["prune", "{d}/model.onnx", "-o", "{d}/out.onnx"]
    ft = ["finetune", "{d}/model.onnx", "-o", "{d}/out.onnx", "--data", "{d}/data.npz", "--labels", "y",
          "--epochs", "1", "--val-split", "0"]
    quant = ["quantize", "{d}/model.onnx", "-o", "{d}/out.onnx", "--calibration-samples", "4", "--input-shape", "x=1x3x8x8"]
    val = ["validate", "{d}/model.onnx", "{d}/model.onnx", "--samples", "2", "--runs", "1"]
    spars = ["sparsify", "{d}/model.onnx", "-o", "{d}/out.onnx"]
    cases = [
        (prune + ["--ratio", "nan"], "error"), (prune + ["--ratio", "inf"], "error"), (prune + ["--ratio", "-0.1"], "error"),
        (prune + ["--ratio", "1"], "error"), (prune + ["--ratio", "abc"], "error"), (prune + ["--ratio", "1e400"], "error"),
        (prune + ["--ratio", "0.5", "--round-to", "0"], "error"), (prune + ["--ratio", "0.5", "--round-to", "-3"], "error"),
        (prune + ["--ratio", "0.5", "--round-to", str(2**70)], "any"),
        (prune + ["--ratio", "0.5", "--max-group-ratio", "2"], "error"), (prune + ["--ratio", "0.5", "--max-group-ratio", "nan"], "error"),
        (prune + ["--ratio", "0.5", "--heads-ratio", "nan"], "error"), (prune + ["--ratio", "0.5", "--criterion", "x"], "error"),
        (prune + ["--ratio", "0.5", "--input-shape", "x=0x3"], "error"), (prune + ["--ratio", "0.5", "--input-shape", "x=ax3"], "error"),
        (prune + ["--ratio", "0.5", "--input-shape", "nosuch=1x3x8x8"], "any"),
        (prune + ["--ratio", "0.5", "--input-shape", "x=1x3x8"], "any"),
        (spars + ["--sparsity", "nan"], "error"), (spars + ["--sparsity", "1"], "error"), (spars + ["--pattern", "5:4"], "error"),
        (spars + ["--pattern", "0:4"], "error"), (spars + ["--pattern", "2:0"], "error"), (spars + ["--pattern", "a:b"], "error"),
        (spars + ["--sparsity", "0.5", "--max-layer-sparsity", "inf"], "error"),
        (quant + ["--threads", "0"], "error"), (quant + ["--threads", "-1"], "error"),
        (quant + ["--threads", str(10**9)], "error"), (quant + ["--threads", str(2**40)], "error"),
        (quant + ["--calibration-samples", "0"], "error"), (quant + ["--calibration-samples", "-5"], "error"),
        (quant + ["--max-error", "nan"], "error"), (quant + ["--max-error", "-1"], "error"),
        (val + ["--threads", "0"], "error"), (val + ["--threads", str(10**6)], "error"), (val + ["--threads", "-4"], "error"),
        (val + ["--samples", "0"], "error"), (val + ["--samples", "-1"], "error"), (val + ["--samples", str(10**12)], "error"),
        (val + ["--runs", "0"], "error"), (val + ["--runs", "-2"], "error"), (val + ["--runs", str(10**12)], "error"),
        (ft + ["--threads", "0"], "error"), (ft + ["--threads", str(10**6)], "error"),
        (ft + ["--lr", "nan"], "error"), (ft + ["--lr", "inf"], "error"), (ft + ["--lr", "0"], "error"),
        (ft + ["--batch-size", "0"], "error"), (ft + ["--epochs", "-1"], "error"), (ft + ["--epochs", str(10**12)], "error"),
        (ft + ["--batch-size", str(10**12)], "any"), (ft + ["--val-split", "1"], "error"), (ft + ["--val-split", "nan"], "error"),
        (ft + ["--weight-decay", "nan"], "error"), (ft + ["--temperature", "nan"], "error"), (ft + ["--temperature", "0"], "error"),
        (ft + ["--distill-weight", "2"], "error"), (ft + ["--seed", "-1"], "error"), (ft + ["--seed", str(2**70)], "error"),
        (ft + ["--steps", "0"], "error"), (ft + ["--prune-ratio", "nan"], "error"), (ft + ["--prune-ratio", "0.5", "--steps", str(10**9)], "error"),
        (ft + ["--providers", "NoSuchEP"], "error"), (ft + ["--lr", "1e30"], "any"),
        (["inspect", "{d}/model.onnx", "--input-shape", "x=-1x3x8x8"], "error"),
        (["demo", "--nosuch"], "error"), (["nosuchcommand"], "error"), ([], "error"),
    ]
    out = []
    for i, (argv, expect) in enumerate(cases):
        isolate = any("--threads" == a for a in argv)  # a huge thread count once segfaulted the runtime
        out.append(FuzzCase(f"args/{i}:{' '.join(argv[3:] if len(argv) > 3 else argv)}", "args", list(argv),
                            dict(files), expect, isolate))
    return out


def _output_cases(rng: random.Random) -> List[FuzzCase]:
    model = model_bytes(conv_model())
    files = {"model.onnx": model, "data.npz": npz_bytes(x=good_x(), y=np.arange(8, dtype=np.int64) % 10),
             "recipe.yaml": b"passes:\n  - prune: {ratio: 0.5}\n"}
    prune = ["prune", "{d}/model.onnx", "--ratio", "0.5", "-o"]
    cases = [
        (prune + ["{d}/sub"], "error", ["sub"]),
        (prune + ["{d}/missing/out.onnx"], "error", []),
        (prune + ["{d}/model.onnx"], "error", []),
        (prune + ["{d}/out.onnx/"], "error", []),
        (prune + [""], "error", []),
        (prune + ["{d}/data.npz", "--criterion", "activation", "--data", "{d}/data.npz"], "error", []),
        (["run", "{d}/model.onnx", "--recipe", "{d}/recipe.yaml", "-o", "{d}/recipe.yaml"], "error", []),
        (["finetune", "{d}/model.onnx", "--data", "{d}/data.npz", "--teacher", "{d}/teacher.onnx", "--epochs", "1",
          "-o", "{d}/teacher.onnx"], "error", []),
        (["finetune", "{d}/model.onnx", "--data", "{d}/data.npz", "--labels", "y", "--epochs", "1", "-o", "{d}/data.npz"], "error", []),
        (["quantize", "{d}/model.onnx", "--no-measure", "--calibration-samples", "2", "-o", "{d}/out.onnx",
          "--report", "{d}/data.npz", "--data", "{d}/data.npz"], "error", []),
        (["quantize", "{d}/model.onnx", "--no-measure", "--calibration-samples", "2", "-o", "{d}/out.onnx",
          "--report", "{d}/nodir/r.json", "--input-shape", "x=1x3x8x8"], "error", []),
        (["sparsify", "{d}/model.onnx", "--sparsity", "0.5", "-o", "{d}/out.onnx", "--report", "{d}/sub"], "error", ["sub"]),
        (["sparsify", "{d}/model.onnx", "--sparsity", "0.5", "-o", "{d}/out.onnx", "--report", "{d}/out.onnx"], "error", []),
        (["validate", "{d}/model.onnx", "{d}/model.onnx", "--samples", "2", "--runs", "1", "--report", "{d}/model.onnx"], "error", []),
        (prune + ["{d}/out.onnx"], "ok", []),
        (prune + ["{d}/ünï cödé out.onnx"], "ok", []),
        (prune + ["{d}/model.onnx", "--overwrite-input"], "ok", []),
    ]
    out = []
    for i, (argv, expect, dirs) in enumerate(cases):
        extra = {"teacher.onnx": model} if "{d}/teacher.onnx" in argv else {}
        out.append(FuzzCase(f"output/{i}:{' '.join(argv[:1] + argv[-3:])}", "output", list(argv),
                            {**files, **extra}, expect, dirs=dirs))
    return out


_BUILDERS = {
    "model_bytes": _model_bytes_cases,
    "structure": _structure_cases,
    "npz": _npz_cases,
    "recipe": _recipe_cases,
    "args": _args_cases,
    "output": _output_cases,
}


def cases(seed: int = 0, families: Sequence[str] = FAMILIES) -> List[FuzzCase]:
    """Every case of ``families``, generated from ``seed`` (same seed, same cases and bytes)."""
    out: List[FuzzCase] = []
    for family in families:
        out.extend(_BUILDERS[family](random.Random(f"{seed}/{family}")))
    return out


def fast_subset(seed: int = 0, size: int = 60) -> List[FuzzCase]:
    """A seeded sample of ``size`` cases across every family (the subset ``make test`` runs).

    Crash-prone (``isolate``) cases are capped at two: each costs a subprocess.
    """
    everything = cases(seed)
    rng = random.Random(f"{seed}/subset")
    isolated = [c for c in everything if c.isolate]
    plain = [c for c in everything if not c.isolate and not c.id.startswith(("structure/fixed_batch", "npz/labels_ok"))]
    by_family: Dict[str, List[FuzzCase]] = {}
    for c in plain:
        by_family.setdefault(c.family, []).append(c)
    picked = rng.sample(isolated, 2)
    share = -(-(size - len(picked)) // len(by_family))  # rounded up
    for family, members in by_family.items():
        picked += rng.sample(members, min(share, len(members)))
    return picked

