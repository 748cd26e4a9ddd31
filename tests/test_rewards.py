"""Reward terms, one by one: signs, magnitudes, anti-gaming, the loss governor, episode semantics."""

from __future__ import annotations

import math

import msgspec
import pytest

from esperd.learn.config import RewardConfig
from esperd.learn.rewards import (
    LossGovernor,
    RewardStep,
    RewardTracker,
    discount,
    episode_flags,
    param_rent,
    stage_potential,
)
from esperd_contracts import Op, SeedSlotState, SeedStage, SystemStatePacket

S = SeedStage
HOST = 1_000_000


def packet(
    epoch: int,
    acc: float = 0.5,
    *,
    added: int = 0,
    seeds: list[SeedSlotState] | None = None,
    done: bool = False,
    val_loss: float = 1.0,
    train_loss: float = 0.8,
) -> SystemStatePacket:
    return SystemStatePacket(
        epoch=epoch,
        val_accuracy=acc,
        val_loss=val_loss,
        train_loss=train_loss,
        host_params=HOST,
        total_params=HOST + added,
        seeds=seeds or [],
        done=done,
    )


def slot(layer: int, stage: SeedStage, improvement: float = 0.0) -> SeedSlotState:
    return SeedSlotState(layer_id=layer, stage=stage, total_improvement=improvement)


def tracker(**overrides: object) -> RewardTracker:
    # No loss history effects unless a test asks for them.
    return RewardTracker(RewardConfig(**overrides))  # type: ignore[arg-type]


# ---------------------------------------------------------------- basic


def test_first_packet_is_only_a_baseline() -> None:
    t = tracker()
    step = t.on_state(packet(0, 0.3, added=50_000))
    assert step.reward == 0.0 and not any(step.terms.values())
    assert t.steps == 0 and t.episode_return == 0.0


def test_basic_pays_accuracy_gain_minus_rent() -> None:
    t = tracker(accuracy_weight=10.0, rent_weight=0.5)
    t.on_state(packet(0, 0.50))
    step = t.on_state(packet(1, 0.53, added=100_000))
    assert step.terms["accuracy"] == pytest.approx(0.3)
    assert step.terms["rent"] == pytest.approx(-0.5 * math.log1p(0.1))
    assert step.reward == pytest.approx(0.3 - 0.5 * math.log1p(0.1))
    drop = t.on_state(packet(2, 0.50, added=100_000))
    assert drop.terms["accuracy"] == pytest.approx(-0.3)  # losing accuracy costs as much as gaining pays
    assert t.episode_return == pytest.approx(step.reward + drop.reward)


def test_rent_grows_with_log_of_added_over_host() -> None:
    assert param_rent(HOST, HOST) == 0.0
    assert param_rent(0, 5_000) == 0.0  # host size unknown: no rent rather than a division by zero
    assert param_rent(HOST, HOST - 10) == 0.0  # fewer than host params is not negative rent
    rents = [param_rent(HOST, HOST + added) for added in (10_000, 100_000, 1_000_000, 10_000_000)]
    assert rents == sorted(rents) and rents[0] > 0
    assert rents[2] == pytest.approx(math.log(2.0))
    # Concave: ten times the parameters costs far less than ten times the rent.
    assert rents[3] < 4 * rents[2]


def test_rent_is_charged_every_step_the_params_exist() -> None:
    t = tracker(rent_weight=1.0)
    t.on_state(packet(0, 0.5))
    steps = [t.on_state(packet(e, 0.5, added=HOST)) for e in range(1, 4)]
    assert all(s.reward == pytest.approx(-math.log(2.0)) for s in steps)


# ---------------------------------------------------------------- sparse


def test_sparse_is_zero_until_done_then_accuracy_minus_param_cost() -> None:
    t = tracker(mode="sparse", accuracy_weight=10.0, param_cost_weight=5.0)
    t.on_state(packet(0, 0.2))
    middle = [t.on_state(packet(e, 0.2 + 0.1 * e, added=HOST)) for e in range(1, 4)]
    assert all(s.reward == 0.0 for s in middle)
    final = t.on_state(packet(4, 0.7, added=HOST, done=True))
    assert final.terms["terminal"] == pytest.approx(7.0)
    assert final.terms["param_cost"] == pytest.approx(-5.0 * math.log(2.0))
    assert final.reward == pytest.approx(7.0 - 5.0 * math.log(2.0))
    assert final.terminal


def test_sparse_still_pays_rejections_and_governor() -> None:
    t = tracker(mode="sparse", rejected_penalty=0.3)
    t.on_state(packet(0))
    t.note_action(Op.PRUNE, 2, rejected=True)
    assert t.on_state(packet(1)).reward == pytest.approx(-0.3)


# ---------------------------------------------------------------- shaped


def test_shaping_is_gamma_phi_next_minus_phi() -> None:
    config = RewardConfig(
        mode="shaped", gamma=0.9, shaping_weight=0.1, rent_weight=0.0, intervention_cost=0.0
    )
    t = RewardTracker(config)
    before = [slot(1, S.TRAINING)]
    after = [slot(1, S.BLENDING)]
    t.on_state(packet(0, 0.5, seeds=before))
    step = t.on_state(packet(1, 0.5, seeds=after))
    phi, phi_next = stage_potential(before, config), stage_potential(after, config)
    assert phi == pytest.approx(0.1 * 2.0) and phi_next == pytest.approx(0.1 * 3.0)
    assert step.terms["shaping"] == pytest.approx(0.9 * phi_next - phi)
    assert step.terms["shaping"] > 0  # progress through the lifecycle is credited now


def test_shaping_potential_is_zero_at_the_terminal_step() -> None:
    config = RewardConfig(mode="shaped", gamma=1.0, shaping_weight=0.1, rent_weight=0.0)
    t = RewardTracker(config)
    seeds = [slot(1, S.FOSSILIZED, 0.05)]
    t.on_state(packet(0, 0.5, seeds=seeds))
    last = t.on_state(packet(1, 0.5, seeds=seeds, done=True))
    # Phi(terminal) = 0: credit handed out along the way is taken back, so the optimum is unchanged.
    assert last.terms["shaping"] == pytest.approx(-0.1 * 5.0)


def test_fossilizing_a_seed_that_did_not_help_earns_no_credit() -> None:
    config = RewardConfig(mode="shaped", gamma=1.0, shaping_weight=0.1, rent_weight=0.0)

    def fossilize(improvement: float) -> float:
        t = RewardTracker(config)
        t.on_state(packet(0, 0.5, seeds=[slot(1, S.PROBATIONARY, improvement)]))
        t.note_action(Op.FOSSILIZE, 1)
        return t.on_state(packet(1, 0.5, seeds=[slot(1, S.FOSSILIZED, improvement)])).terms["shaping"]

    assert fossilize(0.02) == pytest.approx(0.1 * (5.0 - 4.0))
    # Negative improvement: the fossilized seed has no potential, so the probation credit is lost too.
    assert fossilize(-0.02) == pytest.approx(-0.1 * 4.0)


def test_intervention_cost_per_non_wait_op_in_shaped_mode_only() -> None:
    shaped = tracker(mode="shaped", intervention_cost=0.02, rent_weight=0.0, shaping_weight=0.0)
    basic = tracker(mode="basic", intervention_cost=0.02, rent_weight=0.0)
    for t in (shaped, basic):
        t.on_state(packet(0))
        t.note_action(Op.WAIT)
        t.note_action(Op.GERMINATE, 1)
        t.note_action(Op.ADVANCE, 2)
    assert shaped.on_state(packet(1)).terms["intervention"] == pytest.approx(-0.04)
    assert basic.on_state(packet(1)).terms["intervention"] == 0.0


def _prune_after(age_epochs: int, *, confirmed: bool = True) -> RewardStep:
    t = tracker(
        mode="shaped",
        min_prune_age=3,
        prune_young_penalty=0.4,
        shaping_weight=0.0,
        intervention_cost=0.0,
        rent_weight=0.0,
    )
    t.on_state(packet(0, seeds=[slot(1, S.DORMANT)]))
    for epoch in range(1, age_epochs + 2):  # the seed is live from epoch 1 on
        t.on_state(packet(epoch, seeds=[slot(1, S.TRAINING)]))
    t.note_action(Op.PRUNE, 1)
    after = S.PRUNED if confirmed else S.TRAINING
    return t.on_state(packet(age_epochs + 2, seeds=[slot(1, after)]))


def test_pruning_a_young_seed_is_penalised() -> None:
    assert _prune_after(1).terms["prune_young"] == pytest.approx(-0.4)
    assert _prune_after(2).terms["prune_young"] == pytest.approx(-0.4)
    assert _prune_after(3).terms["prune_young"] == 0.0  # old enough
    assert _prune_after(1, confirmed=False).terms["prune_young"] == 0.0  # the prune did not happen


def test_pruning_a_seed_of_unknown_age_is_not_penalised() -> None:
    t = tracker(mode="shaped", shaping_weight=0.0, intervention_cost=0.0)
    t.on_state(packet(10, seeds=[slot(1, S.BLENDING)]))  # tracked from mid-life: born "now"
    t.note_action(Op.PRUNE, 7)  # a layer never seen live
    assert t.on_state(packet(11, seeds=[slot(7, S.PRUNED)])).terms["prune_young"] == 0.0


# ---------------------------------------------------------------- all modes


@pytest.mark.parametrize("mode", ["basic", "sparse", "shaped"])
def test_rejected_commands_are_penalised_in_every_mode(mode: str) -> None:
    t = tracker(mode=mode, rejected_penalty=0.25, intervention_cost=0.0)
    t.on_state(packet(0))
    t.note_action(Op.FOSSILIZE, 1, rejected=True)
    t.note_rejected(2)  # acks that came back late
    step = t.on_state(packet(1))
    assert step.terms["rejected"] == pytest.approx(-0.75)
    assert t.on_state(packet(2)).terms["rejected"] == 0.0  # counted once


@pytest.mark.parametrize("mode", ["basic", "sparse", "shaped"])
def test_loss_blow_up_is_penalised_in_every_mode(mode: str) -> None:
    t = tracker(mode=mode, governor_penalty=0.7, governor_window=8, governor_min_history=4)
    losses = [1.0, 0.95, 0.92, 0.9, 0.88, 0.87]
    steps = [t.on_state(packet(e, val_loss=v)) for e, v in enumerate(losses)]
    assert all(s.terms["governor"] == 0.0 for s in steps)  # a steadily falling loss is fine
    spike = t.on_state(packet(len(losses), val_loss=1.6))
    assert spike.terms["governor"] == pytest.approx(-0.7)


def test_training_loss_blow_up_counts_too_but_once_per_step() -> None:
    t = tracker(governor_penalty=0.5, governor_min_history=3)
    for e in range(5):
        t.on_state(packet(e, val_loss=1.0, train_loss=0.5))
    both = t.on_state(packet(5, val_loss=3.0, train_loss=3.0))
    assert both.terms["governor"] == pytest.approx(-0.5)


def test_governor_needs_history_and_forgets_beyond_its_window() -> None:
    g = LossGovernor(window=3, sigmas=3.0, min_history=3, min_std=0.01, min_relative_std=0.0)
    assert not g.check(1.0) and not g.check(1.0)
    assert not g.check(5.0)  # only two points of history: no verdict yet
    assert g.check(9.0)  # history [1, 1, 5]: mean 2.33, sd 1.89 -> threshold 7.99
    g2 = LossGovernor(window=3, sigmas=3.0, min_history=3, min_std=0.01, min_relative_std=0.0)
    for v in (1.0, 1.0, 1.0):
        g2.check(v)
    assert g2.check(1.05)  # sigma 0 -> floor 0.01: 1.05 > 1.03
    assert not g2.check(1.02)


def test_governor_relative_floor_ignores_small_drifts() -> None:
    g = LossGovernor(window=10, sigmas=3.0, min_history=3, min_std=0.0, min_relative_std=0.05)
    for v in (2.0, 2.0, 2.0, 2.0):
        g.check(v)
    assert not g.check(2.25)  # floor 0.1 -> threshold 2.3
    assert g.check(2.4)


# ---------------------------------------------------------------- episodes


def test_done_is_terminal_and_eviction_truncates() -> None:
    t = tracker()
    t.on_state(packet(0))
    assert not t.on_state(packet(1)).ends_episode
    last = t.on_state(packet(2, done=True))
    assert last.terminal and not last.truncated and last.ends_episode
    assert discount(last, 0.99) == 0.0

    t.reset()
    t.on_state(packet(0))
    t.note_action(Op.GERMINATE, 1, rejected=True)
    cut = t.truncate()
    assert cut.truncated and not cut.terminal
    assert cut.reward == pytest.approx(-RewardConfig().rejected_penalty)  # nothing pending is lost
    assert discount(cut, 0.99) == 0.99  # bootstrapped from the last state's value

    assert episode_flags(done=True, evicted=False) == (True, False)
    assert episode_flags(done=False, evicted=True) == (False, True)
    assert episode_flags(done=True, evicted=True) == (True, False)  # done wins


def test_reset_clears_history() -> None:
    t = tracker(governor_min_history=2)
    for e in range(4):
        t.on_state(packet(e, 0.5 + 0.1 * e, val_loss=1.0))
    t.reset()
    assert t.episode_return == 0.0 and t.prev is None
    assert t.on_state(packet(0, 0.9, val_loss=9.0)).reward == 0.0  # a new baseline, no old losses


def test_config_decodes_from_toml_like_dicts_and_rejects_nonsense() -> None:
    config = msgspec.convert({"mode": "shaped", "stage_potentials": {"fossilized": 3.0}}, RewardConfig)
    assert config.mode == "shaped" and config.stage_potentials == {S.FOSSILIZED: 3.0}
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"mode": "dense"}, RewardConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"rent_weigth": 1.0}, RewardConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"rent_weight": -1.0}, RewardConfig)
    with pytest.raises(ValueError):
        RewardConfig(mode="dense")  # type: ignore[arg-type]


def test_governor_survives_losses_at_the_top_of_the_wire_range() -> None:
    governor = LossGovernor(window=10, min_history=3)
    flags = [governor.check(value) for value in (0.5, 0.6, 0.55, 1e300, 0.5)]  # must not overflow
    assert flags == [False, False, False, True, False]
    calm = LossGovernor(window=10, min_history=3)
    for value in (1e299, 1.1e299, 0.9e299):
        assert calm.check(value) is False
    assert calm.check(1e300) is True  # far above mean + 3 sd of its history
