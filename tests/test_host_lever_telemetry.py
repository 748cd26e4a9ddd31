"""004's lever telemetry, measured by the reference host from real tensors (issue 16 item 3)."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from esperd_contracts import (
    G2_THRESHOLD,
    AdaptationCommand,
    BlendAlgorithm,
    Blueprint,
    Codec,
    HealthBatch,
    HealthSignal,
    IsolationMode,
    Op,
    SeedStage,
    Tempo,
)
from esperd_examples.host.seedstats import SeedGradientLog
from esperd_examples.host.train import HostConfig, HostRun
from tests.support.packets import command
from tests.test_host_run import run_with

torch.set_num_threads(1)
CODEC = Codec()
LEVER_FIELDS = (
    "g2_headroom",
    "gradient_stability",
    "host_gradient_via_seed",
    "coadaptation_delta",
    "seed_loss_gradient",
    "seed_weight_magnitude",
    "lr_stability_ratio",
    "alpha_variance",
)
LAYER = 4  # block3 of the digits CNN: a conv layer with a slot


# ------------------------------------------------------------ the gradient log (no torch)


def test_gradient_log_variance_and_window() -> None:
    log = SeedGradientLog(window=3)
    assert log.variance == 0.0 and log.stability_ratio == 0.0  # nothing read: unknown
    for norm in (1.0, 2.0, 3.0, 4.0):
        assert not log.record(norm)
    assert list(log.recent) == [2.0, 3.0, 4.0]
    assert log.variance == pytest.approx(2.0 / 3.0)


def test_gradient_log_counts_epochs_with_an_explosion() -> None:
    log = SeedGradientLog()
    for norm in (1.0, 1.2, 0.9):
        assert not log.record(norm)
    assert log.stability_ratio == 1.0  # the current epoch counts once read
    log.end_epoch()
    assert log.record(50.0)  # > 10x the median of the earlier readings
    assert log.stability_ratio == 0.5
    log.end_epoch()
    log.end_epoch()  # an epoch without readings (the seed did not train) does not count
    assert (log.epochs, log.stable_epochs) == (2, 1)
    assert log.record(float("nan")) and log.stability_ratio == pytest.approx(1 / 3)
    assert all(math.isfinite(v) for v in log.recent)  # the bad reading is counted, not kept
    assert not SeedGradientLog().record(1e6)  # too little history to call anything an explosion


# ------------------------------------------------------------ a real host


def germinate(run: HostRun, layer_id: int = LAYER, **levers: object) -> None:
    fields = {
        "blueprint": Blueprint.CONV_LIGHT,
        "blend": BlendAlgorithm.LINEAR,
        "tempo": Tempo.FAST,
        **levers,
    }
    reason = run.handle(command(Op.GERMINATE, layer_id, run_id=run.run_id, **fields))
    assert reason is None, reason


def steps(run: HostRun, n: int, capture_every: int = 1) -> list[HealthSignal]:
    """Train `n` steps, probing every `capture_every`-th; the last probed step's signals."""
    assert run.probe is not None
    signals: list[HealthSignal] = []
    batches = zip(run.data.x_train.split(64), run.data.y_train.split(64), strict=True)
    for i, (x, y) in zip(range(n), batches, strict=False):
        capture = i % capture_every == 0 or i == n - 1
        run.train_step(x, y, capture=capture)
        if capture:
            signals = run.probe.signals()
    return signals


def training_seed(**levers: object) -> HostRun:
    run = HostRun(HostConfig(epochs=2, seed=1))
    germinate(run, **levers)
    run.model.layers[LAYER].slot.end_epoch(run.val_accuracy)  # type: ignore[union-attr]  # -> TRAINING
    run._sync_optimizer()
    return run


def blending_seed(isolation: IsolationMode, blend: BlendAlgorithm = BlendAlgorithm.LINEAR) -> HostRun:
    run = training_seed(isolation=isolation, blend=blend)
    advance = AdaptationCommand(command_id="a", run_id=run.run_id, layer_id=LAYER, op=Op.ADVANCE)
    assert run.handle(advance) is None
    return run


def test_without_a_seed_every_lever_field_is_zero_and_the_signal_decodes() -> None:
    run = HostRun(HostConfig(epochs=1))
    for signal in steps(run, 2):
        assert all(getattr(signal, name) == 0.0 for name in LEVER_FIELDS), signal
        decoded = CODEC.decode(CODEC.encode(signal))  # positional: a twin type, compare the values
        assert msgspec.structs.astuple(decoded) == msgspec.structs.astuple(signal)


def test_a_training_seed_reports_its_weights_gradients_and_headroom() -> None:
    run = training_seed()
    slot = run.model.layers[LAYER].slot
    assert slot is not None and slot.stage is SeedStage.TRAINING
    steps(run, 5)
    # Read before the step's update (as the gradients are): the weights the step started from.
    weights = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in slot.seed_parameters()))
    signal = steps(run, 1)[LAYER]
    assert signal.seed_weight_magnitude == pytest.approx(weights, rel=1e-5) and weights > 0.0
    assert signal.seed_loss_gradient > 0.0
    assert signal.seed_loss_gradient == pytest.approx(
        signal.seed_gradient_ratio * signal.gradient_norm, rel=1e-4
    )
    assert signal.g2_headroom == pytest.approx(signal.seed_gradient_ratio - G2_THRESHOLD)
    assert (
        signal.gradient_stability == pytest.approx(slot.gradients.variance)
        and signal.gradient_stability > 0.0
    )
    assert len(slot.gradients.recent) == 6
    assert signal.lr_stability_ratio == 1.0  # six steady steps at the default LR
    # TRAINING detaches the seed's input and blends nothing in: no flow to the host, no alpha spread.
    assert signal.host_gradient_via_seed == 0.0 and signal.coadaptation_delta == 0.0
    assert signal.alpha_variance == 0.0
    others = [s for s in steps(run, 1) if s.layer_id != LAYER]
    assert all(s.seed_weight_magnitude == 0.0 and s.g2_headroom == 0.0 for s in others)


def test_a_germinated_seed_has_weights_but_no_gradient_yet() -> None:
    run = HostRun(HostConfig(epochs=1))
    germinate(run)
    signal = steps(run, 1)[LAYER]
    assert signal.seed_weight_magnitude > 0.0
    assert signal.seed_loss_gradient == signal.g2_headroom == signal.lr_stability_ratio == 0.0


def test_gradient_reaches_the_host_through_a_shared_seed_only() -> None:
    shared, isolated = blending_seed(IsolationMode.SHARED), blending_seed(IsolationMode.ISOLATED)
    s, i = steps(shared, 8)[LAYER], steps(isolated, 8)[LAYER]
    assert s.seed_stage is i.seed_stage is SeedStage.BLENDING and s.alpha > 0.0
    assert s.host_gradient_via_seed > 0.0 and -1.0 <= s.coadaptation_delta <= 1.0
    assert s.coadaptation_delta != 0.0
    assert i.host_gradient_via_seed == 0.0 and i.coadaptation_delta == 0.0
    # The seed's path carries alpha x its Jacobian: early in the blend it is a small share.
    assert s.host_gradient_via_seed < s.gradient_norm * 10


def test_via_seed_gradient_matches_autograd() -> None:
    # Independently: block_out = h + alpha * seed(h), so pulling d loss / d block_out back through
    # (block_out - h) gives the seed path's share of the gradient at h, and d loss / d h the total.
    run = blending_seed(IsolationMode.SHARED)
    steps(run, 5)
    slot = run.model.layers[LAYER].slot
    assert slot is not None and slot.alpha > 0.0
    x, y = run.data.x_train[:64], run.data.y_train[:64]
    block = run.model.layers[LAYER].block
    kept: dict[str, torch.Tensor] = {}
    handles = [
        block.host.register_forward_hook(lambda m, a, out: kept.setdefault("h", out)),
        block.register_forward_hook(lambda m, a, out: kept.setdefault("out", out)),
    ]
    loss = torch.nn.functional.cross_entropy(run.model(x), y)
    for handle in handles:
        handle.remove()
    h, out = kept["h"], kept["out"]
    total, g_out = torch.autograd.grad(loss, [h, out], retain_graph=True)
    (via,) = torch.autograd.grad(out - h, h, grad_outputs=g_out)
    # The probe's hooks on the same step (no optimizer step in between, so the same parameters).
    run.optimizer.zero_grad(set_to_none=True)
    assert run.probe is not None
    with run.probe.capture():
        loss = torch.nn.functional.cross_entropy(run.model(x), y)
    loss.backward()
    assert slot.grad_total is not None and slot.grad_via_seed is not None
    assert torch.allclose(slot.grad_total, total, rtol=1e-4, atol=1e-8)
    assert torch.allclose(slot.grad_via_seed, via, rtol=1e-4, atol=1e-8) and via.norm() > 0
    run.probe.read_gradients()
    signal = run.probe.signals()[LAYER]
    direct = total - via
    cosine = float((via * direct).sum() / (via.norm() * direct.norm()))
    assert signal.host_gradient_via_seed == pytest.approx(float(via.norm()), rel=1e-4)
    assert signal.coadaptation_delta == pytest.approx(cosine, rel=1e-3, abs=1e-6)


def test_a_gated_blend_spreads_alpha_over_the_batch() -> None:
    gated = blending_seed(IsolationMode.ISOLATED, BlendAlgorithm.GATED)
    linear = blending_seed(IsolationMode.ISOLATED, BlendAlgorithm.LINEAR)
    g, lin = steps(gated, 6)[LAYER], steps(linear, 6)[LAYER]
    assert g.alpha > 0.0 and g.alpha_variance > 0.0
    assert lin.alpha > 0.0 and lin.alpha_variance == 0.0


def test_milestone_counterfactuals_are_measured_once_when_reached() -> None:
    run = blending_seed(IsolationMode.ISOLATED)
    slot = run.model.layers[LAYER].slot
    assert slot is not None and slot.schedule is not None
    per_milestone = slot.schedule.total_steps // 4
    steps(run, per_milestone + 1, capture_every=100)
    assert 0.25 <= slot.alpha < 0.5
    _, run.val_accuracy = run.evaluate()
    run.measure_counterfactuals()
    assert set(slot.milestones) == {25}
    with slot.forced_alpha(0.25):
        _, at_quarter = run.evaluate()
    with slot.forced_alpha(0.0):
        _, without = run.evaluate()
    assert slot.milestones[25] == pytest.approx(at_quarter - without)
    state = slot.state()
    assert state.counterfactual_alpha25 == slot.milestones[25]
    assert state.counterfactual_alpha50 is state.counterfactual_alpha100 is None
    steps(run, per_milestone, capture_every=100)  # past 50 %
    run.measure_counterfactuals()
    assert set(slot.milestones) == {25, 50}
    assert slot.milestones[25] == state.counterfactual_alpha25  # measured once, kept
    # A new seed starts with none.
    assert run.handle(command(Op.PRUNE, LAYER, run_id=run.run_id, command_id="p")) is None
    assert slot.milestones == {} and slot.state().counterfactual_alpha25 is None


@pytest.mark.slow
def test_a_real_run_reports_finite_plausible_lever_telemetry() -> None:
    # Germinated after epoch 0 with a 1-epoch dwell and a shared input: trains in epoch 2,
    # blends by itself from epoch 3 (FAST: 3 epochs), so every stage's telemetry is on the wire.
    germ = command(
        Op.GERMINATE,
        LAYER,
        command_id="g",
        blueprint=Blueprint.CONV_LIGHT,
        blend=BlendAlgorithm.LINEAR,
        tempo=Tempo.FAST,
        dwell_epochs=1,
        isolation=IsolationMode.SHARED,
    )
    run, link = run_with({0: [germ]}, epochs=6, batch_size=128, health_every=3)
    assert link.acks[0] == ("g", True, "")
    signals = [s for batch in link.of(HealthBatch) for s in batch.signals if s.layer_id == LAYER]
    for signal in signals:
        assert CODEC.decode(CODEC.encode(signal)) is not None  # the wire's range checks accept it
        assert all(math.isfinite(getattr(signal, name)) for name in LEVER_FIELDS)
        assert signal.error_count == 0 and signal.alpha_variance == 0.0  # LINEAR: no per-sample alpha
    by_stage = {stage: [s for s in signals if s.seed_stage is stage] for stage in SeedStage}
    assert all(s.seed_weight_magnitude == 0.0 for s in by_stage[SeedStage.DORMANT])
    trained = by_stage[SeedStage.TRAINING] + by_stage[SeedStage.BLENDING] + by_stage[SeedStage.PROBATIONARY]
    assert by_stage[SeedStage.TRAINING] and by_stage[SeedStage.BLENDING]
    assert all(s.seed_weight_magnitude > 0.0 and 0.0 < s.lr_stability_ratio <= 1.0 for s in trained)
    assert all(s.seed_loss_gradient > 0.0 for s in by_stage[SeedStage.TRAINING])
    assert all(s.host_gradient_via_seed == 0.0 for s in by_stage[SeedStage.TRAINING])
    # The signal's alpha is the one after its step; the step itself ran at the one before (the
    # blend's first step runs at alpha 0: no gradient to the seed or through it yet).
    blending = [s for s in by_stage[SeedStage.BLENDING] if s.alpha > 0.1]
    assert blending and all(s.host_gradient_via_seed > 0.0 and s.seed_loss_gradient > 0.0 for s in blending)
    assert all(-1.0 <= s.coadaptation_delta <= 1.0 and s.coadaptation_delta != 0.0 for s in blending)
    # The state packets carry the milestones the blend reached (FAST: 25 % within its first epoch).
    final = next(s for s in run.report.final.seeds if s.layer_id == LAYER)
    assert final.stage is SeedStage.PROBATIONARY  # blended to alpha 1: every milestone was reached
    milestones = (final.counterfactual_alpha25, final.counterfactual_alpha50, final.counterfactual_alpha75)
    assert all(m is not None and abs(m) <= 1.0 for m in (*milestones, final.counterfactual_alpha100))
    assert final.counterfactual_alpha100 == pytest.approx(final.counterfactual)  # measured at alpha 1 too
