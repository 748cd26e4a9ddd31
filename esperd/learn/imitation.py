"""Behaviour cloning: fit a learnable policy to a reference policy's recorded decisions.

The warm start of `esperd train --warm-start`: before reinforcement learning begins, the network
is fitted to what a reference policy (the heuristic, say) did, so RL starts from a policy no
worse than the reference instead of from random weights. Knows nothing of the simulator: it
learns from Transitions, whoever made them (`esperd.train.warmstart` records them in the simulator).

Loss per step, minibatch means:

  policy   -log p(reference decision), over the legal actions of the factored distribution
           (esperd.policy.heads). A WAIT is one decision whatever node it names, so its
           likelihood is the marginal sum_n p(n) p(WAIT | n): a reference that writes WAIT on
           node 0 does not teach the node head to prefer node 0 (which may not even be
           choosable). Any other decision: log p(node) + log p(op | node) (+ levers for
           GERMINATE), exactly PPO's log-prob of it. With `lever_smoothing` eps > 0 the levers
           of a GERMINATE (blueprint, blend, tempo) are learned with label smoothing: target
           (1 - eps) on the reference's choice and eps spread evenly over the legal ones. The
           greedy levers stay the reference's, but sampling keeps trying the others, so the RL
           that follows can still find better levers (a reference that always blends the same
           way would otherwise leave a clone that never samples another blend).
  value    value_coef * 0.5 * (V(s) - G)^2, G the discounted return observed after the step
           (gamma of the RL algorithm that follows), over steps whose episode ended in the
           data. Fitting the value head too means the first RL updates get sensible
           advantages instead of ones from a random critic that would push the fitted
           policy off at once.

Agreement (`agreement`): fraction of steps where the policy's greedy decision is the
reference's (both WAIT, or the same node, op and, for GERMINATE, levers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec
import numpy as np
import torch
from torch import nn

from esperd.analyzer.observation import LEVERS, OP_INDEX
from esperd.learn.config import ImitationConfig
from esperd.learn.experience import Transition
from esperd.learn.ppo import check_finite, split_sequences, stack_actions
from esperd.policy.base import ACTION_COLUMN, NODE, OP, PolicyBundle
from esperd.policy.batch import LEVER_COLUMNS
from esperd.policy.heads import FactoredDistribution, counted_lever_mask
from esperd_contracts import Op

__all__ = [
    "DemonstrationAnchor",
    "ImitationConfig",
    "ImitationStats",
    "agreement",
    "discounted_returns",
    "fit_imitation",
    "reference_log_likelihood",
]

_WAIT = OP_INDEX[Op.WAIT]
_MIN = torch.finfo(torch.float32).min


class ImitationStats(msgspec.Struct, kw_only=True):
    """What one fit did; agreement and NLL on `holdout` when given, else on the training steps."""

    steps: int
    samples: int  # training transitions
    value_samples: int  # of which with a complete return (value targets)
    agreement_before: float
    agreement_after: float
    nll_before: float
    nll_after: float
    value_mse_before: float  # on the training steps with a complete return
    value_mse_after: float
    seconds: float


def discounted_returns(transitions: Sequence[Transition], gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(returns float32 [n], complete bool [n]): the discounted return from each step to the end of
    its run's contiguous sequence, and whether that sequence ends its episode (done), i.e. whether
    the return is the whole one rather than cut where the data stops."""
    n = len(transitions)
    returns = np.zeros(n, dtype=np.float64)
    complete = np.zeros(n, dtype=bool)
    for seq in split_sequences(transitions):
        g = 0.0
        ends = transitions[seq[-1]].done
        for i in reversed(seq):
            g = transitions[i].reward + gamma * g
            returns[i] = g
            complete[i] = ends
    return returns.astype(np.float32), complete


def _wait_log_prob(dist: FactoredDistribution) -> torch.Tensor:
    """log sum_n p(n) p(WAIT | n) per graph, [B]."""
    b = dist.batch
    joint = dist.node_logp.reshape(-1)[b.node_slot] + dist.op_logp[:, _WAIT]  # [N_total]
    dense = joint.new_full((b.num_graphs * b.max_nodes,), _MIN).index_put((b.node_slot,), joint)
    return torch.logsumexp(dense.view(b.num_graphs, b.max_nodes), dim=-1)


def reference_actions(
    policy: PolicyBundle, transitions: Sequence[Transition], device: torch.device
) -> torch.Tensor:
    """The reference's action rows as the policy can take them: a lever the policy leaves to the
    host (`[policy] levers`) at the one choice it holds that lever at, whatever the reference set."""
    actions = stack_actions(transitions, device)
    hold = getattr(policy, "held_levers", None)
    return actions if hold is None else hold(actions)


def reference_log_likelihood(dist: FactoredDistribution, actions: torch.Tensor) -> torch.Tensor:
    """log p(reference decision) per graph, [B]; WAIT marginalized over nodes (module doc)."""
    is_wait = actions[:, OP] == _WAIT
    # A WAIT row's node may not be choosable; score its rows as node 0 and discard that score.
    specific = dist.log_prob(torch.where(is_wait.unsqueeze(1), torch.zeros_like(actions), actions))
    return torch.where(is_wait, _wait_log_prob(dist), specific)


def lever_smoothing_term(dist: FactoredDistribution, actions: torch.Tensor) -> torch.Tensor:
    """Per graph, [B]: sum over the levers the row's op samples (GERMINATE's, SET_ALPHA_TARGET's)
    of (mean log p over the legal choices - log p of the reference's choice) at the chosen node
    (0 for other rows). Adding eps times its negative to the log-likelihood gives label-smoothed
    cross-entropy on the levers."""
    counted = counted_lever_mask(actions)  # [B, levers]
    term = torch.zeros(actions.shape[0], device=actions.device)
    acting = torch.nonzero(counted.any(-1)).squeeze(1)
    if acting.numel() == 0:
        return term
    chosen_actions = actions[acting]
    rows = dist.batch.ptr[:-1][acting] + chosen_actions[:, NODE]
    legal_logits = ~dist.batch.illegal_logits[rows]  # [G, NODE_HEAD_DIM]
    smoothing = torch.zeros(acting.numel(), device=actions.device)
    for i, (name, _) in enumerate(LEVERS):
        options = dist.lever_logp(name)[rows]  # [G, choices]
        legal = legal_logits[:, LEVER_COLUMNS[name]]
        uniform = torch.where(legal, options, 0.0).sum(-1) / legal.sum(-1).clamp_min(1)
        column = ACTION_COLUMN[name]
        gap = uniform - options.gather(1, chosen_actions[:, column : column + 1]).squeeze(1)
        smoothing = smoothing + torch.where(counted[acting, i], gap, 0.0)
    return term.index_put((acting,), smoothing)


def _greedy_agrees(dist: FactoredDistribution, actions: torch.Tensor) -> torch.Tensor:
    greedy = dist.sample(deterministic=True)
    both_wait = (greedy[:, OP] == _WAIT) & (actions[:, OP] == _WAIT)
    return both_wait | ((greedy == actions).all(-1) & (actions[:, OP] != _WAIT))


@torch.no_grad()
def agreement(policy: PolicyBundle, transitions: Sequence[Transition], batch_size: int = 512) -> float:
    """Fraction of `transitions` whose recorded decision is the policy's greedy one (module doc)."""
    return _scores(policy, transitions, batch_size)[0]


@torch.no_grad()
def _scores(
    policy: PolicyBundle, transitions: Sequence[Transition], batch_size: int = 512
) -> tuple[float, float]:
    """(agreement, mean NLL of the recorded decisions) over `transitions`."""
    if not transitions:
        return float("nan"), float("nan")
    device = torch.device(policy.device)
    agree, nll = 0, 0.0
    for begin in range(0, len(transitions), batch_size):
        chunk = transitions[begin : begin + batch_size]
        actions = reference_actions(policy, chunk, device)
        dist = policy.distribution([t.obs for t in chunk])  # type: ignore[attr-defined]
        agree += int(_greedy_agrees(dist, actions).sum())
        nll -= float(reference_log_likelihood(dist, actions).double().sum())
    return agree / len(transitions), nll / len(transitions)


@torch.no_grad()
def _value_mse(
    policy: PolicyBundle, transitions: Sequence[Transition], returns: np.ndarray, batch_size: int = 512
) -> float:
    if not transitions:
        return float("nan")
    device = torch.device(policy.device)
    total = 0.0
    for begin in range(0, len(transitions), batch_size):
        chunk = transitions[begin : begin + batch_size]
        values = policy.evaluate([t.obs for t in chunk], reference_actions(policy, chunk, device)).values
        target = torch.from_numpy(returns[begin : begin + len(chunk)]).to(values.device)
        total += float(((values.float() - target) ** 2).sum())
    return total / len(transitions)


def fit_imitation(
    policy: PolicyBundle,
    transitions: Sequence[Transition],
    config: ImitationConfig | None = None,
    holdout: Sequence[Transition] = (),
) -> ImitationStats:
    """Fit `policy` in place to the decisions recorded in `transitions` (module doc).

    `holdout`: other steps of the same reference to report agreement and NLL on (the training
    steps when empty). Raises ValueError on no data, NonFiniteError on a non-finite loss."""
    if not transitions:
        raise ValueError("imitation: no transitions to learn from")
    if not policy.is_learnable:
        raise ValueError(f"imitation: policy {policy.name!r} has no parameters to learn")
    config = config or ImitationConfig()
    started = time.perf_counter()
    device = torch.device(policy.device)
    report_on = holdout or transitions
    agree_before, nll_before = _scores(policy, report_on)

    returns, complete = discounted_returns(transitions, config.gamma)
    value_steps = [t for t, ok in zip(transitions, complete, strict=True) if ok]
    value_mse_before = _value_mse(policy, value_steps, returns[complete])
    actions = reference_actions(policy, transitions, device)
    targets = torch.from_numpy(returns).to(device)
    value_mask = torch.from_numpy(complete).to(device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    n, size = len(transitions), min(config.batch_size, len(transitions))
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for _ in range(config.steps):
        if cursor + size > n:  # a fresh pass over the data in a new order
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + size]
        cursor += size
        batch = [transitions[i] for i in idx.tolist()]
        loss = _loss(policy, batch, actions[idx], targets[idx], value_mask[idx], config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        check_finite("imitation gradients", nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        optimizer.step()

    agree_after, nll_after = _scores(policy, report_on)
    return ImitationStats(
        steps=config.steps,
        samples=n,
        value_samples=len(value_steps),
        agreement_before=agree_before,
        agreement_after=agree_after,
        nll_before=nll_before,
        nll_after=nll_after,
        value_mse_before=value_mse_before,
        value_mse_after=_value_mse(policy, value_steps, returns[complete]),
        seconds=time.perf_counter() - started,
    )


def _loss(
    policy: PolicyBundle,
    batch: list[Transition],
    actions: torch.Tensor,
    targets: torch.Tensor,
    value_mask: torch.Tensor,
    config: ImitationConfig,
) -> torch.Tensor:
    observations = [t.obs for t in batch]
    dist = policy.distribution(observations)  # type: ignore[attr-defined]
    log_likelihood = reference_log_likelihood(dist, actions)
    if config.lever_smoothing > 0:
        log_likelihood = log_likelihood + config.lever_smoothing * lever_smoothing_term(dist, actions)
    policy_loss = -log_likelihood.mean()
    loss = policy_loss
    if config.value_coef > 0 and bool(value_mask.any()):
        # A second forward for the value head: the bundle's public API gives the distribution
        # and the values from separate calls (evaluate's log-probs are not used).
        values = policy.evaluate(observations, actions).values
        value_loss = 0.5 * ((values.float() - targets)[value_mask] ** 2).mean()
        loss = policy_loss + config.value_coef * value_loss
    check_finite("imitation loss", loss)
    return loss


class DemonstrationAnchor:
    """A decaying behaviour-cloning term for the RL updates after a warm start (as DAPG, Rajeswaran
    et al. 2018): at update u, coef * max(0, 1 - u / decay_updates) * mean NLL of the reference's
    decisions on a fresh minibatch of its demonstrations. Early RL updates, made while advantages
    are still noisy, are pulled back towards the cloned behaviour; later ones are pure RL.

    Pass it as `PPOUpdater(..., auxiliary=anchor)`; it returns None once its weight is 0."""

    def __init__(
        self,
        policy: PolicyBundle,
        transitions: Sequence[Transition],
        *,
        coef: float,
        decay_updates: int,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if not transitions:
            raise ValueError("anchor: no demonstrations")
        if coef < 0 or decay_updates < 1 or batch_size < 1:
            raise ValueError("anchor: coef must be >= 0, decay_updates and batch_size >= 1")
        self.policy = policy
        self.transitions = list(transitions)
        self.actions = reference_actions(policy, self.transitions, torch.device(policy.device))
        self.coef = coef
        self.decay_updates = decay_updates
        self.batch_size = min(batch_size, len(self.transitions))
        self.generator = torch.Generator().manual_seed(seed)

    def weight(self, update: int) -> float:
        return self.coef * max(0.0, 1.0 - update / self.decay_updates)

    def __call__(self, update: int) -> torch.Tensor | None:
        weight = self.weight(update)
        if weight <= 0.0:
            return None
        idx = torch.randint(len(self.transitions), (self.batch_size,), generator=self.generator)
        dist = self.policy.distribution([self.transitions[i].obs for i in idx.tolist()])  # type: ignore[attr-defined]
        return -weight * reference_log_likelihood(dist, self.actions[idx]).mean()
