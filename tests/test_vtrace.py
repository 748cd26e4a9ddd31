"""V-trace against a direct double-loop implementation of the paper's definition."""

from __future__ import annotations

import math

import pytest
import torch

from esperd.learn.vtrace import VTraceReturns, from_importance_weights

torch.set_num_threads(1)


def _clip(x: float, threshold: float | None) -> float:
    return x if threshold is None else min(threshold, x)


def vtrace_loops(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap: torch.Tensor,
    rho_bar: float | None,
    pg_rho_bar: float | None,
    c_bar: float | None = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's sum, term by term: v_s = V(x_s) + sum_t (prod_{i<t} gamma_i c_i) * delta_t V."""
    T, B = log_rhos.shape
    vs = torch.zeros(T, B, dtype=torch.float64)
    pg = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        v = [float(values[t, b]) for t in range(T)] + [float(bootstrap[b])]
        rho = [math.exp(float(log_rhos[t, b])) for t in range(T)]
        for s in range(T):
            total = v[s]
            for t in range(s, T):
                weight = 1.0
                for i in range(s, t):
                    weight *= float(discounts[i, b]) * _clip(rho[i], c_bar)
                delta = _clip(rho[t], rho_bar) * (
                    float(rewards[t, b]) + float(discounts[t, b]) * v[t + 1] - v[t]
                )
                total += weight * delta
            vs[s, b] = total
        for s in range(T):
            v_next = float(vs[s + 1, b]) if s + 1 < T else v[T]
            pg[s, b] = _clip(rho[s], pg_rho_bar) * (
                float(rewards[s, b]) + float(discounts[s, b]) * v_next - v[s]
            )
    return vs, pg


def _random_inputs(T: int, B: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dones = torch.rand(T, B, generator=g) < 0.2
    return {
        "log_rhos": torch.randn(T, B, generator=g, dtype=torch.float64),  # rhos well above and below 1
        "discounts": 0.9 * (~dones).double(),
        "rewards": torch.randn(T, B, generator=g, dtype=torch.float64),
        "values": torch.randn(T, B, generator=g, dtype=torch.float64),
        "bootstrap_value": torch.randn(B, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("T,B", [(1, 1), (1, 7), (5, 3), (12, 4)])
@pytest.mark.parametrize(
    "rho_bar,pg_rho_bar,c_bar",
    [(1.0, 1.0, 1.0), (None, None, None), (0.7, 1.3, 0.9), (2.0, None, 1.0)],
)
def test_matches_double_loop(
    T: int, B: int, rho_bar: float | None, pg_rho_bar: float | None, c_bar: float | None
) -> None:
    inputs = _random_inputs(T, B, seed=T * 100 + B)
    out = from_importance_weights(
        **inputs, clip_rho_threshold=rho_bar, clip_pg_rho_threshold=pg_rho_bar, clip_c_threshold=c_bar
    )
    expected_vs, expected_pg = vtrace_loops(*inputs.values(), rho_bar, pg_rho_bar, c_bar)
    assert isinstance(out, VTraceReturns)
    torch.testing.assert_close(out.vs, expected_vs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.pg_advantages, expected_pg, rtol=1e-10, atol=1e-10)


def test_default_thresholds_are_the_reference_ones() -> None:
    inputs = _random_inputs(6, 3, seed=1)
    out = from_importance_weights(*inputs.values())  # positional, reference order
    expected_vs, expected_pg = vtrace_loops(*inputs.values(), 1.0, 1.0, 1.0)
    torch.testing.assert_close(out.vs, expected_vs)
    torch.testing.assert_close(out.pg_advantages, expected_pg)


def nstep_returns(rewards: torch.Tensor, discounts: torch.Tensor, bootstrap: torch.Tensor) -> torch.Tensor:
    """G_s = r_s + d_s r_{s+1} + ... + (prod d) * bootstrap: Monte Carlo returns with a bootstrap."""
    T = rewards.shape[0]
    out = torch.zeros_like(rewards)
    for s in range(T):
        total, scale = torch.zeros_like(bootstrap), torch.ones_like(bootstrap)
        for t in range(s, T):
            total = total + scale * rewards[t]
            scale = scale * discounts[t]
        out[s] = total + scale * bootstrap
    return out


@pytest.mark.parametrize("T,B", [(1, 4), (8, 5), (20, 2)])
def test_on_policy_without_clipping_is_nstep_return(T: int, B: int) -> None:
    inputs = _random_inputs(T, B, seed=7 + T)
    inputs["log_rhos"] = torch.zeros(T, B, dtype=torch.float64)  # pi == mu
    out = from_importance_weights(**inputs, clip_rho_threshold=None, clip_pg_rho_threshold=None)
    expected = nstep_returns(inputs["rewards"], inputs["discounts"], inputs["bootstrap_value"])
    torch.testing.assert_close(out.vs, expected)
    # The policy-gradient advantage is then the one-step-bootstrapped n-step advantage.
    next_vs = torch.cat([expected[1:], inputs["bootstrap_value"][None]])
    torch.testing.assert_close(
        out.pg_advantages, inputs["rewards"] + inputs["discounts"] * next_vs - inputs["values"]
    )


def test_outputs_carry_no_graph() -> None:
    inputs = {k: v.float().requires_grad_(k == "values") for k, v in _random_inputs(4, 2, seed=3).items()}
    out = from_importance_weights(**inputs)
    assert not out.vs.requires_grad and not out.pg_advantages.requires_grad


def test_shape_errors() -> None:
    inputs = _random_inputs(4, 2, seed=0)
    with pytest.raises(ValueError, match="bootstrap_value"):
        from_importance_weights(**{**inputs, "bootstrap_value": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="rewards"):
        from_importance_weights(**{**inputs, "rewards": torch.zeros(4, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="time-major"):
        from_importance_weights(**{k: v.flatten() for k, v in inputs.items()})
