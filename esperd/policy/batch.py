"""Collate many runs' observations into one block-diagonal graph batch.

Building the big tensors ourselves with numpy (one concatenate per array, node
offsets added to edge indices) is several times faster than going through
`torch_geometric.data.Batch.from_data_list` for the small graphs we see (see
benchmarks/bench_policy.py), and yields exactly the same tensors.

Everything a decision needs beyond the features is derived here, in numpy, once
per batch: the effective masks, one mask over all head logits, the dense node
layout and the GCN adjacency (dense or CSR). On 20-node graphs a numpy op costs
about a microsecond and a torch op several, so the policy's torch code is left
with the network and the distribution only (see benchmarks/bench_gnn_forward.py).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from esperd.analyzer.observation import (
    ALPHA_TARGET_INDEX,
    GLOBAL_FEATURES,
    LEVER_COLUMN,
    LEVERS,
    LR_INDEX,
    NODE_FEATURES,
    OP_INDEX,
    OPS,
    OPTIONAL_LEVERS,
    STEEPNESS_INDEX,
    Observation,
)
from esperd_contracts import Op

_GERMINATE = OP_INDEX[Op.GERMINATE]
_WAIT = OP_INDEX[Op.WAIT]
_ACTIONABLE_OPS = [i for i in range(len(OPS)) if i != _WAIT]

#: Per-node output columns of the policy heads: priority, op logits, then each lever's logits
#: (observation.LEVERS order: blueprint, blend, tempo, dwell, isolation, LR multiplier,
#: steepness, alpha target, alpha speed, alpha curve). Defined here (re-exported by heads.py)
#: because collate precomputes one mask in this layout.
HEAD_SIZES: tuple[int, ...] = (1, len(OPS), *(len(choices) for _, choices in LEVERS))
NODE_HEAD_DIM = sum(HEAD_SIZES)
#: Each lever's logit columns in that layout.
LEVER_COLUMNS: dict[str, slice] = {
    name: slice(sum(HEAD_SIZES[: 2 + i]), sum(HEAD_SIZES[: 3 + i])) for i, (name, _) in enumerate(LEVERS)
}
#: The one choice a lever the policy leaves to the host is held at (its log-probability is then 0):
#: the choice that means what the absent field means where the action space has one (alpha
#: target 1.0, what a SET_ALPHA_TARGET without the lever sends; LR multiplier 1 and steepness 1,
#: the host's; isolation's first choice is already "absent"), else the first (dwell, alpha speed
#: and curve: "absent" is no choice of theirs). The command leaves the lever out either way.
_HELD_CHOICE = {
    "alpha_target": ALPHA_TARGET_INDEX[1.0],
    "lr_multiplier": LR_INDEX[1.0],
    "steepness": STEEPNESS_INDEX[1.0],
}


def lever_held_choices(levers: frozenset[str]) -> dict[int, int]:
    """Action-row column -> the choice index its head is held at, for each optional lever not in
    `levers` (see lever_logits_mask)."""
    return {LEVER_COLUMN[name]: _HELD_CHOICE.get(name, 0) for name in OPTIONAL_LEVERS if name not in levers}


def lever_logits_mask(levers: frozenset[str]) -> np.ndarray:
    """bool [NODE_HEAD_DIM], True where a logit is masked because the policy does not set that
    optional lever (PolicyConfig.levers): all its choices but one."""
    unknown = set(levers) - set(OPTIONAL_LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; known: {', '.join(OPTIONAL_LEVERS)}")
    mask = np.zeros(NODE_HEAD_DIM, dtype=bool)
    for name in OPTIONAL_LEVERS:
        if name not in levers:
            columns = LEVER_COLUMNS[name]
            mask[columns] = True
            mask[columns.start + _HELD_CHOICE.get(name, 0)] = False
    mask.flags.writeable = False
    return mask


#: Up to this many nodes in a batch the adjacency is a dense [N, N] matrix, beyond it CSR.
#: A dense product costs N^2 * H, a CSR one about nnz * H plus a fixed overhead; measured on
#: CPU with H = 128, dense wins at a few tens of nodes and loses badly above (figures in
#: benchmarks/RESULTS.md, "Measurements quoted in the code").
DENSE_ADJACENCY_MAX_NODES = 48

#: Distinct op masks (stage patterns) a TopologyCache keeps per run.
_MASKS_PER_RUN = 16

_OP_COLUMNS = slice(HEAD_SIZES[0], HEAD_SIZES[0] + HEAD_SIZES[1])
_BLUEPRINT_COLUMNS = LEVER_COLUMNS["blueprint"]


@dataclass(frozen=True, slots=True, eq=False)
class GraphBatch:
    """B graphs as one disjoint union. Node tensors are flat over all N_total nodes."""

    x: torch.Tensor  # float32 [N_total, F_node]
    global_x: torch.Tensor  # float32 [B, F_global]
    edge_index: torch.Tensor  # int64 [2, E'_total], symmetrized GCN edges, self loops included
    edge_weight: torch.Tensor  # float32 [E'_total]
    batch: torch.Tensor  # int64 [N_total], graph of each node
    position: torch.Tensor  # int64 [N_total], node index within its graph
    ptr: torch.Tensor  # int64 [B + 1], first node of each graph
    op_mask: torch.Tensor  # bool [N_total, len(OPS)], GERMINATE removed where no blueprint fits
    blueprint_mask: torch.Tensor  # bool [N_total, len(BLUEPRINTS)], never an all-False row
    # True for every head logit to mask out, columns as HEAD_SIZES: priorities of nodes with
    # nothing but WAIT to do (unless no node of the graph has more), illegal ops, unfitting
    # blueprints. One masked_fill then masks all heads.
    illegal_logits: torch.Tensor  # bool [N_total, NODE_HEAD_DIM]
    node_slot: torch.Tensor  # int64 [N_total], batch * max_nodes + position (dense [B, max_nodes])
    # The normalized adjacency with rows = targets (GCNConv's adj_t): dense [N, N] for small
    # batches, sparse CSR beyond DENSE_ADJACENCY_MAX_NODES; None if collate was asked not to.
    adjacency: torch.Tensor | None
    num_graphs: int
    max_nodes: int
    # Built for training only (collate's `training`): the CSR adjacency's transpose, for the
    # backward pass (autograd would otherwise transpose and convert it at every backward), and
    # illegal_logits as float masks (legal 1 / 0, floor 0 / float32 minimum: heads.logit_masks).
    adjacency_t: torch.Tensor | None = None
    logit_masks: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def is_padded(self) -> bool:
        """Whether some graph has fewer than max_nodes nodes (else [B, max_nodes] is a view)."""
        return self.x.shape[0] != self.num_graphs * self.max_nodes


def collate(
    observations: Sequence[Observation],
    device: torch.device,
    *,
    adjacency: bool = True,
    cache: TopologyCache | None = None,
    lever_mask: np.ndarray | None = None,
    training: bool = False,
) -> GraphBatch:
    """One GraphBatch for `observations` (in order), on `device`.

    `adjacency=False` skips the adjacency matrix (for policies that do not pass messages);
    `training` also builds what only the backward pass and the learner's distribution use
    (`adjacency_t` where the adjacency is CSR, `logit_masks`).
    With a `cache`, a single observation of an already seen topology is collated from
    its features and op mask alone (see TopologyCache), with the cache's lever mask.
    `lever_mask` (lever_logits_mask) masks the levers a policy leaves to the host.
    """
    if not observations:
        raise ValueError("cannot collate an empty batch of observations")
    if cache is not None and len(observations) == 1:
        return cache.collate(observations[0])
    counts = np.fromiter((_checked_num_nodes(o) for o in observations), dtype=np.int64)
    num_graphs, max_nodes = len(observations), int(counts.max())
    ptr = np.zeros(num_graphs + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    n = int(ptr[-1])
    graph_of_node = np.repeat(np.arange(num_graphs, dtype=np.int64), counts)
    position = np.arange(n, dtype=np.int64) - ptr[:-1][graph_of_node]

    edge_counts = np.fromiter((o.gcn_edge_index.shape[1] for o in observations), dtype=np.int64)
    edge_index = np.concatenate([o.gcn_edge_index for o in observations], axis=1).astype(np.int64, copy=False)
    edge_index += np.repeat(ptr[:-1], edge_counts)
    edge_weight = np.concatenate([o.gcn_edge_weight for o in observations]).astype(np.float32, copy=False)

    blueprint_mask, any_blueprint = _effective_blueprint_mask(
        np.concatenate([o.blueprint_mask for o in observations])
    )
    op_mask = _effective_op_mask(np.concatenate([o.op_mask for o in observations]), any_blueprint)
    illegal_logits = _illegal_logits(_blueprint_logits_mask(blueprint_mask, lever_mask), op_mask, ptr)
    return GraphBatch(
        x=_tensor(np.concatenate([o.node_features for o in observations]), device, np.float32),
        global_x=_tensor(np.stack([o.global_features for o in observations]), device, np.float32),
        edge_index=_tensor(edge_index, device),
        edge_weight=_tensor(edge_weight, device),
        batch=_tensor(graph_of_node, device),
        position=_tensor(position, device),
        ptr=_tensor(ptr, device),
        op_mask=_tensor(op_mask, device),
        blueprint_mask=_tensor(blueprint_mask, device),
        illegal_logits=_tensor(illegal_logits, device),
        node_slot=_tensor(graph_of_node * max_nodes + position, device),
        adjacency=_adjacency(edge_index, edge_weight, n, device) if adjacency else None,
        adjacency_t=_adjacency_t(edge_index, edge_weight, n, device) if adjacency and training else None,
        logit_masks=_logit_masks(illegal_logits, device) if training else None,
        num_graphs=num_graphs,
        max_nodes=max_nodes,
    )


class PackedGraphs:
    """Observations collated once (a learner's rollout); `select(graphs)` is the GraphBatch of
    some of them, in the given order, equal tensor for tensor to `collate` of those observations,
    made by index selections of the packed tensors (no per-observation Python work).

    Everything collate derives per node or per graph (effective masks, illegal logits) does not
    depend on the other graphs of the batch, so it is derived once here; the edges are kept in
    each graph's own numbering and shifted by the selection's node offsets, and the adjacency
    is built for the selection as collate builds it.
    """

    def __init__(
        self,
        observations: Sequence[Observation],
        device: torch.device,
        *,
        adjacency: bool = True,
        lever_mask: np.ndarray | None = None,
    ) -> None:
        self.full = collate(observations, device, adjacency=False, lever_mask=lever_mask)
        self.device = device
        self.adjacency = adjacency
        self.num_graphs = len(observations)
        self._counts = np.fromiter((o.num_nodes for o in observations), dtype=np.int64)
        self._ptr = np.zeros(self.num_graphs + 1, dtype=np.int64)
        np.cumsum(self._counts, out=self._ptr[1:])
        self._edge_counts = np.fromiter((o.gcn_edge_index.shape[1] for o in observations), dtype=np.int64)
        self._edge_ptr = np.zeros(self.num_graphs + 1, dtype=np.int64)
        np.cumsum(self._edge_counts, out=self._edge_ptr[1:])
        # Each graph's edges in its own node numbering, as the observations hold them.
        self._edges = np.concatenate([o.gcn_edge_index for o in observations], axis=1).astype(np.int64)
        self._edge_weight = self.full.edge_weight.cpu().numpy()
        self._legal, self._floor = _logit_masks(self.full.illegal_logits.cpu().numpy(), device)

    def __len__(self) -> int:
        return self.num_graphs

    def select(self, graphs: np.ndarray | Sequence[int], *, training: bool = False) -> GraphBatch:
        """collate([observations[g] for g in graphs], training=training), from the packed
        tensors."""
        graphs = np.asarray(graphs, dtype=np.int64)
        counts = self._counts[graphs]
        ptr = np.zeros(len(graphs) + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        n = int(ptr[-1])
        graph_of_node = np.repeat(np.arange(len(graphs), dtype=np.int64), counts)
        position = np.arange(n, dtype=np.int64) - ptr[:-1][graph_of_node]
        nodes = self._ptr[graphs][graph_of_node] + position  # packed row of each selected node
        edge_counts = self._edge_counts[graphs]
        edge_ptr = np.zeros(len(graphs) + 1, dtype=np.int64)
        np.cumsum(edge_counts, out=edge_ptr[1:])
        edge_graph = np.repeat(np.arange(len(graphs), dtype=np.int64), edge_counts)
        edge_rank = (
            np.arange(int(edge_ptr[-1]), dtype=np.int64) - edge_ptr[:-1][edge_graph]
        )  # within its graph
        edges = self._edge_ptr[graphs][edge_graph] + edge_rank  # packed column of each selected edge
        edge_index = self._edges[:, edges] + ptr[:-1][edge_graph]
        edge_weight = self._edge_weight[edges]
        max_nodes = int(counts.max())
        device, full = self.device, self.full
        node_rows, graph_rows = _tensor(nodes, device), _tensor(graphs, device)
        return GraphBatch(
            x=full.x.index_select(0, node_rows),
            global_x=full.global_x.index_select(0, graph_rows),
            edge_index=_tensor(edge_index, device),
            edge_weight=_tensor(edge_weight, device),
            batch=_tensor(graph_of_node, device),
            position=_tensor(position, device),
            ptr=_tensor(ptr, device),
            op_mask=full.op_mask.index_select(0, node_rows),
            blueprint_mask=full.blueprint_mask.index_select(0, node_rows),
            illegal_logits=full.illegal_logits.index_select(0, node_rows),
            node_slot=_tensor(graph_of_node * max_nodes + position, device),
            adjacency=_adjacency(edge_index, edge_weight, n, device) if self.adjacency else None,
            adjacency_t=(
                _adjacency_t(edge_index, edge_weight, n, device) if self.adjacency and training else None
            ),
            logit_masks=(
                (self._legal.index_select(0, node_rows), self._floor.index_select(0, node_rows))
                if training
                else None
            ),
            num_graphs=len(graphs),
            max_nodes=max_nodes,
        )


@dataclass(frozen=True, slots=True, eq=False)
class _Topology:
    """A single-graph batch's topology-only part, and what it was derived from."""

    sources: tuple[np.ndarray, ...]  # (gcn_edge_index, gcn_edge_weight, blueprint_mask)
    shapes: tuple[tuple[int, ...], ...]  # of layer_ids, node_features, global_features
    num_nodes: int
    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    zeros: torch.Tensor  # the batch vector of one graph
    positions: torch.Tensor  # position, and node_slot too (one graph: the same)
    ptr: torch.Tensor
    blueprint_mask: torch.Tensor
    adjacency: torch.Tensor | None
    # What the per-observation masks are derived from (see _illegal_logits).
    ptr_array: np.ndarray  # int64 [2]: [0, N]
    any_blueprint: np.ndarray  # bool [N]
    blueprint_logits_mask: np.ndarray  # bool [N, NODE_HEAD_DIM], see _blueprint_logits_mask
    # op_mask.tobytes() -> (effective op mask, illegal logits): stages change far less often
    # than decisions are made, so the masks of the last few stage patterns are kept.
    masks: dict[bytes, tuple[torch.Tensor, torch.Tensor]]


class TopologyCache:
    """Per run, what collate derives from its topology alone, for single-graph batches.

    A batch of one is what the serving path mostly sees, and at 20 nodes most of a full
    collate is spent on edges, index vectors, adjacency and blueprint masks that only
    change with the topology. The analyzer shares those arrays between all observations
    of one topology version and freezes them (read-only), so an entry stays valid while
    an observation brings the very same read-only arrays; a new topology version is
    cached anew, and writable arrays (tests, a replay file) are collated in full and
    never cached. Bounded LRU over runs; not thread-safe (the bundle calls it under its
    lock).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        adjacency: bool,
        max_runs: int = 1024,
        lever_mask: np.ndarray | None = None,
    ) -> None:
        self.device = device
        self.adjacency = adjacency
        self.lever_mask = lever_mask
        self.max_runs = max_runs
        self._runs: OrderedDict[str, _Topology] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def collate(self, obs: Observation) -> GraphBatch:
        """collate([obs]), reusing the run's cached topology part when it still applies."""
        topology = self._runs.get(obs.run_id)
        if (
            topology is None
            or obs.gcn_edge_index is not topology.sources[0]
            or obs.gcn_edge_weight is not topology.sources[1]
            or obs.blueprint_mask is not topology.sources[2]
            or (obs.layer_ids.shape, obs.node_features.shape, obs.global_features.shape) != topology.shapes
        ):
            sources = (obs.gcn_edge_index, obs.gcn_edge_weight, obs.blueprint_mask)
            if any(a.flags.writeable for a in sources):
                return collate([obs], self.device, adjacency=self.adjacency, lever_mask=self.lever_mask)
            topology = self._store(obs, sources)
        else:
            self._runs.move_to_end(obs.run_id)
        op_mask, illegal_logits = self._masks(topology, obs.op_mask)
        return GraphBatch(
            x=_float_tensor(obs.node_features, self.device),
            global_x=_float_tensor(obs.global_features[None], self.device),
            edge_index=topology.edge_index,
            edge_weight=topology.edge_weight,
            batch=topology.zeros,
            position=topology.positions,
            ptr=topology.ptr,
            op_mask=op_mask,
            blueprint_mask=topology.blueprint_mask,
            illegal_logits=illegal_logits,
            node_slot=topology.positions,
            adjacency=topology.adjacency,
            num_graphs=1,
            max_nodes=topology.num_nodes,
        )

    def _masks(self, topology: _Topology, op_mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(effective op mask, illegal logits) of an observation's op mask, cached by pattern."""
        masks = topology.masks.get(key := op_mask.tobytes())
        if masks is None:
            effective = _effective_op_mask(op_mask, topology.any_blueprint)
            illegal_logits = _illegal_logits(topology.blueprint_logits_mask, effective, topology.ptr_array)
            if len(topology.masks) >= _MASKS_PER_RUN:
                topology.masks.clear()
            masks = topology.masks[key] = (
                _tensor(effective, self.device),
                _tensor(illegal_logits, self.device),
            )
        return masks

    def _store(self, obs: Observation, sources: tuple[np.ndarray, ...]) -> _Topology:
        """Cache the run's topology part, built for one graph: no offsets or concatenation,
        so a run's first decision (or first after a topology change) costs a fraction of a full
        collate."""
        n = _checked_num_nodes(obs)
        blueprint_mask, any_blueprint = _effective_blueprint_mask(obs.blueprint_mask)
        edge_index = obs.gcn_edge_index.astype(np.int64)  # copies: writable, for from_numpy
        edge_weight = obs.gcn_edge_weight.astype(np.float32)
        ptr = np.array([0, n], dtype=np.int64)
        device = self.device
        topology = _Topology(
            sources=sources,
            shapes=((n,), (n, len(NODE_FEATURES)), (len(GLOBAL_FEATURES),)),
            num_nodes=n,
            edge_index=_tensor(edge_index, device),
            edge_weight=_tensor(edge_weight, device),
            zeros=_tensor(np.zeros(n, dtype=np.int64), device),
            positions=_tensor(np.arange(n, dtype=np.int64), device),
            ptr=_tensor(ptr, device),
            blueprint_mask=_tensor(blueprint_mask, device),
            adjacency=_adjacency(edge_index, edge_weight, n, device) if self.adjacency else None,
            ptr_array=ptr,
            any_blueprint=any_blueprint,
            blueprint_logits_mask=_blueprint_logits_mask(blueprint_mask, self.lever_mask),
            masks={},
        )
        self._runs[obs.run_id] = topology
        self._runs.move_to_end(obs.run_id)
        while len(self._runs) > self.max_runs:
            self._runs.popitem(last=False)  # least recently used run
        return topology

    def forget(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            self._runs.pop(run_id, None)


def _tensor(array: np.ndarray, device: torch.device, dtype: type | None = None) -> torch.Tensor:
    """A tensor on `device`, sharing `array`'s memory where it can (CPU, contiguous, writable)."""
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)


def _float_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """_tensor(array, device, np.float32) for the common case, a writable float32 array, in one
    call (the general path's numpy checks cost several times as much when their code is not
    in cache)."""
    if array.dtype == np.float32 and array.flags.writeable and device.type == "cpu":
        return torch.from_numpy(array)
    return _tensor(array, device, np.float32)


def _checked_num_nodes(obs: Observation) -> int:
    n = obs.num_nodes
    if n == 0:
        raise ValueError(f"observation for run {obs.run_id!r} has no nodes")
    if obs.node_features.shape != (n, len(NODE_FEATURES)):
        raise ValueError(
            f"run {obs.run_id!r}: node_features shape {obs.node_features.shape} != {(n, len(NODE_FEATURES))}"
        )
    if obs.global_features.shape != (len(GLOBAL_FEATURES),):
        raise ValueError(f"run {obs.run_id!r}: global_features shape {obs.global_features.shape}")
    return n


def _effective_blueprint_mask(blueprint_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blueprint mask, whether each node has a fitting blueprint).

    Rows with no legal entry become all-True: they are only reachable through GERMINATE,
    which is masked there (see `_effective_op_mask`), and it keeps softmax finite.
    """
    blueprint_mask = blueprint_mask.astype(bool, copy=True)
    any_blueprint = blueprint_mask.any(axis=1)
    blueprint_mask[~any_blueprint] = True
    return blueprint_mask, any_blueprint


def _effective_op_mask(op_mask: np.ndarray, any_blueprint: np.ndarray) -> np.ndarray:
    """GERMINATE is only legal where some blueprint is; WAIT is always legal."""
    op_mask = op_mask.astype(bool, copy=True)
    op_mask[:, _GERMINATE] &= any_blueprint
    op_mask[:, _WAIT] = True  # WAIT must stay available whatever the analyzer sent
    return op_mask


def _blueprint_logits_mask(blueprint_mask: np.ndarray, lever_mask: np.ndarray | None = None) -> np.ndarray:
    """The topology-only part of the head logits mask (HEAD_SIZES layout, True = masked out):
    unfitting blueprints, and the choices of levers the policy leaves to the host (`lever_mask`);
    priority and op columns are left to `_illegal_logits`. Which levers an op samples is not a
    mask: the distribution only counts them where they mean something (heads.py)."""
    if lever_mask is None:
        mask = np.zeros((blueprint_mask.shape[0], NODE_HEAD_DIM), dtype=bool)
    else:
        mask = np.repeat(lever_mask[None], blueprint_mask.shape[0], axis=0)
    np.logical_not(blueprint_mask, out=mask[:, _BLUEPRINT_COLUMNS])
    return mask


def _illegal_logits(blueprint_logits_mask: np.ndarray, op_mask: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """The mask over all head logits: `_blueprint_logits_mask` plus illegal ops and priorities.

    A node is choosable if it has a legal op besides WAIT; in a graph where none has,
    node 0 is (the decision is then WAIT on node 0).
    """
    mask = blueprint_logits_mask.copy()
    np.logical_not(op_mask, out=mask[:, _OP_COLUMNS])
    choosable = op_mask[:, _ACTIONABLE_OPS].any(axis=1)
    idle_graph = ~np.logical_or.reduceat(choosable, ptr[:-1])
    choosable[ptr[:-1][idle_graph]] = True
    np.logical_not(choosable, out=mask[:, 0])
    return mask


def _adjacency(edge_index: np.ndarray, edge_weight: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    """adj_t (rows = targets) of the batch: dense up to DENSE_ADJACENCY_MAX_NODES nodes, else CSR."""
    src, dst = edge_index
    if n <= DENSE_ADJACENCY_MAX_NODES:
        dense = np.zeros((n, n), dtype=np.float32)
        dense[dst, src] = edge_weight  # no duplicate edges: the analyzer's adjacency is a set
        return _tensor(dense, device)
    # CSR wants entries grouped by row (target). The analyzer sorts by (src, dst), so this
    # stable sort (timsort) only interleaves each node's short runs: cheap even at 64 graphs.
    order = np.argsort(dst * n + src, kind="stable")
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=n), out=crow[1:])
    parts = (crow, src[order], edge_weight[order])
    crow_t, col_t, val_t = (_tensor(p, device) for p in parts)
    return torch.sparse_csr_tensor(crow_t, col_t, val_t, (n, n), check_invariants=False)


def _logit_masks(illegal_logits: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """illegal_logits as float32 (legal, floor): 1 / 0 where legal, 0 / the float32 minimum where
    not (heads.logit_masks, which builds the same from a tensor)."""
    illegal = illegal_logits.astype(np.float32)
    return _tensor(1.0 - illegal, device), _tensor(illegal * np.finfo(np.float32).min, device)


def _adjacency_t(
    edge_index: np.ndarray, edge_weight: np.ndarray, n: int, device: torch.device
) -> torch.Tensor | None:
    """The transpose of `_adjacency`'s CSR matrix as CSR (None where that is dense)."""
    if n <= DENSE_ADJACENCY_MAX_NODES:
        return None
    src, dst = edge_index
    return _adjacency(np.stack([dst, src]), edge_weight, n, device)


def _consume_csr_beta_warning() -> None:
    # torch warns once per process that CSR support is "beta"; trigger that once here,
    # silenced, instead of in the middle of serving.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        one = torch.ones(1, dtype=torch.int64)
        torch.sparse_csr_tensor(torch.tensor([0, 1]), one - 1, one.float(), (1, 1), check_invariants=False)


_consume_csr_beta_warning()
