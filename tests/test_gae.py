"""GAE against a straightforward loop, and its lam = 1 / lam = 0 limits."""

from __future__ import annotations

import pytest
import torch

from esperd.learn.gae import compute_gae

torch.set_num_threads(1)


def gae_loop(
    rewards: list[float], values: list[float], dones: list[float], last_value: float, gamma: float, lam: float
) -> list[float]:
    """A_t = sum_k (gamma lam)^k delta_{t+k}, stopping after the step that ends the episode."""
    T = len(rewards)
    next_values = values[1:] + [last_value]
    deltas = [rewards[t] + gamma * (1 - dones[t]) * next_values[t] - values[t] for t in range(T)]
    out = []
    for t in range(T):
        total, scale = 0.0, 1.0
        for k in range(t, T):
            total += scale * deltas[k]
            if dones[k]:
                break
            scale *= gamma * lam
        out.append(total)
    return out


def _random(T: int, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, B, generator=g, dtype=torch.float64)
    values = torch.randn(T, B, generator=g, dtype=torch.float64)
    dones = (torch.rand(T, B, generator=g) < 0.25).double()
    dones[T // 2] = 1.0  # always an episode end in the middle
    last_value = torch.randn(B, generator=g, dtype=torch.float64)
    return rewards, values, dones, last_value


@pytest.mark.parametrize("T,B", [(1, 1), (6, 3), (25, 4)])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_matches_loop_time_major(T: int, B: int, gamma: float, lam: float) -> None:
    rewards, values, dones, last_value = _random(T, B, seed=T + B)
    advantages, returns = compute_gae(rewards, values, dones, last_value, gamma, lam)
    for b in range(B):
        expected = gae_loop(
            rewards[:, b].tolist(),
            values[:, b].tolist(),
            dones[:, b].tolist(),
            float(last_value[b]),
            gamma,
            lam,
        )
        torch.testing.assert_close(advantages[:, b], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(returns, advantages + values)


def test_one_dimensional_inputs_and_float_last_value() -> None:
    rewards, values, dones, last_value = _random(10, 1, seed=3)
    r, v, d = rewards[:, 0], values[:, 0], dones[:, 0]
    advantages, returns = compute_gae(r, v, d, float(last_value[0]), 0.97, 0.9)
    expected = gae_loop(r.tolist(), v.tolist(), d.tolist(), float(last_value[0]), 0.97, 0.9)
    assert advantages.shape == (10,)
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(returns, advantages + v)


def discounted_returns(
    rewards: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor, gamma: float
) -> torch.Tensor:
    out = torch.zeros_like(rewards)
    running = last_value.clone()
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * (1 - dones[t]) * running
        out[t] = running
    return out


def test_lambda_one_is_discounted_return_minus_value() -> None:
    rewards, values, dones, last_value = _random(15, 3, seed=11)
    advantages, returns = compute_gae(rewards, values, dones, last_value, 0.95, 1.0)
    expected_returns = discounted_returns(rewards, dones, last_value, 0.95)
    torch.testing.assert_close(returns, expected_returns)
    torch.testing.assert_close(advantages, expected_returns - values)


def test_lambda_zero_is_td_error() -> None:
    rewards, values, dones, last_value = _random(15, 3, seed=12)
    advantages, _ = compute_gae(rewards, values, dones, last_value, 0.95, 0.0)
    next_values = torch.cat([values[1:], last_value[None]])
    torch.testing.assert_close(advantages, rewards + 0.95 * (1 - dones) * next_values - values)


def test_done_at_last_step_ignores_last_value() -> None:
    rewards = torch.tensor([1.0, 2.0])
    values = torch.tensor([0.5, 0.5])
    dones = torch.tensor([0.0, 1.0])
    a1, _ = compute_gae(rewards, values, dones, 100.0, 0.9, 0.9)
    a2, _ = compute_gae(rewards, values, dones, -100.0, 0.9, 0.9)
    torch.testing.assert_close(a1, a2)


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        compute_gae(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 2), torch.zeros(2), 0.9, 0.9)
    with pytest.raises(ValueError):
        compute_gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), 0.9, 0.9)
