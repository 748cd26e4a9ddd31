"""IMPALA (Espeholt et al. 2018): off-policy actor-critic with V-trace targets.

Commands made by older policy versions keep arriving after a hot swap, and a replay
buffer hands back steps of any age; V-trace corrects for the gap between the policy
that acted (mu: the log-prob recorded in the Transition) and the one being trained
(pi: `policy.evaluate` on the recorded action).

One `update(transitions, weights)` is one learner step, as in the reference
(deepmind/scalable_agent experiment.py):

  log_rho  = log pi(a|x) - log mu(a|x)                 (target minus behaviour)
  vs, pg_advantages = vtrace.from_importance_weights(log_rho, gamma * (1 - done), r, V, V_boot)
  loss     = sum_i w_i * ( -pg_advantage_i * log pi(a_i|x_i)              policy gradient
                           + baseline_coef * 0.5 * (vs_i - V(x_i))^2        baseline
                           - entropy_coef * H(pi(.|x_i)) )                  entropy bonus

then gradient-norm clipping and RMSprop. Losses are sums over the batch, as in the
reference, which the default LR, RMSprop epsilon and max grad norm (40) are tuned for.
`w` are importance weights from prioritized replay (1 when None).

Sequences: transitions are grouped like PPO's (`split_sequences`): a run's contiguous
steps (each one's next_obs is the next one's obs) form one V-trace sequence, so traces
flow across steps when the buffer hands out contiguous runs; steps sampled uniformly or
by priority are mostly isolated, and then V-trace reduces to its one-step form with the
bootstrap V(next_obs) from the current network (0 when the episode ended; an evicted,
truncated run is bootstrapped). Both are exact V-trace for their segment lengths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import torch
from msgspec import Meta
from torch import nn

from esperd.learn.config import ImpalaConfig
from esperd.learn.experience import Transition
from esperd.learn.ppo import (
    NonFiniteError,
    SequenceLayout,
    UpdateStats,
    bootstrap_values,
    bptt_chunks,
    check_finite,
    explained_variance,
    split_sequences,
    stack_actions,
    stack_hidden,
)
from esperd.learn.vtrace import from_importance_weights
from esperd.policy.base import PolicyBundle

__all__ = ["ImpalaConfig", "ImpalaUpdater", "NonFiniteError", "UpdateStats"]

Threshold = Annotated[float, Meta(gt=0.0)]
Coef = Annotated[float, Meta(ge=0.0, le=1e3)]


class ImpalaUpdater:
    """Trains a learnable PolicyBundle in place with V-trace actor-critic. One caller at a time.

    It never touches `policy.version`; whoever publishes the new weights does (the Learner,
    esperd.learn.learner, which orchestrates; esperd.learn.algorithms is its loop side).
    """

    algorithm = "impala"

    def __init__(self, policy: PolicyBundle, config: ImpalaConfig | None = None) -> None:
        if not policy.is_learnable:
            raise ValueError(f"policy {policy.name!r} has no parameters to learn")
        self.policy = policy
        self.config = config = config or ImpalaConfig()
        self.device = torch.device(policy.device)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.RMSprop(
            self.params,
            lr=config.lr,
            alpha=config.rmsprop_alpha,
            eps=config.rmsprop_eps,
            momentum=config.rmsprop_momentum,
        )
        self.updates = 0
        self.samples = 0

    def update(
        self,
        transitions: Sequence[Transition],
        weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ) -> UpdateStats:
        """One learner step on `transitions`; `weights` [n] are prioritized-replay importance weights.

        The returned stats carry `td_errors`: |vs - V(x)| per transition, for new priorities.
        """
        if not transitions:
            raise ValueError("impala: no transitions to learn from")
        start = time.perf_counter()
        cfg, device, n = self.config, self.device, len(transitions)

        rewards = torch.tensor([t.reward for t in transitions], dtype=torch.float32, device=device)
        dones = torch.tensor([t.done for t in transitions], dtype=torch.float32, device=device)
        behaviour_log_probs = torch.tensor(
            [t.log_prob for t in transitions], dtype=torch.float32, device=device
        )
        w = torch.ones(n, device=device) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        w = w.to(device)
        if w.shape != (n,):
            raise ValueError(f"impala: weights must be [{n}], got {tuple(w.shape)}")
        check_finite("rewards, log-probs or weights in the batch", rewards, behaviour_log_probs, w)

        # The target policy and baseline, with gradients, on the recorded actions; a recurrent
        # policy unrolls each run's contiguous steps through time (pieces of bptt_length).
        sequences = split_sequences(transitions)
        hidden = stack_hidden(self.policy, transitions, device)
        result = self.policy.evaluate(
            [t.obs for t in transitions],
            stack_actions(transitions, device),
            hidden,
            sequences=None if hidden is None else bptt_chunks(sequences, cfg.bptt_length),
        )
        target_log_probs, values = result.log_probs, result.values

        # V-trace over each run's contiguous sequences at once (right-aligned [T, S] grid).
        layout = SequenceLayout(sequences, device)
        bootstrap = bootstrap_values(self.policy, transitions, sequences, values.detach())
        log_rhos = target_log_probs.detach() - behaviour_log_probs
        vtrace = from_importance_weights(
            log_rhos=layout.grid(log_rhos),
            discounts=layout.grid(cfg.gamma * (1.0 - dones)),
            rewards=layout.grid(rewards),
            values=layout.grid(values.detach()),
            bootstrap_value=bootstrap,
            clip_rho_threshold=cfg.rho_bar,
            clip_pg_rho_threshold=cfg.pg_rho_bar,
            clip_c_threshold=cfg.c_bar,
        )
        vs, pg_advantages = layout.flat(vtrace.vs), layout.flat(vtrace.pg_advantages)

        # Summed losses, as in the reference; each sample's terms scaled by its importance weight.
        pg_loss = -(w * pg_advantages * target_log_probs).sum()
        baseline_loss = 0.5 * (w * (vs - values) ** 2).sum()
        entropy = (w * result.entropy).sum()
        loss = pg_loss + cfg.baseline_coef * baseline_loss - cfg.entropy_coef * entropy
        check_finite("impala loss", loss)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # never step on these
            raise NonFiniteError("non-finite impala gradients")
        self.optimizer.step()
        self.updates += 1
        self.samples += n

        with torch.no_grad():
            rhos = log_rhos.exp()
            approx_kl = float(((rhos - 1) - log_rhos).mean())
            clip_fraction = 0.0 if cfg.rho_bar is None else float((rhos > cfg.rho_bar).float().mean())
            cs = rhos if cfg.c_bar is None else rhos.clamp(max=cfg.c_bar)
            c_clip = 0.0 if cfg.c_bar is None else float((rhos > cfg.c_bar).float().mean())
            pg_clip = 0.0 if cfg.pg_rho_bar is None else float((rhos > cfg.pg_rho_bar).float().mean())
            td_errors = (vs - values.detach()).abs()
        return UpdateStats(
            algorithm=self.algorithm,
            update=self.updates,
            samples=n,
            policy_loss=pg_loss.item() / n,
            value_loss=baseline_loss.item() / n,
            entropy=result.entropy.detach().mean().item(),
            approx_kl=approx_kl,
            clip_fraction=clip_fraction,
            grad_norm=float(grad_norm),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            epochs_run=1,
            steps=1,
            early_stopped=False,
            explained_variance=explained_variance(values.detach(), vs),
            seconds=time.perf_counter() - start,
            td_errors=td_errors.cpu().tolist(),
            rho_mean=float(rhos.mean()),
            c_mean=float(cs.mean()),
            importance_weight_mean=float(w.mean()),
            c_clip_fraction=c_clip,
            pg_clip_fraction=pg_clip,
            unrolls=len(sequences),
        )

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state and counters (tensors and plain values: `torch.load(weights_only=True)`
        reads it back). The policy's weights are saved separately."""
        return {
            "algorithm": self.algorithm,
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("algorithm", self.algorithm) != self.algorithm:
            raise ValueError(f"learner state is for {state['algorithm']!r}, not {self.algorithm!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        self.samples = int(state["samples"])

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moment estimates (after a rollback they describe bad updates);
        the LR schedule and counters are kept."""
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
