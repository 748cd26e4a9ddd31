"""The reference host's seed slot: lifecycle table, blending schedules, gradient isolation."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from esperd_contracts import (
    LEGAL_OPS,
    TRANSITIONS,
    AdaptationCommand,
    AlphaCurve,
    AlphaSpeed,
    BlendAlgorithm,
    Blueprint,
    BlueprintFamily,
    IsolationMode,
    Op,
    SeedStage,
    Tempo,
    next_stage,
)
from esperd_examples.host.blending import BlendSchedule, curve_shape
from esperd_examples.host.lifecycle import IllegalTransition, SeedLifecycle
from esperd_examples.host.slot import SeedSlot
from tests.support.packets import command

torch.set_num_threads(1)

S = SeedStage
STEPS_PER_EPOCH = 4
WIDTH = 4


def cnn_slot(cooldown: int = 2) -> SeedSlot:
    torch.manual_seed(0)
    return SeedSlot(
        0, "block", WIDTH, BlueprintFamily.CNN, cooldown_epochs=cooldown, steps_per_epoch=STEPS_PER_EPOCH
    )


def apply_ok(slot: SeedSlot, op: Op, **fields: object) -> None:
    reason = slot.apply(command(op, **fields))
    assert reason is None, reason


#: How to reach each stage from DORMANT with legal commands and epoch boundaries.
PATHS: dict[SeedStage, list[Op | str]] = {
    S.DORMANT: [],
    S.GERMINATED: [Op.GERMINATE],
    S.TRAINING: [Op.GERMINATE, "epoch"],
    S.BLENDING: [Op.GERMINATE, "epoch", Op.ADVANCE],
    S.PROBATIONARY: [Op.GERMINATE, "epoch", Op.ADVANCE, Op.ADVANCE],
    S.FOSSILIZED: [Op.GERMINATE, "epoch", Op.ADVANCE, Op.ADVANCE, Op.FOSSILIZE],
    S.PRUNED: [Op.GERMINATE, Op.PRUNE],
}


def drive_to(slot: SeedSlot, stage: SeedStage, **germinate: object) -> SeedSlot:
    for step in PATHS[stage]:
        if step == "epoch":
            slot.end_epoch(val_accuracy=0.5)
        else:
            apply_ok(slot, step, **(germinate if step is Op.GERMINATE else {}))  # type: ignore[arg-type]
    assert slot.stage is stage
    return slot


def test_paths_cover_every_stage() -> None:
    assert set(PATHS) == set(SeedStage)


# ------------------------------------------------------------ the table


ALL_PAIRS = [(stage, op) for stage in SeedStage for op in Op]


@pytest.mark.parametrize(("stage", "op"), ALL_PAIRS, ids=[f"{s.value}-{o.value}" for s, o in ALL_PAIRS])
def test_slot_applies_exactly_the_legal_ops(stage: SeedStage, op: Op) -> None:
    slot = drive_to(cnn_slot(), stage)
    seed_before = slot.seed
    reason = slot.apply(command(op))
    if op in LEGAL_OPS[stage]:
        assert reason is None
        assert slot.stage is next_stage(stage, op)
        assert op is Op.WAIT or (stage, op) in TRANSITIONS
    else:
        assert reason is not None and op.value in reason and stage.value in reason
        assert slot.stage is stage
        assert slot.seed is seed_before  # a rejected command changes nothing


@pytest.mark.parametrize(("stage", "op"), ALL_PAIRS, ids=[f"{s.value}-{o.value}" for s, o in ALL_PAIRS])
def test_stage_machine_follows_the_contract_table(stage: SeedStage, op: Op) -> None:
    machine = SeedLifecycle(stage=stage)
    if (stage, op) in TRANSITIONS or op is Op.WAIT:
        assert machine.apply(op) is next_stage(stage, op)
    else:
        with pytest.raises(IllegalTransition, match=f"{op.value} is illegal from {stage.value}"):
            machine.apply(op)
        assert machine.stage is stage


def test_transition_resets_time_in_stage_but_wait_does_not() -> None:
    machine = SeedLifecycle()
    machine.end_epoch()
    machine.end_epoch()
    assert machine.epochs_in_stage == 2
    machine.apply(Op.WAIT)
    assert machine.epochs_in_stage == 2
    machine.apply(Op.GERMINATE)
    assert machine.epochs_in_stage == 0


# ------------------------------------------------------------ automatic transitions


def test_germinated_starts_training_at_the_next_epoch_boundary() -> None:
    slot = drive_to(cnn_slot(), S.GERMINATED)
    assert slot.end_epoch(0.5) is S.TRAINING
    assert slot.lifecycle.epochs_in_stage == 0


@pytest.mark.parametrize("cooldown", [1, 3])
def test_pruned_returns_to_dormant_after_the_cooldown(cooldown: int) -> None:
    slot = drive_to(cnn_slot(cooldown=cooldown), S.PRUNED)
    assert slot.seed is None and slot.seed_param_count() == 0
    for _ in range(cooldown - 1):
        assert slot.end_epoch(0.5) is S.PRUNED
    assert slot.end_epoch(0.5) is S.DORMANT
    apply_ok(slot, Op.GERMINATE)  # the slot is usable again


def test_blending_becomes_probationary_only_once_the_blend_is_complete() -> None:
    slot = drive_to(cnn_slot(), S.BLENDING)
    total = Tempo.FAST.epochs * STEPS_PER_EPOCH
    for _ in range(total - 1):
        slot.step()
    assert slot.end_epoch(0.5) is S.BLENDING  # one step short
    slot.step()
    assert slot.alpha == 1.0
    assert slot.end_epoch(0.5) is S.PROBATIONARY
    assert slot.alpha == 1.0  # alpha holds on probation


@pytest.mark.parametrize("stage", [S.DORMANT, S.TRAINING, S.PROBATIONARY, S.FOSSILIZED])
def test_other_stages_stay_put_at_epoch_boundaries(stage: SeedStage) -> None:
    slot = drive_to(cnn_slot(), stage)
    for _ in range(20):
        assert slot.end_epoch(0.5) is stage


def test_total_improvement_counts_from_the_accuracy_at_germination() -> None:
    slot = cnn_slot()
    assert slot.apply(command(Op.GERMINATE), val_accuracy=0.60) is None
    slot.end_epoch(0.70)
    assert slot.total_improvement == pytest.approx(0.10)
    slot.end_epoch(0.55)
    assert slot.total_improvement == pytest.approx(-0.05)


# ------------------------------------------------------------ command checks


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"blueprint": None}, "needs a blueprint"),
        ({"blueprint": Blueprint.LORA}, "transformer-family"),
        ({"blueprint": Blueprint.ATTENTION}, "takes cnn blueprints"),
        ({"seed_id": 1}, "seed_id 1"),
    ],
)
def test_bad_germinations_are_rejected_with_a_reason(fields: dict[str, object], needle: str) -> None:
    slot = cnn_slot()
    reason = slot.apply(command(Op.GERMINATE, **fields))
    assert reason is not None and needle in reason
    assert slot.stage is S.DORMANT and slot.seed is None


def test_transformer_slot_rejects_cnn_blueprints() -> None:
    slot = SeedSlot(5, "fc", 8, BlueprintFamily.TRANSFORMER)
    reason = slot.apply(command(Op.GERMINATE, blueprint=Blueprint.DEPTHWISE))
    assert reason is not None and "cnn-family" in reason
    apply_ok(slot, Op.GERMINATE, blueprint=Blueprint.MLP)


def test_unimplemented_blueprint_is_rejected() -> None:
    from esperd_examples.host.blueprints import CNN_SEEDS

    registry = {bp: f for bp, f in CNN_SEEDS.items() if bp is not Blueprint.DILATED}
    slot = SeedSlot(0, "block", WIDTH, BlueprintFamily.CNN, registry=registry)
    reason = slot.apply(command(Op.GERMINATE, blueprint=Blueprint.DILATED))
    assert reason == "blueprint dilated is not implemented by this host"
    apply_ok(slot, Op.GERMINATE, blueprint=Blueprint.DEPTHWISE)


def test_set_alpha_target_needs_a_target() -> None:
    slot = drive_to(cnn_slot(), S.BLENDING)
    reason = slot.apply(AdaptationCommand(command_id="c", run_id="r1", layer_id=0, op=Op.SET_ALPHA_TARGET))
    assert reason == "set_alpha_target needs alpha_target"


@pytest.mark.parametrize("blueprint", list(Blueprint), ids=lambda bp: bp.value)
def test_every_blueprint_builds_a_shape_preserving_seed(blueprint: Blueprint) -> None:
    cnn = blueprint.family is BlueprintFamily.CNN
    slot = SeedSlot(0, "layer", 8, blueprint.family, steps_per_epoch=2)
    drive_to(slot, S.BLENDING, blueprint=blueprint)
    slot.step()
    inputs = [torch.randn(3, 8, 5, 5)] if cnn else [torch.randn(3, 6, 8), torch.randn(3, 8)]
    for x in inputs:
        out = slot(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
    assert slot.seed_param_count() > 0


# ------------------------------------------------------------ blending schedules


def linear(step: int, total: int, _k: float) -> float:
    return min(step / total, 1.0)


def sigmoid(step: int, total: int, k: float) -> float:
    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    p = min(step / total, 1.0)
    return (sig(12 * k * (p - 0.5)) - sig(-6 * k)) / (sig(6 * k) - sig(-6 * k))


SCHEDULES: list[tuple[BlendAlgorithm, float, Callable[[int, int, float], float]]] = [
    (BlendAlgorithm.LINEAR, 1.0, linear),
    (BlendAlgorithm.SIGMOID, 0.5, sigmoid),
    (BlendAlgorithm.SIGMOID, 1.0, sigmoid),
    (BlendAlgorithm.SIGMOID, 2.0, sigmoid),
    (BlendAlgorithm.GATED, 1.0, linear),  # the schedule part; the gate multiplies it in forward
]


@pytest.mark.parametrize("tempo", list(Tempo), ids=lambda t: t.value)
@pytest.mark.parametrize(
    ("algorithm", "steepness", "expected"), SCHEDULES, ids=lambda v: getattr(v, "value", v)
)
def test_alpha_follows_the_schedule_at_every_step(
    algorithm: BlendAlgorithm, steepness: float, expected: Callable[[int, int, float], float], tempo: Tempo
) -> None:
    slot = drive_to(cnn_slot(), S.BLENDING, blend=algorithm, steepness=steepness, tempo=tempo)
    total = tempo.epochs * STEPS_PER_EPOCH
    seen = []
    for step in range(total + 3):  # three extra steps: alpha must stay at the target
        assert slot.alpha == pytest.approx(expected(step, total, steepness), abs=1e-12), f"step {step}"
        seen.append(slot.alpha)
        slot.step()
    assert seen[0] == 0.0 and seen[total] == pytest.approx(1.0, abs=1e-12)
    assert all(b >= a for a, b in itertools.pairwise(seen))  # monotone ramp


def test_sigmoid_steepness_sharpens_the_middle() -> None:
    def alpha_at_quarter(k: float) -> float:
        return BlendSchedule(BlendAlgorithm.SIGMOID, 100, steepness=k).alpha_at(25)

    assert alpha_at_quarter(2.0) < alpha_at_quarter(1.0) < alpha_at_quarter(0.5) < 0.25
    assert BlendSchedule(BlendAlgorithm.SIGMOID, 100).alpha_at(50) == pytest.approx(0.5)


def test_set_alpha_target_ramps_from_the_current_alpha_to_the_target() -> None:
    slot = drive_to(cnn_slot(), S.BLENDING, tempo=Tempo.FAST)
    total = Tempo.FAST.epochs * STEPS_PER_EPOCH  # 12
    for _ in range(4):
        slot.step()
    before = slot.alpha
    apply_ok(slot, Op.SET_ALPHA_TARGET, alpha_target=0.6)
    assert slot.stage is S.BLENDING and slot.alpha == pytest.approx(before)  # no jump
    for step in range(4, total + 1):
        expected = before + (0.6 - before) * (step - 4) / (total - 4)
        assert slot.alpha == pytest.approx(expected, abs=1e-12)
        slot.step()
    assert slot.alpha == pytest.approx(0.6)


@pytest.mark.parametrize("dwell", [1, 2, 5])
def test_dwell_starts_the_blend_by_itself_after_that_many_epochs_in_training(dwell: int) -> None:
    slot = drive_to(cnn_slot(), S.TRAINING, dwell_epochs=dwell, tempo=Tempo.FAST)
    for _ in range(dwell - 1):
        assert slot.end_epoch(0.5) is S.TRAINING
    assert slot.end_epoch(0.5) is S.BLENDING
    assert slot.schedule is not None and slot.alpha == 0.0  # blends as ADVANCE would
    for _ in range(STEPS_PER_EPOCH):
        slot.step()
    assert slot.alpha == pytest.approx(1 / 3)  # fast: a third per epoch, linear


def test_advance_before_the_dwell_still_starts_the_blend() -> None:
    slot = drive_to(cnn_slot(), S.TRAINING, dwell_epochs=5)
    apply_ok(slot, Op.ADVANCE)
    assert slot.stage is S.BLENDING and slot.schedule is not None


@pytest.mark.parametrize("speed", list(AlphaSpeed), ids=lambda s: s.value)
@pytest.mark.parametrize("curve", list(AlphaCurve), ids=lambda c: c.value)
def test_set_alpha_target_moves_at_its_speed_along_its_curve(speed: AlphaSpeed, curve: AlphaCurve) -> None:
    slot = drive_to(cnn_slot(), S.BLENDING, tempo=Tempo.FAST, blend=BlendAlgorithm.LINEAR)
    for _ in range(4):
        slot.step()
    before = slot.alpha
    apply_ok(slot, Op.SET_ALPHA_TARGET, alpha_target=0.25, alpha_speed=speed, alpha_curve=curve)
    steps = speed.epochs * STEPS_PER_EPOCH
    for k in range(steps + 1):
        expected = before + (0.25 - before) * curve_shape(curve, 1.0 if steps == 0 else k / steps)
        assert slot.alpha == pytest.approx(expected, abs=1e-12), f"step {k}"
        slot.step()
    assert slot.alpha == pytest.approx(0.25)
    # The blend completes once both its tempo and the move are done (a slow move extends it).
    total = Tempo.FAST.epochs * STEPS_PER_EPOCH
    while slot.schedule is not None and not slot.schedule.complete:
        slot.step()
    assert slot.schedule is not None and slot.schedule.step == max(total, 4 + steps)
    assert slot.end_epoch(0.5) is S.PROBATIONARY and slot.alpha == pytest.approx(0.25)


def test_a_cosine_move_is_slow_at_both_ends() -> None:
    schedule = BlendSchedule(BlendAlgorithm.LINEAR, 40)
    schedule.set_target(1.0, AlphaSpeed.SLOW, AlphaCurve.COSINE, steps_per_epoch=4)  # 20 steps
    alphas = [schedule.alpha_at(k) for k in range(21)]
    steps = [b - a for a, b in itertools.pairwise(alphas)]
    assert steps[0] < steps[10] > steps[-1] and alphas[10] == pytest.approx(0.5)


def test_blending_forward_is_host_plus_alpha_times_seed() -> None:
    slot = drive_to(cnn_slot(), S.BLENDING)
    for _ in range(5):
        slot.step()
    h = torch.randn(2, WIDTH, 3, 3)
    assert slot.seed is not None
    torch.testing.assert_close(slot(h), h + slot.alpha * slot.seed(h))


def test_gated_blend_multiplies_a_learned_per_sample_gate_into_alpha() -> None:
    slot = drive_to(cnn_slot(), S.BLENDING, blend=BlendAlgorithm.GATED)
    for _ in range(6):
        slot.step()
    assert slot.gate is not None and slot.seed is not None
    h = torch.randn(5, WIDTH, 3, 3) * torch.arange(1, 6).view(5, 1, 1, 1)
    gate = slot.gate(h)
    assert gate.shape == (5, 1, 1, 1) and bool(((gate > 0) & (gate < 1)).all())
    assert gate.flatten().unique().numel() > 1  # input-dependent
    torch.testing.assert_close(slot(h), h + gate * slot.alpha * slot.seed(h))
    assert any(p is q for p in slot.trainable_parameters() for q in slot.gate.parameters())


def test_early_advance_ends_the_blend_where_it_stands() -> None:
    slot = drive_to(cnn_slot(), S.BLENDING)
    for _ in range(3):
        slot.step()
    alpha = slot.alpha
    apply_ok(slot, Op.ADVANCE)
    assert slot.stage is S.PROBATIONARY and 0.0 < slot.alpha == alpha < 1.0
    slot.step()
    assert slot.alpha == alpha  # no further ramp on probation


def test_forced_alpha_switches_the_seed_off() -> None:
    slot = drive_to(cnn_slot(), S.BLENDING)
    for _ in range(3):
        slot.step()
    h = torch.randn(2, WIDTH, 3, 3)
    with slot.forced_alpha(0.0):
        assert torch.equal(slot(h), h)
    assert not torch.equal(slot(h), h)


# ------------------------------------------------------------ gradient isolation


class Host(nn.Module):
    """A host layer feeding a slot: conv -> relu -> slot."""

    def __init__(self, slot: SeedSlot) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, WIDTH, 3, padding=1)
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slot(torch.relu(self.conv(x)))


def host_grads(model: Host) -> list[torch.Tensor | None]:
    return [p.grad for p in model.conv.parameters()]


def nonzero(grads: list[torch.Tensor | None]) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def seed_grads(slot: SeedSlot) -> list[torch.Tensor | None]:
    return [p.grad for p in slot.seed_parameters()]


@pytest.mark.parametrize("blueprint", [Blueprint.CONV_LIGHT, Blueprint.BOTTLENECK, Blueprint.SQUEEZE_EXCITE])
def test_training_seed_path_gives_host_no_gradient(blueprint: Blueprint) -> None:
    model = Host(drive_to(cnn_slot(), S.TRAINING, blueprint=blueprint))
    x = torch.randn(4, 3, 5, 5)
    h = torch.relu(model.conv(x))
    branch = model.slot.seed_branch(h)
    assert branch is not None and torch.equal(branch, torch.zeros_like(branch))  # alpha 0 in value
    (branch * torch.randn_like(branch)).sum().backward()  # a loss through the seed path only
    assert all(g is None for g in host_grads(model))
    assert nonzero(seed_grads(model.slot))


def test_training_seed_leaves_host_output_and_gradients_exactly_unchanged() -> None:
    x, target = torch.randn(4, 3, 5, 5), torch.randn(4, WIDTH, 5, 5)
    with_seed = Host(drive_to(cnn_slot(), S.TRAINING))
    without = Host(cnn_slot())  # same host weights (seeded), dormant slot
    out_seed, out_plain = with_seed(x), without(x)
    assert torch.equal(out_seed, out_plain)  # alpha 0: the forward value is the host's
    ((out_seed - target) ** 2).mean().backward()
    ((out_plain - target) ** 2).mean().backward()
    for g_seed, g_plain in zip(host_grads(with_seed), host_grads(without), strict=True):
        assert g_seed is not None and g_plain is not None
        torch.testing.assert_close(g_seed, g_plain, rtol=0, atol=0)
    assert nonzero(seed_grads(with_seed.slot))  # the seed still learns from the task loss


@pytest.mark.parametrize(
    ("isolation", "host_gets_gradient"), [(IsolationMode.ISOLATED, False), (IsolationMode.SHARED, True)]
)
def test_isolation_lever_decides_host_gradient_while_blending(
    isolation: IsolationMode, host_gets_gradient: bool
) -> None:
    model = Host(drive_to(cnn_slot(), S.BLENDING, isolation=isolation))
    for _ in range(6):
        model.slot.step()
    h = torch.relu(model.conv(torch.randn(4, 3, 5, 5)))
    branch = model.slot.seed_branch(h)
    assert branch is not None
    branch.pow(2).sum().backward()
    assert nonzero(host_grads(model)) is host_gets_gradient
    assert nonzero(seed_grads(model.slot))


def test_default_isolation_is_isolated_for_cnn_and_shared_for_transformer() -> None:
    cnn = drive_to(cnn_slot(), S.TRAINING)
    tf = drive_to(SeedSlot(0, "fc", 8, BlueprintFamily.TRANSFORMER), S.TRAINING, blueprint=Blueprint.MLP)
    assert cnn.isolation is IsolationMode.ISOLATED
    assert tf.isolation is IsolationMode.SHARED


def test_fossilized_seed_is_frozen_and_joins_the_host() -> None:
    model = Host(drive_to(cnn_slot(), S.BLENDING))
    for _ in range(6):
        model.slot.step()
    apply_ok(model.slot, Op.ADVANCE)
    apply_ok(model.slot, Op.FOSSILIZE)
    assert model.slot.trainable_parameters() == []
    assert all(not p.requires_grad for p in model.slot.seed_parameters())
    h = torch.relu(model.conv(torch.randn(4, 3, 5, 5)))
    branch = model.slot.seed_branch(h)
    assert branch is not None
    branch.pow(2).sum().backward()
    assert nonzero(host_grads(model))  # no longer detached: the host learns around it
    assert all(g is None for g in seed_grads(model.slot))


def test_fossilized_seed_stays_in_eval_mode() -> None:
    slot = drive_to(cnn_slot(), S.FOSSILIZED, blueprint=Blueprint.CONV_NORM)
    slot.train()
    assert slot.seed is not None and not slot.seed.training
    stats = copy.deepcopy(slot.seed[1].running_mean)  # type: ignore[index]
    slot(torch.randn(4, WIDTH, 3, 3) * 5)
    assert torch.equal(slot.seed[1].running_mean, stats)  # type: ignore[index]
