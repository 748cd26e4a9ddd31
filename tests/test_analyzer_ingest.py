"""Vectorized health ingest (esperd.analyzer.ingest) against the one-signal-at-a-time semantics.

`Reference` is the analyzer's per-signal code as it was before the ingest was vectorized (a
SlidingTrend per layer, Python arithmetic per signal). Random streams of health messages for
several runs -- batches with repeated layers, signals with and without seed fields, older and
newer host timestamps, errors, health around the thresholds -- go through both, applied one
message at a time, queued and flushed in random groups, with observations in between; the
feature rows, the bookkeeping and the material-change verdicts must agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from esperd.analyzer import Analyzer, AnalyzerConfig, SlidingTrend, ingest, table as T
from esperd.analyzer.observation import NODE_FEATURE_INDEX, STAGE_INDEX, STAGES
from esperd_contracts import HealthBatch, HealthSignal, SeedStage
from tests.support.timing import FakeClock

F = NODE_FEATURE_INDEX
_EPOCHS = 12.0


def _clip(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


class _Layer:
    def __init__(self, cfg: AnalyzerConfig) -> None:
        self.trend = SlidingTrend(cfg.window_size, cfg.ewma_alpha)
        self.feat = [cfg.default_health, cfg.default_health] + [0.0] * (T.SIGNAL_END - 2)
        self.levers = [0.0] * (T.LEVER_END - T.LEVER_FIRST)  # lever telemetry (issue 16)
        self.latency = [0.0, 0.0, 0.0, 0.0]  # last, EWMA, EW variance, throughput trend (issue 16)
        self.slot_ts = 0.0
        self.stage = STAGE_INDEX[SeedStage.DORMANT]
        self.weight = 1.0
        self.last_seen = -math.inf
        self.seen = (cfg.default_health, 0.0, 0.0)  # health, problematic, attention at the last observe


class Reference:
    """The per-signal semantics, one signal at a time (the code the vectorized ingest replaced)."""

    def __init__(self, cfg: AnalyzerConfig) -> None:
        self.cfg = cfg
        self.runs: dict[str, dict[int, _Layer]] = {}

    def ingest(self, run: str, signals: list[HealthSignal], batch_ts: float, now: float) -> bool:
        layers = self.runs.setdefault(run, {})
        material = False
        for s in signals:
            layer = layers.setdefault(s.layer_id, _Layer(self.cfg))
            material |= self._apply(layer, s, s.timestamp or batch_ts, now)
        return material

    def observed(self, run: str) -> None:
        for layer in self.runs.get(run, {}).values():
            layer.seen = (layer.feat[T.HEALTH], layer.feat[T.PROBLEMATIC], layer.feat[T.ATTENTION])

    def _apply(self, layer: _Layer, s: HealthSignal, ts: float, now: float) -> bool:
        cfg = self.cfg
        h = s.health_score
        layer.trend.push(h)
        slope = layer.trend.slope
        problematic = (
            h < cfg.problematic_health
            or slope < cfg.problematic_trend
            or s.error_count > cfg.problematic_errors
        )
        attention = h < cfg.attention_health and slope < cfg.attention_trend
        old, stage = layer.feat, layer.stage
        total = s.total_seeds
        seed_aware = (
            total or s.active_seeds or s.seed_stage is not SeedStage.DORMANT or s.alpha or s.epochs_in_stage
        )
        if seed_aware and s.seed_id == 0 and (ts == 0.0 or ts >= layer.slot_ts):
            new_stage = STAGE_INDEX[s.seed_stage]
            slot = [s.alpha, min(s.epochs_in_stage / _EPOCHS, 1.0), _clip(s.blending_velocity, -1.0, 1.0)]
            layer.slot_ts = max(ts, layer.slot_ts)
            # observation.NODE_FEATURES: cosine, ratio and headroom clipped, the rest x / (1 + x).
            layer.levers = [
                _clip(s.g2_headroom, -1.0, 1.0),
                s.gradient_stability / (1.0 + s.gradient_stability),
                s.host_gradient_via_seed / (1.0 + s.host_gradient_via_seed),
                s.coadaptation_delta,
                s.seed_loss_gradient / (1.0 + s.seed_loss_gradient),
                s.seed_weight_magnitude / (1.0 + s.seed_weight_magnitude),
                s.lr_stability_ratio,
                s.alpha_variance / (1.0 + s.alpha_variance),
            ]
        else:
            new_stage = stage
            slot = old[T.ALPHA : T.SIGNAL_END]
        layer.feat = [
            h,
            layer.trend.ewma,
            _clip(slope, -1.0, 1.0),
            math.log1p(s.activation_variance),
            s.dead_neuron_ratio,
            s.avg_correlation,
            math.log1p(s.execution_latency_us / 1000.0),
            min(s.error_count / 10.0, 1.0),
            min(s.active_seeds / max(total, 1), 1.0),
            1.0 if problematic else 0.0,
            1.0 if attention else 0.0,
            0.0,
            math.log1p(s.gradient_norm),
            min(s.seed_gradient_ratio, 1.0),
            *slot,
        ]
        layer.stage, layer.weight, layer.last_seen = new_stage, float(max(total, 1)), now
        if s.execution_latency_us >= 1e-3:  # a measured latency (capped at 1000 s)
            latency = min(s.execution_latency_us, 1e9)
            last, mean, var, trend = layer.latency
            if last == 0.0:
                layer.latency = [latency, latency, var, trend]
            else:
                a = cfg.ewma_alpha
                d = latency - mean
                # Throughput is 1 / latency: its relative change is last / latency - 1.
                layer.latency = [
                    latency,
                    mean + a * d,
                    (1 - a) * (var + a * (d * d)),
                    trend + a * ((last / latency - 1.0) - trend),
                ]
        seen_h, seen_p, seen_a = layer.seen
        return bool(
            new_stage != stage
            or abs(h - seen_h) > cfg.material_health_delta
            or problematic != (seen_p > 0.5)
            or attention != (seen_a > 0.5)
        )


def assert_same(analyzer: Analyzer, reference: Reference, run: str) -> None:
    state = analyzer.get_run(run)
    layers = reference.runs.get(run, {})
    if state is None:
        assert not layers
        return
    table = state._table  # private on purpose: the bookkeeping columns are what is compared
    ids = table.layer.tolist()
    assert sorted(ids) == sorted(layers)
    for row, layer_id in enumerate(ids):
        want = layers[layer_id]
        got = table.feat[row, : T.SIGNAL_END]
        np.testing.assert_allclose(
            got, np.float32(want.feat), rtol=1e-6, atol=1e-7, err_msg=f"layer {layer_id}"
        )
        np.testing.assert_allclose(
            table.feat[row, T.LEVER_FIRST : T.LEVER_END],
            np.float32(want.levers),
            rtol=1e-6,
            atol=1e-7,
            err_msg=f"layer {layer_id} lever telemetry",
        )
        aux = table.aux[row]
        np.testing.assert_allclose(
            aux[T.LAT_LAST : T.TPUT_TREND + 1], want.latency, rtol=1e-12, err_msg=f"layer {layer_id} latency"
        )
        assert (aux[T.LAST_SEEN], aux[T.WEIGHT], aux[T.SLOT_TS], aux[T.STAGE]) == (
            want.last_seen,
            want.weight,
            want.slot_ts,
            want.stage,
        ), layer_id
        assert tuple(aux[T.SEEN_HEALTH : T.SEEN_ATTENTION + 1]) == want.seen, layer_id  # exact, float64
        window = analyzer._arena.window_values(table.start + row)
        assert window == want.trend.values(), layer_id


# ------------------------------------------------------------------ hypothesis streams

_health = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.29, 0.3, 0.31, 0.49, 0.5, 0.95, 1.0]))


@st.composite
def signals(draw: st.DrawFn) -> HealthSignal:
    seed_fields = draw(st.booleans())
    extra: dict[str, object] = {}
    if seed_fields:
        extra = {
            "seed_stage": draw(st.sampled_from(STAGES)),
            "alpha": draw(st.sampled_from([0.0, 0.25, 1.0])),
            "epochs_in_stage": draw(st.integers(0, 20)),
            "active_seeds": draw(st.integers(0, 2)),
            "total_seeds": draw(st.integers(0, 2)),
            "blending_velocity": draw(st.sampled_from([-2.0, 0.0, 0.3, 5.0])),
            "seed_id": draw(st.sampled_from([0, 0, 1])),
        }
        if draw(st.booleans()):  # a host that measures 004's lever telemetry
            extra |= {
                "g2_headroom": draw(st.sampled_from([-0.1, 0.0, 0.4, 3.0])),
                "gradient_stability": draw(st.floats(0.0, 50.0)),
                "host_gradient_via_seed": draw(st.floats(0.0, 10.0)),
                "coadaptation_delta": draw(st.floats(-1.0, 1.0)),
                "seed_loss_gradient": draw(st.floats(0.0, 100.0)),
                "seed_weight_magnitude": draw(st.floats(0.0, 1e4)),
                "lr_stability_ratio": draw(st.floats(0.0, 1.0)),
                "alpha_variance": draw(st.floats(0.0, 0.25)),
            }
    return HealthSignal(
        layer_id=draw(st.integers(0, 5)),
        health_score=draw(_health),
        error_count=draw(st.sampled_from([0, 5, 6, 40])),
        activation_variance=draw(st.floats(0.0, 10.0)),
        dead_neuron_ratio=draw(st.floats(0.0, 1.0)),
        avg_correlation=draw(st.floats(-1.0, 1.0)),
        execution_latency_us=draw(st.floats(0.0, 1e5)),
        gradient_norm=draw(st.floats(0.0, 100.0)),
        seed_gradient_ratio=draw(st.floats(0.0, 3.0)),
        timestamp=draw(st.sampled_from([0.0, 0.0, 1.0, 2.0, 3.0, 5.0])),
        **extra,
    )


@st.composite
def steps(draw: st.DrawFn) -> tuple[str, object]:
    """One step of a stream: a message for a run, a flush, or an observation."""
    what = draw(st.sampled_from(["batch", "batch", "batch", "single", "flush", "observe"]))
    run = draw(st.sampled_from(["a", "b", "c"]))
    if what == "batch":
        batch = HealthBatch(
            signals=draw(st.lists(signals(), min_size=0, max_size=8)),
            timestamp=draw(st.sampled_from([0.0, 2.0, 4.0])),
        )
        return run, (batch, draw(st.booleans()))  # queued, or applied at once
    if what == "single":
        return run, (draw(signals()), draw(st.booleans()))
    return run, what


@pytest.fixture(params=["vectorized", "one by one", "by size"])
def pass_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Small passes go one signal at a time, larger ones vectorized: each way on its own, and mixed."""
    if request.param != "by size":
        monkeypatch.setattr(ingest, "SCALAR_MAX", 0 if request.param == "vectorized" else 10**9)
    return str(request.param)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(stream=st.lists(steps(), min_size=1, max_size=40), window=st.sampled_from([2, 3, 10]))
def test_queued_and_immediate_ingest_match_the_per_signal_reference(pass_kind, stream, window) -> None:
    cfg = AnalyzerConfig(window_size=window, ewma_alpha=0.3)
    clock = FakeClock()
    analyzer = Analyzer(cfg, clock=clock)
    reference = Reference(cfg)
    expected: set[str] = set()  # material changes of queued messages not yet handed out
    for run, step in stream:
        clock.advance(0.5)
        if step == "flush":
            assert analyzer.flush() == expected
            expected = set()
        elif step == "observe":
            analyzer.observe(run) if run in analyzer else None
            reference.observed(run)
        else:
            message, queue = step
            sigs = message.signals if isinstance(message, HealthBatch) else [message]
            batch_ts = message.timestamp if isinstance(message, HealthBatch) else 0.0
            material = reference.ingest(run, sigs, batch_ts, clock.now)
            if queue:
                analyzer.queue_health(run, message)
                if material:
                    expected.add(run)
            else:
                got = analyzer.ingest_health(run, message)
                assert got == (material or run in expected)
                expected.discard(run)
    for run in ("a", "b", "c"):
        assert_same(analyzer, reference, run)
    assert analyzer.flush() == expected


@pytest.mark.parametrize(
    ("before", "after", "material"),
    [
        # 0.1 -> 0.0 moved exactly 0.1: not material (float32(0.1) = 0.10000000149 made it so).
        ((0.2, 0.1), 0.0, False),
        # 0.7 -> 0.59999999 moved 0.10000001: material (float32(0.7) = 0.69999998808 hid it).
        ((0.7,) * 5, 0.59999999, True),
    ],
)
def test_a_material_health_move_is_measured_from_the_reported_health(
    pass_kind: str, before: tuple[float, ...], after: float, material: bool
) -> None:
    """The baseline an observation leaves is the health as reported (float64), not the float32
    feature: its rounding must not decide a move of about `material_health_delta` either way.
    The flags are the same before and after, so only the health move counts."""
    cfg = AnalyzerConfig(window_size=10 if len(before) > 2 else 2)
    analyzer = Analyzer(cfg, clock=FakeClock())
    reference = Reference(cfg)
    for h in before:
        sigs = [HealthSignal(layer_id=0, health_score=h)]
        analyzer.ingest_health("r", HealthBatch(signals=sigs))
        reference.ingest("r", sigs, 0.0, 0.0)
    analyzer.observe("r")
    reference.observed("r")
    sigs = [HealthSignal(layer_id=0, health_score=after)]
    assert reference.ingest("r", sigs, 0.0, 0.0) is material
    analyzer.queue_health("r", HealthBatch(signals=sigs))
    assert analyzer.flush() == ({"r"} if material else set())


# ------------------------------------------------------------------ the arena


def test_long_streams_resync_the_running_sums_like_the_reference(pass_kind: str) -> None:
    """Past `sync_every` pushes the sums are recomputed from the window, as SlidingTrend does."""
    cfg = AnalyzerConfig(window_size=3)
    analyzer = Analyzer(cfg, clock=FakeClock())
    reference = Reference(cfg)
    rng = np.random.default_rng(0)
    for step in range(2500):
        batch = HealthBatch(
            signals=[HealthSignal(layer_id=k, health_score=float(rng.random())) for k in range(3)]
        )
        if step % 7:
            analyzer.queue_health("r", batch, now=float(step))
        else:
            analyzer.ingest_health("r", batch, now=float(step))
        reference.ingest("r", batch.signals, 0.0, float(step))
    analyzer.flush()
    assert_same(analyzer, reference, "r")
    got = analyzer.observe("r", now=2500.0).node_features[:, F["health_trend"]]
    want = [reference.runs["r"][k].trend.slope for k in range(3)]
    np.testing.assert_allclose(got, np.float32(want), rtol=1e-6)


def test_runs_keep_their_rows_while_others_grow_and_are_forgotten(pass_kind: str) -> None:
    """Blocks move when a run outgrows its own, are reused once a run is forgotten, and the arena
    doubles: every run's rows and windows survive all of it."""
    cfg = AnalyzerConfig(window_size=4)
    analyzer = Analyzer(cfg, clock=FakeClock())
    reference = Reference(cfg)
    rng = np.random.default_rng(1)
    alive: set[str] = set()
    for step in range(300):
        run = f"r{int(rng.integers(0, 12))}"
        if rng.random() < 0.08 and run in alive:
            analyzer.remove_run(run)
            reference.runs.pop(run, None)
            alive.discard(run)
            continue
        width = int(rng.integers(1, 40))  # layers 0..width-1: runs grow past their blocks
        sigs = [
            HealthSignal(layer_id=int(k), health_score=float(rng.random())) for k in rng.integers(0, width, 6)
        ]
        analyzer.queue_health(run, HealthBatch(signals=sigs), now=float(step))
        reference.ingest(run, sigs, 0.0, float(step))
        alive.add(run)
    analyzer.flush()
    for run in alive:
        assert_same(analyzer, reference, run)
    arena = analyzer._arena
    used = sum(analyzer.get_run(r)._table.size for r in alive)
    assert arena.rows_in_use == used  # every forgotten block was given back


def test_a_topology_keeps_the_windows_of_the_layers_it_keeps() -> None:
    from esperd_contracts import TopologyNode, TopologyPacket

    analyzer = Analyzer(AnalyzerConfig(window_size=3), clock=FakeClock())
    for h in (0.9, 0.8, 0.7):
        analyzer.queue_health(
            "r", HealthBatch(signals=[HealthSignal(layer_id=k, health_score=h) for k in (5, 7)])
        )
    topology = TopologyPacket(nodes=[TopologyNode(layer_id=k) for k in (7, 9, 5)], edges=[(7, 9), (9, 5)])
    analyzer.ingest_topology("r", topology)  # applies the queue first
    table = analyzer.get_run("r")._table
    windows = {
        layer: analyzer._arena.window_values(table.start + row)
        for row, layer in enumerate(table.layer.tolist())
    }
    assert windows == {7: [0.9, 0.8, 0.7], 9: [], 5: [0.9, 0.8, 0.7]}


def test_signals_for_undeclared_layers_are_dropped_and_counted_when_queued() -> None:
    from esperd_contracts import TopologyNode, TopologyPacket

    analyzer = Analyzer(clock=FakeClock())
    analyzer.ingest_topology("r", TopologyPacket(nodes=[TopologyNode(layer_id=0)]))
    batch = HealthBatch(signals=[HealthSignal(layer_id=k, health_score=0.1) for k in (0, 3, 4)])
    analyzer.queue_health("r", batch)
    assert analyzer.get_run("r").dropped_signals == 2
    assert analyzer.flush() == {"r"}  # layer 0 fell to 0.1: material
    assert analyzer.observe("r").node_features[0, F["health"]] == pytest.approx(0.1)
