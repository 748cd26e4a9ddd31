"""The lever telemetry (issue 16 item 3) as observation features: filled by the analyzer."""

from __future__ import annotations

import numpy as np
import pytest

from esperd.analyzer import NODE_FEATURES, Analyzer
from esperd.analyzer.observation import LEVER_TELEMETRY, MILESTONE_FEATURES, NODE_FEATURE_INDEX
from esperd_contracts import (
    BlendAlgorithm,
    Blueprint,
    HealthBatch,
    HealthSignal,
    IsolationMode,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    Tempo,
    TopologyPacket,
)
from tests.support.packets import command
from tests.support.timing import FakeClock

F = NODE_FEATURE_INDEX
TELEMETRY = {
    "g2_headroom": 0.4,
    "gradient_stability": 3.0,
    "host_gradient_via_seed": 1.0,
    "coadaptation_delta": -0.5,
    "seed_loss_gradient": 0.25,
    "seed_weight_magnitude": 9.0,
    "lr_stability_ratio": 0.75,
    "alpha_variance": 0.0,
}


def seeded(layer: int, ts: float = 0.0, **fields: object) -> HealthSignal:
    return HealthSignal(
        layer_id=layer,
        health_score=0.8,
        total_seeds=1,
        active_seeds=1,
        seed_stage=SeedStage.BLENDING,
        alpha=0.5,
        timestamp=ts,
        **{**TELEMETRY, **fields},  # type: ignore[arg-type]
    )


def test_the_features_are_appended_after_the_older_ones() -> None:
    first = NODE_FEATURES.index("counterfactual_z") + 1  # the last feature before issue 16
    block = LEVER_TELEMETRY + MILESTONE_FEATURES
    assert NODE_FEATURES[first : first + len(block)] == block
    assert NODE_FEATURES.index("g2_headroom") == first


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "vectorized"])
def test_a_signal_fills_the_lever_features(batched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if batched:  # the vectorized pass, even for a few signals
        monkeypatch.setattr("esperd.analyzer.ingest.SCALAR_MAX", 0)
    a = Analyzer(clock=FakeClock())
    a.ingest_health("r", HealthBatch(signals=[seeded(0), HealthSignal(layer_id=1, health_score=0.9)]))
    x = a.observe("r").node_features
    expected = {
        "g2_headroom": 0.4,
        "gradient_stability": 0.75,  # 3 / (1 + 3)
        "host_gradient_via_seed": 0.5,
        "coadaptation_delta": -0.5,
        "seed_loss_gradient": 0.2,
        "seed_weight_magnitude": 0.9,
        "lr_stability_ratio": 0.75,
        "alpha_variance": 0.0,
    }
    for name, value in expected.items():
        assert x[0, F[name]] == pytest.approx(value), name
        assert x[1, F[name]] == 0.0, name  # a layer without a seed: nothing measured
    # Out-of-scale values stay in the feature range.
    a.ingest_health("r", HealthBatch(signals=[seeded(0, g2_headroom=7.0, seed_weight_magnitude=1e12)]))
    x = a.observe("r").node_features
    assert x[0, F["g2_headroom"]] == 1.0 and 0.99 < x[0, F["seed_weight_magnitude"]] <= 1.0


def test_an_older_signal_does_not_undo_newer_lever_telemetry() -> None:
    a = Analyzer(clock=FakeClock())
    a.ingest_health("r", seeded(0, ts=10.0))
    a.ingest_health("r", seeded(0, ts=5.0, coadaptation_delta=0.9))
    assert a.observe("r").node_features[0, F["coadaptation_delta"]] == pytest.approx(-0.5)


def test_milestones_come_from_the_state_packet_and_a_new_seed_clears_everything() -> None:
    a = Analyzer(clock=FakeClock())
    a.ingest_health("r", seeded(0))
    slot = SeedSlotState(
        layer_id=0,
        stage=SeedStage.BLENDING,
        blueprint=Blueprint.CONV_LIGHT,
        alpha=0.6,
        counterfactual_alpha25=0.02,
        counterfactual_alpha50=-3.0,
    )
    a.ingest_state("r", SystemStatePacket(epoch=1, seeds=[slot]))
    x = a.observe("r").node_features
    values = [x[0, F[name]] for name in MILESTONE_FEATURES]
    assert values == pytest.approx([0.02, -1.0, 0.0, 0.0])  # clipped; 0 until reached
    assert a.note_ack("r", 0, Op.PRUNE, applied=True)
    x = a.observe("r").node_features
    assert not x[0, [F[name] for name in LEVER_TELEMETRY + MILESTONE_FEATURES]].any()


@pytest.mark.slow
def test_a_real_hosts_packets_fill_the_features() -> None:
    # The reference host's own packets, end to end through the analyzer: a SHARED seed blending.
    from tests.test_host_run import run_with

    germ = command(
        Op.GERMINATE,
        4,
        command_id="g",
        blueprint=Blueprint.CONV_LIGHT,
        blend=BlendAlgorithm.LINEAR,
        tempo=Tempo.FAST,
        dwell_epochs=1,
        isolation=IsolationMode.SHARED,
    )
    _, link = run_with({0: [germ]}, epochs=4, batch_size=128, health_every=3)
    a = Analyzer(clock=FakeClock())
    for message in link.sent:
        if isinstance(message, (TopologyPacket, HealthBatch, SystemStatePacket)):
            a.ingest("r1", message)
    obs = a.observe("r1")
    node = int(np.flatnonzero(obs.layer_ids == 4)[0])
    x = obs.node_features
    new = [F[name] for name in LEVER_TELEMETRY + MILESTONE_FEATURES]
    assert np.isfinite(x).all() and (np.abs(x[:, new]) <= 1.0).all()
    assert obs.stages[node] == list(SeedStage).index(SeedStage.BLENDING)
    for name in (
        "seed_weight_magnitude",
        "seed_loss_gradient",
        "host_gradient_via_seed",
        "lr_stability_ratio",
    ):
        assert x[node, F[name]] > 0.0, name
    assert x[node, F["coadaptation_delta"]] != 0.0 and x[node, F["alpha_variance"]] == 0.0
    last = next(s for s in link.of(SystemStatePacket)[-1].seeds if s.layer_id == 4)
    assert last.counterfactual_alpha25 is not None  # FAST reaches 25 % within its first epoch
    assert x[node, F["counterfactual_alpha25"]] == pytest.approx(last.counterfactual_alpha25, abs=1e-7)
    others = [i for i in range(obs.num_nodes) if i != node]
    assert not x[others][:, [F[name] for name in LEVER_TELEMETRY]].any()
