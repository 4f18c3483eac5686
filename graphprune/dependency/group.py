"""Groups: the channels that must be pruned together, and why a group cannot be pruned.

The dependency graph links dims; its connected components are its dims coupled together.  Inside a
component every coupling edge becomes paired index arrays, and a vectorized union-find over
(dim, index) pairs labels each index with the channel ("atom") it belongs to.  Atoms touching
exactly the same dims form one group: the two inputs of a Concat share the Concat's output dim but
keep separate groups, because each input's channels reach only its own segment.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np

from graphprune.dependency.components import label_components
from graphprune.dependency.dims import DimInfo, DimKey, is_concrete
from graphprune.dependency.kinds import kind_of

if TYPE_CHECKING:  # pragma: no cover
    from graphprune.dependency.graph import DependencyGraph

__all__ = ["Member", "Group", "find_groups", "reported_groups"]


@dataclasses.dataclass(slots=True)  # no __dict__: one per dim of every group
class Member:
    """One dim of a group.

    Attributes:
        dim: the dim.
        info: what the graph knows about it (size, param, role).
        positions: the dim's indices that belong to the group (None when its size is dynamic).
        atoms: for each position, the group channel (0 .. channels-1) it belongs to.
        identity: positions and atoms are both ``0 .. channels-1``: index k of the dim is channel k.
    """

    dim: DimKey
    info: DimInfo
    positions: Optional[np.ndarray]
    atoms: Optional[np.ndarray]
    identity: bool = False


@dataclasses.dataclass
class Group:
    """Channels pruned together: removing channel k removes ``positions[atoms == k]`` of every member.

    Attributes:
        id: index in the list ``find_groups`` returns.
        channels: number of independent channels (None when a member's size is dynamic).
        members: every dim the group touches (activations, weights, virtual dims).
        reasons: why the group must not be pruned (empty when it may be).
        fixed: a member is no channel axis (kernel/spatial): not a channel group at all.
    """

    id: int
    channels: Optional[int]
    members: List[Member]
    reasons: List[str]
    fixed: bool = False

    # ``params`` and ``kind`` are cached: the members are complete when a group is made, and the
    # selection asks every group for them several times (20,000 scans of the members per prune
    # of a 5,000-group graph)
    @functools.cached_property
    def params(self) -> List[Member]:
        """Members that are axes of constants (weights, biases, BatchNorm parameters...)."""
        return [m for m in self.members if m.info.param]

    @property
    def blocked(self) -> bool:
        return bool(self.reasons)

    @property
    def is_channel_group(self) -> bool:
        """A group worth reporting: channels of some weight (not a kernel/spatial/batch axis)."""
        return not self.fixed and bool(self.params) and self.channels != 1

    @functools.cached_property
    def kind(self) -> str:
        """What the channels are: ``channels``, ``heads``, ``head_dim``, ``ffn`` or ``hidden``
        (the strongest tag a rule put on a member, see ``graphprune.dependency.kinds``)."""
        return kind_of(m.info.kind for m in self.members)

    @property
    def prunable(self) -> bool:
        return self.is_channel_group and not self.blocked and (self.channels or 0) >= 2

    def param_names(self) -> List[str]:
        """Member constants, weights first (then normalization scales, biases, the rest)."""
        order = {"weight": 0, None: 0, "norm_scale": 1, "bias": 2, "scale": 3, "shift": 4}
        roles = {m.dim.tensor: m.info.role for m in self.params}
        return sorted(roles, key=lambda name: (order.get(roles[name], 5), name))

    def describe(self) -> dict:
        """JSON-able summary for reports and ``inspect --groups``."""
        return {
            "id": self.id,
            "kind": self.kind,
            "channels": self.channels,
            "params": self.param_names(),
            "dims": len(self.members),
            "reasons": list(self.reasons),
        }


def _dedupe(items) -> List[str]:
    return list(dict.fromkeys(items))


def _reasons(infos: List[DimInfo]) -> List[str]:
    """The reasons of every dim, in order."""
    return [r for i in infos for r in i.reasons]


def find_groups(dep: "DependencyGraph") -> List[Group]:
    """Every group of the dependency graph (channel groups and trivial ones alike)."""
    groups: List[Group] = []
    for dims, infos, mapped in dep.sorted_components():
        flagged = [i for i in infos if i.reasons or i.fixed]  # few: the reasons and ``fixed`` are read from these
        fixed = any(i.fixed for i in flagged)
        sizes = {i.size for i in infos}
        if not all(map(is_concrete, sizes)):  # a dynamic size: judged once per distinct size
            first, size = next((d, i.size) for d, i in zip(dims, infos) if not i.concrete)
            what = "unknown" if size is None else f"dynamic ({size})"
            reasons = _dedupe(_reasons(flagged) + [f"size of {first} is {what}"])
            members = [Member(d, i, None, None) for d, i in zip(dims, infos)]
            groups.append(Group(len(groups), None, members, reasons, fixed))
            continue
        # one size and no link but identities (``Component.mapped`` answers without reading the links)
        if len(sizes) == 1 and not mapped:
            _add_identity_group(groups, dims, infos, _reasons(flagged), fixed)
            continue
        # each edge once (from its smaller end)
        links = [link for d in dims for other, between in dep.neighbors(d).items() if other >= d for link in between]
        _add_labelled_groups(groups, dims, dict(zip(dims, infos)), links)
    return groups


def _add_identity_group(groups: List[Group], dims, infos, reasons: List[str], fixed: bool) -> None:
    """Fast path: every coupling is index i <-> index i between dims of one size."""
    n = infos[0].size
    idx = np.arange(n, dtype=np.int64)
    members = [Member(d, i, idx, idx, True) for d, i in zip(dims, infos)]
    groups.append(Group(len(groups), n, members, _dedupe(reasons), fixed))


def _add_labelled_groups(groups: List[Group], dims, infos, links) -> None:
    """General path: label every (dim, index) with its channel, then split channels by members."""
    offsets: Dict[DimKey, int] = {}
    total = 0
    for d in dims:
        offsets[d] = total
        total += infos[d].size
    a_parts, b_parts = [], []
    for src, dst, mapping in links:
        s, t = mapping.pairs(infos[src].size, infos[dst].size)
        a_parts.append(s + offsets[src])
        b_parts.append(t + offsets[dst])
    a = np.concatenate(a_parts) if a_parts else np.zeros(0, np.int64)
    b = np.concatenate(b_parts) if b_parts else np.zeros(0, np.int64)
    _, atom_of_index = np.unique(label_components(total, a, b), return_inverse=True)
    n_atoms = int(atom_of_index.max()) + 1 if total else 0
    atom_of = {d: atom_of_index[offsets[d] : offsets[d] + infos[d].size] for d in dims}

    # Atoms touching the same set of dims form a group: sum a random 64-bit key per dim over the
    # dims each atom appears in (collisions have probability ~2^-64 per pair).
    keys = np.random.default_rng(0x9E3779B9).integers(1, 2**62, size=len(dims), dtype=np.int64).astype(np.uint64)
    signature = np.zeros(n_atoms, dtype=np.uint64)
    for key, d in zip(keys, dims):
        signature[np.unique(atom_of[d])] += key
    _, group_of_atom = np.unique(signature, return_inverse=True)
    n_groups = int(group_of_atom.max()) + 1 if n_atoms else 0
    local = np.zeros(n_atoms, dtype=np.int64)
    sizes = np.zeros(n_groups, dtype=np.int64)
    for g in range(n_groups):
        atoms = np.flatnonzero(group_of_atom == g)
        local[atoms] = np.arange(len(atoms))
        sizes[g] = len(atoms)
    members: List[List[Member]] = [[] for _ in range(n_groups)]
    for d in dims:
        group_ids = group_of_atom[atom_of[d]]
        for g in np.unique(group_ids):
            pos = np.flatnonzero(group_ids == g)
            members[g].append(Member(d, infos[d], pos, local[atom_of[d][pos]]))
    for g in range(n_groups):
        reasons = _dedupe(r for m in members[g] for r in m.info.reasons)
        is_fixed = any(m.info.fixed for m in members[g])
        groups.append(Group(len(groups), int(sizes[g]), members[g], reasons, is_fixed))


def reported_groups(groups: List[Group]) -> List[Group]:
    """The channel groups a user cares about (see ``Group.is_channel_group``)."""
    return [g for g in groups if g.is_channel_group]
