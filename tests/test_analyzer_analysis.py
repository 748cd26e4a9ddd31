"""Seed document 001's per-layer analysis (issue 16 item 5): latency variance, throughput trend,
stability, readiness and topology context, as the analyzer fills them into the observation."""

from __future__ import annotations

import numpy as np
import pytest

from esperd.analyzer import Analyzer, AnalyzerConfig
from esperd.analyzer.graph import longest_paths
from esperd.analyzer.observation import NODE_FEATURE_INDEX
from esperd_contracts import HealthBatch, HealthSignal, SeedStage, TopologyNode, TopologyPacket
from tests.support.packets import health, seed, state
from tests.support.timing import FakeClock

F = NODE_FEATURE_INDEX
ALPHA = AnalyzerConfig().ewma_alpha


def chain_with_skip(seed_slots: int = 1) -> TopologyPacket:
    # 0 -> 1 -> 2 -> 3 with a skip 0 -> 2 (which must not make 2 shallower) and 1 -> 3.
    nodes = [TopologyNode(layer_id=i, layer_type="conv", seed_slots=seed_slots) for i in range(4)]
    return TopologyPacket(nodes=nodes, edges=[(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)])


def analyzer(packet: TopologyPacket | None = None) -> tuple[Analyzer, FakeClock]:
    clock = FakeClock()
    a = Analyzer(clock=clock)
    a.ingest_topology("r", packet or chain_with_skip())
    return a, clock


def column(a: Analyzer, name: str) -> np.ndarray:
    return a.observe("r").node_features[:, F[name]].astype(np.float64)


# ------------------------------------------------------------------ topology context


def test_depth_is_the_longest_path_and_position_its_share_of_the_deepest() -> None:
    a, _ = analyzer()
    assert column(a, "depth") == pytest.approx(np.array([0, 1, 2, 3]) / 32)
    assert column(a, "position") == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_depth_follows_the_edges_not_the_ids() -> None:
    # Edges going down in layer id: the graph's order is not the id order.
    edges = np.array([[3, 2, 3], [2, 0, 1]])  # 3 -> 2 -> 0, 3 -> 1
    assert longest_paths(edges, 4).tolist() == [2, 1, 1, 0]
    assert longest_paths(np.zeros((2, 0), dtype=np.int64), 3).tolist() == [0, 0, 0]


def test_a_single_layer_has_no_position_and_default_neighbour_health() -> None:
    a, _ = analyzer(TopologyPacket(nodes=[TopologyNode(layer_id=0)]))
    x = a.observe("r").node_features[0]
    assert x[F["depth"]] == x[F["position"]] == 0.0
    assert x[F["upstream_health"]] == x[F["downstream_health"]] == AnalyzerConfig().default_health


def test_upstream_and_downstream_health_are_the_neighbours_means() -> None:
    a, _ = analyzer()
    a.ingest_health(
        "r", HealthBatch(signals=[health(i, score) for i, score in enumerate([0.2, 0.4, 0.6, 0.8])])
    )
    up, down = column(a, "upstream_health"), column(a, "downstream_health")
    # Inputs: 0 <- none, 1 <- 0, 2 <- {0, 1}, 3 <- {1, 2}; outputs the other way round.
    assert up == pytest.approx([1.0, 0.2, 0.3, 0.5])
    assert down == pytest.approx([0.5, 0.7, 0.8, 1.0])


# ------------------------------------------------------------------ performance trends


def feed_latencies(a: Analyzer, clock: FakeClock, latencies: list[float], layer: int = 1) -> None:
    for latency in latencies:
        clock.advance(0.1)
        a.ingest_health("r", health(layer, 0.9, execution_latency_us=latency))


def ew_stats(latencies: list[float]) -> tuple[float, float, float]:
    """Independently: EWMA, EW variance and EWMA of the throughput's relative change."""
    mean, var, trend, last = latencies[0], 0.0, 0.0, latencies[0]
    for latency in latencies[1:]:
        d = latency - mean
        mean += ALPHA * d
        var = (1 - ALPHA) * (var + ALPHA * d * d)
        trend += ALPHA * ((1e6 / latency) / (1e6 / last) - 1 - trend)
        last = latency
    return mean, var, trend


def test_a_steady_latency_has_no_variance_and_no_trend() -> None:
    a, clock = analyzer()
    feed_latencies(a, clock, [500.0] * 8)
    assert column(a, "latency_variance")[1] == 0.0 and column(a, "throughput_trend")[1] == 0.0
    assert column(a, "stability")[1] == pytest.approx(1.0)


def test_a_slowing_layer_has_a_falling_throughput_trend() -> None:
    a, clock = analyzer()
    latencies = [100.0 * 1.2**k for k in range(10)]
    feed_latencies(a, clock, latencies)
    mean, var, trend = ew_stats(latencies)
    assert trend < 0
    assert column(a, "throughput_trend")[1] == pytest.approx(trend, rel=1e-5)
    assert column(a, "latency_variance")[1] == pytest.approx(var / mean**2, rel=1e-5)
    # A speeding-up one, the other way.
    feed_latencies(a, clock, latencies[::-1], layer=2)
    assert column(a, "throughput_trend")[2] > 0


def test_a_jittery_latency_lowers_the_stability() -> None:
    a, clock = analyzer()
    latencies = [100.0, 300.0] * 6
    feed_latencies(a, clock, latencies)
    mean, var, _ = ew_stats(latencies)
    assert column(a, "latency_variance")[1] == pytest.approx(var / mean**2, rel=1e-5) and var > 0
    assert column(a, "stability")[1] == pytest.approx(1 / (1 + np.sqrt(var / mean**2)), rel=1e-5)
    # Signals without a latency (0: not measured) change nothing.
    before = a.observe("r").node_features[1].copy()
    feed_latencies(a, clock, [0.0, 0.0])
    after = a.observe("r").node_features[1]
    assert after[F["latency_variance"]] == before[F["latency_variance"]]
    assert after[F["throughput_trend"]] == before[F["throughput_trend"]]


def test_stability_falls_as_health_swings() -> None:
    a, clock = analyzer()
    swings = [0.9, 0.5] * 4
    for score in swings:
        a.ingest_health("r", HealthBatch(signals=[health(1, score), health(2, 0.7)]))
    stability = column(a, "stability")
    assert stability[2] == pytest.approx(1.0)
    assert stability[1] == pytest.approx(1 / (1 + 10 * np.std(swings)), rel=1e-5)  # sd 0.2: 1/3


# ------------------------------------------------------------------ readiness


def test_readiness_is_need_times_stability_times_freshness_where_germinate_is_legal() -> None:
    nodes = [TopologyNode(layer_id=i, layer_type="conv", seed_slots=int(i != 3)) for i in range(4)]
    a, clock = analyzer(TopologyPacket(nodes=nodes, edges=[(0, 1), (1, 2), (2, 3)]))
    a.ingest_health("r", HealthBatch(signals=[health(i, 0.4) for i in range(4)]))
    a.ingest_state("r", state(1, seeds=[seed(2, SeedStage.TRAINING)]))
    ready = column(a, "readiness")
    assert ready[0] == pytest.approx(0.6) and ready[1] == pytest.approx(0.6)  # steady, fresh, health 0.4
    assert ready[2] == 0.0  # its slot holds a seed: GERMINATE is not legal there
    assert ready[3] == 0.0  # no seed slot
    clock.advance(30.0)  # half-stale (staleness scale 60 s)
    assert column(a, "readiness")[0] == pytest.approx(0.3)
    a.ingest_health("r", HealthBatch(signals=[health(0, 1.0)] * 3 + [health(1, 0.1), health(1, 0.1)]))
    ready = column(a, "readiness")
    # A healthier layer needs less; one in steady decline needs more but is less stable.
    assert ready[0] < 0.3 and 0.0 < ready[1] < 0.9


def test_every_analysis_feature_is_in_range_on_random_streams() -> None:
    rng = np.random.default_rng(3)
    a, clock = analyzer()
    for _ in range(50):
        clock.advance(float(rng.uniform(0, 5)))
        signals = [
            HealthSignal(
                layer_id=int(i),
                health_score=float(rng.random()),
                execution_latency_us=float(10 ** rng.uniform(-6, 12)) * int(rng.random() > 0.2),
            )
            for i in rng.integers(0, 4, 3)
        ]
        a.ingest_health("r", HealthBatch(signals=signals))
    x = a.observe("r").node_features
    names = ["latency_variance", "throughput_trend", "stability", "readiness", "depth", "position"]
    names += ["upstream_health", "downstream_health"]
    values = x[:, [F[name] for name in names]]
    assert np.isfinite(values).all() and (values >= -1.0).all() and (values <= 1.0).all()


# ------------------------------------------------------------------ the status summary


def test_the_analysis_summary_lists_flagged_layers_and_clusters_worst_run_first() -> None:
    a, _ = analyzer()
    # r: layers 1 and 2 problematic (and adjacent: one cluster), 0 healthy, 3 falling (attention).
    a.ingest_health(
        "r", HealthBatch(signals=[health(0, 0.9), health(1, 0.1), health(2, 0.2), health(3, 0.45)])
    )
    a.ingest_health("r", HealthBatch(signals=[health(3, 0.44)]))
    a.ingest_topology("s", chain_with_skip())
    a.ingest_health("s", HealthBatch(signals=[health(0, 0.1)]))  # one problematic layer
    a.ingest_health("quiet", health(0, 0.95))
    summary = a.analysis()
    assert (summary.runs, summary.runs_with_problems) == (3, 2)
    assert (summary.problematic_layers, summary.clusters) == (3, 2)
    assert [run.run_id for run in summary.per_run] == ["r", "s"]  # most problematic first; quiet left out
    r = summary.per_run[0]
    assert (r.layers, r.problematic, r.clusters) == (4, 2, 1)
    assert r.problematic_layers == [1, 2] and r.cluster_layers == [[1, 2]]
    assert 3 in r.attention_layers and r.needs_attention == len(r.attention_layers)
    assert r.overall_health == pytest.approx(a.run_summary("r").overall_health)
    assert [run.run_id for run in a.analysis(limit=1).per_run] == ["r"]


def test_the_summary_bounds_what_it_lists_but_counts_everything() -> None:
    from esperd_contracts.status import MAX_LISTED_LAYERS

    n = MAX_LISTED_LAYERS + 8
    nodes = [TopologyNode(layer_id=i) for i in range(n)]
    a, _ = analyzer(TopologyPacket(nodes=nodes, edges=[]))  # no edges: every layer its own cluster
    a.ingest_health("r", HealthBatch(signals=[health(i, 0.1) for i in range(n)]))
    run = a.analysis().per_run[0]
    assert run.problematic == run.clusters == n
    assert run.problematic_layers == list(range(MAX_LISTED_LAYERS)) and len(run.cluster_layers) == 8
