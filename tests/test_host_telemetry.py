"""The reference host's telemetry: statistics on known tensors, health score, probe, topology."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from esperd.analyzer.graph import Graph
from esperd_contracts import AdaptationCommand, BlendAlgorithm, Blueprint, Codec, Op, SeedStage, Tempo
from esperd_examples.host.models import DigitsCNN, TinyTransformer
from esperd_examples.host.telemetry import activation_stats, health_score, layer_edges, topology
from esperd_examples.host.train import HostConfig, HostRun

torch.set_num_threads(1)
CODEC = Codec()


# ------------------------------------------------------------ statistics on known inputs


def test_dead_units_are_counted_per_channel() -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(32, 8, 4, 4)) + 0.1  # every unit alive ...
    x[:, [1, 4, 6]] = 0.0  # ... but three channels never fire
    assert activation_stats(x).dead_ratio == pytest.approx(3 / 8)


def test_a_unit_alive_for_one_sample_is_not_dead() -> None:
    x = torch.zeros(16, 4)
    x[3, 2] = 1.0
    assert activation_stats(x).dead_ratio == pytest.approx(3 / 4)


def test_variance_is_over_every_element() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    assert activation_stats(x).variance == pytest.approx(x.var(unbiased=False).item(), rel=1e-5)


def test_identical_units_correlate_fully_and_independent_ones_barely() -> None:
    torch.manual_seed(0)
    base = torch.randn(512, 1)
    same = base.repeat(1, 6)
    mirrored = torch.cat([base, -base], dim=1)
    independent = torch.randn(4096, 8)
    assert activation_stats(same).avg_correlation == pytest.approx(1.0, abs=1e-5)
    assert activation_stats(mirrored).avg_correlation == pytest.approx(1.0, abs=1e-5)  # |corr|
    # Correlation uses at most 256 samples: |corr| of independent units then averages ~0.05.
    assert activation_stats(independent).avg_correlation < 0.08


def test_correlation_leaves_dead_units_out() -> None:
    torch.manual_seed(0)
    conv = torch.randn(64, 3, 3, 3)
    conv[:, 1] = conv[:, 0]  # two identical channels ...
    conv[:, 2] = 0.0  # ... and a dead one, which has no correlation to count (not a 0)
    assert activation_stats(conv).avg_correlation == pytest.approx(1.0, abs=1e-5)


def test_correlation_of_sequences_counts_every_position_as_a_sample() -> None:
    torch.manual_seed(0)
    seq = torch.randn(4, 64, 6)
    seq[..., 1] = seq[..., 0]  # one identical pair among 15; the others ~0.05 over 256 samples
    assert 1 / 15 < activation_stats(seq).avg_correlation < 1 / 15 + 0.08


def test_all_dead_layer_has_zero_correlation_not_nan() -> None:
    stats = activation_stats(torch.zeros(16, 8, 2, 2))
    assert stats.dead_ratio == 1.0 and stats.avg_correlation == 0.0 and stats.variance == 0.0


# ------------------------------------------------------------ health score


def test_health_of_a_healthy_layer_is_high() -> None:
    assert health_score(0.0, 0.2, 0.5, 0.3) > 0.85


@pytest.mark.parametrize(
    ("dead", "corr", "var", "grad", "at_most"),
    [
        (1.0, 0.0, 0.0, 0.0, 0.0),  # everything dead
        (0.5, 0.2, 0.5, 0.3, 0.46),  # half the units dead
        (0.0, 1.0, 0.5, 0.3, 0.51),  # fully redundant units
        (0.0, 0.2, 1e-8, 0.3, 0.02),  # collapsed activations
        (0.0, 0.2, 0.5, 1e5, 0.04),  # exploding gradients
        (0.0, 0.2, 0.5, 1e-10, 0.02),  # vanishing gradients
        (0.0, float("nan"), 0.5, 0.3, 0.0),  # not finite
    ],
)
def test_health_falls_with_each_failure_mode(
    dead: float, corr: float, var: float, grad: float, at_most: float
) -> None:
    assert 0.0 <= health_score(dead, corr, var, grad) <= at_most


def test_health_is_always_in_unit_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        dead, corr = rng.uniform(0, 1), rng.uniform(-1, 1)
        var, grad = 10 ** rng.uniform(-12, 12), 10 ** rng.uniform(-12, 12)
        assert 0.0 <= health_score(dead, corr, var, grad) <= 1.0
    assert health_score(0.0, 0.0, 1.0, None) > 0.99  # no parameters: no gradient factor


# ------------------------------------------------------------ the probe on a real model


def probed_run(**config: object) -> HostRun:
    run = HostRun(HostConfig(epochs=1, **config))  # type: ignore[arg-type]
    x, y = run.data.x_train[:64], run.data.y_train[:64]
    run.train_step(x, y, capture=True)
    return run


def germinate(run: HostRun, layer_id: int, blueprint: Blueprint = Blueprint.CONV_LIGHT) -> None:
    reason = run.handle(
        AdaptationCommand(
            command_id="c",
            run_id=run.run_id,
            layer_id=layer_id,
            op=Op.GERMINATE,
            blueprint=blueprint,
            blend=BlendAlgorithm.LINEAR,
            tempo=Tempo.FAST,
        )
    )
    assert reason is None, reason


def test_probe_reports_every_layer_with_values_in_range() -> None:
    run = probed_run()
    assert run.probe is not None
    signals = run.probe.signals()
    assert [s.layer_id for s in signals] == [layer.layer_id for layer in run.model.layers]
    for signal, layer in zip(signals, run.model.layers, strict=True):
        decoded = CODEC.decode(CODEC.encode(signal))  # the wire's range checks accept it
        assert decoded.layer_id == signal.layer_id
        assert 0.0 < signal.health_score <= 1.0 and signal.error_count == 0
        assert signal.activation_variance > 0.0 and signal.execution_latency_us > 0.0
        assert 0.0 <= signal.avg_correlation <= 1.0 and 0.0 <= signal.dead_neuron_ratio < 0.5
        has_params = bool(layer.block.host_parameters())
        assert (signal.gradient_norm > 0.0) is has_params, layer.name
        assert signal.total_seeds == (1 if layer.slot is not None else 0)
        assert signal.seed_stage is SeedStage.DORMANT and signal.seed_gradient_ratio == 0.0


def test_probe_hooks_are_removed_after_capture() -> None:
    run = probed_run()
    assert all(
        not layer.block._forward_hooks and not layer.block._forward_pre_hooks for layer in run.model.layers
    )


def test_seed_gradient_ratio_appears_once_a_seed_trains() -> None:
    run = HostRun(HostConfig(epochs=1))
    germinate(run, 2)
    run.model.layers[2].slot.end_epoch(0.5)  # type: ignore[union-attr]  # GERMINATED -> TRAINING
    run._sync_optimizer()
    run.train_step(run.data.x_train[:64], run.data.y_train[:64], capture=True)
    assert run.probe is not None
    signal = run.probe.signals()[2]
    assert signal.seed_stage is SeedStage.TRAINING and signal.active_seeds == 1
    assert signal.seed_gradient_ratio > 0.0
    others = [s for s in run.probe.signals() if s.layer_id != 2]
    assert all(s.seed_gradient_ratio == 0.0 for s in others)


def test_injected_dead_units_show_up_in_the_dead_ratio_and_health() -> None:
    healthy = probed_run().probe.signals()[2]  # type: ignore[union-attr]
    run = HostRun(HostConfig(epochs=1, degrade="block2", degrade_max=0.5))
    run._inject_fault()
    run._fault.dead_fraction = 0.5  # type: ignore[union-attr]
    run.train_step(run.data.x_train[:64], run.data.y_train[:64], capture=True)
    sick = run.probe.signals()[2]  # type: ignore[union-attr]
    assert sick.dead_neuron_ratio >= 0.5
    assert sick.health_score < healthy.health_score * 0.6


# ------------------------------------------------------------ topology


def test_cnn_topology_is_traced_with_its_skip_connection() -> None:
    model = DigitsCNN(width=8)
    packet = topology(model)
    edges = set(packet.edges)
    assert edges == {(0, 1), (1, 2), (2, 3), (1, 3), (3, 4), (4, 5), (5, 6)}
    assert (1, 3) in edges  # block1 -> pool, around block2: the residual skip
    names = {n.layer_id: (n.name, n.layer_type, n.seed_slots) for n in packet.nodes}
    assert names[3] == ("pool", "pool", 0) and names[6] == ("head", "linear", 0)
    assert names[2] == ("block2", "conv", 1) and names[5] == ("fc", "linear", 1)
    assert sum(n.params for n in packet.nodes) == model.host_param_count()
    graph = Graph.from_topology(CODEC.decode(CODEC.encode(packet)), max_nodes=64, max_edges=64)  # type: ignore[arg-type]
    assert graph.num_edges == 7 and not graph.inferred


def test_transformer_topology_has_residual_edges() -> None:
    edges = set(layer_edges(TinyTransformer()))
    chain = {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)}
    assert chain <= edges
    assert {(0, 2), (0, 5), (2, 4)} <= edges  # the residual stream skips every branch
    assert all(src < dst for src, dst in edges)


def test_topology_follows_the_models_own_wiring() -> None:
    class NoSkip(DigitsCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.block3(self.pool(self.block2(self.block1(self.stem(x)))))
            return self.head(self.fc(x.mean(dim=(2, 3))))

    assert (1, 3) not in layer_edges(NoSkip(width=4))


def test_topology_counts_host_parameters_only() -> None:
    run = HostRun(HostConfig(epochs=1))
    before = topology(run.model)
    germinate(run, 1)
    after = topology(run.model)
    assert [n.params for n in before.nodes] == [n.params for n in after.nodes]
    assert run.model.total_param_count() > run.model.host_param_count()


# ------------------------------------------------------------ counterfactual and state


def blended_run() -> HostRun:
    run = HostRun(HostConfig(epochs=2, seed=3))
    germinate(run, 4)
    slot = run.model.layers[4].slot
    assert slot is not None
    slot.end_epoch(0.5)
    reason = run.handle(AdaptationCommand(command_id="a", run_id=run.run_id, layer_id=4, op=Op.ADVANCE))
    assert reason is None
    for x, y in zip(run.data.x_train[:640].split(64), run.data.y_train[:640].split(64), strict=True):
        run.train_step(x, y)
    return run


def test_counterfactual_is_accuracy_with_the_seed_minus_without() -> None:
    run = blended_run()
    slot = run.model.layers[4].slot
    assert slot is not None and 0.0 < slot.alpha < 1.0
    _, run.val_accuracy = run.evaluate()
    run.measure_counterfactuals()
    # Independently: the same model with the seed removed.
    pruned = copy.deepcopy(run.model)
    pruned.layers[4].block.slot.seed = None  # type: ignore[union-attr]
    pruned.eval()
    with torch.no_grad():
        without = (pruned(run.data.x_val).argmax(dim=1) == run.data.y_val).float().mean().item()
    assert slot.counterfactual == pytest.approx(run.val_accuracy - without)
    assert all(s.counterfactual == 0.0 for s in run.model.slots if s is not slot)


def test_state_packet_reports_params_and_every_slot() -> None:
    run = HostRun(HostConfig(epochs=1))
    germinate(run, 5, Blueprint.MLP)
    report = asyncio.run(run.train_epoch())
    packet = CODEC.decode(CODEC.encode(run.state_packet(report, done=True)))
    assert packet.done and packet.epoch == 0 and 0.0 < packet.val_accuracy <= 1.0  # type: ignore[union-attr]
    seeds = {s.layer_id: s for s in packet.seeds}  # type: ignore[union-attr]
    assert sorted(seeds) == [slot.layer_id for slot in run.model.slots]
    assert seeds[5].stage is SeedStage.TRAINING and seeds[5].blueprint is Blueprint.MLP
    assert packet.total_params == packet.host_params + seeds[5].params  # type: ignore[union-attr]
    assert seeds[5].params > 0 and packet.host_params == run.model.host_param_count()  # type: ignore[union-attr]
