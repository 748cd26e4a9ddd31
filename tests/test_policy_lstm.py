"""LSTM policy: per-run recurrent state, masks, batching, act/evaluate consistency, gradients."""

from __future__ import annotations

import msgspec
import pytest
import torch

from esperd.analyzer.observation import OP_INDEX
from esperd.policy import LSTMPolicy, PolicyBundle, PolicyConfig, create_policy
from esperd.policy.batch import collate
from esperd_contracts import Op
from tests.support.actions import legality_problem
from tests.support.observations import make_observation, mixed_batch

GERMINATE = OP_INDEX[Op.GERMINATE]


def make_policy(**overrides: object) -> LSTMPolicy:
    return create_policy("lstm", PolicyConfig(name="lstm", hidden_size=64, lstm_hidden=32, **overrides))


def test_is_a_recurrent_policy_bundle() -> None:
    policy = make_policy()
    assert isinstance(policy, PolicyBundle)
    assert policy.name == "lstm" and policy.is_learnable and policy.is_recurrent


def test_hidden_state_is_kept_per_run() -> None:
    policy = make_policy()
    a, b = make_observation("a", 5, seed=1), make_observation("b", 5, seed=2)
    first = policy.act([a, b], deterministic=True)
    assert torch.count_nonzero(first.hidden) == 0  # new runs start from zeros
    state_a = policy.hidden_state("a")
    assert state_a is not None and torch.count_nonzero(state_a) > 0
    second = policy.act([a], deterministic=True)
    torch.testing.assert_close(second.hidden[0], state_a)  # continued from where "a" was
    assert not torch.equal(policy.hidden_state("a"), state_a)  # and advanced
    # The same observation gives a different output once the run has history.
    assert second.values[0].item() != pytest.approx(first.values[0].item(), abs=1e-7)


def test_reset_and_forget_drop_state() -> None:
    policy = make_policy()
    policy.act([make_observation("a", 3), make_observation("b", 3)])
    policy.reset_run("a")
    assert policy.hidden_state("a") is None and policy.hidden_state("b") is not None
    policy.forget(["b", "never-seen"])
    assert policy.tracked_runs == 0
    assert torch.count_nonzero(policy.act([make_observation("a", 3)]).hidden) == 0


def test_hidden_store_is_bounded_lru() -> None:
    policy = make_policy(lstm_max_runs=3)
    for i in range(5):
        policy.act([make_observation(f"r{i}", 3, seed=i)])
    policy.act([make_observation("r2", 3, seed=2)])  # touch r2: most recent now
    policy.act([make_observation("r5", 3, seed=5)])
    assert policy.tracked_runs == 3
    assert [r for r in ("r0", "r1", "r2", "r3", "r4", "r5") if policy.hidden_state(r) is not None] == [
        "r2",
        "r4",
        "r5",
    ]


def test_sampled_actions_are_always_legal() -> None:
    policy = make_policy()
    observations = mixed_batch([1, 3, 8, 17] * 5, seed=4)
    torch.manual_seed(0)
    for _ in range(40):
        result = policy.act(observations)
        for obs, action in zip(observations, result.actions.tolist(), strict=True):
            problem = legality_problem(obs, action)
            assert problem is None, problem
    dist = policy.distribution(observations)
    assert torch.all(dist.op_probs()[~collate(observations, policy.device).op_mask] == 0.0)


def test_batched_equals_one_by_one() -> None:
    batched_policy, single_policy = make_policy(), make_policy()  # same init_seed: same weights
    observations = mixed_batch([4, 12, 1, 30], seed=6)
    for _step in range(3):  # several steps: recurrent state must evolve identically
        batched = batched_policy.act(observations, deterministic=True)
        for i, obs in enumerate(observations):
            single = single_policy.act([obs], deterministic=True)
            assert single.actions[0].tolist() == batched.actions[i].tolist()
            assert single.log_probs[0].item() == pytest.approx(batched.log_probs[i].item(), abs=1e-5)
            assert single.values[0].item() == pytest.approx(batched.values[i].item(), abs=1e-5)
    for obs in observations:
        torch.testing.assert_close(
            batched_policy.hidden_state(obs.run_id), single_policy.hidden_state(obs.run_id)
        )


def test_evaluate_with_stored_hidden_matches_act() -> None:
    policy = make_policy()
    observations = mixed_batch([3, 7, 11], seed=8)
    torch.manual_seed(2)
    policy.act(observations)  # step 1: state is non-zero afterwards
    acted = policy.act(observations)  # step 2
    assert torch.count_nonzero(acted.hidden) > 0
    evaluated = policy.evaluate(observations, acted.actions, hidden=acted.hidden)
    torch.testing.assert_close(evaluated.log_probs.detach(), acted.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(evaluated.values.detach(), acted.values, atol=1e-5, rtol=0)
    fresh = policy.evaluate(observations, acted.actions)  # hidden=None means zeros: differs
    assert not torch.allclose(fresh.values, evaluated.values)


def test_explicit_hidden_must_have_the_right_shape() -> None:
    policy = make_policy()
    with pytest.raises(ValueError, match="hidden must have shape"):
        policy.act([make_observation("a", 3)], hidden=torch.zeros(1, 2, 7))


def test_gradients_flow_through_evaluate_and_lstm() -> None:
    policy = make_policy()
    observations = mixed_batch([4, 9], seed=3)
    acted = policy.act(observations)
    acted = policy.act(observations)
    policy.train()
    result = policy.evaluate(observations, acted.actions, hidden=acted.hidden)
    (-(result.log_probs.mean()) - 0.01 * result.entropy.mean() + result.values.pow(2).mean()).backward()
    grads = dict(policy.base_network.named_parameters())
    for name in (
        "cell.weight_ih",
        "cell.weight_hh",
        "run_encoder.0.weight",
        "node_head.2.weight",
        "value_head.weight",
    ):
        grad = grads[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def _played(policy: LSTMPolicy, runs: int = 3, steps: int = 6):  # type: ignore[no-untyped-def]
    """Several runs acted on for several steps, interleaved as the daemon batches them:
    (observations, actions, stored hidden, act log-probs, sequences by run)."""
    observations, actions, hidden, log_probs = [], [], [], []
    sequences: list[list[int]] = [[] for _ in range(runs)]
    torch.manual_seed(4)
    for step in range(steps):
        batch = [make_observation(f"r{r}", 4 + r, seed=100 * r + step) for r in range(runs)]
        result = policy.act(batch)
        for r in range(runs):
            sequences[r].append(len(observations))
            observations.append(batch[r])
        actions.append(result.actions)
        hidden.append(result.hidden)
        log_probs.append(result.log_probs)
    return observations, torch.cat(actions), torch.cat(hidden), torch.cat(log_probs), sequences


def test_unrolled_sequences_reproduce_act_and_backpropagate_through_time() -> None:
    policy = make_policy(dropout=0.0)
    observations, actions, hidden, log_probs, sequences = _played(policy)
    unrolled = policy.evaluate(observations, actions, hidden, sequences=sequences)
    # Same weights: unrolling from each run's first stored state reaches every later state again.
    torch.testing.assert_close(unrolled.log_probs.detach(), log_probs, atol=1e-5, rtol=0)
    single = policy.evaluate(observations, actions, hidden)
    torch.testing.assert_close(single.log_probs.detach(), log_probs, atol=1e-5, rtol=0)

    # What differs is the gradient: a late step's loss reaches the first step's input only
    # through time. Perturb the first step of run 0 and see who notices.
    first, last = sequences[0][0], sequences[0][-1]
    changed = list(observations)
    features = observations[first].node_features.copy()
    features += 0.5
    changed[first] = msgspec.structs.replace(observations[first], node_features=features)
    moved = policy.evaluate(changed, actions, hidden, sequences=sequences).log_probs.detach()
    assert moved[last] != pytest.approx(unrolled.log_probs[last].item(), abs=1e-6)
    replayed = policy.evaluate(changed, actions, hidden).log_probs.detach()
    assert replayed[last] == pytest.approx(single.log_probs[last].item(), abs=1e-6)  # no path through time
    others = [i for seq in sequences[1:] for i in seq]
    torch.testing.assert_close(moved[others], unrolled.log_probs.detach()[others])  # runs stay apart

    policy.train()
    loss = -policy.evaluate(observations, actions, hidden, sequences=sequences).log_probs[last]
    loss.backward()
    grads = dict(policy.base_network.named_parameters())
    assert grads["cell.weight_hh"].grad is not None and grads["cell.weight_hh"].grad.abs().sum() > 0


def test_sequences_must_name_each_step_once() -> None:
    policy = make_policy()
    observations, actions, hidden, _, sequences = _played(policy, runs=2, steps=2)
    with pytest.raises(ValueError, match="at most once"):
        policy.evaluate(observations, actions, hidden, sequences=[sequences[0], sequences[0]])
    with pytest.raises(ValueError, match="at most once"):
        policy.evaluate(observations, actions, hidden, sequences=[[0, 99]])
    partial = policy.evaluate(observations, actions, hidden, sequences=[sequences[0]])  # the rest: one by one
    assert partial.log_probs.shape == (len(observations),)
