"""Generalized advantage estimation (Schulman et al. 2016), as CleanRL computes it.

    delta_t = r_t + gamma * (1 - done_t) * V(s_{t+1}) - V(s_t)
    A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
    R_t     = A_t + V(s_t)                       (the value target, "returns")

`dones[t] = 1` means the episode ended after step t (no bootstrap through it);
`V(s_T)` is `last_value`, the value of the state after the last step. lam = 1 gives
discounted (bootstrapped) returns minus values; lam = 0 gives one-step TD errors.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor | float,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) for time-major `[T]` or `[T, B]` inputs; `last_value` is `[]` or `[B]`."""
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [T] or [T, B], got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape or dones.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and dones "
            f"{tuple(dones.shape)} must have the same shape"
        )
    if not values.is_floating_point():
        values = values.float()
    next_value = torch.as_tensor(last_value, dtype=values.dtype, device=values.device)
    next_value = next_value.expand(rewards.shape[1:]) if next_value.dim() == 0 else next_value
    if next_value.shape != rewards.shape[1:]:
        raise ValueError(
            f"last_value must be shaped {tuple(rewards.shape[1:])}, got {tuple(next_value.shape)}"
        )
    not_done = 1.0 - dones.to(values.dtype)

    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(next_value)
    for t in range(rewards.shape[0] - 1, -1, -1):
        delta = rewards[t] + gamma * not_done[t] * next_value - values[t]
        last_gae = delta + gamma * lam * not_done[t] * last_gae
        advantages[t] = last_gae
        next_value = values[t]
    return advantages, advantages + values
