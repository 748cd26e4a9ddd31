"""The loop side of PPO and IMPALA (esperd.learn.algorithms): buffering, when an update and a
swap are due, the batch drawn, and what a swap, a trip or an update's TD errors do to the buffer."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from esperd.learn.algorithms import ImpalaAlgorithm, PPOAlgorithm, make_algorithm
from esperd.learn.config import ImpalaConfig
from esperd.learn.ppo import UpdateStats
from tests.test_learner import learner_config, make_policy, sim_transitions

SINGLE_STEPS = ImpalaConfig(batch_size=16, unroll_length=1)


def stats(td_errors: list[float]) -> UpdateStats:
    return UpdateStats(
        algorithm="impala", update=1, samples=len(td_errors), policy_loss=0.0, value_loss=0.0,
        entropy=0.0, approx_kl=0.0, clip_fraction=0.0, grad_norm=0.0, lr=0.0, epochs_run=1,
        steps=1, early_stopped=False, explained_variance=0.0, seconds=0.0, td_errors=td_errors,
    )  # fmt: skip


def test_make_algorithm_picks_by_name_and_refuses_others() -> None:
    assert isinstance(make_algorithm(learner_config("ppo")), PPOAlgorithm)
    assert isinstance(make_algorithm(learner_config("impala")), ImpalaAlgorithm)
    with pytest.raises(ValueError, match="off"):
        make_algorithm(learner_config("off"))


def test_ppo_uses_a_rollout_of_the_serving_version_once() -> None:
    algo = PPOAlgorithm(learner_config("ppo"))  # rollout_size 32
    steps = sim_transitions(make_policy(), 40, seed=3)
    for t in steps[:31]:
        algo.add(t)
    assert not algo.update_due()
    algo.add(steps[31])
    assert algo.update_due() and algo.swap_due(0.0)  # on-policy: every update swaps at once
    sample = algo.take()
    assert len(sample.batch) == 32 and sample.weights is None and sample.slots is None
    assert len(algo.buffer) == 0 and not algo.update_due()
    for t in steps[32:]:
        algo.add(t)  # version 0
    algo.on_serve(1)  # a swap: steps of version 0 are off-policy now
    assert len(algo.buffer) == 0
    algo.add(msgspec.structs.replace(steps[0], policy_version=1))
    algo.on_trip()  # a rejected trajectory's steps go
    assert len(algo.buffer) == 0
    assert algo.kl_limit == algo.config.breaker.kl_limit_ppo


def test_impala_replays_swaps_at_most_every_interval_and_reads_a_replaced_config() -> None:
    config = learner_config("impala", min_replay=16, swap_min_interval_s=0.5, impala=SINGLE_STEPS)
    algo = ImpalaAlgorithm(config)
    for t in sim_transitions(make_policy(), 16, seed=4):
        algo.add(t)
    assert algo.update_due() and algo.keeps_learning
    assert not algo.swap_due(0.4) and algo.swap_due(0.5)
    sample = algo.take()  # batch_size 16, single steps
    assert len(sample.batch) == 16 and sample.weights is not None and sample.slots is not None
    assert len(algo.buffer) == 16  # replay keeps what it drew
    algo.on_serve(1)
    algo.on_trip()
    assert len(algo.buffer) == 16  # off-policy: neither a swap nor a trip empties it
    algo.config = msgspec.structs.replace(algo.config, min_replay=10_000)
    assert not algo.update_due()
    assert algo.kl_limit == algo.config.breaker.kl_limit_impala


def test_impala_update_sets_the_drawn_steps_priorities_from_td_errors() -> None:
    algo = ImpalaAlgorithm(learner_config("impala", min_replay=8, impala=SINGLE_STEPS))
    for t in sim_transitions(make_policy(), 8, seed=5):
        algo.add(t)
    sample = algo.take()
    assert sample.priority_slots is not None and sample.lengths is None
    td = [float(i + 1) for i in range(len(sample.batch))]
    algo.after_update(sample, stats(td))
    priorities = algo.buffer.priorities()
    # p = |td| + eps; a slot drawn twice keeps its last write.
    expected = {int(slot): v for slot, v in zip(sample.priority_slots, td, strict=True)}
    for slot, v in expected.items():
        assert priorities[slot] == pytest.approx(v + algo.buffer.eps)


def test_impala_unroll_priority_is_its_mean_td_error_on_its_first_step() -> None:
    algo = ImpalaAlgorithm(
        learner_config("impala", min_replay=16, impala=ImpalaConfig(batch_size=40, unroll_length=10))
    )
    for t in sim_transitions(make_policy(), 48, seed=6, envs=4):
        algo.add(t)
    sample = algo.take()
    assert sample.lengths is not None and sample.priority_slots is not None
    assert len(sample.batch) == int(sample.lengths.sum())
    td = [float(i) for i in range(len(sample.batch))]
    algo.after_update(sample, stats(td))
    starts = np.concatenate([[0], np.cumsum(sample.lengths)[:-1]])
    means = [float(np.mean(td[s : s + n])) for s, n in zip(starts, sample.lengths, strict=True)]
    expected = {int(slot): m for slot, m in zip(sample.priority_slots, means, strict=True)}
    priorities = algo.buffer.priorities()
    for slot, m in expected.items():
        assert priorities[slot] == pytest.approx(m + algo.buffer.eps)
