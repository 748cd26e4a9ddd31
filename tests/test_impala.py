"""IMPALA learner: V-trace wiring, one update, importance weights, NaN safety, checkpoints,
and improvement of a small GNN policy on the simulator from replayed (off-policy) experience."""

from __future__ import annotations

import random
import time

import msgspec
import pytest
import torch
from test_ppo import (
    assert_finite_stats,
    collect,
    mean_return,
    parameters_of,
    same_parameters,
    small_policy,
    synthetic_transitions,
)

from esperd.learn.config import ImpalaConfig
from esperd.learn.experience import Transition
from esperd.learn.impala import ImpalaUpdater
from esperd.learn.ppo import NonFiniteError, split_sequences
from esperd.learn.vtrace import from_importance_weights
from esperd.policy import PolicyBundle, PolicyConfig, create_policy
from tests.support.checkpoints import saved_and_loaded

torch.set_num_threads(1)


def isolated(transitions: list[Transition], every: int = 3) -> list[Transition]:
    """Every `every`-th transition: no two are consecutive steps of a run (like replay samples)."""
    return transitions[::every]


def current_values(policy: PolicyBundle, transitions: list[Transition]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(a|x), V(x)) under the current weights."""
    actions = torch.stack([torch.as_tensor(t.action) for t in transitions])
    with torch.no_grad():
        result = policy.evaluate([t.obs for t in transitions], actions)
    return result.log_probs, result.values


def next_values(policy: PolicyBundle, transitions: list[Transition]) -> torch.Tensor:
    out = torch.zeros(len(transitions))
    for i, t in enumerate(transitions):
        if not t.done and t.next_obs is not None:
            out[i] = policy.act([t.next_obs]).values[0]
    return out


# ---------------------------------------------------------------- config


def test_config_defaults_are_the_seed_documents() -> None:
    c = ImpalaConfig()
    assert (c.rho_bar, c.c_bar, c.baseline_coef, c.entropy_coef) == (1.0, 1.0, 0.5, 0.001)
    assert (c.lr, c.rmsprop_eps, c.rmsprop_alpha, c.max_grad_norm, c.gamma) == (1e-4, 0.1, 0.99, 40.0, 0.99)


def test_config_decodes_strictly() -> None:
    assert msgspec.convert({"rho_bar": None}, ImpalaConfig).rho_bar is None
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"rho_barr": 1.0}, ImpalaConfig)
    with pytest.raises(ValueError):
        ImpalaConfig(lr=0.0)


# ---------------------------------------------------------------- V-trace wiring


def test_one_step_targets_on_isolated_samples() -> None:
    """Isolated samples are one-step V-trace: vs = V + rho_bar-clipped (r + gamma V(next) - V)."""
    policy = small_policy()
    batch = isolated(synthetic_transitions(policy, runs=4, steps=12))
    batch[2] = msgspec.structs.replace(batch[2], done=True, next_obs=None)
    # Pretend some actions were made by a different policy: behaviour log-probs shifted.
    batch = [
        msgspec.structs.replace(t, log_prob=t.log_prob + (0.5 if i % 2 else -0.5))
        for i, t in enumerate(batch)
    ]
    assert all(len(s) == 1 for s in split_sequences(batch))
    log_pi, values = current_values(policy, batch)
    boot = next_values(policy, batch)
    rewards = torch.tensor([t.reward for t in batch])
    dones = torch.tensor([float(t.done) for t in batch])
    rhos = torch.exp(log_pi - torch.tensor([t.log_prob for t in batch]))
    expected_vs = values + rhos.clamp(max=1.0) * (rewards + 0.9 * (1 - dones) * boot - values)

    learner = ImpalaUpdater(policy, ImpalaConfig(gamma=0.9))
    stats = learner.update(batch)
    torch.testing.assert_close(
        torch.tensor(stats.td_errors), (expected_vs - values).abs(), rtol=1e-4, atol=1e-5
    )
    assert stats.clip_fraction == pytest.approx(float((rhos > 1.0).float().mean()))


def test_contiguous_steps_form_one_vtrace_sequence() -> None:
    policy = small_policy()
    batch = synthetic_transitions(policy, runs=1, steps=6)
    batch = [msgspec.structs.replace(t, log_prob=t.log_prob - 0.3 * (i % 3)) for i, t in enumerate(batch)]
    assert split_sequences(batch) == [list(range(6))]
    log_pi, values = current_values(policy, batch)
    expected = from_importance_weights(
        log_rhos=(log_pi - torch.tensor([t.log_prob for t in batch]))[:, None],
        discounts=torch.full((6, 1), 0.95),
        rewards=torch.tensor([t.reward for t in batch])[:, None],
        values=values[:, None],
        bootstrap_value=next_values(policy, batch[-1:]),
    )
    stats = ImpalaUpdater(policy, ImpalaConfig(gamma=0.95)).update(batch)
    torch.testing.assert_close(
        torch.tensor(stats.td_errors), (expected.vs[:, 0] - values).abs(), rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------- the update


def test_one_update_changes_parameters_and_returns_finite_stats() -> None:
    policy = small_policy()
    learner = ImpalaUpdater(policy)
    batch = synthetic_transitions(policy, runs=4, steps=16)
    before = parameters_of(policy)
    stats = learner.update(batch)
    assert not same_parameters(before, parameters_of(policy))
    assert_finite_stats(stats)
    assert stats.algorithm == "impala" and stats.update == 1 and stats.samples == 64 and stats.steps == 1
    assert len(stats.td_errors) == 64 and all(e >= 0 for e in stats.td_errors)
    assert learner.updates == 1 and learner.samples == 64 and policy.version == 0


def test_recurrent_policy_update() -> None:
    policy = small_policy("lstm")
    learner = ImpalaUpdater(policy)
    batch = synthetic_transitions(policy, runs=2, steps=8)
    before = parameters_of(policy)
    stats = learner.update(batch)
    assert stats.approx_kl == pytest.approx(0.0, abs=1e-6)  # evaluate replays the recorded states
    assert not same_parameters(before, parameters_of(policy))


def test_recurrent_policy_learns_through_time() -> None:
    batch = synthetic_transitions(small_policy("lstm"), runs=2, steps=8)
    after = {}
    for length in (1, 8):
        policy = small_policy("lstm")
        stats = ImpalaUpdater(policy, ImpalaConfig(bptt_length=length)).update(batch)
        assert stats.approx_kl == pytest.approx(0.0, abs=1e-6)  # unrolled or replayed: on-policy
        after[length] = parameters_of(policy)
    assert not same_parameters(after[1], after[8])  # BPTT: other gradients


def test_importance_weights_scale_the_loss() -> None:
    batch = isolated(synthetic_transitions(small_policy(), runs=4, steps=24))  # 32 one-step samples
    assert len(batch) == 32

    def stats_for(weights: torch.Tensor | None):  # type: ignore[no-untyped-def]
        return ImpalaUpdater(small_policy()).update(batch, weights=weights)

    plain = stats_for(None)
    doubled = stats_for(torch.full((32,), 2.0))
    assert doubled.policy_loss == pytest.approx(2 * plain.policy_loss, rel=1e-5)
    assert doubled.value_loss == pytest.approx(2 * plain.value_loss, rel=1e-5)
    assert doubled.grad_norm == pytest.approx(2 * plain.grad_norm, rel=1e-4)
    assert doubled.td_errors == pytest.approx(plain.td_errors)  # priorities do not depend on weights

    # All weight on one sample: that sample's loss alone.
    only = torch.zeros(32)
    only[5] = 1.0
    single = stats_for(only)
    alone = ImpalaUpdater(small_policy()).update([batch[5]])
    assert single.value_loss * 32 == pytest.approx(alone.value_loss, rel=1e-4, abs=1e-7)
    assert single.grad_norm == pytest.approx(alone.grad_norm, rel=1e-4)


def test_weights_must_match_the_batch() -> None:
    policy = small_policy()
    with pytest.raises(ValueError, match="weights"):
        ImpalaUpdater(policy).update(synthetic_transitions(policy, runs=2, steps=2), weights=[1.0, 1.0])


def test_nan_reward_raises_and_leaves_parameters_unchanged() -> None:
    policy = small_policy()
    learner = ImpalaUpdater(policy)
    learner.update(synthetic_transitions(policy, runs=4, steps=4, seed=1))
    batch = synthetic_transitions(policy, runs=4, steps=4, seed=2)
    batch[3] = msgspec.structs.replace(batch[3], reward=float("nan"))
    before = parameters_of(policy)
    with pytest.raises(NonFiniteError):
        learner.update(batch)
    assert same_parameters(before, parameters_of(policy))
    assert learner.updates == 1
    with pytest.raises(NonFiniteError):
        learner.update(batch[:3], weights=[1.0, float("inf"), 1.0])


def test_non_finite_gradients_do_not_step() -> None:
    policy = small_policy()
    learner = ImpalaUpdater(policy)
    batch = synthetic_transitions(policy, runs=2, steps=4)
    real_evaluate = policy.evaluate

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_evaluate(*args, **kwargs)
        if result.values.requires_grad:  # the training forward, not the bootstrap
            result.values.register_hook(lambda grad: grad * float("inf"))  # finite loss, infinite gradient
        return result

    policy.evaluate = poisoned  # type: ignore[method-assign]
    before = parameters_of(policy)
    with pytest.raises(NonFiniteError, match="gradients"):
        learner.update(batch)
    assert same_parameters(before, parameters_of(policy))
    assert learner.optimizer.state_dict()["state"] == {}


def test_checkpoint_round_trip() -> None:
    config = ImpalaConfig(lr=1e-3)
    policy = small_policy()
    learner = ImpalaUpdater(policy, config)
    learner.update(synthetic_transitions(policy, runs=4, steps=8, seed=1))
    saved = saved_and_loaded(policy, learner)

    batch = synthetic_transitions(policy, runs=4, steps=8, seed=2)
    expected = learner.update(batch)
    resumed_policy = small_policy(init_seed=5)
    resumed_policy.load_state_dict(saved["weights"])
    resumed = ImpalaUpdater(resumed_policy, config)
    resumed.load_state_dict(saved["learner"])
    got = resumed.update(batch)
    assert got.update == expected.update == 2 and resumed.samples == 64
    assert (got.policy_loss, got.value_loss, got.td_errors) == (
        expected.policy_loss,
        expected.value_loss,
        expected.td_errors,
    )
    assert same_parameters(parameters_of(policy), parameters_of(resumed_policy))


def test_reset_optimizer_forgets_moments() -> None:
    policy = small_policy()
    learner = ImpalaUpdater(policy)
    learner.update(synthetic_transitions(policy, runs=2, steps=4))
    assert learner.optimizer.state_dict()["state"]
    learner.reset_optimizer()
    assert learner.optimizer.state_dict()["state"] == {} and learner.updates == 1
    assert_finite_stats(learner.update(synthetic_transitions(policy, runs=2, steps=4, seed=3)))


def test_rule_based_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        ImpalaUpdater(create_policy("heuristic", PolicyConfig(), "cpu"))


# ---------------------------------------------------------------- learning in the simulator


@pytest.mark.slow
def test_impala_improves_a_small_gnn_policy_on_the_simulator() -> None:
    """Fixed seed, fixed budget: 60 rounds of (64 new transitions into a 2,048-step replay, 4
    updates on uniform samples of 64), i.e. 96 episodes and 240 updates, mostly on steps made by
    older versions. The mean return of the sampling policy on 40 held-out episodes rises by at
    least 0.5 (untrained: about 4.2; over torch/sim seeds 0-3 this budget gave +0.83 to +0.93).
    LR 5e-4 instead of the default 1e-4 so that this short budget suffices; everything else is
    the seed documents' defaults."""
    from esperd.sim import SimConfig, SimEnv

    torch.manual_seed(0)
    policy = small_policy()
    before = mean_return(policy)
    learner = ImpalaUpdater(policy, ImpalaConfig(lr=5e-4))
    env = SimEnv(8, SimConfig(), seed=0)
    observations = env.reset()
    replay: list[Transition] = []
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(60):
        transitions, observations = collect(env, policy, observations, steps=8)
        replay = (replay + transitions)[-2048:]
        for _ in range(4):
            stats = learner.update(rng.sample(replay, min(64, len(replay))))
            assert_finite_stats(stats)
    elapsed = time.perf_counter() - start
    after = mean_return(policy)
    assert after > before + 0.5, f"mean return {before:.3f} -> {after:.3f} after {elapsed:.1f}s of training"
