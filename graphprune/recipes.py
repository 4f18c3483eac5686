"""Pipelines from recipes (``passes/*.yaml``) and from ``--pass NAME[:k=v,...]`` command-line specs."""

from __future__ import annotations

import inspect
import math
import os
import stat
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from graphprune.errors import UserError
from graphprune.passes.base import Pass, Pipeline, pass_class

__all__ = ["parse_pass_spec", "load_recipe", "build_pass", "build_pipeline", "RECIPE_DIR"]

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "passes")

PassSpec = Tuple[str, Dict[str, Any]]

# A recipe is a few lines of YAML: anything larger is a mistaken path.
MAX_RECIPE_BYTES = 1 << 20

# Ranges of pass arguments by name, whichever pass takes them: (low, high, low_open, high_open).
_ARG_RANGES: Dict[str, Tuple[float, float, bool, bool]] = {
    "ratio": (0.0, 1.0, False, True),
    "ffn_ratio": (0.0, 1.0, False, True),
    "hidden_ratio": (0.0, 1.0, False, True),
    "heads_ratio": (0.0, 1.0, False, False),
    "sparsity": (0.0, 1.0, False, True),
    "max_layer_sparsity": (0.0, 1.0, False, False),
    "max_group_ratio": (0.0, 1.0, True, False),
    "round_to": (1, 2**31 - 1, False, False),
    "threads": (1, (os.cpu_count() or 1) * 4, False, False),
    "calibration_samples": (1, 10_000_000, False, False),
    "epochs": (0, 100_000, False, False),
    "batch_size": (1, math.inf, False, True),
    "lr": (0.0, math.inf, True, True),
    "val_split": (0.0, 1.0, False, True),
    "weight_decay": (0.0, 1.0, False, False),
    "temperature": (0.0, math.inf, True, True),
    "distill_weight": (0.0, 1.0, False, False),
    "seed": (0, 2**32 - 1, False, False),
    "max_error": (0.0, math.inf, False, True),
    "fold_limit": (0, math.inf, False, True),
    "damp": (0.0, math.inf, False, True),
}


def parse_pass_spec(text: str) -> PassSpec:
    """``prune:ratio=0.5,criterion=l2`` -> ("prune", {"ratio": 0.5, "criterion": "l2"}).

    Values are read as YAML scalars, so numbers, booleans and ``[a, b]`` lists keep their types.
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise UserError(f"--pass {text!r}: missing pass name")
    kwargs: Dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--pass {text!r}: expected key=value, got {item!r}")
        try:
            kwargs[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--pass {text!r}: cannot read value {value!r}") from None
    return name, kwargs


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside [...] (so ``exclude=[a,b]`` stays one item)."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        items.append(current)
    return [i for i in items if i.strip()]


def load_recipe(path: str) -> List[PassSpec]:
    """Read a recipe: a YAML mapping with ``passes:``, a list of names or ``{name: {args}}`` items.

    A bare name (``prune-quantize``) is looked up in the bundled ``passes/`` folder.
    """
    if not os.path.exists(path) and os.path.exists(os.path.join(RECIPE_DIR, path + ".yaml")):
        path = os.path.join(RECIPE_DIR, path + ".yaml")
    text = _read_recipe_text(path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("passes"), list) or not doc["passes"]:
        raise UserError(f"{path}: a recipe is a mapping with a non-empty 'passes:' list")
    specs: List[PassSpec] = []
    for i, item in enumerate(doc["passes"]):
        if isinstance(item, str):
            specs.append((item, {}))
        elif isinstance(item, dict) and len(item) == 1:
            (name, args), = item.items()
            if args is not None and not isinstance(args, dict):
                raise UserError(f"{path}: pass #{i + 1} ({name}): arguments must be a mapping")
            specs.append((str(name), dict(args or {})))
        else:
            raise UserError(f"{path}: pass #{i + 1} must be a name or a one-key mapping name: {{args}}")
    return specs


def _read_recipe_text(path: str) -> str:
    """The recipe's text: only a regular file (a FIFO would block), at most ``MAX_RECIPE_BYTES``, UTF-8."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read recipe ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: not a regular file (a recipe is a YAML file)")
    if info.st_size > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: {info.st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read recipe ({exc.strerror})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: a recipe is at most {MAX_RECIPE_BYTES:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None


def _check_argument(pass_name: str, key: str, value: Any, annotation: Any) -> None:
    """Refuse a recipe/--pass value of the wrong type or outside its range (``UserError`` naming it)."""
    if value is None:
        return
    kind = str(annotation).replace("typing.", "").replace(" ", "")
    what = f"pass {pass_name!r}: {key}={value!r}"
    if kind in ("int", "Optional[int]"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{what} must be an integer")
    elif kind in ("float", "Optional[float]"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{what} must be a number")
        if not math.isfinite(value):
            raise UserError(f"{what} must be a finite number")
    elif kind in ("bool",):
        if not isinstance(value, bool):
            raise UserError(f"{what} must be true or false")
    elif kind in ("str", "Optional[str]"):
        if not isinstance(value, str):
            raise UserError(f"{what} must be a string")
    limits = _ARG_RANGES.get(key)
    if limits is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, low_open, high_open = limits
    if not math.isfinite(value) and high != math.inf:
        raise UserError(f"{what} must be a finite number")
    ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        raise UserError(f"{what} is outside {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def build_pass(name: str, kwargs: Mapping[str, Any], context: Optional[Mapping[str, Any]] = None) -> Pass:
    """Instantiate a registered pass, filling ``context`` values (data, input_shapes...) it accepts.

    Unknown arguments are a ``UserError`` listing what the pass accepts.
    """
    cls = pass_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    for key in kwargs:
        if key not in accepted:
            raise UserError(f"pass {name!r} has no argument {key!r} (arguments: {', '.join(accepted) or 'none'})")
    for key, value in kwargs.items():
        _check_argument(name, key, value, params[key].annotation)
    full = dict(kwargs)
    for key, value in (context or {}).items():
        if key in accepted and key not in full and value is not None:
            full[key] = value
    try:
        return cls(**full)
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"pass {name!r}: {' '.join(str(exc).split())[:300]}") from None


def build_pipeline(specs: Sequence[PassSpec], context: Optional[Mapping[str, Any]] = None, progress: bool = False) -> Pipeline:
    from graphprune.passes.reconstruct import link_originals  # a reconstruct refits to what the prune before it got

    return Pipeline(link_originals([build_pass(name, kwargs, context) for name, kwargs in specs]), progress=progress)
