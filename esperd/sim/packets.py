"""Real wire packets from simulated hosts: what a Kasmina host would publish each epoch.

Telemetry is computed for all runs at once ([E, L] arrays), then one run's rows are
turned into `contracts` Structs. Values are kept inside the contracts' ranges, so
the packets also survive an encode/decode round trip unchanged.
"""

from __future__ import annotations

import msgspec
import numpy as np

from esperd.analyzer.observation import BLUEPRINTS, STAGES
from esperd.sim import catalog as C
from esperd.sim.dynamics import BLENDING, FOSSILIZED, NO_SEED, PROBATIONARY, TRAINING, HostBatch
from esperd_contracts import (
    HealthBatch,
    HealthSignal,
    SeedSlotState,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)

_LIVE = (TRAINING, BLENDING, PROBATIONARY)


class Telemetry(msgspec.Struct):
    """Per-layer health telemetry of every run, [E, L] each (rows beyond a run's layers are padding)."""

    health: np.ndarray
    activation_variance: np.ndarray
    dead_neuron_ratio: np.ndarray
    avg_correlation: np.ndarray
    latency_us: np.ndarray
    gradient_norm: np.ndarray
    seed_gradient_ratio: np.ndarray
    counterfactual: np.ndarray
    total_improvement: np.ndarray


def telemetry(hosts: HostBatch) -> Telemetry:
    """What each layer's instruments would read this epoch (vectorized over runs and layers)."""
    cfg = hosts.config
    noise = hosts.noise
    has_seed = hosts.blueprint != NO_SEED
    deficit_layer = hosts.deficit > 0
    severity = np.divide(
        hosts.severity, hosts.deficit, out=np.zeros_like(hosts.severity), where=deficit_layer
    )
    repair = np.where(has_seed & deficit_layer, hosts.alpha * hosts.quality * hosts.maturity, 0.0)
    sick = severity * (1.0 - np.clip(repair, 0.0, 1.0)) + 0.5 * np.clip(-repair, 0.0, None)
    interfering = np.where(has_seed & ~deficit_layer, hosts.alpha, 0.0)
    dip = hosts.dip
    health = hosts.base_health - 0.6 * sick - 0.05 * interfering - dip + cfg.health_noise * noise[..., 0]
    # Deficit layers go dead and redundant (many dead units, high correlation, low variance);
    # transient dips are noisy instead (high variance and gradients): a telling difference.
    dead = 0.03 + 0.45 * sick + 0.02 * np.abs(noise[..., 1])
    variance = 1.0 - 0.6 * sick + 3.0 * dip + 0.1 * noise[..., 2]
    correlation = 0.15 + 0.6 * sick + 0.05 * noise[..., 3]
    gradient = 1.0 + 8.0 * dip + 0.5 * hosts.loss_spike[:, None] + 0.1 * np.abs(noise[..., 4])
    # The seed/host gradient ratio shows how much a training seed is learning: its fit, if any.
    fit = np.where(deficit_layer, np.clip(hosts.quality, 0.0, 1.0), 0.0) * hosts.maturity
    learning = np.isin(hosts.stage, (TRAINING, BLENDING))
    seed_ratio = np.where(learning, 0.05 + 0.5 * fit + 0.08 * noise[..., 5], 0.0)
    latency = (hosts.layer_params + hosts.seed_params) / 100.0 + 20.0
    contributing = has_seed & (hosts.alpha > 0)
    reliance = hosts.reliance * hosts.alpha * hosts.maturity
    counterfactual = np.where(
        contributing, hosts.contrib + reliance + cfg.counterfactual_noise * noise[..., 1], 0.0
    )
    improvement = np.where(
        has_seed, hosts.contrib - hosts.harm + cfg.counterfactual_noise * noise[..., 3], 0.0
    )
    return Telemetry(
        health=np.clip(health, 0.0, 1.0),
        activation_variance=np.maximum(variance, 0.0),
        dead_neuron_ratio=np.clip(dead, 0.0, 1.0),
        avg_correlation=np.clip(correlation, -1.0, 1.0),
        latency_us=latency,
        gradient_norm=np.maximum(gradient, 0.0),
        seed_gradient_ratio=np.clip(seed_ratio, 0.0, 1.0),
        counterfactual=counterfactual,
        total_improvement=improvement,
    )


def topology_packet(hosts: HostBatch, e: int, timestamp: float) -> TopologyPacket:
    """The run's layer graph, skip connections included; one seed slot per layer."""
    n = int(hosts.n_layers[e])
    kinds = hosts.kind[e, :n].tolist()
    params = hosts.layer_params[e, :n].tolist()
    nodes = [
        TopologyNode(layer_id=i, name=f"{C.KINDS[k]}{i}", layer_type=C.KINDS[k], params=p, seed_slots=1)
        for i, (k, p) in enumerate(zip(kinds, params, strict=True))
    ]
    return TopologyPacket(nodes=nodes, edges=list(hosts.edges[e]), topology_version=1, timestamp=timestamp)


def health_batch(hosts: HostBatch, tel: Telemetry, e: int, timestamp: float) -> HealthBatch:
    """One HealthBatch for the run's epoch: one signal per layer, seed fields included."""
    n = int(hosts.n_layers[e])
    rows = zip(
        tel.health[e, :n].tolist(),
        tel.activation_variance[e, :n].tolist(),
        tel.dead_neuron_ratio[e, :n].tolist(),
        tel.avg_correlation[e, :n].tolist(),
        tel.latency_us[e, :n].tolist(),
        tel.gradient_norm[e, :n].tolist(),
        tel.seed_gradient_ratio[e, :n].tolist(),
        hosts.stage[e, :n].tolist(),
        hosts.alpha[e, :n].tolist(),
        (hosts.alpha[e, :n] - hosts.prev_alpha[e, :n]).tolist(),
        hosts.eis[e, :n].tolist(),
        strict=True,
    )
    signals = [
        HealthSignal(
            layer_id=i,
            health_score=h,
            activation_variance=var,
            dead_neuron_ratio=dead,
            avg_correlation=corr,
            execution_latency_us=lat,
            active_seeds=1 if stage in _LIVE or stage == FOSSILIZED else 0,
            total_seeds=1,
            timestamp=timestamp,
            gradient_norm=grad,
            seed_gradient_ratio=ratio,
            seed_stage=STAGES[stage],
            alpha=alpha,
            epochs_in_stage=eis,
            blending_velocity=velocity,
        )
        for i, (h, var, dead, corr, lat, grad, ratio, stage, alpha, velocity, eis) in enumerate(rows)
    ]
    return HealthBatch(signals=signals, timestamp=timestamp)


def state_packet(hosts: HostBatch, tel: Telemetry, e: int, timestamp: float, done: bool) -> SystemStatePacket:
    """The run's SystemStatePacket for the epoch just finished."""
    n = int(hosts.n_layers[e])
    noise = hosts.run_noise[e].tolist()
    cfg = hosts.config
    epoch = int(hosts.epoch[e])
    accuracy = float(hosts.accuracy[e])
    val_accuracy = min(max(accuracy + cfg.accuracy_noise * noise[0], 0.0), 1.0)
    train_accuracy = min(max(accuracy + 0.02 + 0.002 * epoch + cfg.accuracy_noise * noise[1], 0.0), 1.0)
    spike = float(hosts.loss_spike[e])
    val_loss = max(2.5 * (1.0 - accuracy) + 0.05 + spike + 0.01 * noise[2], 0.0)
    train_loss = max(2.3 * (1.0 - train_accuracy) + 0.03 + 0.5 * spike + 0.01 * noise[3], 0.0)
    blueprints = hosts.blueprint[e, :n].tolist()
    slots = [
        SeedSlotState(
            layer_id=i,
            stage=STAGES[stage],
            blueprint=BLUEPRINTS[bp] if bp != NO_SEED else None,
            alpha=alpha,
            epochs_in_stage=eis,
            params=params,
            counterfactual=cf,
            total_improvement=ti,
        )
        for i, (stage, bp, alpha, eis, params, cf, ti) in enumerate(
            zip(
                hosts.stage[e, :n].tolist(),
                blueprints,
                hosts.alpha[e, :n].tolist(),
                hosts.eis[e, :n].tolist(),
                hosts.seed_params[e, :n].tolist(),
                tel.counterfactual[e, :n].tolist(),
                tel.total_improvement[e, :n].tolist(),
                strict=True,
            )
        )
    ]
    host_params = int(hosts.host_params[e])
    return SystemStatePacket(
        epoch=epoch,
        global_step=epoch * 100,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        metrics={"learning_rate": 0.01},
        seeds=slots,
        host_params=host_params,
        total_params=host_params + int(hosts.seed_params[e, :n].sum()),
        timestamp=timestamp,
        done=done,
        # The simulator's epoch-0 packet comes before any training and its last is `epochs`:
        # after packet e, `epochs - e` epochs remain, i.e. total_epochs - e - 1 as the contract counts.
        total_epochs=cfg.epochs + 1 if cfg.report_budget else 0,
        val_samples=cfg.val_samples,
    )
