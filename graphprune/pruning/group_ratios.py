"""Per-group pruning ratios: stable group names, selection by name, and the ratios file.

Group ids are positions in one analysis; a ratio meant to be saved and re-applied needs a name that
survives a new analysis of the same model.  A group is named by its first member constant axis,
weights first (``conv2.weight:0`` is the output channels of ``conv2``, ``fc.weight:1`` the input
features of ``fc``): the same model always gives the same names, and a name says where to look.

The ratios file (``prune --save-ratios`` / ``--group-ratios``) is JSON::

    {"version": 1, "groups": {"conv1.weight:0": 0.25, "conv2.weight:0": 0.5}, ...}

Other keys (the budget asked for, the MACs measured) are kept for the reader and ignored here.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping

import numpy as np

from graphprune.dependency import Group
from graphprune.errors import UserError
from graphprune.pruning.selection import select_channels

__all__ = ["group_keys", "select_by_group", "read_ratios_file", "ratios_document", "RATIOS_VERSION"]

RATIOS_VERSION = 1
# Which member constant names a group: weights before scales and biases (as Group.param_names).
_ROLE_ORDER = {"weight": 0, None: 0, "norm_scale": 1, "bias": 2, "scale": 3, "shift": 4}


def group_keys(groups: List[Group]) -> Dict[int, str]:
    """Group id -> stable name ``tensor:axis`` (a ``#n`` suffix only if two groups would share one)."""
    keys: Dict[int, str] = {}
    used: Dict[str, int] = {}
    for g in groups:
        params = sorted(g.params, key=lambda m: (_ROLE_ORDER.get(m.info.role, 5), m.dim.tensor, m.dim.axis))
        base = f"{params[0].dim.tensor}:{params[0].dim.axis}" if params else f"group{g.id}"
        count = used.get(base, 0)
        used[base] = count + 1
        keys[g.id] = base if count == 0 else f"{base}#{count}"
    return keys


def select_by_group(
    groups: List[Group],
    scores: Dict[int, np.ndarray],
    ratios: Mapping[str, float],
    round_to: int = 1,
) -> Dict[int, np.ndarray]:
    """Group id -> boolean mask (True = prune) for the groups ``ratios`` names, each at its own ratio.

    Raises ``UserError`` for a name that is no prunable group or a ratio outside [0, 1).
    """
    keys = group_keys(groups)
    by_key = {keys[g.id]: g for g in groups}
    unknown = [k for k in ratios if k not in by_key]
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UserError(f"prune: group ratios name no prunable group of this model: {', '.join(unknown[:3])}{more} "
                        "(graphprune sensitivity MODEL lists the group names)")
    selected: Dict[int, np.ndarray] = {}
    for key, ratio in ratios.items():
        ratio = _check_ratio(key, ratio)
        g = by_key[key]
        if ratio > 0:
            selected.update(select_channels([g], scores, ratio, False, round_to))
    return selected


def _check_ratio(key: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"prune: ratio of group {key} is not a number: {value!r}") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise UserError(f"prune: ratio of group {key} is {value}, outside [0, 1)")
    return value


def ratios_document(ratios: Mapping[str, float], **extra) -> dict:
    """The JSON document ``--save-ratios`` writes (``extra``: budget, measured cost, for the reader)."""
    return {"version": RATIOS_VERSION, "groups": {k: float(v) for k, v in ratios.items()}, **extra}


def read_ratios_file(path: str) -> Dict[str, float]:
    """Group name -> ratio from a ``--save-ratios`` file; ``UserError`` (one line) for anything else."""
    if not os.path.isfile(path):
        raise UserError(f"--group-ratios {path}: no such file")
    if os.path.getsize(path) > 16 * 1024 * 1024:  # a ratio per group: megabytes would be no ratios file
        raise UserError(f"--group-ratios {path}: larger than 16 MB, not a ratios file")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"--group-ratios {path}: not JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), dict):
        raise UserError(f"--group-ratios {path}: expected {{\"version\": 1, \"groups\": {{name: ratio}}}}")
    if doc.get("version", RATIOS_VERSION) != RATIOS_VERSION:
        raise UserError(f"--group-ratios {path}: version {doc.get('version')!r} is not {RATIOS_VERSION}")
    return {str(k): _check_ratio(str(k), v) for k, v in doc["groups"].items()}
