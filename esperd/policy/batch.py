"""Collate many runs' observations into one block-diagonal graph batch.

Building the big tensors ourselves with numpy (one concatenate per array, node
offsets added to edge indices) is several times faster than going through
`torch_geometric.data.Batch.from_data_list` for the small graphs we see (see
benchmarks/bench_policy.py), and yields exactly the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from contracts import Op
from esperd.analyzer.observation import GLOBAL_FEATURES, NODE_FEATURES, OP_INDEX, Observation

_GERMINATE = OP_INDEX[Op.GERMINATE]
_WAIT = OP_INDEX[Op.WAIT]


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
    num_graphs: int
    max_nodes: int


def collate(observations: Sequence[Observation], device: torch.device) -> GraphBatch:
    """One GraphBatch for `observations` (in order), on `device`."""
    if not observations:
        raise ValueError("cannot collate an empty batch of observations")
    counts = np.fromiter((_checked_num_nodes(o) for o in observations), dtype=np.int64)
    ptr = np.zeros(len(observations) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    graph_of_node = np.repeat(np.arange(len(observations), dtype=np.int64), counts)
    position = np.arange(int(ptr[-1]), dtype=np.int64) - ptr[:-1][graph_of_node]

    edge_counts = np.fromiter((o.gcn_edge_index.shape[1] for o in observations), dtype=np.int64)
    edge_index = np.concatenate([o.gcn_edge_index for o in observations], axis=1).astype(np.int64, copy=False)
    edge_index = edge_index + np.repeat(ptr[:-1], edge_counts)[None, :]

    op_mask, blueprint_mask = _effective_masks(
        np.concatenate([o.op_mask for o in observations]),
        np.concatenate([o.blueprint_mask for o in observations]),
    )
    arrays = {
        "x": np.concatenate([o.node_features for o in observations]).astype(np.float32, copy=False),
        "global_x": np.stack([o.global_features for o in observations]).astype(np.float32, copy=False),
        "edge_index": edge_index,
        "edge_weight": np.concatenate([o.gcn_edge_weight for o in observations]).astype(
            np.float32, copy=False
        ),
        "batch": graph_of_node,
        "position": position,
        "ptr": ptr,
        "op_mask": op_mask,
        "blueprint_mask": blueprint_mask,
    }
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in arrays.items()
    }
    return GraphBatch(**tensors, num_graphs=len(observations), max_nodes=int(counts.max()))


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


def _effective_masks(op_mask: np.ndarray, blueprint_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GERMINATE is only legal where some blueprint is; WAIT is always legal.

    Rows of the blueprint mask with no legal entry become all-True: they are only
    reachable through GERMINATE, which is masked there, and it keeps softmax finite.
    """
    op_mask = op_mask.astype(bool, copy=True)
    any_blueprint = blueprint_mask.any(axis=1)
    op_mask[:, _GERMINATE] &= any_blueprint
    op_mask[:, _WAIT] = True  # WAIT must stay available whatever the analyzer sent
    blueprint_mask = blueprint_mask.astype(bool, copy=True)
    blueprint_mask[~any_blueprint] = True
    return op_mask, blueprint_mask
