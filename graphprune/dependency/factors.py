"""Merged axes (Reshape/Flatten): which factor of a merge is coupled to the merged axis, once every node is seen."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional

from graphprune.dependency.components import UnionFind
from graphprune.dependency.dims import DimInfo, DimKey
from graphprune.dependency.index_mapping import Expand, Identity

if TYPE_CHECKING:  # pragma: no cover
    from graphprune.dependency.graph import DependencyGraph

__all__ = ["resolve_factors"]


def resolve_factors(dep: "DependencyGraph") -> None:
    """Couple each merged axis recorded by ``RuleContext.factor`` to one of its factors: the
    preferred one if it is prunable, else the largest prunable one; the others are blocked."""
    factors_of = dep.factors
    if not factors_of:
        return
    # periodic merges first: the axes they size become known before components are judged
    firsts: Dict[int, Optional[int]] = {}
    for k, (merged, factors, _, _) in enumerate(factors_of):
        infos = [dep.info(f) for f in factors]
        if not dep.info(merged).concrete or not all(i.concrete for i in infos):
            firsts[k] = _periodic_merge(dep, merged, infos)
    comp_of: Dict[DimKey, int] = {}
    blocked: Dict[int, bool] = {}
    for i, comp in enumerate(dep.components()):
        infos = [dep.info(d) for d in comp]
        blocked[i] = any(x.reasons or x.fixed or not x.concrete for x in infos)
        comp_of.update(dict.fromkeys(comp, i))
    union = UnionFind()

    def is_blocked(dim: DimKey) -> bool:
        return blocked[union[comp_of[dim]]]

    for k, (merged, factors, prefer, label) in enumerate(factors_of):
        infos = [dep.info(f) for f in factors]
        first = firsts.get(k, 0)
        if first is None:
            for d in [merged, *factors]:
                dep.add_reason(d, f"{label}: merges axes of dynamic size")
            continue
        sizes = [i.size if i.concrete else 1 for i in infos]
        big = [i for i, s in enumerate(sizes) if s > 1 and i >= first]
        if not big:
            continue
        free = [i for i in big if not is_blocked(factors[i])]
        if prefer is not None and prefer in free:
            chosen = prefer
        else:  # the largest factor; on a tie the innermost (channels within a shuffle group)
            chosen = max(free or big, key=lambda i: (sizes[i], i))
        mapping = Expand(outer=math.prod(sizes[first:chosen]), inner=math.prod(sizes[chosen + 1:]))
        dep.add_coupling(factors[chosen], merged, mapping)
        root_a, root_b = union[comp_of[factors[chosen]]], union[comp_of[merged]]
        either = blocked[root_a] or blocked[root_b]
        union.union(root_a, root_b)
        blocked[union[root_a]] = either
        for i in big:
            if i != chosen:
                dep.add_reason(
                    factors[i], f"{label}: merged with {factors[chosen]} into {merged} (one axis of a merge is pruned)"
                )
                blocked[union[comp_of[factors[i]]]] = True


def _periodic_merge(dep: "DependencyGraph", merged: DimKey, infos: List[DimInfo]) -> Optional[int]:
    """A merge of dynamic outer axes with sizes known inside them, ``[batch, heads] -> batch*heads``
    (torch's dynamo exporter batches attention so): the merged index is ``b * P + j`` for the
    period ``P`` (the inner sizes' product), so pruning index ``j`` of the inner axes prunes it
    in every period alike.  The merged axis, and every axis of the same symbolic size it is tied
    to 1:1, is then tracked by its period.  Returns the first inner factor's index, or None when
    the merge is not of this form."""
    dynamic = [i for i, info in enumerate(infos) if not info.concrete]
    if not dynamic or dynamic != list(range(len(dynamic))):
        return None
    first = len(dynamic)
    period = math.prod(info.size for info in infos[first:])
    if period <= 1:
        return None
    info = dep.info(merged)
    if info.concrete:  # made periodic by an earlier merge (split back here)
        return first if info.size == period else None
    symbol = info.size
    if not isinstance(symbol, str) or symbol.startswith("unk__"):
        return None
    frontier, seen = [merged], {merged}
    while frontier:  # the axes tied 1:1 to it (Transpose, the batched MatMul, Softmax...)
        dim = frontier.pop()
        dep.info(dim).size = period
        for other, links in dep.neighbors(dim).items():
            if (other not in seen and dep.info(other).size == symbol
                    and all(isinstance(m, Identity) for _, _, m in links)):
                seen.add(other)
                frontier.append(other)
    return first
