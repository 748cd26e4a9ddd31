"""Property tests across analyzer and policies: clusters vs networkx, masks never broken."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from contracts import (
    LEGAL_OPS,
    Blueprint,
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
    family_for_layer_type,
)
from esperd.analyzer import Analyzer, AnalyzerConfig
from esperd.policy import HeuristicConfig, PolicyBundle, PolicyConfig, create_policy

LAYER_TYPES = ["conv", "conv2d", "linear", "attention", "mlp", "layernorm", "pool"]


@st.composite
def random_runs(draw: st.DrawFn) -> tuple[TopologyPacket, list[float], list[SeedStage]]:
    """A random DAG (edges only from lower to higher ids), health per layer, a stage per slot."""
    n = draw(st.integers(min_value=1, max_value=24))
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=min(len(pairs), 40))) if pairs else []
    types = draw(st.lists(st.sampled_from(LAYER_TYPES), min_size=n, max_size=n))
    slots = draw(st.lists(st.integers(min_value=0, max_value=2), min_size=n, max_size=n))
    nodes = [
        TopologyNode(layer_id=i, name=f"l{i}", layer_type=t, seed_slots=s)
        for i, (t, s) in enumerate(zip(types, slots, strict=True))
    ]
    health = draw(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=n, max_size=n))
    stages = draw(st.lists(st.sampled_from(list(SeedStage)), min_size=n, max_size=n))
    return TopologyPacket(nodes=nodes, edges=edges), health, stages


def load_run(
    analyzer: Analyzer, run_id: str, topo: TopologyPacket, health: list[float], stages: list[SeedStage]
) -> None:
    analyzer.ingest_topology(run_id, topo, now=1.0)
    for layer, score in enumerate(health):
        analyzer.ingest_health(run_id, HealthSignal(layer_id=layer, health_score=score), now=1.0)
    analyzer.ingest_state(
        run_id,
        SystemStatePacket(
            epoch=10,
            val_accuracy=0.5,
            seeds=[SeedSlotState(layer_id=i, stage=s) for i, s in enumerate(stages)],
        ),
        now=1.0,
    )


@settings(max_examples=150, deadline=None)
@given(random_runs())
def test_clusters_equal_networkx_components(run: tuple[TopologyPacket, list[float], list[SeedStage]]) -> None:
    topo, health, stages = run
    analyzer = Analyzer(AnalyzerConfig())
    load_run(analyzer, "r", topo, health, stages)
    problematic = {i for i, h in enumerate(health) if h < analyzer.config.problematic_health}
    graph = nx.Graph()
    graph.add_nodes_from(problematic)
    graph.add_edges_from((a, b) for a, b in topo.edges if a in problematic and b in problematic)
    expected = sorted(sorted(c) for c in nx.connected_components(graph))
    assert sorted(sorted(c) for c in analyzer.clusters("r")) == expected


@pytest.fixture(scope="module")
def policies() -> dict[str, PolicyBundle]:
    torch.set_num_threads(1)
    # Thresholds at zero so the heuristic acts whenever its rules allow: more ops to check.
    config = PolicyConfig(
        heuristic=HeuristicConfig(min_epoch=0, confidence_threshold=0.0, urgency_threshold=0.0)
    )
    return {name: create_policy(name, config, "cpu") for name in ("heuristic", "gnn", "lstm")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=st.lists(random_runs(), min_size=1, max_size=4))
def test_no_policy_emits_an_illegal_op_or_a_foreign_blueprint(
    policies: dict[str, PolicyBundle], runs: list[tuple[TopologyPacket, list[float], list[SeedStage]]]
) -> None:
    analyzer = Analyzer(AnalyzerConfig())
    truth: dict[str, tuple[TopologyPacket, list[SeedStage]]] = {}
    for index, (topo, health, stages) in enumerate(runs):
        run_id = f"run{index}"
        load_run(analyzer, run_id, topo, health, stages)
        truth[run_id] = (topo, stages)
    observations = [analyzer.observe(run_id) for run_id in truth]
    seen_ops: set[Op] = set()
    for name, policy in policies.items():
        for _ in range(3):  # sampling policies: several draws
            for decision in policy.act(observations).decisions:
                seen_ops.add(decision.op)
                topo, stages = truth[decision.run_id]
                node = topo.nodes[decision.layer_id]
                assert decision.op in LEGAL_OPS[stages[decision.layer_id]], (name, decision)
                if decision.op is Op.GERMINATE:
                    assert node.seed_slots > 0, (name, decision)
                    assert isinstance(decision.blueprint, Blueprint)
                    assert decision.blueprint.family is family_for_layer_type(node.layer_type), (
                        name,
                        decision,
                    )
    OPS_SEEN.update(seen_ops)


OPS_SEEN: set[Op] = set()


def test_the_mask_property_saw_real_actions() -> None:
    # Runs after the property test (file order): it must have exercised more than WAIT.
    assert {Op.GERMINATE, Op.PRUNE} <= OPS_SEEN, OPS_SEEN
