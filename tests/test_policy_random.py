"""The random legal controller: registered, legal under the masks, uniform, reproducible by seed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from esperd.analyzer.observation import ACTION_WIDTH, OP_INDEX, OPS
from esperd.policy import PolicyBundle, PolicyConfig, create_policy, registered_policies
from esperd.policy.random import RandomLegalPolicy, random_legal_action
from esperd_contracts import Op, SeedStage
from tests.support.actions import legality_problem
from tests.support.observations import make_observation

STAGES = [
    SeedStage.DORMANT,
    SeedStage.TRAINING,
    SeedStage.BLENDING,
    SeedStage.PROBATIONARY,
    SeedStage.FOSSILIZED,
    SeedStage.DORMANT,
]


def test_random_is_a_registered_bundle() -> None:
    assert "random" in registered_policies()
    policy = create_policy("random", PolicyConfig(name="random"))
    assert isinstance(policy, RandomLegalPolicy) and isinstance(policy, PolicyBundle)
    assert not policy.is_learnable and policy.state_dict() == {}
    with pytest.raises(NotImplementedError):
        policy.evaluate([], np.zeros((0, ACTION_WIDTH)))  # type: ignore[arg-type]


def test_every_action_is_legal_and_every_legal_action_is_drawn_about_equally() -> None:
    obs = make_observation(stages=STAGES)
    rng = np.random.default_rng(7)
    draws = [random_legal_action(obs, rng) for _ in range(6000)]
    legal_pairs = {(int(n), int(o)) for n, o in zip(*np.nonzero(obs.op_mask), strict=True) if o != 0}
    counts: Counter[tuple[int, int]] = Counter()
    for action in draws:
        problem = legality_problem(obs, action)
        assert problem is None, problem
        node, op = action[:2]
        counts[(node, op) if OPS[op] is not Op.WAIT else (-1, 0)] += 1
    assert set(counts) == legal_pairs | {(-1, 0)}  # every legal pair and WAIT occur, nothing else
    expected = len(draws) / len(counts)
    assert all(abs(n - expected) < 0.25 * expected for n in counts.values()), counts


def test_germinations_spread_over_the_fitting_blueprints() -> None:
    obs = make_observation(num_nodes=2, stages=[SeedStage.DORMANT] * 2)
    rng = np.random.default_rng(1)
    chosen = {
        row[2]
        for row in (random_legal_action(obs, rng) for _ in range(3000))
        if OPS[row[1]] is Op.GERMINATE and row[0] == 0
    }
    assert chosen == set(np.flatnonzero(obs.blueprint_mask[0]).tolist())


def test_a_layer_where_no_blueprint_fits_is_never_germinated() -> None:
    obs = make_observation(num_nodes=3, stages=[SeedStage.DORMANT] * 3)
    obs.blueprint_mask[1] = False
    rng = np.random.default_rng(3)
    for _ in range(2000):
        node, op, *_ = random_legal_action(obs, rng)
        assert not (node == 1 and op == OP_INDEX[Op.GERMINATE])


def test_the_same_init_seed_replays_the_same_decisions() -> None:
    batch = [make_observation(f"r{i}", stages=STAGES, seed=i) for i in range(8)]

    def actions(seed: int) -> list[list[int]]:
        policy = create_policy("random", PolicyConfig(name="random", init_seed=seed))
        return [policy.act(batch).actions.tolist() for _ in range(5)]

    assert actions(11) == actions(11)
    assert actions(11) != actions(12)
    decisions = create_policy("random", PolicyConfig(name="random")).act(batch).decisions
    assert [d.run_id for d in decisions] == [f"r{i}" for i in range(8)]
    assert all(d.policy == "random" for d in decisions)
