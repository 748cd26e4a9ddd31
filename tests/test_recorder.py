"""Recorder: decisions become open steps; packets, acks, done and eviction close them right."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from esperd.analyzer import Analyzer
from esperd.analyzer.observation import ACTION_WIDTH, OP_INDEX, Observation
from esperd.learn.buffers import ReplayBuffer, RolloutBuffer
from esperd.learn.config import RewardConfig
from esperd.learn.experience import Transition
from esperd.learn.recorder import Recorder
from esperd.learn.rewards import RewardTracker
from esperd.policy import PolicyConfig, create_policy
from esperd.policy.base import ActResult, build_decisions
from esperd_contracts import Op, SeedSlotState, SystemStatePacket
from tests.support.actions import row
from tests.support.packets import chain_topology
from tests.support.timing import FakeClock


def state(
    epoch: int,
    acc: float,
    *,
    total: int = 1000,
    done: bool = False,
    loss: float = 1.0,
    seeds: Sequence[SeedSlotState] = (),
) -> SystemStatePacket:
    return SystemStatePacket(
        epoch=epoch,
        val_accuracy=acc,
        train_accuracy=acc,
        val_loss=loss,
        train_loss=loss,
        host_params=1000,
        total_params=total,
        done=done,
        seeds=list(seeds),
    )


class Host:
    """A real analyzer fed wire packets, for real Observations (shared topology per version)."""

    def __init__(self, runs: Sequence[str] = ("run-a",), layers: int = 4) -> None:
        self.analyzer = Analyzer(clock=FakeClock())
        kinds = ["conv2d" if i % 2 == 0 else "attention" for i in range(layers)]
        for run in runs:
            self.analyzer.ingest_topology(run, chain_topology(kinds, first_id=10, params=250))

    def observe(self, run: str, packet: SystemStatePacket | None = None) -> Observation:
        if packet is not None:
            self.analyzer.ingest_state(run, packet)
        return self.analyzer.observe(run)


def act(
    observations: Sequence[Observation],
    ops: Sequence[Op] | Op = Op.WAIT,
    *,
    version: int = 3,
    hidden: torch.Tensor | None = None,
) -> ActResult:
    """An ActResult as a policy returns it, with chosen ops (node 1, first levers)."""
    if isinstance(ops, Op):
        ops = [ops] * len(observations)
    b = len(observations)
    actions = torch.tensor([row(1, OP_INDEX[op]) for op in ops], dtype=torch.int64).reshape(b, ACTION_WIDTH)
    log_probs = -torch.arange(1, b + 1, dtype=torch.float32) / 4
    values = torch.arange(b, dtype=torch.float32) / 8 + 0.5
    ones = torch.ones(b)
    decisions = build_decisions(
        observations,
        actions,
        confidences=ones,
        urgencies=ones,
        log_probs=log_probs,
        values=values,
        policy="test",
        version=version,
    )
    return ActResult(
        actions=actions,
        log_probs=log_probs,
        values=values,
        confidences=ones,
        urgencies=ones,
        decisions=decisions,
        hidden=hidden,
    )


def recorder(config: RewardConfig | None = None, **kw: object) -> tuple[Recorder, list[Transition]]:
    rec = Recorder(config, **kw)  # type: ignore[arg-type]
    out: list[Transition] = []
    rec.add_sink(out.append)
    return rec, out


def expected_rewards(
    config: RewardConfig, packets: Sequence[SystemStatePacket], rejected_before: dict[int, int] | None = None
) -> list[float]:
    tracker = RewardTracker(config)
    out = []
    for i, p in enumerate(packets):
        for _ in range((rejected_before or {}).get(i, 0)):
            tracker.note_rejected()
        out.append(tracker.on_state(p).reward)
    return out


# ---------------------------------------------------------------- closing steps


def test_rewards_of_several_packets_accumulate_and_next_obs_is_the_next_decisions_obs():
    host = Host()
    rec, out = recorder()
    p0, p1, p2 = state(0, 0.50), state(1, 0.55, total=1100), state(2, 0.60, total=1100)
    rec.on_state("run-a", p0)  # baseline before any decision: reward 0, nobody to credit
    obs0 = host.observe("run-a", p0)
    rec.on_decided([obs0], act([obs0], Op.GERMINATE))
    assert rec.open_steps == 1 and out == []
    rec.on_state("run-a", p1)
    rec.on_state("run-a", p2)
    obs1 = host.observe("run-a", p2)
    rec.on_decided([obs1], act([obs1], Op.WAIT))

    assert len(out) == 1 and rec.open_steps == 1
    t = out[0]
    r = expected_rewards(RewardConfig(), [p0, p1, p2])
    assert t.reward == pytest.approx(r[1] + r[2])
    c = RewardConfig()
    assert t.reward == pytest.approx(c.accuracy_weight * 0.10 - 2 * c.rent_weight * np.log1p(0.1))
    assert t.obs is obs0 and t.next_obs is obs1
    assert not t.done and not t.truncated
    assert t.action.tolist() == row(1, OP_INDEX[Op.GERMINATE])
    assert t.log_prob == pytest.approx(-0.25) and t.value == pytest.approx(0.5)
    assert t.policy_version == 3 and t.hidden is None
    # The topology arrays are the analyzer's, shared between the two steps (same version).
    assert t.obs.gcn_edge_index is t.next_obs.gcn_edge_index


def test_next_steps_chain_by_identity():
    host = Host()
    rec, out = recorder()
    observations = []
    for e in range(5):
        obs = host.observe("run-a", state(e, 0.5 + e / 100))
        rec.on_state("run-a", state(e, 0.5 + e / 100))
        rec.on_decided([obs], act([obs]))
        observations.append(obs)
    assert len(out) == 4
    for i, t in enumerate(out):
        assert t.obs is observations[i] and t.next_obs is observations[i + 1]
        assert t.next_obs is (out[i + 1].obs if i + 1 < len(out) else observations[-1])
    assert rec.stats().transitions_closed == 4 and rec.stats().decisions == 5


def test_done_closes_the_step_as_terminal_and_ends_the_episode():
    host = Host()
    config = RewardConfig(mode="sparse")
    rec, out = recorder(config)
    packets = [state(0, 0.5), state(1, 0.6), state(2, 0.7, total=1500, done=True)]
    rec.on_state("run-a", packets[0])
    obs = host.observe("run-a", packets[0])
    rec.on_decided([obs], act([obs], Op.GERMINATE))
    rec.on_state("run-a", packets[1])
    step = rec.on_state("run-a", packets[2])
    assert step.terminal
    assert len(out) == 1
    t = out[0]
    assert t.done and not t.truncated and t.next_obs is None
    r = expected_rewards(config, packets)
    assert t.reward == pytest.approx(sum(r))
    assert t.reward == pytest.approx(config.accuracy_weight * 0.7 - config.param_cost_weight * np.log1p(0.5))
    assert rec.open_steps == 0 and "run-a" not in rec
    s = rec.stats()
    assert (s.episodes_closed, s.terminal, s.truncated) == (1, 1, 0)
    assert s.mean_episode_return == pytest.approx(t.reward)
    # A packet after the end starts a fresh episode: a new baseline, no reward.
    assert rec.on_state("run-a", state(3, 0.9)).reward == 0.0


def test_done_without_an_open_step_closes_nothing():
    rec, out = recorder()
    rec.on_state("run-a", state(0, 0.5))
    rec.on_state("run-a", state(1, 0.6, done=True))
    assert out == [] and rec.stats().episodes_closed == 0 and len(rec) == 0
    assert rec.stats().unattributed_reward == pytest.approx(1.0)


def test_eviction_truncates_bootstrapping_from_its_own_observation():
    host = Host()
    rec, out = recorder()
    rec.on_state("run-a", state(0, 0.5))
    obs = host.observe("run-a")
    rec.on_decided([obs], act([obs], Op.GERMINATE))
    rec.on_state("run-a", state(1, 0.52))
    rec.on_ack("run-a", "cmd-1", applied=False)  # not yet charged by a packet: the truncation charges it
    rec.on_evicted("run-a")
    assert len(out) == 1
    t = out[0]
    assert t.truncated and not t.done
    assert t.next_obs is t.obs  # the state after the action was never seen: V(s_t) stands in
    c = RewardConfig()
    assert t.reward == pytest.approx(c.accuracy_weight * 0.02 - c.rejected_penalty)
    assert "run-a" not in rec and rec.open_steps == 0
    assert rec.stats().truncated == 1 and rec.stats().episodes_closed == 1
    rec.on_evicted("run-a")  # twice, or never seen: nothing happens
    rec.on_evicted("never")
    assert len(out) == 1


def test_wait_decisions_are_recorded_and_cost_no_intervention():
    host = Host()
    config = RewardConfig(mode="shaped")
    rec, out = recorder(config)
    p = [state(0, 0.5), state(1, 0.5), state(2, 0.5)]
    rec.on_state("run-a", p[0])
    obs0 = host.observe("run-a")
    rec.on_decided([obs0], act([obs0], Op.WAIT))
    rec.on_state("run-a", p[1])
    obs1 = host.observe("run-a")
    rec.on_decided([obs1], act([obs1], Op.GERMINATE))
    rec.on_state("run-a", p[2])
    obs2 = host.observe("run-a")
    rec.on_decided([obs2], act([obs2], Op.WAIT))
    assert [OP_INDEX[Op.WAIT], OP_INDEX[Op.GERMINATE]] == [int(t.action[1]) for t in out]
    assert out[0].reward == pytest.approx(0.0)
    assert out[1].reward == pytest.approx(-config.intervention_cost)


def test_rejections_are_charged_to_the_run_with_the_next_packet():
    host = Host(runs=("run-a", "run-b"))
    rec, out = recorder()
    for run in ("run-a", "run-b"):
        rec.on_state(run, state(0, 0.5))
    obs = [host.observe("run-a"), host.observe("run-b")]
    rec.on_decided(obs, act(obs, Op.GERMINATE))
    rec.on_ack("run-a", "c1", applied=False)
    rec.note_rejected("run-a")
    rec.on_ack("run-b", "c2", applied=True)
    rec.on_ack("unknown-run", "c3", applied=False)  # ignored
    for run in ("run-a", "run-b"):
        rec.on_state(run, state(1, 0.5))
    nxt = [host.observe("run-a"), host.observe("run-b")]
    rec.on_decided(nxt, act(nxt))
    by_run = {t.run_id: t for t in out}
    assert by_run["run-a"].reward == pytest.approx(-2 * RewardConfig().rejected_penalty)
    assert by_run["run-b"].reward == pytest.approx(0.0)
    assert rec.stats().rejections == 2


def test_batches_interleave_runs_and_each_run_keeps_its_own_chain():
    host = Host(runs=("a", "b", "c"))
    rec, out = recorder()
    first = [host.observe(r) for r in ("a", "b", "c")]
    rec.on_decided(first, act(first))
    second = [host.observe(r) for r in ("c", "a")]  # b not due this time
    rec.on_decided(second, act(second, version=4))
    assert {t.run_id for t in out} == {"a", "c"}
    for t in out:
        assert t.next_obs is next(o for o in second if o.run_id == t.run_id)
        assert t.policy_version == 3
    assert rec.open_steps == 3
    assert rec.truncate_all() == 3
    assert len(out) == 5 and rec.open_steps == 0 and len(rec) == 0
    assert sorted(t.policy_version for t in out[2:]) == [3, 4, 4]


def test_max_runs_truncates_the_least_recently_active_run():
    host = Host(runs=("a", "b", "c"))
    rec, out = recorder(max_runs=2)
    oa, ob = host.observe("a"), host.observe("b")
    rec.on_decided([oa, ob], act([oa, ob]))
    rec.on_state("a", state(0, 0.5))  # a is now more recent than b
    oc = host.observe("c")
    rec.on_decided([oc], act([oc]))
    assert [t.run_id for t in out] == ["b"] and out[0].truncated
    assert set(rec._runs) == {"a", "c"} and rec.stats().runs_dropped == 1


def test_sinks_get_the_same_transition_and_a_failing_sink_is_contained():
    host = Host()
    rec = Recorder()
    got: list[Transition] = []

    def broken(t: Transition) -> None:
        raise RuntimeError("boom")

    rollout, replay = RolloutBuffer(16), ReplayBuffer(16)
    for sink in (broken, got.append, rollout.add, replay.add):
        rec.add_sink(sink)
    obs = host.observe("run-a")
    rec.on_decided([obs], act([obs]))
    rec.on_evicted("run-a")
    assert len(got) == 1 and rollout.peek()[0] is got[0] and replay[0] is got[0]
    assert rec.stats().sink_errors == 1
    rec.remove_sink(broken)


def test_version_comes_from_the_decisions_stamp():
    host = Host()
    rec, out = recorder()
    obs = host.observe("run-a")
    rec.on_decided([obs], act([obs], version=7), policy_version=9)  # weights reloaded after act
    rec.on_decided([obs], act([obs], version=9), policy_version=9)
    rec.on_decided([obs], act([obs], version=10))
    rec.on_evicted("run-a")
    assert [t.policy_version for t in out] == [7, 9, 10]
    assert rec.version_mismatches == 1


def test_mismatched_result_is_refused():
    host = Host()
    rec, _ = recorder()
    obs = host.observe("run-a")
    with pytest.raises(ValueError):
        rec.on_decided([obs, obs], act([obs]))


# ---------------------------------------------------------------- with real policies


def test_real_gnn_policy_through_the_decision_hook():
    host = Host(runs=("a", "b"))
    policy = create_policy("gnn", PolicyConfig(name="gnn", hidden_size=64))
    policy.version = 5
    rec, out = recorder()
    obs = [host.observe("a"), host.observe("b")]
    result = policy.act(obs)
    rec.decision_hook(obs, result, policy)
    rec.truncate_all()
    assert len(out) == 2
    for t, action, lp, v in zip(out, result.actions, result.log_probs, result.values, strict=True):
        assert t.action.dtype == np.int64 and t.action.tolist() == action.tolist()
        assert t.log_prob == pytest.approx(float(lp)) and t.value == pytest.approx(float(v))
        assert t.policy_version == 5


def test_recurrent_state_is_recorded_as_numpy_per_run():
    host = Host(runs=("a", "b"))
    policy = create_policy("lstm", PolicyConfig(name="lstm", hidden_size=64, lstm_hidden=32))
    rec, out = recorder()
    obs = [host.observe("a"), host.observe("b")]
    first = policy.act(obs)
    rec.on_decided(obs, first)
    obs2 = [host.observe("a"), host.observe("b")]
    second = policy.act(obs2)
    rec.on_decided(obs2, second)
    rec.truncate_all()
    assert first.hidden is not None and second.hidden is not None
    assert len(out) == 4
    for t in out:
        assert isinstance(t.hidden, np.ndarray) and t.hidden.shape == (2, 32) and t.hidden.dtype == np.float32
    steps = {(t.run_id, t.obs is obs2[0] or t.obs is obs2[1]): t for t in out}
    assert np.array_equal(steps[("b", True)].hidden, second.hidden[1].numpy())
    assert np.array_equal(steps[("a", False)].hidden, first.hidden[0].numpy())
