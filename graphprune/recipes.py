"""Pipelines from recipes (``passes/*.yaml``) and from ``--pass NAME[:k=v,...]`` command-line specs."""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from graphprune.errors import UserError
from graphprune.passes.base import Pass, Pipeline, pass_class

__all__ = ["parse_pass_spec", "load_recipe", "build_pass", "build_pipeline", "RECIPE_DIR"]

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "passes")

PassSpec = Tuple[str, Dict[str, Any]]


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
    if not os.path.exists(path):
        raise UserError(f"{path}: no such recipe file")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
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
    full = dict(kwargs)
    for key, value in (context or {}).items():
        if key in accepted and key not in full and value is not None:
            full[key] = value
    try:
        return cls(**full)
    except (TypeError, ValueError) as exc:
        raise UserError(f"pass {name!r}: {exc}") from None


def build_pipeline(specs: Sequence[PassSpec], context: Optional[Mapping[str, Any]] = None, progress: bool = False) -> Pipeline:
    return Pipeline([build_pass(name, kwargs, context) for name, kwargs in specs], progress=progress)
