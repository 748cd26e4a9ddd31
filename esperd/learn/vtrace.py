"""V-trace off-policy targets (Espeholt et al. 2018, "IMPALA", section 4.1).

Same name, arguments and semantics as the reference implementation
(deepmind/scalable_agent `vtrace.from_importance_weights`), in torch. All inputs
are time-major: `[T, B]`, with `bootstrap_value` `[B]` the value of the state after
the last step. `discounts[t]` is `gamma * (1 - done[t])`, so a terminal step cuts
both the bootstrap and the trace.

    rho_t  = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t))        (clip_rho_threshold)
    c_t    = min(c_bar,   pi(a_t|x_t) / mu(a_t|x_t))        (clip_c_threshold, 1 in the reference)
    delta_t V = rho_t * (r_t + discount_t * V(x_{t+1}) - V(x_t))
    v_s    = V(x_s) + sum_{t>=s} (prod_{i=s}^{t-1} discount_i * c_i) * delta_t V
           = V(x_s) + delta_s V + discount_s * c_s * (v_{s+1} - V(x_{s+1}))      (recursion used)
    pg_advantage_s = min(pg_rho_bar, pi/mu)_s * (r_s + discount_s * v_{s+1} - V(x_s))

with v_T = bootstrap_value. A threshold of None means no clipping.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class VTraceReturns(NamedTuple):
    """V-trace value targets and policy-gradient advantages, both [T, B] and detached."""

    vs: torch.Tensor
    pg_advantages: torch.Tensor


def _clip(rhos: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return rhos if threshold is None else torch.clamp(rhos, max=threshold)


@torch.no_grad()
def from_importance_weights(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    *,
    clip_c_threshold: float | None = 1.0,
) -> VTraceReturns:
    """V-trace targets from log importance weights log(pi(a|x) / mu(a|x)), all [T, B].

    `clip_c_threshold` (keyword-only, c-bar) is an extension of the reference, which
    fixes it at 1.0; the default reproduces the reference exactly.
    """
    if log_rhos.dim() != 2:
        raise ValueError(f"log_rhos must be time-major [T, B], got shape {tuple(log_rhos.shape)}")
    for name, tensor in (("discounts", discounts), ("rewards", rewards), ("values", values)):
        if tensor.shape != log_rhos.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != log_rhos shape {tuple(log_rhos.shape)}")
    if bootstrap_value.shape != log_rhos.shape[1:]:
        raise ValueError(
            f"bootstrap_value must be [B]={tuple(log_rhos.shape[1:])}, got {tuple(bootstrap_value.shape)}"
        )

    rhos = torch.exp(log_rhos)
    clipped_rhos = _clip(rhos, clip_rho_threshold)
    cs = _clip(rhos, clip_c_threshold)

    values_t_plus_1 = torch.cat([values[1:], bootstrap_value[None]], dim=0)
    deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)

    # Backward recursion on v_s - V(x_s); T is small (a sequence), B is vectorised.
    vs_minus_v = torch.zeros_like(values)
    acc = torch.zeros_like(bootstrap_value)
    for t in range(values.shape[0] - 1, -1, -1):
        acc = deltas[t] + discounts[t] * cs[t] * acc
        vs_minus_v[t] = acc
    vs = vs_minus_v + values

    vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value[None]], dim=0)
    pg_advantages = _clip(rhos, clip_pg_rho_threshold) * (rewards + discounts * vs_t_plus_1 - values)
    return VTraceReturns(vs=vs.detach(), pg_advantages=pg_advantages.detach())
