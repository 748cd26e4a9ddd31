"""PPO learner: sequences and bootstrap, one update, KL early stop, NaN safety, checkpoints,
and improvement of a small GNN policy on the simulator within a fixed budget."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import msgspec
import numpy as np
import pytest
import torch

from esperd.learn.config import PPOConfig
from esperd.learn.experience import Transition
from esperd.learn.gae import compute_gae
from esperd.learn.ppo import (
    NonFiniteError,
    PPOUpdater,
    UpdateStats,
    _minibatches,
    bootstrap_values,
    bptt_chunks,
    clip_grad_norm,
    lr_factor,
    split_sequences,
    stack_actions,
)
from esperd.policy import PolicyBundle, PolicyConfig, create_policy
from esperd.policy.batch import collate, lever_logits_mask
from tests.support.checkpoints import saved_and_loaded
from tests.support.observations import make_observation

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers (test_impala uses them too)


def small_policy(name: str = "gnn", init_seed: int = 0) -> PolicyBundle:
    """A small policy without dropout, so act and evaluate agree exactly."""
    return create_policy(
        name, PolicyConfig(name=name, hidden_size=64, gnn_layers=2, dropout=0.0, init_seed=init_seed), "cpu"
    )


def synthetic_transitions(
    policy: PolicyBundle, runs: int = 4, steps: int = 16, seed: int = 0, reward_scale: float = 1.0
) -> list[Transition]:
    """`runs` runs stepped together for `steps` steps on random graphs, acted on by `policy`."""
    rng = np.random.default_rng(seed)

    def observe(run: int, epoch: int):  # type: ignore[no-untyped-def]
        return make_observation(f"run-{run}", 5 + run % 3, seed=seed * 7919 + run * 101 + epoch, epoch=epoch)

    observations = [observe(r, 0) for r in range(runs)]
    transitions = []
    for t in range(steps):
        result = policy.act(observations)
        following = [observe(r, t + 1) for r in range(runs)]
        for r in range(runs):
            transitions.append(
                Transition(
                    obs=observations[r],
                    action=result.actions[r].numpy(),
                    log_prob=float(result.log_probs[r]),
                    value=float(result.values[r]),
                    policy_version=policy.version,
                    reward=float(rng.normal()) * reward_scale,
                    next_obs=following[r],
                    hidden=None if result.hidden is None else result.hidden[r].numpy(),
                )
            )
        observations = following
    return transitions


def parameters_of(policy: PolicyBundle) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.parameters()]


def same_parameters(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_finite_stats(stats: UpdateStats) -> None:
    for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm", "lr"):
        assert math.isfinite(getattr(stats, name)), name
    assert math.isfinite(stats.explained_variance)


def collect(env, policy: PolicyBundle, observations, steps: int) -> tuple[list[Transition], list]:  # type: ignore[no-untyped-def]
    """`steps` sim steps of every env with `policy.act`; (transitions, the observations after)."""
    transitions = []
    for _ in range(steps):
        result = policy.act(observations)
        following, rewards, dones, _ = env.step(result)
        for e, obs in enumerate(observations):
            done = bool(dones[e])
            transitions.append(
                Transition(
                    obs=obs,
                    action=result.actions[e].numpy(),
                    log_prob=float(result.log_probs[e]),
                    value=float(result.values[e]),
                    policy_version=policy.version,
                    reward=float(rewards[e]),
                    done=done,
                    next_obs=None if done else following[e],
                )
            )
        observations = following
    return transitions, observations


def mean_return(policy: PolicyBundle, episodes: int = 40, seed: int = 1000) -> float:
    """Mean episode return of the (sampling) policy on fixed simulator seeds and a fixed torch seed."""
    from esperd.sim import run_episodes

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        results = run_episodes(policy, episodes, num_envs=8, seed=seed, deterministic=False)
    return sum(r.episode_return for r in results) / len(results)


# ---------------------------------------------------------------- config and schedule


def test_config_defaults_are_the_seed_documents() -> None:
    c = PPOConfig()
    assert (c.clip_ratio, c.target_kl, c.value_coef, c.entropy_coef, c.max_grad_norm) == (
        0.2,
        0.01,
        0.5,
        0.01,
        0.5,
    )
    assert (c.epochs, c.minibatch_size, c.lr, c.gamma, c.gae_lambda) == (4, 32, 3e-4, 0.99, 0.95)
    assert c.normalize_advantages and c.final_lr_ratio == 0.1


def test_config_decodes_strictly() -> None:
    assert msgspec.convert({"clip_ratio": 0.1, "target_kl": None}, PPOConfig).target_kl is None
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"clip_ratoi": 0.1}, PPOConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"gamma": 1.5}, PPOConfig)
    with pytest.raises(ValueError):
        PPOConfig(epochs=0)


def test_lr_schedule_warmup_then_linear_decay() -> None:
    # lr_factor(steps, warmup, total, final): environment steps trained on, this update's included.
    assert [lr_factor(s, 4, 14, 0.1) for s in range(1, 5)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(0, 4, 14, 0.1) == 0.25  # never 0: the first update learns a little
    assert lr_factor(9, 4, 14, 0.1) == pytest.approx(0.55)
    assert lr_factor(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert lr_factor(1000, 4, 14, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 0, 0, 0.1) == 1.0  # no warmup, no decay


def test_the_lr_schedule_counts_environment_steps_not_updates() -> None:
    """Seed document 002: warmup then linear decay to 0.1x over total_steps, counted in steps
    trained on: an update of 32 transitions moves it twice as far as one of 16."""
    policy = small_policy()
    config = PPOConfig(lr=1e-3, warmup_steps=32, total_steps=96, epochs=1)
    assert config.schedule_steps == (32, 96)
    learner = PPOUpdater(policy, config)
    small = synthetic_transitions(policy, runs=2, steps=8)  # 16 steps
    large = synthetic_transitions(policy, runs=4, steps=8)  # 32 steps
    lrs = [learner.update(batch).lr for batch in (small, small, large, large, small)]
    # Steps after each: 16 (warmup 0.5), 32 (1.0), 64 (half the decay: 0.55), 96 (0.1), 112 (0.1).
    assert lrs == pytest.approx([5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4])
    # The same updates per update count would have given the same LR to equal update indices;
    # here the two large batches moved the schedule by 32 steps each.
    assert learner.samples == 112


def test_unset_schedule_steps_are_the_update_counts_times_the_rollout() -> None:
    config = PPOConfig(warmup_updates=10, total_updates=1_000, rollout_size=256)
    assert config.schedule_steps == (2_560, 256_000)
    assert PPOConfig(rollout_size=64, warmup_steps=7).schedule_steps == (7, 640_000)


# ---------------------------------------------------------------- sequences and bootstrap


def test_split_sequences_by_run_episode_end_and_gap() -> None:
    def obs(run: str, epoch: int):  # type: ignore[no-untyped-def]
        return make_observation(run, 4, seed=epoch, epoch=epoch)

    a = [obs("a", e) for e in range(6)]
    b = [obs("b", e) for e in range(3)]
    action = np.zeros(5, dtype=np.int64)

    def tr(o, nxt, **kw):  # type: ignore[no-untyped-def]
        return Transition(obs=o, action=action, log_prob=0.0, value=0.0, policy_version=0, next_obs=nxt, **kw)

    transitions = [
        tr(a[0], a[1]),  # 0  a: first sequence
        tr(b[0], b[1]),  # 1  b: interleaved
        tr(a[1], a[2], done=True),  # 2  a: episode ends
        tr(b[1], b[2], truncated=True),  # 3  b: evicted, cut
        tr(a[3], a[4]),  # 4  a: new episode
        tr(obs("a", 4), a[5]),  # 5  a: continues (an equal copy of a[4], as after a reload)
        tr(b[2], None),  # 6  b: new sequence after the truncation
        tr(a[2], a[3]),  # 7  a: not the successor of a[5]: a gap
    ]
    assert split_sequences(transitions) == [[0, 2], [1, 3], [4, 5], [6], [7]]


def test_bootstrap_zero_when_done_and_current_value_otherwise() -> None:
    policy = small_policy()
    batch = synthetic_transitions(policy, runs=3, steps=2)
    batch[-3] = msgspec.structs.replace(batch[-3], done=True, next_obs=None)  # run-0 ends
    batch[-2] = msgspec.structs.replace(batch[-2], truncated=True)  # run-1 evicted: bootstrapped
    batch[-1] = msgspec.structs.replace(batch[-1], next_obs=None)  # run-2: next unknown -> fallback
    sequences = split_sequences(batch)
    assert sequences == [[0, 3], [1, 4], [2, 5]]
    fallback = torch.arange(6, dtype=torch.float32)
    out = bootstrap_values(policy, batch, sequences, fallback)
    expected_truncated = policy.act([batch[4].next_obs], deterministic=True).values[0]  # type: ignore[list-item]
    assert out[0] == 0.0
    torch.testing.assert_close(out[1], expected_truncated)
    assert out[2] == 5.0


def test_learner_advantages_are_gae_per_run() -> None:
    """The grid layout gives each run's GAE exactly as compute_gae on that run alone."""
    policy = small_policy()
    config = PPOConfig(gamma=0.9, gae_lambda=0.8)
    batch = synthetic_transitions(policy, runs=3, steps=5)
    batch[4] = msgspec.structs.replace(batch[4], done=True, next_obs=None)  # run-1 ends at its step 1
    captured = {}
    learner = PPOUpdater(policy, config)

    def spy(*args: object) -> object:
        captured["advantages"], captured["returns"] = args[5], args[6]
        raise NonFiniteError("stop here")

    learner._optimize = spy  # type: ignore[method-assign]
    with pytest.raises(NonFiniteError):
        learner.update(batch)
    for seq in split_sequences(batch):
        rewards = torch.tensor([batch[i].reward for i in seq])
        values = torch.tensor([batch[i].value for i in seq])
        dones = torch.tensor([float(batch[i].done) for i in seq])
        last = batch[seq[-1]]
        last_value = 0.0 if last.done else float(policy.act([last.next_obs]).values[0])  # type: ignore[list-item]
        adv, ret = compute_gae(rewards, values, dones, last_value, 0.9, 0.8)
        torch.testing.assert_close(captured["advantages"][seq], adv)
        torch.testing.assert_close(captured["returns"][seq], ret)
    assert split_sequences(batch)[1] == [1, 4]  # run-1's episode was cut after step 1


# ---------------------------------------------------------------- the update


def test_one_update_changes_parameters_and_returns_finite_stats() -> None:
    policy = small_policy()
    learner = PPOUpdater(policy, PPOConfig(warmup_updates=0, target_kl=None, minibatch_size=16))
    batch = synthetic_transitions(policy, runs=4, steps=16)
    before = parameters_of(policy)
    stats = learner.update(batch)
    assert not same_parameters(before, parameters_of(policy))
    assert_finite_stats(stats)
    assert stats.algorithm == "ppo" and stats.update == 1 and stats.samples == 64
    assert stats.steps == 4 * 4 and stats.epochs_run == 4 and not stats.early_stopped
    assert stats.entropy > 0 and stats.grad_norm > 0 and stats.td_errors == []
    assert learner.updates == 1 and learner.samples == 64
    assert policy.version == 0  # publishing (and the version bump) is the caller's job


class _CollatingEachMinibatch:
    """A policy as PPOUpdater sees any PolicyBundle that cannot pack a rollout: it hands each
    minibatch's observations to `evaluate`, which collates them (the path before rollouts were
    collated once per update)."""

    def __init__(self, policy: PolicyBundle) -> None:
        self._policy = policy

    def __getattr__(self, name: str) -> object:
        return getattr(self._policy, name)


@pytest.mark.parametrize("size", [3, 32])  # a dense adjacency, a CSR one (with its transpose)
def test_packed_minibatch_evaluates_like_per_sample_collation(size: int) -> None:
    policy = small_policy()
    transitions = synthetic_transitions(policy, runs=8, steps=8)
    observations = [t.obs for t in transitions]
    actions = stack_actions(transitions, torch.device("cpu"))
    idx = torch.randperm(len(transitions), generator=torch.Generator().manual_seed(size))[:size]
    packed = policy.pack(observations).select(idx.numpy(), training=True)
    assert (packed.adjacency_t is None) == (size == 3)

    def evaluated(inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
        result = policy.evaluate(inputs, actions[idx])
        outputs = torch.stack([result.log_probs, result.values, result.entropy])
        grads = torch.autograd.grad(outputs.sum(), list(policy.parameters()))
        return outputs.detach(), list(grads)

    ours, our_grads = evaluated(packed)
    collated, collated_grads = evaluated([observations[i] for i in idx.tolist()])  # what PPO did
    torch.testing.assert_close(ours, collated, rtol=0, atol=0)
    assert same_parameters(our_grads, collated_grads)
    # Autograd's own backward through the CSR product (collated without the transpose).
    plain = collate(
        [observations[i] for i in idx.tolist()], policy.device, lever_mask=lever_logits_mask(policy.levers)
    )
    _, plain_grads = evaluated(plain)
    for a, b in zip(our_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Each transition on its own: a batch of one graph, as the recorder's act saw it.
    singles = [policy.evaluate([observations[i]], actions[i : i + 1]) for i in idx.tolist()]
    for row, name in enumerate(("log_probs", "values", "entropy")):
        expected = torch.cat([getattr(r, name) for r in singles]).detach()
        torch.testing.assert_close(ours[row], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0], torch.tensor([transitions[i].log_prob for i in idx.tolist()]))


@pytest.mark.parametrize("name", ["gnn", "lstm"])
def test_update_on_the_packed_rollout_matches_collating_each_minibatch(name: str) -> None:
    transitions = synthetic_transitions(small_policy(name), runs=4, steps=16)
    config = PPOConfig(warmup_updates=0, target_kl=None, minibatch_size=16, seed=3)
    results = []
    for wrap in (False, True):
        policy = small_policy(name)
        learner = PPOUpdater(_CollatingEachMinibatch(policy) if wrap else policy, config)  # type: ignore[arg-type]
        stats = [learner.update(transitions) for _ in range(2)]
        results.append((stats, parameters_of(policy)))
    (packed_stats, packed_params), (plain_stats, plain_params) = results
    for ours, theirs in zip(packed_stats, plain_stats, strict=True):
        assert ours.steps == theirs.steps == 16
        for field in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm"):
            assert getattr(ours, field) == pytest.approx(getattr(theirs, field), rel=1e-5, abs=1e-7), field
    for a, b in zip(packed_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_minibatch_ratio_is_one_on_policy() -> None:
    policy = small_policy()
    learner = PPOUpdater(policy, PPOConfig(epochs=1, minibatch_size=64))
    stats = learner.update(synthetic_transitions(policy, runs=4, steps=16))
    assert stats.approx_kl == pytest.approx(0.0, abs=1e-6)
    assert stats.clip_fraction == 0.0


def test_recurrent_policy_updates_from_recorded_states() -> None:
    policy = small_policy("lstm")
    learner = PPOUpdater(policy, PPOConfig(warmup_updates=0, epochs=1, minibatch_size=64))
    batch = synthetic_transitions(policy, runs=4, steps=16)
    assert batch[-1].hidden is not None and np.abs(batch[-1].hidden).sum() > 0
    before = parameters_of(policy)
    stats = learner.update(batch)
    assert stats.approx_kl == pytest.approx(0.0, abs=1e-6)  # evaluate replays the recorded states
    assert not same_parameters(before, parameters_of(policy))


def test_recurrent_policy_learns_through_time() -> None:
    # The same batch, the same initial weights: unrolling pieces of 16 steps (BPTT) gives other
    # gradients than replaying each step from its recorded state (bptt_length 1), and both start
    # on-policy (the unroll reaches the recorded states again).
    batch = synthetic_transitions(small_policy("lstm"), runs=4, steps=16)
    after = {}
    for length in (1, 16):
        policy = small_policy("lstm")
        learner = PPOUpdater(
            policy, PPOConfig(warmup_updates=0, epochs=1, minibatch_size=64, bptt_length=length)
        )
        stats = learner.update(batch)
        assert stats.approx_kl == pytest.approx(0.0, abs=1e-6) and stats.steps == 1
        after[length] = parameters_of(policy)
    assert not same_parameters(after[1], after[16])


def test_bptt_chunks_and_minibatches_keep_whole_pieces() -> None:
    assert bptt_chunks([[0, 2, 4, 6, 8], [1, 3]], 2) == [[0, 2], [4, 6], [8], [1, 3]]
    groups = _minibatches([[0, 2], [4, 6], [8], [1, 3]], 3)
    assert groups == [[[0, 2], [4, 6]], [[8], [1, 3]]]  # a group closes once it has 3 steps
    assert _minibatches([[i] for i in range(5)], 2) == [[[0], [1]], [[2], [3]], [[4]]]


def test_kl_early_stop_with_a_huge_lr() -> None:
    policy = small_policy()
    learner = PPOUpdater(policy, PPOConfig(lr=1.0, warmup_updates=0, minibatch_size=16, max_grad_norm=10.0))
    stats = learner.update(synthetic_transitions(policy, runs=4, steps=16, reward_scale=10.0))
    assert stats.early_stopped
    assert stats.approx_kl > 1.5 * 0.01
    assert 1 <= stats.steps < 16 and stats.epochs_run < 4
    assert_finite_stats(stats)


def test_no_early_stop_without_target_kl() -> None:
    policy = small_policy()
    learner = PPOUpdater(policy, PPOConfig(lr=0.05, warmup_updates=0, minibatch_size=16, target_kl=None))
    stats = learner.update(synthetic_transitions(policy, runs=4, steps=8))
    assert not stats.early_stopped and stats.steps == 4 * 2


def test_nan_reward_raises_and_leaves_everything_unchanged() -> None:
    policy = small_policy()
    learner = PPOUpdater(policy, PPOConfig(warmup_updates=0))
    learner.update(synthetic_transitions(policy, runs=4, steps=8, seed=1))  # some optimizer state
    batch = synthetic_transitions(policy, runs=4, steps=8, seed=2)
    batch[5] = msgspec.structs.replace(batch[5], reward=float("nan"))
    before, optim_before = (
        parameters_of(policy),
        learner.optimizer.state_dict()["state"][0]["exp_avg"].clone(),
    )
    with pytest.raises(NonFiniteError):
        learner.update(batch)
    assert same_parameters(before, parameters_of(policy))
    assert torch.equal(optim_before, learner.optimizer.state_dict()["state"][0]["exp_avg"])
    assert learner.updates == 1 and learner.samples == 32


def test_non_finite_loss_mid_update_restores_weights_and_optimizer() -> None:
    policy = small_policy()
    learner = PPOUpdater(policy, PPOConfig(warmup_updates=0, target_kl=None, minibatch_size=8))
    batch = synthetic_transitions(policy, runs=4, steps=8)
    before = parameters_of(policy)
    real_evaluate, calls = policy.evaluate, []

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        result = real_evaluate(*args, **kwargs)
        if len(calls) == 4:  # bootstrap, then two minibatches stepped: values blow up
            return type(result)(result.log_probs, result.values * float("inf"), result.entropy)
        return result

    policy.evaluate = poisoned  # type: ignore[method-assign]
    with pytest.raises(NonFiniteError):
        learner.update(batch)
    assert len(calls) == 4
    assert same_parameters(before, parameters_of(policy))
    assert learner.optimizer.state_dict()["state"] == {}
    assert learner.updates == 0


def test_checkpoint_round_trip_resumes_identically() -> None:
    """Weights + learner state saved after update 1 give the very same update 2 in a new learner."""
    config = PPOConfig(lr=1e-3, warmup_updates=1, total_updates=5)
    policy = small_policy()
    learner = PPOUpdater(policy, config)
    first = learner.update(synthetic_transitions(policy, runs=4, steps=8, seed=1))
    assert first.lr == pytest.approx(1e-3 * 32 / 256)  # 32 of the 256 warmup steps (1 update of 256)

    saved = saved_and_loaded(policy, learner)

    batch = synthetic_transitions(policy, runs=4, steps=8, seed=2)
    expected = learner.update(batch)

    resumed_policy = small_policy(init_seed=123)
    resumed_policy.load_state_dict(saved["weights"])
    resumed = PPOUpdater(resumed_policy, config)
    resumed.load_state_dict(saved["learner"])
    assert resumed.updates == 1 and resumed.samples == 32 and resumed.lr == pytest.approx(first.lr)
    got = resumed.update(batch)
    assert got.update == expected.update == 2
    assert (got.policy_loss, got.value_loss, got.lr, got.steps) == (
        expected.policy_loss,
        expected.value_loss,
        expected.lr,
        expected.steps,
    )
    assert same_parameters(parameters_of(policy), parameters_of(resumed_policy))


def test_a_state_saved_by_the_unfused_adam_resumes_on_the_fused_kernel() -> None:
    """Optimizer states saved before Adam ran fused (their flags say so) load, switch to the fused
    kernel, and give the update the unfused Adam gives, up to float rounding."""
    config = PPOConfig(lr=1e-3, warmup_updates=0)
    policy = small_policy()
    unfused = PPOUpdater(policy, config)
    unfused.optimizer = torch.optim.Adam(unfused.params, lr=config.lr, eps=config.adam_eps, foreach=False)
    unfused.update(synthetic_transitions(policy, runs=4, steps=8, seed=1))
    saved = saved_and_loaded(policy, unfused)
    assert not saved["learner"]["optimizer"]["param_groups"][0]["fused"]

    batch = synthetic_transitions(policy, runs=4, steps=8, seed=2)
    expected = unfused.update(batch)
    resumed_policy = small_policy(init_seed=123)
    resumed_policy.load_state_dict(saved["weights"])
    resumed = PPOUpdater(resumed_policy, config)
    resumed.load_state_dict(saved["learner"])
    assert resumed.optimizer.param_groups[0]["fused"]
    got = resumed.update(batch)
    assert got.policy_loss == pytest.approx(expected.policy_loss, rel=1e-4, abs=1e-6)
    for a, b in zip(parameters_of(policy), parameters_of(resumed_policy), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clip_grad_norm_is_torchs() -> None:
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    for scale in (10.0, 1e-3):  # clipped, and left alone
        (sum(p.sum() for p in params) * scale).backward()
        expected = [p.grad.clone() for p in params]
        expected_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        got = [p.grad.clone() for p in params]
        for p, g in zip(params, expected, strict=True):
            p.grad = g.clone()
        assert torch.equal(clip_grad_norm(params, 0.5), expected_norm)
        assert same_parameters([p.grad for p in params], got)
        for p in params:
            p.grad = None


def test_state_of_another_algorithm_is_refused() -> None:
    learner = PPOUpdater(small_policy())
    with pytest.raises(ValueError, match="impala"):
        learner.load_state_dict({**learner.state_dict(), "algorithm": "impala"})


def test_rule_based_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        PPOUpdater(create_policy("heuristic", PolicyConfig(), "cpu"))


# ---------------------------------------------------------------- learning in the simulator


@pytest.mark.slow
def test_ppo_improves_a_small_gnn_policy_on_the_simulator() -> None:
    """Fixed seed, fixed budget: 20 updates of 256 on-policy transitions (128 episodes). The mean
    return of the sampling policy on 40 held-out episodes rises by at least 0.25 (untrained: about
    4.2). Which seed lands where is chaotic in float rounding: the fused Adam and the all-heads
    distribution (rounding-level differences) moved seed 0 from +0.61 to +0.29, while over torch/sim
    seeds 0-9 the gains are alike before (+0.33 to +0.76, mean +0.52) and after (+0.29 to +0.74,
    mean +0.55); so the bar sits below the spread, not at a seed's draw.
    LR 1e-3 and target KL 0.02 instead of 3e-4 / 0.01 so that this short budget suffices (at the
    defaults the KL stop holds each update to a few steps: +0.4 to +0.8); everything else is the
    seed documents' defaults."""
    from esperd.sim import SimConfig, SimEnv

    torch.manual_seed(0)
    policy = small_policy()
    before = mean_return(policy)
    config = PPOConfig(lr=1e-3, target_kl=0.02, warmup_updates=0, total_updates=0, rollout_size=256)
    learner = PPOUpdater(policy, config)
    env = SimEnv(8, SimConfig(), seed=0)
    observations = env.reset()
    start = time.perf_counter()
    for _ in range(20):
        transitions, observations = collect(env, policy, observations, steps=config.rollout_size // 8)
        stats = learner.update(transitions)
        assert_finite_stats(stats)
    elapsed = time.perf_counter() - start
    after = mean_return(policy)
    assert after > before + 0.25, f"mean return {before:.3f} -> {after:.3f} after {elapsed:.1f}s of training"


def test_reset_optimizer_forgets_moments_but_keeps_schedule() -> None:
    policy = small_policy()
    learner = PPOUpdater(policy, PPOConfig(warmup_updates=3))
    learner.update(synthetic_transitions(policy, runs=2, steps=8))
    assert learner.optimizer.state_dict()["state"]
    lr = learner.lr
    learner.reset_optimizer()
    assert learner.optimizer.state_dict()["state"] == {} and learner.lr == lr and learner.updates == 1
    assert_finite_stats(learner.update(synthetic_transitions(policy, runs=2, steps=8, seed=3)))
