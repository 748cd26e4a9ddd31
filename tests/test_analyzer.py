"""Analyzer: graphs, O(1) trends, flags, clusters, adjacency cache, masks, bounds, features."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
import pytest

from esperd.analyzer import (
    GLOBAL_FEATURES,
    NODE_FEATURES,
    Analyzer,
    AnalyzerConfig,
    AnalyzerError,
    SlidingTrend,
    gcn_normalize,
)
from esperd.analyzer.observation import (
    BLUEPRINTS,
    GLOBAL_FEATURE_INDEX,
    NODE_FEATURE_INDEX,
    OP_INDEX,
    OPS,
    STAGE_INDEX,
    STAGES,
)
from esperd_contracts import (
    LEGAL_OPS,
    Blueprint,
    BlueprintFamily,
    HealthBatch,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)
from tests.support.packets import health
from tests.support.timing import FakeClock

F = NODE_FEATURE_INDEX
G = GLOBAL_FEATURE_INDEX


def topology(nodes: list[int] | list[TopologyNode], edges: list[tuple[int, int]]) -> TopologyPacket:
    return TopologyPacket(
        nodes=[n if isinstance(n, TopologyNode) else TopologyNode(layer_id=n) for n in nodes], edges=edges
    )


def feed(analyzer: Analyzer, run: str, layer: int, values: list[float], **kw: object) -> bool:
    changed = False
    for v in values:
        changed |= analyzer.ingest_health(run, health(layer, v, **kw))
    return changed


def edges_as_layer_pairs(obs) -> set[tuple[int, int]]:
    ids = obs.layer_ids
    return {(int(ids[s]), int(ids[d])) for s, d in obs.edge_index.T}


def polyfit_slope(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


# ---------------------------------------------------------------- topology


def test_topology_with_skip_connections_keeps_every_edge():
    a = Analyzer(clock=FakeClock())
    # Non-contiguous ids, listed out of order, with a duplicated edge and two skips.
    pkt = topology([30, 10, 20, 40], [(10, 20), (20, 30), (30, 40), (10, 30), (20, 40), (10, 20)])
    assert a.ingest_topology("r", pkt) is True
    obs = a.observe("r")
    assert obs.layer_ids.tolist() == [10, 20, 30, 40]
    assert edges_as_layer_pairs(obs) == {(10, 20), (20, 30), (30, 40), (10, 30), (20, 40)}
    assert obs.edge_index.shape == (2, 5) and obs.edge_index.dtype == np.int64
    assert obs.topology_version == 1
    assert obs.global_features[G["inferred_topology"]] == 0.0
    assert a.run_summary("r").inferred is False


def test_backward_numbered_dag_is_accepted():
    # Edges going down in layer id are fine as long as there is no cycle (exercises Kahn's check).
    a = Analyzer(clock=FakeClock())
    a.ingest_topology("r", topology([0, 1, 2], [(2, 1), (1, 0), (2, 0)]))
    assert edges_as_layer_pairs(a.observe("r")) == {(2, 1), (1, 0), (2, 0)}


@pytest.mark.parametrize(
    ("nodes", "edges", "reason"),
    [
        ([0, 1, 2], [(0, 1), (1, 2), (2, 0)], "cycle"),
        ([0, 1, 2, 3], [(0, 1), (2, 3), (3, 2)], "cycle"),
        ([0, 1], [(1, 1)], "cycle"),
        ([0, 1], [(0, 1), (1, 7)], "bad_edge"),
        ([0, 1], [(9, 0)], "bad_edge"),
        ([0, 1, 1], [(0, 1)], "duplicate_node"),
        ([], [], "empty_topology"),
        (list(range(5)), [], "too_many_nodes"),
        ([0, 1, 2, 3], [(0, 1), (1, 2), (0, 2), (2, 3)], "too_many_edges"),
    ],
)
def test_bad_topologies_are_rejected_with_a_reason(nodes, edges, reason):
    a = Analyzer(AnalyzerConfig(max_nodes_per_run=4, max_edges_per_run=3), clock=FakeClock())
    a.ingest_topology("r", topology([0, 1], [(0, 1)]))
    with pytest.raises(AnalyzerError) as info:
        a.ingest_topology("r", topology(nodes, edges))
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
    # The run keeps its previous graph.
    obs = a.observe("r")
    assert obs.layer_ids.tolist() == [0, 1] and obs.topology_version == 1


def test_rejected_topology_does_not_create_a_run():
    a = Analyzer(clock=FakeClock())
    with pytest.raises(AnalyzerError):
        a.ingest_topology("r", topology([0, 1], [(0, 5)]))
    assert "r" not in a and len(a) == 0


def test_inferred_chain_then_replaced_by_topology():
    clock = FakeClock()
    a = Analyzer(AnalyzerConfig(window_size=4), clock=clock)
    feed(a, "r", 5, [0.9])
    feed(a, "r", 1, [0.8, 0.7, 0.6])
    a.ingest_health("r", HealthBatch(signals=[health(3, 0.5), health(3, 0.4)]))
    obs = a.observe("r")
    assert obs.layer_ids.tolist() == [1, 3, 5]
    assert edges_as_layer_pairs(obs) == {(1, 3), (3, 5)}
    assert obs.global_features[G["inferred_topology"]] == 1.0
    assert obs.topology_version == 3  # one bump per new layer (the batch added one)
    trend_1 = obs.node_features[0, F["health_trend"]]
    assert trend_1 == pytest.approx(-0.1)

    changed = a.ingest_topology("r", topology([1, 3, 7], [(1, 3), (1, 7), (3, 7)]))
    assert changed is True
    obs = a.observe("r")
    assert obs.layer_ids.tolist() == [1, 3, 7]
    assert edges_as_layer_pairs(obs) == {(1, 3), (1, 7), (3, 7)}
    assert obs.global_features[G["inferred_topology"]] == 0.0
    assert obs.topology_version == 4
    # Layers 1 and 3 keep their window; 7 is new (default health, never reported).
    assert obs.node_features[0, F["health_trend"]] == trend_1
    assert obs.node_features[1, F["health"]] == pytest.approx(0.4)
    assert obs.node_features[2, F["health"]] == 1.0 and obs.node_features[2, F["staleness"]] == 1.0
    feed(a, "r", 1, [0.5])
    assert a.observe("r").node_features[0, F["health_trend"]] == pytest.approx(
        polyfit_slope([0.8, 0.7, 0.6, 0.5])
    )
    # A signal for a layer the host's topology does not declare is dropped, not grafted on.
    feed(a, "r", 5, [0.1])
    assert a.observe("r").layer_ids.tolist() == [1, 3, 7]
    assert a.run_summary("r").dropped_signals == 1


def test_state_packet_slots_extend_an_inferred_graph():
    a = Analyzer(clock=FakeClock())
    a.ingest_state("r", SystemStatePacket(seeds=[SeedSlotState(layer_id=4, stage=SeedStage.TRAINING)]))
    obs = a.observe("r")
    assert obs.layer_ids.tolist() == [4]
    assert obs.stages.tolist() == [STAGE_INDEX[SeedStage.TRAINING]]


def test_run_with_no_layers_observes_as_empty_graph():
    a = Analyzer(clock=FakeClock())
    a.ingest_state("r", SystemStatePacket(epoch=7, val_accuracy=0.5))
    obs = a.observe("r")
    assert obs.num_nodes == 0
    assert obs.node_features.shape == (0, len(NODE_FEATURES))
    assert obs.op_mask.shape == (0, len(OPS)) and obs.gcn_edge_index.shape == (2, 0)
    assert obs.global_features[G["epoch"]] == pytest.approx(0.07)
    assert obs.epoch == 7


# ------------------------------------------------------------------ trends


@pytest.mark.parametrize("size", [2, 3, 5, 10, 17])
def test_sliding_trend_matches_polyfit_on_every_push(size):
    rng = np.random.default_rng(size)
    trend = SlidingTrend(size, 0.3)
    history: list[float] = []
    for y in rng.random(6 * size + 3).tolist():  # wraps the ring buffer several times
        trend.push(y)
        history.append(y)
        window = history[-size:]
        assert trend.values() == window
        assert trend.count == len(window)
        assert trend.slope == pytest.approx(polyfit_slope(window), abs=1e-9)


def test_sliding_trend_stays_exact_over_a_long_stream():
    rng = np.random.default_rng(7)
    trend = SlidingTrend(10, 0.3)
    values = (rng.random(50_000) * 0.5 + np.linspace(0.0, 0.5, 50_000)).tolist()
    for y in values:
        trend.push(y)
    assert trend.slope == pytest.approx(polyfit_slope(values[-10:]), abs=1e-10)


def test_sliding_trend_of_a_line_is_its_slope_and_of_one_point_is_zero():
    trend = SlidingTrend(4, 0.5)
    trend.push(0.7)
    assert trend.slope == 0.0
    for k in range(1, 9):
        trend.push(0.7 - 0.05 * k)
    assert trend.slope == pytest.approx(-0.05)


def test_ewma_follows_its_recurrence():
    alpha = 0.25
    trend = SlidingTrend(3, alpha)
    expected = None
    for y in [0.5, 0.9, 0.1, 0.3, 0.8, 0.2, 0.6]:
        trend.push(y)
        expected = y if expected is None else alpha * y + (1 - alpha) * expected
        assert trend.ewma == pytest.approx(expected)


def test_window_size_below_two_is_refused():
    with pytest.raises(ValueError):
        SlidingTrend(1, 0.3)
    with pytest.raises(ValueError):
        AnalyzerConfig(window_size=1)
    with pytest.raises(ValueError):
        AnalyzerConfig(ewma_alpha=0.0)


def test_config_decodes_from_plain_data_with_bounds():
    cfg = msgspec.convert({"window_size": 6, "max_runs": 3}, AnalyzerConfig)
    assert cfg.window_size == 6 and cfg.max_runs == 3 and cfg.idle_ttl_s == 600.0
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"window_size": 0}, AnalyzerConfig)


def test_node_trend_and_ewma_features_track_the_window():
    a = Analyzer(AnalyzerConfig(window_size=5, ewma_alpha=0.5), clock=FakeClock())
    values = [0.9, 0.85, 0.95, 0.6, 0.7, 0.65, 0.4, 0.5]
    feed(a, "r", 0, values)
    x = a.observe("r").node_features[0]
    assert x[F["health"]] == pytest.approx(0.5)
    assert x[F["health_trend"]] == pytest.approx(polyfit_slope(values[-5:]), abs=1e-6)
    ewma = values[0]
    for v in values[1:]:
        ewma = 0.5 * v + 0.5 * ewma
    assert x[F["health_ewma"]] == pytest.approx(ewma, abs=1e-6)


# ------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("values", "errors", "problematic", "attention"),
    [
        ([0.9, 0.9, 0.9], 0, False, False),  # healthy and flat
        ([0.2, 0.2, 0.2], 0, True, False),  # low health, but not falling
        ([0.25, 0.22], 0, True, True),  # low and falling
        ([0.9, 0.75, 0.6], 0, True, False),  # falling faster than 0.1 per signal
        ([0.48, 0.46, 0.44], 0, False, True),  # below 0.5 and falling slowly
        ([0.4, 0.45], 0, False, False),  # below 0.5 but recovering
        ([0.9], 6, True, False),  # more than five errors
        ([0.9], 5, False, False),
    ],
)
def test_problematic_and_needs_attention_flags(values, errors, problematic, attention):
    a = Analyzer(clock=FakeClock())
    feed(a, "r", 0, values, error_count=errors)
    x = a.observe("r").node_features[0]
    assert bool(x[F["is_problematic"]]) is problematic
    assert bool(x[F["needs_attention"]]) is attention
    summary = a.run_summary("r")
    assert summary.problematic == int(problematic) and summary.needs_attention == int(attention)


def test_flag_thresholds_come_from_the_config():
    cfg = AnalyzerConfig(problematic_health=0.6, problematic_errors=100, attention_health=0.95)
    a = Analyzer(cfg, clock=FakeClock())
    feed(a, "r", 0, [0.9, 0.55], error_count=50)
    x = a.observe("r").node_features[0]
    assert x[F["is_problematic"]] == 1.0  # 0.55 < 0.6 (default threshold 0.3 would say no)
    feed(a, "r", 1, [0.9], error_count=50)
    assert a.observe("r").node_features[1, F["is_problematic"]] == 0.0  # 50 errors <= 100


def _skip_graph_analyzer(with_skip: bool) -> Analyzer:
    a = Analyzer(clock=FakeClock())
    edges = [(0, 1), (1, 2), (2, 3), (3, 4)] + ([(1, 3)] if with_skip else [])
    a.ingest_topology("r", topology([0, 1, 2, 3, 4], edges))
    for layer, score in [(0, 0.9), (1, 0.1), (2, 0.9), (3, 0.2), (4, 0.25)]:
        feed(a, "r", layer, [score])
    return a


def test_clusters_follow_skip_connections():
    with_skip = _skip_graph_analyzer(with_skip=True)
    assert with_skip.clusters("r") == [[1, 3, 4]]
    obs = with_skip.observe("r")
    assert obs.node_features[:, F["in_cluster"]].tolist() == [0, 1, 0, 1, 1]
    assert obs.global_features[G["cluster_count"]] == pytest.approx(0.1)
    assert obs.global_features[G["problematic_fraction"]] == pytest.approx(0.6)

    chain = _skip_graph_analyzer(with_skip=False)
    assert chain.clusters("r") == [[1], [3, 4]]  # a lone problematic layer is a cluster of one
    obs = chain.observe("r")
    assert obs.node_features[:, F["in_cluster"]].tolist() == [0, 0, 0, 1, 1]
    assert obs.global_features[G["cluster_count"]] == pytest.approx(0.2)
    assert chain.run_summary("r").clusters == 2


def test_clusters_update_when_a_flag_flips():
    a = _skip_graph_analyzer(with_skip=True)
    assert a.clusters("r") == [[1, 3, 4]]
    feed(a, "r", 3, [0.9] * 12)  # layer 3 recovers; the skip no longer joins 1 to 4
    assert a.clusters("r") == [[1], [4]]
    assert a.observe("r").node_features[:, F["in_cluster"]].tolist() == [0, 0, 0, 0, 0]


def test_overall_health_is_weighted_by_seed_count():
    a = Analyzer(clock=FakeClock())
    a.ingest_topology("r", topology([0, 1, 2], [(0, 1), (1, 2)]))
    feed(a, "r", 0, [0.2], total_seeds=3, active_seeds=3)
    feed(a, "r", 1, [1.0], total_seeds=0)  # weight max(0, 1) = 1
    # Layer 2 never reported: it does not count.
    expected = (0.2 * 3 + 1.0 * 1) / 4
    assert a.run_summary("r").overall_health == pytest.approx(expected)
    assert a.observe("r").global_features[G["overall_health"]] == pytest.approx(expected)


def test_overall_health_with_no_reports_is_the_default():
    a = Analyzer(AnalyzerConfig(default_health=0.75), clock=FakeClock())
    a.ingest_topology("r", topology([0], []))
    assert a.run_summary("r").overall_health == 0.75


# --------------------------------------------------------------- adjacency


def _dense_gcn(edge_index: np.ndarray, n: int) -> np.ndarray:
    adj = np.eye(n)
    for s, d in edge_index.T:
        adj[s, d] = adj[d, s] = 1.0
    inv_sqrt = 1.0 / np.sqrt(adj.sum(axis=1))
    return inv_sqrt[:, None] * adj * inv_sqrt[None, :]


def _to_dense(index: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    dense = np.zeros((n, n))
    dense[index[0], index[1]] = weight
    return dense


def test_gcn_adjacency_is_the_symmetric_normalization():
    a = Analyzer(clock=FakeClock())
    a.ingest_topology("r", topology([0, 1, 2, 3, 4], [(0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (1, 4)]))
    obs = a.observe("r")
    n = obs.num_nodes
    assert obs.gcn_edge_index.shape == (2, 2 * 6 + n)
    assert obs.gcn_edge_weight.dtype == np.float32
    dense = _to_dense(obs.gcn_edge_index, obs.gcn_edge_weight, n)
    np.testing.assert_allclose(dense, _dense_gcn(obs.edge_index, n), rtol=1e-6)
    np.testing.assert_allclose(dense, dense.T)


def test_gcn_adjacency_agrees_with_torch_geometric():
    torch = pytest.importorskip("torch")
    gcn_conv = pytest.importorskip("torch_geometric.nn.conv.gcn_conv")
    utils = pytest.importorskip("torch_geometric.utils")
    edge_index = np.array([[0, 0, 1, 2, 3, 1], [1, 2, 2, 3, 4, 4]])
    ours = _to_dense(*gcn_normalize(edge_index, 5), 5)
    undirected = utils.to_undirected(torch.from_numpy(edge_index))
    index, weight = gcn_conv.gcn_norm(undirected, num_nodes=5, add_self_loops=True)
    theirs = _to_dense(index.numpy(), weight.numpy(), 5)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_gcn_adjacency_is_cached_until_the_topology_changes():
    clock = FakeClock()
    a = Analyzer(clock=clock)
    pkt = topology([0, 1, 2], [(0, 1), (1, 2), (0, 2)])
    a.ingest_topology("r", pkt)
    run = a.get_run("r")
    first = a.observe("r")
    assert run.gcn_builds == 1
    feed(a, "r", 1, [0.2, 0.1])
    a.ingest_state(
        "r", SystemStatePacket(epoch=2, seeds=[SeedSlotState(layer_id=0, stage=SeedStage.TRAINING)])
    )
    assert a.ingest_topology("r", pkt) is False  # the same topology again: nothing changes
    second = a.observe("r")
    assert run.gcn_builds == 1
    assert second.gcn_edge_index is first.gcn_edge_index
    assert second.gcn_edge_weight is first.gcn_edge_weight
    assert second.topology_version == first.topology_version

    assert a.ingest_topology("r", topology([0, 1, 2], [(0, 1), (1, 2)])) is True
    third = a.observe("r")
    assert run.gcn_builds == 2
    assert third.topology_version == first.topology_version + 1
    assert third.gcn_edge_index is not first.gcn_edge_index
    assert third.gcn_edge_index.shape == (2, 2 * 2 + 3)


def test_inferred_growth_invalidates_the_cached_adjacency():
    a = Analyzer(clock=FakeClock())
    feed(a, "r", 0, [0.9])
    first = a.observe("r")
    feed(a, "r", 1, [0.9])
    second = a.observe("r")
    assert a.get_run("r").gcn_builds == 2
    assert second.gcn_edge_index.shape == (2, 2 + 2) and first.gcn_edge_index.shape == (2, 1)


def test_shared_arrays_are_read_only_and_per_call_arrays_are_fresh():
    a = Analyzer(clock=FakeClock())
    a.ingest_topology("r", topology([0, 1], [(0, 1)]))
    first = a.observe("r")
    for shared in (
        first.gcn_edge_index,
        first.gcn_edge_weight,
        first.edge_index,
        first.layer_ids,
        first.blueprint_mask,
    ):
        with pytest.raises(ValueError):
            shared[0] = 0
    first.node_features[:] = 42.0
    first.op_mask[:] = False
    first.stages[:] = 3
    second = a.observe("r")
    assert second.node_features[0, F["health"]] == 1.0
    assert second.op_mask[:, OP_INDEX[Op.WAIT]].all()
    assert second.stages.tolist() == [STAGE_INDEX[SeedStage.DORMANT]] * 2


# ------------------------------------------------------------------- masks


@pytest.mark.parametrize("stage", list(SeedStage))
def test_op_mask_follows_the_lifecycle_table(stage):
    a = Analyzer(clock=FakeClock())
    nodes = [TopologyNode(layer_id=0, seed_slots=1), TopologyNode(layer_id=1, seed_slots=0)]
    a.ingest_topology("r", TopologyPacket(nodes=nodes, edges=[(0, 1)]))
    seeds = [SeedSlotState(layer_id=0, stage=stage), SeedSlotState(layer_id=1, stage=stage)]
    a.ingest_state("r", SystemStatePacket(seeds=seeds))
    obs = a.observe("r")
    legal = [op in LEGAL_OPS[stage] for op in OPS]
    assert obs.op_mask[0].tolist() == legal
    no_slot = list(legal)
    no_slot[OP_INDEX[Op.GERMINATE]] = False  # a layer without seed slots can never germinate
    assert obs.op_mask[1].tolist() == no_slot
    assert obs.op_mask[:, OP_INDEX[Op.WAIT]].all()
    assert obs.stages.tolist() == [STAGE_INDEX[stage]] * 2
    one_hot = obs.node_features[:, F["stage_dormant"] : F["stage_dormant"] + len(STAGES)]
    assert one_hot.sum(axis=1).tolist() == [1.0, 1.0]
    assert one_hot[0, STAGE_INDEX[stage]] == 1.0


def test_blueprint_mask_matches_the_layer_kind():
    a = Analyzer(clock=FakeClock())
    nodes = [
        TopologyNode(layer_id=0, layer_type="conv2d"),
        TopologyNode(layer_id=1, layer_type="attention"),
        TopologyNode(layer_id=2, layer_type="linear"),
    ]
    a.ingest_topology("r", TopologyPacket(nodes=nodes, edges=[(0, 1), (1, 2)]))
    obs = a.observe("r")
    cnn = [bp.family is BlueprintFamily.CNN for bp in BLUEPRINTS]
    transformer = [not c for c in cnn]
    assert obs.blueprint_mask.tolist() == [cnn, transformer, transformer]
    assert obs.blueprint_mask[0, BLUEPRINTS.index(Blueprint.CONV_LIGHT)]
    assert obs.node_features[:, F["family_cnn"]].tolist() == [1.0, 0.0, 0.0]


# ------------------------------------------------------- seed slot updates


def test_newest_slot_information_wins_by_host_timestamp():
    a = Analyzer(clock=FakeClock())
    blending = SeedSlotState(layer_id=0, stage=SeedStage.BLENDING, alpha=0.5, counterfactual=0.02)
    a.ingest_state("r", SystemStatePacket(timestamp=10.0, seeds=[blending]))
    # An older signal (ts 5) must not roll the slot back to TRAINING.
    feed(a, "r", 0, [0.8], seed_stage=SeedStage.TRAINING, total_seeds=1, timestamp=5.0)
    x = a.observe("r")
    assert x.stages.tolist() == [STAGE_INDEX[SeedStage.BLENDING]]
    assert x.node_features[0, F["alpha"]] == 0.5
    assert x.node_features[0, F["counterfactual"]] == pytest.approx(0.02)
    # A hand-typed signal says nothing about seeds and leaves the slot alone.
    feed(a, "r", 0, [0.7])
    assert a.observe("r").stages.tolist() == [STAGE_INDEX[SeedStage.BLENDING]]
    # A newer signal moves it on.
    feed(
        a,
        "r",
        0,
        [0.7],
        seed_stage=SeedStage.PROBATIONARY,
        alpha=1.0,
        epochs_in_stage=3,
        total_seeds=1,
        timestamp=20.0,
    )
    x = a.observe("r").node_features[0]
    assert x[F["stage_probationary"]] == 1.0 and x[F["alpha"]] == 1.0
    assert x[F["epochs_in_stage"]] == pytest.approx(3 / 12)
    # And an older state packet does not undo that.
    a.ingest_state("r", SystemStatePacket(timestamp=15.0, seeds=[blending]))
    assert a.observe("r").stages.tolist() == [STAGE_INDEX[SeedStage.PROBATIONARY]]


def test_batch_timestamp_applies_to_signals_without_their_own():
    a = Analyzer(clock=FakeClock())
    a.ingest_state(
        "r", SystemStatePacket(timestamp=10.0, seeds=[SeedSlotState(layer_id=0, stage=SeedStage.TRAINING)])
    )
    stale = HealthBatch(timestamp=5.0, signals=[health(0, 0.9, seed_stage=SeedStage.DORMANT, total_seeds=1)])
    a.ingest_health("r", stale)
    assert a.observe("r").stages.tolist() == [STAGE_INDEX[SeedStage.TRAINING]]


def test_slots_other_than_zero_are_not_actionable():
    a = Analyzer(clock=FakeClock())
    a.ingest_topology("r", topology([0], []))
    a.ingest_state(
        "r", SystemStatePacket(seeds=[SeedSlotState(layer_id=0, stage=SeedStage.TRAINING, seed_id=1)])
    )
    assert a.observe("r").stages.tolist() == [STAGE_INDEX[SeedStage.DORMANT]]


# -------------------------------------------------------- global features


def test_global_training_features():
    a = Analyzer(clock=FakeClock())
    a.ingest_topology("r", topology([0, 1], [(0, 1)]))
    accuracies = [(1, 0.50), (2, 0.60), (3, 0.6005), (4, 0.59), (5, 0.58)]
    for epoch, acc in accuracies:
        a.ingest_state(
            "r",
            SystemStatePacket(
                epoch=epoch,
                val_accuracy=acc,
                train_loss=1.0,
                val_loss=2.0,
                train_accuracy=0.7,
                host_params=1000,
                total_params=1250,
            ),
        )
    g = a.observe("r").global_features
    assert g[G["epoch"]] == pytest.approx(0.05)
    assert g[G["val_accuracy"]] == pytest.approx(0.58)
    assert g[G["val_accuracy_delta"]] == pytest.approx(-0.01, abs=1e-6)
    assert g[G["plateau_epochs"]] == pytest.approx(0.3)  # best (0.60) was at epoch 2; 0.6005 is no gain
    assert g[G["train_loss"]] == pytest.approx(np.log1p(1.0))
    assert g[G["val_loss"]] == pytest.approx(np.log1p(2.0))
    assert g[G["param_growth"]] == pytest.approx(0.25)
    assert g[G["log_nodes"]] == pytest.approx(np.log10(3) / 4)
    a.ingest_state("r", SystemStatePacket(epoch=6, val_accuracy=0.7))
    g = a.observe("r").global_features
    assert g[G["plateau_epochs"]] == 0.0 and g[G["val_accuracy_delta"]] == pytest.approx(0.12)
    assert g[G["param_growth"]] == pytest.approx(0.25)  # sizes omitted: last known kept


def test_active_seed_fraction_counts_live_slots():
    a = Analyzer(clock=FakeClock())
    a.ingest_topology("r", topology([0, 1, 2, 3], [(0, 1), (1, 2), (2, 3)]))
    seeds = [
        SeedSlotState(layer_id=0, stage=SeedStage.TRAINING),
        SeedSlotState(layer_id=1, stage=SeedStage.BLENDING),
        SeedSlotState(layer_id=2, stage=SeedStage.FOSSILIZED),
    ]
    a.ingest_state("r", SystemStatePacket(seeds=seeds))
    assert a.observe("r").global_features[G["active_seed_fraction"]] == pytest.approx(0.5)


def test_feature_values_are_finite_and_in_range():
    clock = FakeClock()
    a = Analyzer(clock=clock)
    rng = np.random.default_rng(3)
    n = 40
    edges = [(i, i + 1) for i in range(n - 1)] + [(i, i + 3) for i in range(0, n - 3, 2)]
    kinds = ["conv", "attention", "linear", "embedding"]
    a.ingest_topology(
        "r",
        TopologyPacket(
            nodes=[
                TopologyNode(layer_id=i, layer_type=kinds[i % 4], params=int(rng.integers(0, 10**9)))
                for i in range(n)
            ],
            edges=edges,
        ),
    )
    stages = list(SeedStage)
    for step in range(31):  # the last step (30) reports every layer, so staleness is uniform
        clock.now += 1.0
        a.ingest_health(
            "r",
            HealthBatch(
                signals=[
                    health(
                        i,
                        float(rng.random()),
                        activation_variance=float(rng.random() * 50),
                        dead_neuron_ratio=float(rng.random()),
                        avg_correlation=float(rng.uniform(-1, 1)),
                        execution_latency_us=float(rng.random() * 5e4),
                        error_count=int(rng.integers(0, 30)),
                        active_seeds=int(rng.integers(0, 5)),
                        total_seeds=int(rng.integers(0, 3)),
                        gradient_norm=float(rng.random() * 100),
                        seed_gradient_ratio=float(rng.random() * 3),
                        seed_stage=stages[int(rng.integers(0, 7))],
                        alpha=float(rng.random()),
                        epochs_in_stage=int(rng.integers(0, 40)),
                        blending_velocity=float(rng.uniform(-3, 3)),
                    )
                    for i in range(0, n, 1 + step % 3)
                ]
            ),
        )
    a.ingest_state(
        "r",
        SystemStatePacket(
            epoch=250,
            train_loss=3.0,
            val_loss=4.0,
            train_accuracy=0.4,
            val_accuracy=0.3,
            host_params=100,
            total_params=900,
            seeds=[SeedSlotState(layer_id=i, counterfactual=5.0, total_improvement=-7.0) for i in range(3)],
        ),
    )
    clock.now += 30.0
    obs = a.observe("r")
    x, g = obs.node_features, obs.global_features
    assert x.shape == (n, len(NODE_FEATURES)) and x.dtype == np.float32
    assert g.shape == (len(GLOBAL_FEATURES),) and g.dtype == np.float32
    assert obs.op_mask.shape == (n, len(OPS)) and obs.op_mask.dtype == bool
    assert obs.blueprint_mask.shape == (n, len(BLUEPRINTS))
    assert obs.stages.dtype == np.int64 and obs.layer_ids.dtype == np.int64
    assert np.isfinite(x).all() and np.isfinite(g).all()
    log_scaled = [F[name] for name in ("activation_variance", "latency_ms", "gradient_norm")]
    bounded = [i for i in range(len(NODE_FEATURES)) if i not in log_scaled]
    assert (x[:, bounded] >= -1.0).all() and (x[:, bounded] <= 1.0).all()
    assert (x[:, log_scaled] >= 0.0).all() and (x[:, log_scaled] < 12.0).all()
    unit = [
        F[name]
        for name in (
            "health",
            "health_ewma",
            "error_rate",
            "seed_utilization",
            "alpha",
            "epochs_in_stage",
            "log_params",
            "staleness",
            "seed_gradient_ratio",
        )
    ]
    assert (x[:, unit] >= 0.0).all()
    assert x[0, F["counterfactual"]] == 1.0 and x[0, F["total_improvement"]] == -1.0
    assert np.allclose(x[:, F["staleness"]], 0.5)  # 30 s after the last batch, scale 60 s
    # Losses are log1p-scaled (the best and the history too, issue 16), the rest within [-1, 1].
    losses = [G["train_loss"], G["val_loss"], G["best_val_loss"], *(G[f"loss_history_{k}"] for k in range(5))]
    assert (g[losses] >= 0.0).all()
    others = [i for i in range(len(GLOBAL_FEATURES)) if i not in losses]
    assert (g[others] >= -1.0).all() and (g[others] <= 1.0).all()
    assert g[G["epoch"]] == 1.0 and g[G["param_growth"]] == 1.0


# -------------------------------------------------------- material change


def test_material_change_is_measured_against_the_last_observation():
    a = Analyzer(AnalyzerConfig(material_health_delta=0.1), clock=FakeClock())
    assert feed(a, "r", 0, [0.95]) is False  # healthy first report: within 0.1 of the default 1.0
    assert feed(a, "r", 0, [0.92]) is False
    assert feed(a, "r", 0, [0.85]) is True  # 0.15 from the baseline (never observed: default health)
    a.observe("r")
    assert feed(a, "r", 0, [0.8]) is False  # 0.05 from the observed 0.85
    assert feed(a, "r", 0, [0.7]) is True  # 0.15 from 0.85: material until observed again
    assert feed(a, "r", 0, [0.7]) is True
    a.observe("r")
    assert feed(a, "r", 0, [0.7]) is False
    assert feed(a, "r", 0, [0.25]) is True  # problematic flips
    a.observe("r")
    assert feed(a, "r", 0, [0.25]) is False


def test_material_change_from_state_and_topology():
    a = Analyzer(clock=FakeClock())
    assert a.ingest_topology("r", topology([0, 1], [(0, 1)])) is True
    assert a.ingest_state("r", SystemStatePacket(epoch=1)) is False
    training = SystemStatePacket(epoch=2, seeds=[SeedSlotState(layer_id=0, stage=SeedStage.TRAINING)])
    assert a.ingest_state("r", training) is True
    assert a.ingest_state("r", training) is False  # same stage again
    assert a.ingest_state("r", SystemStatePacket(epoch=3, done=True)) is True
    assert a.ingest_state("r", SystemStatePacket(epoch=3, done=True)) is False
    assert a.run_summary("r").done is True


def test_batch_reports_material_if_any_signal_is():
    a = Analyzer(clock=FakeClock())
    batch = HealthBatch(signals=[health(0, 0.9), health(1, 0.1), health(2, 0.95)])
    assert a.ingest_health("r", batch) is True
    a.observe("r")
    assert a.ingest_health("r", HealthBatch(signals=[health(0, 0.9), health(2, 0.95)])) is False


# ----------------------------------------------------------------- bounds


def test_runs_are_created_on_demand_and_forgotten_on_remove():
    # How many runs exist is the run table's call (esperd.runs); the analyzer never refuses a run.
    a = Analyzer(AnalyzerConfig(max_runs=1), clock=FakeClock())
    feed(a, "a", 0, [0.9])
    feed(a, "b", 0, [0.9])
    assert sorted(a.run_ids()) == ["a", "b"]
    assert a.remove_run("b") is True and a.remove_run("b") is False
    assert a.run_ids() == ["a"] and "b" not in a


def test_the_size_gate_is_asked_before_a_graph_grows_and_a_refusal_changes_nothing():
    asked: list[tuple[str, int, int]] = []

    def gate(run_id: str, nodes: int, edges: int) -> str:
        asked.append((run_id, nodes, edges))
        return "over budget" if nodes > 3 else ""

    a = Analyzer(AnalyzerConfig(), clock=FakeClock(), size_gate=gate)
    assert a.ingest_topology("r", topology([0, 1, 2], [(0, 1), (1, 2), (0, 2)]))
    with pytest.raises(AnalyzerError) as info:
        a.ingest_topology("r", topology([0, 1, 2, 3], [(0, 1)]))
    assert info.value.reason == "memory_budget" and "over budget" in info.value.detail
    assert a.observe("r").layer_ids.tolist() == [0, 1, 2]  # the refused topology was not adopted
    feed(a, "s", 0, [0.9])  # an inferred graph: a chain, asked layer by layer as it grows
    a.ingest_health("s", HealthBatch(signals=[health(1, 0.5), health(2, 0.5)]))
    with pytest.raises(AnalyzerError) as info:
        a.ingest_health("s", HealthBatch(signals=[health(3, 0.1), health(0, 0.1)]))
    assert info.value.reason == "memory_budget"
    obs = a.observe("s")
    assert obs.layer_ids.tolist() == [0, 1, 2]
    assert obs.node_features[0, F["health"]] == pytest.approx(0.9)  # nothing of the refused batch applied
    assert asked == [("r", 3, 3), ("r", 4, 1), ("s", 1, 0), ("s", 3, 2), ("s", 4, 3)]


def test_max_nodes_per_run_bounds_inferred_growth_atomically():
    a = Analyzer(AnalyzerConfig(max_nodes_per_run=3), clock=FakeClock())
    feed(a, "r", 0, [0.9])
    with pytest.raises(AnalyzerError) as info:
        a.ingest_health("r", HealthBatch(signals=[health(1, 0.5), health(2, 0.5), health(3, 0.5)]))
    assert info.value.reason == "too_many_nodes"
    obs = a.observe("r")
    assert obs.layer_ids.tolist() == [0]  # nothing from the refused batch was applied
    assert obs.node_features[0, F["health"]] == pytest.approx(0.9)
    a.ingest_health("r", HealthBatch(signals=[health(1, 0.5), health(2, 0.5), health(1, 0.4)]))
    assert a.observe("r").layer_ids.tolist() == [0, 1, 2]
    with pytest.raises(AnalyzerError) as info:
        a.ingest_state("r", SystemStatePacket(seeds=[SeedSlotState(layer_id=9)]))
    assert info.value.reason == "too_many_nodes"


# ----------------------------------------------------------------- status


def test_summary_reports_every_run():
    clock = FakeClock(0.0)
    a = Analyzer(clock=clock)
    a.ingest_topology("a", topology([0, 1, 2], [(0, 1), (1, 2)]))
    feed(a, "a", 0, [0.1])
    feed(a, "a", 1, [0.2])
    clock.now = 5.0
    feed(a, "b", 3, [0.9])
    summary = a.summary(now=7.0)
    assert summary.runs == 2 and summary.max_runs == 1024
    by_id = {run.run_id: run for run in summary.per_run}
    assert by_id["a"].nodes == 3 and by_id["a"].edges == 2 and by_id["a"].problematic == 2
    assert by_id["a"].clusters == 1 and by_id["a"].inferred is False
    assert by_id["a"].idle_s == 7.0 and by_id["b"].idle_s == 2.0
    assert by_id["b"].inferred is True and by_id["b"].overall_health == pytest.approx(0.9)
    assert msgspec.json.decode(msgspec.json.encode(summary))["runs"] == 2


def test_ingest_dispatches_by_message_type():
    a = Analyzer(clock=FakeClock())
    a.ingest("r", topology([0, 1], [(0, 1)]))
    a.ingest("r", health(0, 0.2))
    a.ingest("r", SystemStatePacket(epoch=4))
    obs = a.observe("r")
    assert obs.node_features[0, F["health"]] == pytest.approx(0.2) and obs.epoch == 4
    with pytest.raises(TypeError):
        a.ingest("r", object())  # type: ignore[arg-type]


def test_analyzer_imports_neither_torch_nor_nats():
    code = "import sys, esperd.analyzer; print(sorted(m for m in ('torch', 'nats') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ host acks


def _slots_run(kinds: list[str]) -> Analyzer:
    analyzer = Analyzer(clock=FakeClock())
    nodes = [TopologyNode(layer_id=i, layer_type=k) for i, k in enumerate(kinds)]
    analyzer.ingest_topology("r", topology(nodes, [(i, i + 1) for i in range(len(kinds) - 1)]))
    return analyzer


def test_rejected_germinate_masks_its_blueprint_on_that_layer_only():
    analyzer = _slots_run(["linear", "linear", "conv"])
    before = analyzer.observe("r")
    assert analyzer.note_ack("r", 0, Op.GERMINATE, applied=False, blueprint=Blueprint.ATTENTION)
    obs = analyzer.observe("r")
    col = BLUEPRINTS.index(Blueprint.ATTENTION)
    assert before.blueprint_mask[0, col] and not obs.blueprint_mask[0, col]
    assert obs.blueprint_mask[1, col]  # another layer may still try it
    assert obs.op_mask[0, OP_INDEX[Op.GERMINATE]]  # other blueprints remain
    # The mask keeps its identity until the next change (policy batching caches by it).
    assert analyzer.observe("r").blueprint_mask is obs.blueprint_mask
    # Other ops' rejections say nothing about blueprints.
    analyzer.note_ack("r", 1, Op.ADVANCE, applied=False)
    assert analyzer.observe("r").blueprint_mask is obs.blueprint_mask


def test_blueprint_rejected_on_two_layers_is_masked_run_wide():
    analyzer = _slots_run(["linear", "linear", "linear"])
    for layer in (0, 1):
        analyzer.note_ack("r", layer, Op.GERMINATE, applied=False, blueprint=Blueprint.MLP)
    obs = analyzer.observe("r")
    assert not obs.blueprint_mask[:, BLUEPRINTS.index(Blueprint.MLP)].any()


def test_a_layer_rejecting_germinate_repeatedly_is_no_longer_germinated():
    analyzer = _slots_run(["conv", "conv"])
    for bp in (Blueprint.CONV_LIGHT, Blueprint.CONV_HEAVY, Blueprint.DEPTHWISE):
        analyzer.note_ack("r", 0, Op.GERMINATE, applied=False, blueprint=bp)
    obs = analyzer.observe("r")
    assert not obs.op_mask[0, OP_INDEX[Op.GERMINATE]] and obs.op_mask[1, OP_INDEX[Op.GERMINATE]]
    assert obs.op_mask[0, OP_INDEX[Op.WAIT]]


def test_every_fitting_blueprint_rejected_masks_germinate():
    analyzer = Analyzer(
        AnalyzerConfig(max_germinate_rejections=100, blueprint_rejections_run_wide=100), clock=FakeClock()
    )
    analyzer.ingest_topology("r", topology([TopologyNode(layer_id=0, layer_type="conv")], []))
    for bp in BLUEPRINTS:
        if bp.family is BlueprintFamily.CNN:
            analyzer.note_ack("r", 0, Op.GERMINATE, applied=False, blueprint=bp)
    obs = analyzer.observe("r")
    assert not obs.blueprint_mask[0].any() and not obs.op_mask[0, OP_INDEX[Op.GERMINATE]]


def test_applied_ack_moves_the_stage_at_once_and_the_next_packet_reconciles():
    analyzer = _slots_run(["conv", "conv"])
    stage = lambda: STAGES[int(analyzer.observe("r").stages[0])]  # noqa: E731
    assert analyzer.note_ack("r", 0, Op.GERMINATE, applied=True, timestamp=100.0)
    assert stage() is SeedStage.GERMINATED
    obs = analyzer.observe("r")
    assert not obs.op_mask[0, OP_INDEX[Op.GERMINATE]] and obs.op_mask[0, OP_INDEX[Op.PRUNE]]
    # A packet the host stamped before it applied the command does not undo it ...
    old = SystemStatePacket(epoch=3, timestamp=99.0, seeds=[SeedSlotState(layer_id=0)])
    analyzer.ingest_state("r", old)
    assert stage() is SeedStage.GERMINATED
    # ... a later one is the truth.
    later = SeedSlotState(layer_id=0, stage=SeedStage.TRAINING, epochs_in_stage=3)
    analyzer.ingest_state("r", SystemStatePacket(epoch=4, timestamp=101.0, seeds=[later]))
    assert stage() is SeedStage.TRAINING
    assert analyzer.note_ack("r", 0, Op.ADVANCE, applied=True, timestamp=102.0)
    assert stage() is SeedStage.BLENDING
    assert analyzer.observe("r").node_features[0, F["epochs_in_stage"]] == 0.0
    # An applied op our view does not allow (a stale view) changes nothing.
    assert not analyzer.note_ack("r", 0, Op.FOSSILIZE, applied=True)
    assert stage() is SeedStage.BLENDING
    assert not analyzer.note_ack("unknown", 0, Op.PRUNE, applied=True)


def test_layer_kind_features_follow_the_layer_type():
    from esperd.analyzer.observation import LAYER_KINDS, layer_kind

    types = ["Conv2d", "linear", "attention", "ffn", "embedding", "layernorm", "pool", "mystery"]
    assert [layer_kind(t) for t in types] == list(LAYER_KINDS)
    analyzer = Analyzer(clock=FakeClock())
    nodes = [TopologyNode(layer_id=i, layer_type=t) for i, t in enumerate(types)]
    analyzer.ingest_topology("r", topology(nodes, []))
    x = analyzer.observe("r").node_features
    one_hot = x[:, [F[f"kind_{k}"] for k in LAYER_KINDS]]
    assert np.array_equal(one_hot, np.eye(len(LAYER_KINDS)))


def test_budget_features_come_from_total_epochs():
    analyzer = Analyzer(clock=FakeClock())
    analyzer.ingest_topology("r", topology([0, 1], [(0, 1)]))
    analyzer.ingest_state("r", SystemStatePacket(epoch=3))
    g = analyzer.observe("r").global_features
    assert g[G["budget_known"]] == 0.0 and g[G["epochs_remaining"]] == 1.0  # unknown: plenty
    analyzer.ingest_state("r", SystemStatePacket(epoch=4, total_epochs=20, val_samples=360))
    run = analyzer.get_run("r")
    assert run is not None and run.training.epochs_remaining == 15 and run.training.val_samples == 360
    g = analyzer.observe("r").global_features
    assert g[G["budget_known"]] == 1.0 and round(float(g[G["epochs_remaining"]]) * 50) == 15
    # A packet that omits them keeps the last known values.
    analyzer.ingest_state("r", SystemStatePacket(epoch=19))
    assert run.training.epochs_remaining == 0 and run.training.val_samples == 360


def _probation(analyzer: Analyzer, epoch: int, cf: float, val_samples: int = 0) -> float:
    slot = SeedSlotState(layer_id=0, stage=SeedStage.PROBATIONARY, counterfactual=cf, total_improvement=0.01)
    analyzer.ingest_state("r", SystemStatePacket(epoch=epoch, seeds=[slot], val_samples=val_samples))
    return float(analyzer.observe("r").node_features[0, F["counterfactual_z"]]) * 4


def test_counterfactual_z_counts_validation_samples():
    analyzer = _slots_run(["linear", "linear"])
    # 0.003 of 1000 samples is 3 samples: not more than noise (z < 2) ...
    assert 1.0 < _probation(analyzer, 5, 0.003, val_samples=1000) < 2.0
    analyzer = _slots_run(["linear", "linear"])
    # ... 0.02 of 360 (7 samples) is.
    assert _probation(analyzer, 5, 0.02, val_samples=360) > 2.5
    analyzer = _slots_run(["linear", "linear"])
    assert _probation(analyzer, 5, -0.02, val_samples=360) < -2.5


def test_counterfactual_z_averages_probation_epochs_and_counts_their_spread():
    analyzer = _slots_run(["linear", "linear"])
    assert _probation(analyzer, 5, 0.03, val_samples=100_000) == 4.0  # capped at 4 (feature 1.0)
    z = _probation(analyzer, 6, -0.01, val_samples=100_000)  # mean 0.01, spread 0.028 over 2 epochs
    assert 0.4 < z < 0.6
    # Leaving probation forgets the measurements.
    analyzer.ingest_state("r", SystemStatePacket(epoch=7, seeds=[SeedSlotState(layer_id=0)]))
    assert analyzer.observe("r").node_features[0, F["counterfactual_z"]] == 0.0
    assert _probation(analyzer, 8, 0.03, val_samples=100_000) == 4.0


def test_counterfactual_z_without_a_validation_size_uses_the_configured_error():
    analyzer = Analyzer(AnalyzerConfig(counterfactual_se=0.01), clock=FakeClock())
    analyzer.ingest_topology("r", topology([0], []))
    assert _probation(analyzer, 5, 0.015) == pytest.approx(1.5, abs=1e-3)
