"""Seed document 004's base observation features (issue 16 item 4): training history, the
state packet's metrics and hardware, and which blueprint occupies each slot."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from esperd.analyzer import Analyzer
from esperd.analyzer.observation import (
    BLUEPRINTS,
    GLOBAL_FEATURE_INDEX,
    GLOBAL_FEATURES,
    METRIC_BUCKETS,
    NODE_FEATURE_INDEX,
)
from esperd_contracts import Blueprint, HardwareContext, HealthBatch, Op, SeedStage
from tests.support.packets import health, seed, state
from tests.support.timing import FakeClock

F, G = NODE_FEATURE_INDEX, GLOBAL_FEATURE_INDEX


def analyzer() -> Analyzer:
    a = Analyzer(clock=FakeClock())
    a.ingest_health("r", HealthBatch(signals=[health(i) for i in range(3)]))
    return a


def glob(a: Analyzer) -> dict[str, float]:
    g = a.observe("r").global_features
    return {name: float(g[i]) for i, name in enumerate(GLOBAL_FEATURES)}


def test_before_any_packet_the_history_features_are_zero() -> None:
    g = glob(analyzer())
    names = ["global_step", "loss_delta", "best_val_accuracy", "best_val_loss", "metrics_count"]
    names += [f"loss_history_{k}" for k in range(5)] + [f"accuracy_history_{k}" for k in range(5)]
    names += ["hardware_known", "gpu_utilization", "gpu_memory", "cpu_utilization", "host_memory"]
    assert all(g[name] == 0.0 for name in names)


def test_step_loss_delta_bests_and_five_packet_histories() -> None:
    a = analyzer()
    losses = [2.0, 1.5, 1.7, 1.2, 1.1, 1.3, 0.9]
    accuracies = [0.2, 0.4, 0.35, 0.5, 0.55, 0.52, 0.6]
    for epoch, (loss, acc) in enumerate(zip(losses[:3], accuracies[:3], strict=True)):
        a.ingest_state("r", state(epoch, val_loss=loss, val_accuracy=acc, global_step=100 * epoch))
    g = glob(a)
    assert g["global_step"] == pytest.approx(math.log10(201) / 7)
    assert g["loss_delta"] == pytest.approx(0.2)  # 1.5 -> 1.7
    assert g["best_val_accuracy"] == pytest.approx(0.4) and g["best_val_loss"] == pytest.approx(
        math.log1p(1.5)
    )
    assert [g[f"loss_history_{k}"] for k in range(5)] == pytest.approx(
        [math.log1p(1.7), math.log1p(1.5), math.log1p(2.0), 0.0, 0.0]
    )
    assert [g[f"accuracy_history_{k}"] for k in range(5)] == pytest.approx([0.35, 0.4, 0.2, 0.0, 0.0])
    for epoch in range(3, 7):
        a.ingest_state("r", state(epoch, val_loss=losses[epoch], val_accuracy=accuracies[epoch]))
    g = glob(a)
    assert [g[f"accuracy_history_{k}"] for k in range(5)] == pytest.approx(accuracies[:1:-1])  # newest 5
    assert g["best_val_loss"] == pytest.approx(math.log1p(0.9)) and g["loss_delta"] == pytest.approx(-0.4)
    assert g["best_val_accuracy"] == pytest.approx(0.6)


def test_metrics_are_hashed_into_buckets_by_key() -> None:
    a = analyzer()
    metrics = {"lr": 0.05, "grad_norm": 1.8, "ece": -0.04, "throughput": 5e4}
    a.ingest_state("r", state(1, metrics=metrics))
    g = glob(a)
    expected: dict[int, list[float]] = {}
    for key, value in metrics.items():  # independently: crc32 of the key, signed log1p / 10
        expected.setdefault(zlib.crc32(key.encode()) % METRIC_BUCKETS, []).append(
            math.copysign(math.log1p(abs(value)), value) / 10
        )
    for k in range(METRIC_BUCKETS):
        want = float(np.clip(np.mean(expected[k]), -1, 1)) if k in expected else 0.0
        assert g[f"metric_bucket_{k}"] == pytest.approx(want, abs=1e-7), k
    assert g["metrics_count"] == pytest.approx(4 / 16)
    a.ingest_state("r", state(2))  # the next packet has none: the buckets follow it
    assert all(glob(a)[f"metric_bucket_{k}"] == 0.0 for k in range(METRIC_BUCKETS))


def test_hardware_when_given_is_kept_until_replaced() -> None:
    a = analyzer()
    hw = HardwareContext(device="cuda:0", gpu_utilization=0.9, gpu_memory_gb=11.0, cpu_utilization=0.2)
    a.ingest_state("r", state(1, hardware=hw))
    a.ingest_state("r", state(2))  # omitted: the last known stands
    g = glob(a)
    assert g["hardware_known"] == 1.0 and g["gpu_utilization"] == pytest.approx(0.9)
    assert g["gpu_memory"] == pytest.approx(math.log1p(11.0) / 7) and g["host_memory"] == 0.0
    assert g["cpu_utilization"] == pytest.approx(0.2)


def test_the_blueprint_in_each_slot_is_one_hot() -> None:
    a = analyzer()
    columns = [F[f"blueprint_{bp.value}"] for bp in BLUEPRINTS]
    a.ingest_state(
        "r",
        state(
            1,
            seeds=[seed(0, SeedStage.TRAINING, blueprint=Blueprint.CONV_LIGHT), seed(1, SeedStage.DORMANT)],
        ),
    )
    x = a.observe("r").node_features[:, columns]
    assert x[0].tolist() == [float(bp is Blueprint.CONV_LIGHT) for bp in BLUEPRINTS]
    assert not x[1].any() and not x[2].any()
    # An applied GERMINATE names its blueprint at once; a PRUNE empties the slot.
    assert a.note_ack("r", 2, Op.GERMINATE, applied=True, blueprint=Blueprint.DEPTHWISE)
    assert a.note_ack("r", 0, Op.PRUNE, applied=True)
    x = a.observe("r").node_features[:, columns]
    assert not x[0].any() and x[2].tolist() == [float(bp is Blueprint.DEPTHWISE) for bp in BLUEPRINTS]
