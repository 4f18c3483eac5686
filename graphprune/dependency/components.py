"""Connected components and disjoint sets over the dependency graph's dims: what the analysis took
from networkx, without a networkx graph's attribute dict per dim and per edge (20 MB and a tenth of
the analysis of a 20,000-node graph), and without walking the edges one by one in Python (labels
are propagated over whole index arrays)."""

from __future__ import annotations

from typing import Dict, Hashable, Iterator, List, Mapping, Sequence

import numpy as np

__all__ = ["label_components", "components_in_order", "UnionFind", "as_networkx"]


def label_components(total: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the pairs (a[k], b[k]) over 0..total-1: the smallest index of each."""
    parent = np.arange(total, dtype=np.int64)
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            return parent
        lo = np.minimum(pa[differ], pb[differ])
        hi = np.maximum(pa[differ], pb[differ])
        np.minimum.at(parent, hi, lo)  # hook each root under the smaller label
        while True:  # pointer jumping until every index points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def components_in_order(total: int, a: Sequence[int], b: Sequence[int]) -> Iterator[List[int]]:
    """The connected components of the graph on 0..total-1 with edges (a[k], b[k]): each a list of
    indices in increasing order, the components in the order of their first index (the order
    ``networkx.connected_components`` yields them for nodes added in index order)."""
    if not total:
        return
    labels = label_components(total, np.asarray(a, np.int64), np.asarray(b, np.int64))  # first index of each
    order = np.argsort(labels, kind="stable")
    ends = (np.flatnonzero(np.diff(labels[order])) + 1).tolist() + [total]
    order = order.tolist()  # sliced as a list: no array per component (thousands of them)
    start = 0
    for end in ends:
        yield order[start:end]
        start = end


class UnionFind:
    """Disjoint sets of hashable items, by path halving (``union[x]`` is x's root; x joins as its
    own set when new), as ``networkx.utils.UnionFind`` was used here."""

    def __init__(self) -> None:
        self._parent: Dict[Hashable, Hashable] = {}

    def __getitem__(self, item: Hashable) -> Hashable:
        parent = self._parent
        if item not in parent:
            parent[item] = item
            return item
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, a: Hashable, b: Hashable) -> None:
        root_a, root_b = self[a], self[b]
        if root_a != root_b:
            self._parent[root_b] = root_a


def as_networkx(infos: Mapping[Hashable, object], adj: Mapping[Hashable, Mapping[Hashable, list]]):
    """A ``networkx.Graph`` of the same dims (attribute ``info``) and edges (attribute ``links``)."""
    import networkx as nx

    graph = nx.Graph()
    for dim, info in infos.items():
        graph.add_node(dim, info=info)
    for a, neighbours in adj.items():
        for b, links in neighbours.items():
            graph.add_edge(a, b, links=links)
    return graph
