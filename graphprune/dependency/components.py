"""Connected components and disjoint sets over the dependency graph's own adjacency (dim -> neighbour
-> links): what the analysis took from networkx, without a networkx graph's attribute dict per dim
and per edge (20 MB and a tenth of the analysis of a 20,000-node graph)."""

from __future__ import annotations

from typing import Dict, Hashable, Iterator, Mapping, Set

__all__ = ["connected_components", "UnionFind", "as_networkx"]


def connected_components(adj: Mapping[Hashable, Mapping[Hashable, object]]) -> Iterator[Set[Hashable]]:
    """The components of the undirected graph ``adj`` (node -> neighbours), breadth first from each
    node not yet reached, in ``adj``'s order: the order ``networkx.connected_components`` yields."""
    seen: Set[Hashable] = set()
    for start in adj:
        if start in seen:
            continue
        component = {start}
        frontier = [start]
        while frontier:
            reached = []
            for node in frontier:
                for other in adj[node]:
                    if other not in component:
                        component.add(other)
                        reached.append(other)
            frontier = reached
        seen |= component
        yield component


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
