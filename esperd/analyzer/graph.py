"""A run's layer graph (one immutable version), its validation, GCN normalization and clusters."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from esperd.analyzer.config import AnalyzerError
from esperd.analyzer.masks import FAMILY_BLUEPRINT_MASK
from esperd.analyzer.observation import LAYER_KIND_INDEX, layer_kind
from esperd_contracts import BlueprintFamily, TopologyPacket, family_for_layer_type

#: Kind given to layers known only from their health signals (the wire default).
INFERRED_LAYER_TYPE = "linear"


def _frozen(array: np.ndarray) -> np.ndarray:
    # Graph arrays are shared by every Observation of a version; nobody may edit them.
    array.flags.writeable = False
    return array


class Graph:
    """Nodes sorted by layer id (node i is layer layer_ids[i]) and directed edges between them.

    Immutable: a topology change makes a new Graph, so anything derived from one (the GCN
    adjacency, the blueprint mask) can be cached for as long as the graph is current.
    """

    __slots__ = (
        "_depth",
        "blueprint_mask",
        "can_germinate",
        "edge_index",
        "family_cnn",
        "inferred",
        "kind_index",
        "layer_ids",
        "layer_types",
        "params",
        "seed_slots",
    )

    def __init__(
        self,
        layer_ids: np.ndarray,
        edge_index: np.ndarray,
        *,
        inferred: bool,
        layer_types: tuple[str, ...],
        params: np.ndarray,
        seed_slots: np.ndarray,
    ) -> None:
        self.layer_ids = _frozen(layer_ids)
        self.edge_index = _frozen(edge_index)
        self.inferred = inferred
        self.layer_types = layer_types
        self.params = _frozen(params)
        self.seed_slots = _frozen(seed_slots)
        families = {kind: family_for_layer_type(kind) for kind in set(layer_types)}
        self.family_cnn = _frozen(
            np.fromiter((families[k] is BlueprintFamily.CNN for k in layer_types), bool, len(layer_types))
        )
        rows = np.stack(
            [FAMILY_BLUEPRINT_MASK[BlueprintFamily.TRANSFORMER], FAMILY_BLUEPRINT_MASK[BlueprintFamily.CNN]]
        )
        self.blueprint_mask = _frozen(rows[self.family_cnn.astype(np.int64)])
        kinds = {kind: LAYER_KIND_INDEX[layer_kind(kind)] for kind in set(layer_types)}
        self.kind_index = _frozen(np.fromiter((kinds[k] for k in layer_types), np.int64, len(layer_types)))
        self.can_germinate = _frozen(seed_slots > 0)
        self._depth: np.ndarray | None = None

    @property
    def depth(self) -> np.ndarray:
        """Each node's depth: the longest path (in edges) to it from a node without inputs.
        Computed once per graph (it is immutable)."""
        if self._depth is None:
            self._depth = _frozen(longest_paths(self.edge_index, self.num_nodes))
        return self._depth

    @property
    def num_nodes(self) -> int:
        return int(self.layer_ids.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def same_as(self, other: Graph | None) -> bool:
        """Whether `other` describes the same nodes, kinds, sizes and edges."""
        return (
            other is not None
            and self.inferred == other.inferred
            and self.layer_types == other.layer_types
            and np.array_equal(self.layer_ids, other.layer_ids)
            and np.array_equal(self.edge_index, other.edge_index)
            and np.array_equal(self.params, other.params)
            and np.array_equal(self.seed_slots, other.seed_slots)
        )

    @classmethod
    def chain(cls, layer_ids: Sequence[int] | np.ndarray) -> Graph:
        """The inferred graph: layers in id order, each feeding the next."""
        ids = np.unique(np.asarray(layer_ids, dtype=np.int64))  # sorted, deduplicated
        n = ids.shape[0]
        edges = (
            np.stack([np.arange(n - 1, dtype=np.int64), np.arange(1, n, dtype=np.int64)])
            if n > 1
            else (np.zeros((2, 0), dtype=np.int64))
        )
        return cls(
            ids,
            edges,
            inferred=True,
            layer_types=(INFERRED_LAYER_TYPE,) * n,
            params=np.zeros(n, dtype=np.int64),
            seed_slots=np.ones(n, dtype=np.int64),
        )

    @classmethod
    def from_topology(cls, packet: TopologyPacket, *, max_nodes: int, max_edges: int) -> Graph:
        """Validate a TopologyPacket into a Graph; raises AnalyzerError with a reason."""
        n = len(packet.nodes)
        if n == 0:
            raise AnalyzerError("empty_topology", "a topology needs at least one node")
        if n > max_nodes:
            raise AnalyzerError("too_many_nodes", f"{n} nodes, at most {max_nodes} per run")
        if len(packet.edges) > max_edges:
            raise AnalyzerError("too_many_edges", f"{len(packet.edges)} edges, at most {max_edges} per run")
        nodes = sorted(packet.nodes, key=lambda node: node.layer_id)
        ids = np.fromiter((node.layer_id for node in nodes), np.int64, n)
        duplicated = np.flatnonzero(ids[1:] == ids[:-1])
        if duplicated.size:
            raise AnalyzerError("duplicate_node", f"layer id {int(ids[duplicated[0]])} appears twice")
        edge_index = _edges_to_indices(packet.edges, ids)
        _check_acyclic(edge_index, n)
        return cls(
            ids,
            edge_index,
            inferred=False,
            layer_types=tuple(node.layer_type for node in nodes),
            params=np.fromiter((node.params for node in nodes), np.int64, n),
            seed_slots=np.fromiter((node.seed_slots for node in nodes), np.int64, n),
        )


def _edges_to_indices(edges: Sequence[tuple[int, int]], ids: np.ndarray) -> np.ndarray:
    """(src, dst) layer-id pairs -> deduplicated [2, E] node indices sorted by (src, dst)."""
    n = ids.shape[0]
    if not edges:
        return np.zeros((2, 0), dtype=np.int64)
    pairs = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    pos = np.minimum(np.searchsorted(ids, pairs), n - 1)
    unknown = ids[pos] != pairs
    if unknown.any():
        bad = pairs[np.flatnonzero(unknown.any(axis=1))[0]]
        raise AnalyzerError(
            "bad_edge", f"edge {int(bad[0])}->{int(bad[1])} names a layer not in the topology"
        )
    keys = np.unique(pos[:, 0] * n + pos[:, 1])
    return np.stack([keys // n, keys % n])


def longest_paths(edge_index: np.ndarray, n: int) -> np.ndarray:
    """int64 [n]: the number of edges on the longest path into each node of a DAG (0 for a source)."""
    depth = [0] * n
    src, dst = edge_index
    # Usually every edge goes up in layer id, which makes id order a topological order.
    order = range(n) if np.all(src < dst) else _topological_order(edge_index, n)
    by_src = np.argsort(src, kind="stable")
    starts = np.searchsorted(src[by_src], np.arange(n + 1)).tolist()
    targets = dst[by_src].tolist()
    for node in order:
        here = depth[node] + 1
        for target in targets[starts[node] : starts[node + 1]]:
            if depth[target] < here:
                depth[target] = here
    return np.array(depth, dtype=np.int64)


def _topological_order(edge_index: np.ndarray, n: int) -> list[int]:
    """Kahn's algorithm: nodes in an order where every edge goes forward (a DAG: from_topology checks)."""
    src, dst = edge_index
    order = np.argsort(src, kind="stable")
    starts = np.searchsorted(src[order], np.arange(n + 1)).tolist()
    targets = dst[order].tolist()
    indegree = np.bincount(dst, minlength=n).tolist()
    ready = [i for i in range(n) if indegree[i] == 0]
    out: list[int] = []
    while ready:
        node = ready.pop()
        out.append(node)
        for target in targets[starts[node] : starts[node + 1]]:
            indegree[target] -= 1
            if indegree[target] == 0:
                ready.append(target)
    return out


def _check_acyclic(edge_index: np.ndarray, n: int) -> None:
    """Raise AnalyzerError("cycle") unless the edges form a DAG."""
    src, dst = edge_index
    if np.any(src == dst):
        layer = int(src[np.flatnonzero(src == dst)[0]])
        raise AnalyzerError("cycle", f"node {layer} has an edge to itself")
    if np.all(src < dst):
        return  # every edge goes up in layer id: a topological order already, the usual case
    # Kahn's algorithm: a DAG can be emptied by repeatedly removing nodes with no inputs.
    order = np.argsort(src, kind="stable")
    starts = np.searchsorted(src[order], np.arange(n + 1)).tolist()
    targets = dst[order].tolist()
    indegree = np.bincount(dst, minlength=n).tolist()
    ready = [i for i in range(n) if indegree[i] == 0]
    removed = 0
    while ready:
        node = ready.pop()
        removed += 1
        for target in targets[starts[node] : starts[node + 1]]:
            indegree[target] -= 1
            if indegree[target] == 0:
                ready.append(target)
    if removed < n:
        raise AnalyzerError("cycle", f"the edges contain a cycle through {n - removed} nodes")


def gcn_normalize(edge_index: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric GCN normalization D^-1/2 (A + I) D^-1/2 of the undirected graph.

    Returns ([2, E'] int64 indices, [E'] float32 weights) with both directions of every edge
    and one self loop per node, sorted by (src, dst).
    """
    src, dst = edge_index
    loops = np.arange(num_nodes, dtype=np.int64)
    keys = np.unique(
        np.concatenate([src * num_nodes + dst, dst * num_nodes + src, loops * num_nodes + loops])
    )
    rows, cols = keys // num_nodes, keys % num_nodes
    degree = np.bincount(rows, minlength=num_nodes).astype(np.float64)  # >= 1 thanks to the loops
    inv_sqrt = 1.0 / np.sqrt(degree)
    weights = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    return _frozen(np.stack([rows, cols])), _frozen(weights)


def components(edge_index: np.ndarray, members: np.ndarray) -> list[np.ndarray]:
    """Connected components of the subgraph induced by `members` (bool per node), edges undirected.

    Each component is a sorted array of node indices; components are ordered by their first node.
    """
    nodes = np.flatnonzero(members)
    if nodes.size == 0:
        return []
    src, dst = edge_index
    inside = members[src] & members[dst]
    parent = {node: node for node in nodes.tolist()}

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # path halving keeps the trees shallow
            node = parent[node]
        return node

    for a, b in zip(src[inside].tolist(), dst[inside].tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.fromiter((root(node) for node in nodes.tolist()), np.int64, nodes.size)
    order = np.argsort(roots, kind="stable")  # nodes are sorted, so each group stays sorted
    # Roots are each component's smallest node, so sorting by root orders components by first node.
    return np.split(nodes[order], np.flatnonzero(np.diff(roots[order])) + 1)
