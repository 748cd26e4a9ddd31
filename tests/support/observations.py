"""Synthetic Observations for the policy tests and benchmarks (shapes as the analyzer makes them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from esperd.analyzer.observation import (
    BLUEPRINTS,
    GLOBAL_FEATURE_INDEX,
    GLOBAL_FEATURES,
    NODE_FEATURE_INDEX,
    NODE_FEATURES,
    OPS,
    STAGE_INDEX,
    STAGES,
    Observation,
)
from esperd_contracts import LEGAL_OPS, BlueprintFamily, SeedStage

#: Neutral, healthy per-node defaults for rule tests (everything else 0).
HEALTHY_NODE = {"health": 0.9, "health_ewma": 0.9, "family_cnn": 1.0}
#: A stabilized host mid-training, no plateau.
STABLE_GLOBALS = {"epoch": 0.1, "val_accuracy": 0.6, "val_accuracy_delta": 0.0, "overall_health": 0.9}


def chain_edges(num_nodes: int, skips: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Directed chain 0 -> 1 -> ... plus the given skip edges, [2, E]."""
    pairs = [(i, i + 1) for i in range(num_nodes - 1)] + [tuple(s) for s in skips]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2).T.copy()


def gcn_adjacency(edge_index: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetrized edges with self loops and weights D^-1/2 (A + I) D^-1/2."""
    a = np.zeros((num_nodes, num_nodes), dtype=np.float32)
    a[edge_index[0], edge_index[1]] = 1.0
    a = np.maximum(a, a.T) + np.eye(num_nodes, dtype=np.float32)
    a = np.minimum(a, 1.0)
    inv_sqrt = 1.0 / np.sqrt(a.sum(1))
    src, dst = np.nonzero(a)
    weights = (inv_sqrt[src] * inv_sqrt[dst]).astype(np.float32)
    return np.stack([src, dst]).astype(np.int64), weights


def make_observation(
    run_id: str = "run-0",
    num_nodes: int = 6,
    *,
    seed: int | None = 0,
    stages: Sequence[SeedStage] | None = None,
    families: Sequence[BlueprintFamily] | None = None,
    edges: np.ndarray | None = None,
    node: Mapping[str, float | Sequence[float]] | None = None,
    globals_: Mapping[str, float] | None = None,
    epoch: int = 10,
    random_features: bool = True,
    layer_ids: Sequence[int] | None = None,
) -> Observation:
    """An Observation with consistent masks. Random features unless `random_features=False`,
    in which case nodes start from HEALTHY_NODE and globals from STABLE_GLOBALS; `node` and
    `globals_` override columns by name (a scalar for every node, or one value per node)."""
    rng = np.random.default_rng(seed)
    stages = list(stages) if stages is not None else [SeedStage.DORMANT] * num_nodes
    if families is None:
        families = [
            BlueprintFamily.CNN if i % 2 == 0 else BlueprintFamily.TRANSFORMER for i in range(num_nodes)
        ]
    assert len(stages) == len(families) == num_nodes

    if random_features:
        x = rng.uniform(0.0, 1.0, (num_nodes, len(NODE_FEATURES))).astype(np.float32)
        g = rng.uniform(0.0, 1.0, len(GLOBAL_FEATURES)).astype(np.float32)
    else:
        x = np.zeros((num_nodes, len(NODE_FEATURES)), dtype=np.float32)
        g = np.zeros(len(GLOBAL_FEATURES), dtype=np.float32)
        for name, value in HEALTHY_NODE.items():
            x[:, NODE_FEATURE_INDEX[name]] = value
        for name, value in STABLE_GLOBALS.items():
            g[GLOBAL_FEATURE_INDEX[name]] = value
    stage_cols = [NODE_FEATURE_INDEX[f"stage_{s.value}"] for s in STAGES]
    x[:, stage_cols] = 0.0
    for i, stage in enumerate(stages):
        x[i, NODE_FEATURE_INDEX[f"stage_{stage.value}"]] = 1.0
        x[i, NODE_FEATURE_INDEX["family_cnn"]] = float(families[i] is BlueprintFamily.CNN)
    for name, value in (node or {}).items():
        x[:, NODE_FEATURE_INDEX[name]] = value
    for name, value in (globals_ or {}).items():
        g[GLOBAL_FEATURE_INDEX[name]] = value

    if edges is None:
        skips = [(i, i + 2) for i in range(0, num_nodes - 2, 3)]
        edges = chain_edges(num_nodes, skips)
    gcn_index, gcn_weight = gcn_adjacency(edges, num_nodes)
    op_mask = np.array([[op in LEGAL_OPS[s] for op in OPS] for s in stages], dtype=bool).reshape(
        num_nodes, len(OPS)
    )
    blueprint_mask = np.array(
        [[bp.family is fam for bp in BLUEPRINTS] for fam in families], dtype=bool
    ).reshape(num_nodes, len(BLUEPRINTS))
    return Observation(
        run_id=run_id,
        topology_version=1,
        layer_ids=np.asarray(
            layer_ids if layer_ids is not None else range(100, 100 + num_nodes), dtype=np.int64
        ),
        node_features=x,
        edge_index=edges,
        gcn_edge_index=gcn_index,
        gcn_edge_weight=gcn_weight,
        global_features=g,
        op_mask=op_mask,
        blueprint_mask=blueprint_mask,
        stages=np.array([STAGE_INDEX[s] for s in stages], dtype=np.int64),
        epoch=epoch,
    )


def random_stages(num_nodes: int, seed: int) -> list[SeedStage]:
    """A mix of every stage (so every op is legal somewhere and illegal somewhere)."""
    rng = np.random.default_rng(seed)
    return [STAGES[int(i)] for i in rng.integers(0, len(STAGES), num_nodes)]


def mixed_batch(sizes: Sequence[int], seed: int = 0) -> list[Observation]:
    """Observations of different sizes with mixed stages, distinct run ids."""
    return [
        make_observation(f"run-{i}", n, seed=seed + i, stages=random_stages(n, seed + 100 + i))
        for i, n in enumerate(sizes)
    ]
