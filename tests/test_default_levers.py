"""`[policy] levers = []`: a policy that chooses none of the optional levers (issue 16's lever
ablation). Every command it sends carries the contract's defaults (the optional lever fields
absent, SET_ALPHA_TARGET's target 1.0), its log-probability has no optional lever term, and the
heuristic and the warm start's demonstrations honour the switch as well."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import torch

from esperd.analyzer.observation import (
    BLEND_INDEX,
    GERMINATE_LEVERS,
    LEVER_COLUMN,
    LR_INDEX,
    OP_INDEX,
    OPTIONAL_LEVERS,
    STEEPNESS_INDEX,
    Observation,
)
from esperd.policy import PolicyConfig, create_policy
from esperd.policy.base import BLEND, NODE, OP, PolicyBundle
from esperd.policy.batch import lever_held_choices
from esperd.policy.config import HeuristicConfig
from esperd.sim import SimConfig, SimEnv
from esperd.sim.rollout import play
from esperd.train.warmstart import record_demonstrations, reference_policy
from esperd_contracts import AdaptationCommand, BlendAlgorithm, Op

torch.set_num_threads(1)

SIM = SimConfig(epochs=16, min_layers=4, max_layers=6)
FIXED = PolicyConfig(name="gnn", hidden_size=64, gnn_layers=1, dropout=0.0, levers=())
ALL = PolicyConfig().levers
OPTIONAL_FIELDS = ("dwell_epochs", "isolation", "lr_multiplier", "steepness", "alpha_speed", "alpha_curve")
#: The always-chosen GERMINATE levers (blueprint, blend, tempo): the only lever terms left.
_ALWAYS = [name for name in GERMINATE_LEVERS if name not in OPTIONAL_LEVERS]


def wire_commands(policy: PolicyBundle, steps: int, *, apply_rows: bool = False) -> list[AdaptationCommand]:
    """The wire commands `policy` sends over `steps` steps of 6 simulated hosts (sampling)."""
    sent: list[AdaptationCommand] = []

    def observe(run_id: str, kind: str, message: Any) -> None:
        if kind == "command":
            sent.append(message)

    env = SimEnv(6, SIM, seed=3, observer=observe)
    levers = frozenset(getattr(policy, "levers", OPTIONAL_LEVERS))
    rollout = play(env, policy, env.reset(), deterministic=False, apply_rows=apply_rows, levers=levers)
    torch.manual_seed(0)
    for _ in range(steps):
        next(rollout)
    return sent


def test_every_command_of_a_policy_with_default_levers_carries_the_defaults() -> None:
    sent = wire_commands(create_policy("gnn", FIXED, "cpu"), 60)
    ops = {c.op for c in sent}
    assert {Op.GERMINATE, Op.SET_ALPHA_TARGET} <= ops, ops  # both lever-carrying ops were sampled
    for command in sent:
        assert all(getattr(command, name) is None for name in OPTIONAL_FIELDS), command
        if command.op is Op.SET_ALPHA_TARGET:
            assert command.alpha_target == 1.0
        if command.op is Op.GERMINATE:  # the always-chosen levers are still there
            assert None not in (command.blueprint, command.blend, command.tempo)
    # The same policy with every lever sends some of them (so the checks above could fail).
    learned = wire_commands(create_policy("gnn", msgspec.structs.replace(FIXED, levers=ALL), "cpu"), 60)
    assert any(c.dwell_epochs is not None for c in learned if c.op is Op.GERMINATE)
    assert any(c.alpha_target != 1.0 for c in learned if c.op is Op.SET_ALPHA_TARGET)


def sampled_batch(policy: PolicyBundle) -> tuple[list[Observation], torch.Tensor, torch.Tensor]:
    """Observations of simulated hosts mid-run and the actions `policy` samples there, with their
    log-probabilities; enough of them that GERMINATE and SET_ALPHA_TARGET both come up."""
    env = SimEnv(6, SIM, seed=3)
    rollout = play(env, policy, env.reset(), deterministic=False)
    torch.manual_seed(1)
    observations, actions, log_probs = [], [], []
    for _ in range(40):
        step = next(rollout)
        observations += step.observations
        actions.append(step.result.actions)
        log_probs.append(step.result.log_probs)
    return observations, torch.cat(actions), torch.cat(log_probs)


def node_op_and_always_levers(
    policy: Any, observations: list[Observation], actions: torch.Tensor
) -> torch.Tensor:
    """log p(node) + log p(op | node) + the blueprint, blend and tempo terms of a GERMINATE: the
    log-probability of each action without any optional lever's term."""
    dist = policy.distribution(observations)
    rows = dist.batch.ptr[:-1] + actions[:, NODE]
    out = (
        dist.node_logp.gather(1, actions[:, NODE : NODE + 1]).squeeze(1) + dist.op_logp[rows, actions[:, OP]]
    )
    germinate = actions[:, OP] == OP_INDEX[Op.GERMINATE]
    for name in _ALWAYS:
        term = dist.lever_logp(name)[rows, actions[:, LEVER_COLUMN[name]]]
        out = out + torch.where(germinate, term, 0.0)
    return out


@torch.no_grad()
def test_the_log_probability_of_a_policy_with_default_levers_has_no_lever_term() -> None:
    policy = create_policy("gnn", FIXED, "cpu")
    observations, actions, sampled = sampled_batch(policy)
    ops = set(actions[:, OP].tolist())
    assert {OP_INDEX[Op.GERMINATE], OP_INDEX[Op.SET_ALPHA_TARGET]} <= ops
    expected = node_op_and_always_levers(policy, observations, actions)
    torch.testing.assert_close(sampled, expected, rtol=0, atol=1e-5)  # what act returned
    evaluated = policy.evaluate(observations, actions).log_probs  # what PPO / V-trace ratios use
    torch.testing.assert_close(evaluated, expected, rtol=0, atol=1e-5)
    # Each optional lever's head holds one choice, at probability exactly 1 at every node.
    dist = policy.distribution(observations)
    for column, choice in lever_held_choices(frozenset()).items():
        name = next(n for n in OPTIONAL_LEVERS if LEVER_COLUMN[n] == column)
        logp = dist.lever_logp(name)
        assert torch.equal(logp[:, choice], torch.zeros(logp.shape[0])), name
        assert bool((logp.exp().sum(-1) == 1.0).all()), name
    # The held choices mean what the absent fields do, where the action space has such a choice.
    held = lever_held_choices(frozenset())
    assert held[LEVER_COLUMN["lr_multiplier"]] == LR_INDEX[1.0]
    assert held[LEVER_COLUMN["steepness"]] == STEEPNESS_INDEX[1.0]
    assert held[LEVER_COLUMN["isolation"]] == 0  # ISOLATIONS[0] is None, the host's default
    # With every lever the same formula misses the lever terms (so the checks above could fail).
    full = create_policy("gnn", msgspec.structs.replace(FIXED, levers=ALL), "cpu")
    observations, actions, sampled = sampled_batch(full)
    missing = sampled - node_op_and_always_levers(full, observations, actions)
    assert bool((missing < -1e-3).any())


EAGER = HeuristicConfig(min_epoch=0, confidence_threshold=0.0, urgency_threshold=0.0)


def test_the_heuristic_with_default_levers_sends_none_of_its_lever_rules() -> None:
    fixed = create_policy("heuristic", PolicyConfig(heuristic=EAGER, levers=()), "cpu")
    rules = create_policy("heuristic", PolicyConfig(heuristic=EAGER), "cpu")
    sent, ruled = wire_commands(fixed, 40), wire_commands(rules, 40)
    germinations = [c for c in sent if c.op is Op.GERMINATE]
    assert germinations and all(all(getattr(c, n) is None for n in OPTIONAL_FIELDS) for c in germinations)
    # The rules set a dwell, an isolation, an LR multiplier and (sigmoid blends) a steepness.
    ruled_germinations = [c for c in ruled if c.op is Op.GERMINATE]
    assert ruled_germinations and all(c.dwell_epochs == EAGER.train_dwell_epochs for c in ruled_germinations)
    assert all(c.isolation is not None and c.lr_multiplier == 1.0 for c in ruled_germinations)
    # Its action rows hold those levers where a learned policy without them holds its heads, and
    # the env applying the rows (as the warm start does) sends what its decisions would.
    env = SimEnv(6, SIM, seed=3)
    rollout = play(env, fixed, env.reset(), deterministic=True)
    rows = [r for _ in range(40) for r in next(rollout).actions.tolist() if r[OP] == OP_INDEX[Op.GERMINATE]]
    held = lever_held_choices(frozenset())
    for row in rows:
        sigmoid = row[BLEND] == BLEND_INDEX[BlendAlgorithm.SIGMOID]
        for column, choice in held.items():
            counted = column <= LEVER_COLUMN["lr_multiplier"] or (
                column == LEVER_COLUMN["steepness"] and sigmoid
            )
            assert row[column] == (choice if counted else 0)
    again = create_policy("heuristic", PolicyConfig(heuristic=EAGER, levers=()), "cpu")
    from_rows = wire_commands(again, 40, apply_rows=True)
    assert [c.op for c in from_rows] == [c.op for c in sent]
    assert all(all(getattr(c, n) is None for n in OPTIONAL_FIELDS) for c in from_rows)


@pytest.mark.parametrize("levers", [(), None])
def test_the_warm_start_heuristic_leaves_to_the_host_what_the_trainee_does(
    levers: tuple[str, ...] | None,
) -> None:
    chosen = None if levers is None else frozenset(levers)
    reference = reference_policy("heuristic", chosen)
    steps = record_demonstrations(reference, SimEnv(4, SimConfig(epochs=16), seed=2), 40, chosen)
    germinations = [t for t in steps if int(t.action[OP]) == OP_INDEX[Op.GERMINATE]]
    assert germinations
    dwell = LEVER_COLUMN["dwell"]
    dwells = {int(t.action[dwell]) for t in germinations}
    # The heuristic's dwell rule (3 epochs, index 2) only where the trainee sets the dwell.
    assert dwells == ({0} if levers == () else {2})
