"""The in-process Learner: updates and atomic hot swaps, the circuit breaker, checkpoints.

No broker: a real GNN policy (hidden 64) acts on the simulator (esperd.sim.SimEnv, observed
through the real Analyzer), its steps become Transitions, and the Learner trains on them on
its own worker thread while the tests drive it from the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import math
import os
import pathlib
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from esperd.config import SchedulerConfig
from esperd.decisions import DecisionLoop
from esperd.learn import ppo as ppo_module
from esperd.learn.algorithms import ImpalaAlgorithm, PPOAlgorithm
from esperd.learn.config import BreakerConfig, BudgetConfig, ImpalaConfig, LearnerConfig, PPOConfig
from esperd.learn.experience import Transition
from esperd.learn.learner import Learner
from esperd.learn.recorder import Recorder
from esperd.policy import PolicyBundle, PolicyConfig, create_policy
from esperd.scheduler import Scheduler
from esperd.sim import SimConfig, SimEnv
from esperd_contracts import AdaptationCommand
from tests.support.timing import FakeClock

torch.set_num_threads(1)

SIM = SimConfig(epochs=12, min_layers=6, max_layers=8, report_budget=False)
PPO = PPOConfig(rollout_size=32, minibatch_size=16, epochs=2, warmup_updates=0)
IMPALA = ImpalaConfig(batch_size=16)


def policy_config(init_seed: int = 0) -> PolicyConfig:
    return PolicyConfig(name="gnn", hidden_size=64, gnn_layers=2, dropout=0.0, init_seed=init_seed)


def make_policy(init_seed: int = 0) -> PolicyBundle:
    return create_policy("gnn", policy_config(init_seed), "cpu")


def learner_config(algorithm: str, **overrides: object) -> LearnerConfig:
    fields: dict[str, object] = {
        "algorithm": algorithm,
        "ppo": PPO,
        "impala": IMPALA,
        "min_replay": 32,
        "replay_capacity": 1_000,
        # One failure opens the breaker: these tests look at what a trip does (rollback, pause,
        # recovery); 002's threshold of 5 within 300 s is tested below and in tests/test_breaker.py.
        "breaker": BreakerConfig(failure_threshold=1, recovery_s=60.0),
        # In-process and a swap after every update: these tests look at the trainee and the
        # optimizer directly. tests/test_learner_worker.py covers the process worker.
        "worker": "thread",
        "swap_min_interval_s": 0.0,
    }
    fields.update(overrides)
    return LearnerConfig(**fields)  # type: ignore[arg-type]


def build_learner(
    tmp_path: Path,
    algorithm: str,
    *,
    serving: PolicyBundle | None = None,
    clock: Callable[[], float] | None = None,
    **overrides: object,
) -> tuple[Learner, list[PolicyBundle]]:
    """A Learner over a fresh serving GNN; the list collects every bundle handed to swap."""
    swapped: list[PolicyBundle] = []
    learner = Learner(
        learner_config(algorithm, **overrides),
        make_policy=make_policy,
        serving=serving if serving is not None else make_policy(),
        swap=swapped.append,
        state_dir=tmp_path,
        clock=clock or FakeClock(),
    )
    return learner, swapped


def sim_transitions(policy: PolicyBundle, count: int, *, seed: int = 0, envs: int = 8) -> list[Transition]:
    """`count` steps of `policy` acting on the simulator, as the recorder would close them."""
    env = SimEnv(envs, SIM, seed=seed)
    obs = env.reset()
    out: list[Transition] = []
    while len(out) < count:
        result = policy.act(obs)
        following, rewards, dones, _ = env.step(result)
        actions = result.actions.numpy().astype(np.int64)
        for i, o in enumerate(obs):
            done = bool(dones[i])
            out.append(
                Transition(
                    obs=o,
                    action=actions[i].copy(),
                    log_prob=float(result.log_probs[i]),
                    value=float(result.values[i]),
                    policy_version=result.decisions[i].policy_version,
                    reward=float(rewards[i]),
                    done=done,
                    next_obs=None if done else following[i],
                )
            )
        obs = following
    return out[:count]


def with_rewards(transitions: list[Transition], rewards: list[float]) -> list[Transition]:
    return [msgspec.structs.replace(t, reward=r) for t, r in zip(transitions, rewards, strict=True)]


def alternating(mean: float, spread: float, n: int) -> list[float]:
    """mean +- spread, alternating: a known mean and variance, no randomness."""
    return [mean + (spread if i % 2 else -spread) for i in range(n)]


def weights(policy: PolicyBundle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def feed(learner: Learner, transitions: list[Transition]) -> None:
    for t in transitions:
        learner.add(t)


def optimizer_tensor(learner: Learner) -> torch.Tensor:
    """One moment-estimate tensor of the optimizer (Adam's exp_avg, RMSprop's square_avg)."""
    state = learner.updater.optimizer.state_dict()["state"]
    assert state, "the optimizer has no state yet"
    first = state[min(state)]
    key = "exp_avg" if "exp_avg" in first else "square_avg"
    return first[key].clone()


# ---------------------------------------------------------------- update and hot swap


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_update_swaps_in_a_new_bundle_as_version_plus_one(tmp_path: Path, algorithm: str) -> None:
    learner, swapped = build_learner(tmp_path, algorithm)
    original = learner.serving
    before = weights(original)
    feed(learner, sim_transitions(original, 32, seed=1))

    assert await learner.update_once()
    first = learner.serving
    assert swapped == [first]
    assert first is not original and first is not learner.trainee
    assert first.version == 1 == learner.status.serving_version
    assert learner.status.updates == 1 and learner.status.swaps == 1
    assert learner.status.swap_pause_us_max > 0.0  # measured (its size: benchmarks/bench_learner.py)
    # The update changed the weights; the new bundle serves exactly the trainee's weights...
    assert not same_weights(weights(first), before)
    assert same_weights(weights(first), weights(learner.trainee))
    # ...and the bundle it replaced (a batch in flight may still be using it) is untouched.
    assert original.version == 0 and same_weights(weights(original), before)

    feed(learner, sim_transitions(first, 32, seed=2))
    assert await learner.update_once()
    second = learner.serving
    assert swapped == [first, second] and second is not first
    assert second.version == 2 and first.version == 1


async def decide_rounds_until(
    loop: DecisionLoop,
    scheduler: Scheduler,
    run_ids: list[str],
    done: Callable[[int], bool],
    within_s: float,
) -> int:
    """Rounds of: every run marked due, then all of them decided; until `done(rounds)`."""
    deadline = asyncio.get_running_loop().time() + within_s
    rounds = 0
    while not done(rounds):
        assert asyncio.get_running_loop().time() < deadline, rounds
        for run_id in run_ids:
            scheduler.mark_due(run_id)
        loop.wake()
        rounds += 1
        while loop.stats.decisions < rounds * len(run_ids):
            assert asyncio.get_running_loop().time() < deadline, (rounds, loop.stats)
            await asyncio.sleep(0.002)
    return rounds


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_hot_swap_under_concurrent_decisions(tmp_path: Path, algorithm: str) -> None:
    """The DecisionLoop decides many runs in batches while the learner trains and swaps on its own thread."""
    env = SimEnv(24, SIM, seed=3)
    env.reset()
    run_ids = list(env.run_ids)
    serving = make_policy()
    scheduler = Scheduler(SchedulerConfig(min_interval_s=0.0, cooldown_s=0.0, max_batch=8, max_wait_ms=0.0))
    recorder = Recorder()
    published: list[tuple[int, int]] = []  # (batch index, policy_version), in publish order
    batches: list[tuple[PolicyBundle, int, set[int]]] = []  # (bundle, its version, decisions' versions)
    decided = collections.Counter[str]()

    async def publish(command: AdaptationCommand) -> None:
        published.append((loop.stats.batches, command.policy_version))
        await asyncio.sleep(0.001)  # a slow bus: the learner's swaps land while batches are published
        # The host answers at once: the layer is free for the next round, so commands keep coming
        # (unanswered, every layer would wait out ack_timeout_s after its first command, and from
        # then on batches would be all WAITs, with no commands for a swap to land between).
        scheduler.note_ack(command.run_id, command.command_id, applied=True)

    def on_decided(observations, result, policy):  # type: ignore[no-untyped-def]
        batches.append((policy, policy.version, {d.policy_version for d in result.decisions}))
        decided.update(o.run_id for o in observations)
        recorder.decision_hook(observations, result, policy)

    loop = DecisionLoop(
        scheduler, serving, observe=env.analyzer.observe_many, publish=publish, on_decided=on_decided
    )
    handed_out: list[PolicyBundle] = [serving]

    swapped_at: list[int] = []  # how many commands had gone out when each swap landed

    def swap(bundle: PolicyBundle) -> None:
        handed_out.append(bundle)
        swapped_at.append(len(published))
        loop.swap_policy(bundle)

    learner = Learner(
        learner_config(
            algorithm, breaker=BreakerConfig(failure_threshold=1, kl_limit_ppo=1e3, kl_limit_impala=1e3)
        ),
        make_policy=make_policy,
        serving=serving,
        swap=swap,
        state_dir=tmp_path,
    )
    recorder.add_sink(learner.add)

    def swaps_mid_batch() -> list[int]:
        """Swaps that landed between two commands of the same batch."""
        return [n for n in swapped_at if 0 < n < len(published) and published[n - 1][0] == published[n][0]]

    tasks = [asyncio.create_task(loop.run()), asyncio.create_task(learner.run())]
    try:
        # Where a swap lands is up to the thread scheduler: go on until one has split a batch.
        rounds = await decide_rounds_until(
            loop,
            scheduler,
            run_ids,
            lambda rounds: learner.status.swaps >= 4 and rounds >= 8 and bool(swaps_mid_batch()),
            # A deadline, not an expectation: on a loaded 2-core machine PPO updates (and so swaps)
            # come seconds apart, and one must happen to land inside a batch.
            within_s=120.0,
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # No decision dropped: every run was decided once per round, nothing failed or ran late.
    assert decided == {run_id: rounds for run_id in run_ids}
    assert loop.stats.decisions == rounds * len(run_ids)
    assert loop.stats.failures == 0 and loop.stats.late == 0
    # Each batch was decided wholly by the one bundle it started with, at that bundle's version.
    for bundle, version, stamped in batches:
        assert stamped == {version}
        assert any(bundle is h for h in handed_out)
    versions_by_batch: dict[int, set[int]] = collections.defaultdict(set)
    for batch, version in published:
        versions_by_batch[batch].add(version)
    assert all(len(v) == 1 for v in versions_by_batch.values()), versions_by_batch
    # Versions in published commands only ever increase, and several swaps landed among them.
    versions = [v for _, v in published]
    assert versions == sorted(versions)
    assert len(set(versions)) >= 3, (set(versions), learner.status)
    # Some swaps landed in the middle of a batch's commands, and that batch still stayed whole.
    assert swaps_mid_batch(), (swapped_at, len(published))
    assert learner.status.trips == 0
    assert [h.version for h in handed_out] == list(range(len(handed_out)))


# ---------------------------------------------------------------- the circuit breaker


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_nan_reward_trips_the_breaker_and_never_serves_it(tmp_path: Path, algorithm: str) -> None:
    clock = FakeClock()
    # IMPALA: 16 stored, 64 single steps drawn stratified at equal priority: every stored step is
    # in the batch.
    learner, swapped = build_learner(
        tmp_path, algorithm, clock=clock, min_replay=16, impala=ImpalaConfig(batch_size=64, unroll_length=1)
    )
    serving = learner.serving
    good = weights(serving)
    transitions = sim_transitions(serving, 32 if algorithm == "ppo" else 16, seed=4)
    transitions[5] = msgspec.structs.replace(transitions[5], reward=math.nan)
    feed(learner, transitions)

    assert not await learner.update_once()
    status = learner.status
    assert status.trips == 1 and status.breaker == "open" and "non-finite" in status.last_trip
    assert learner.paused
    # Nothing new serves: the same bundle, the same version, the last good weights, all finite.
    assert swapped == [] and learner.serving is serving and serving.version == 0
    assert same_weights(weights(serving), good) and all_finite(weights(serving))
    assert same_weights(weights(learner.trainee), good)
    assert status.updates == 0 and status.serving_version == 0
    # The pause ends after recovery_s.
    clock.now += learner.config.breaker.recovery_s + 1.0
    assert not learner.paused


async def test_learning_pauses_after_a_trip_then_resumes_on_its_own(tmp_path: Path) -> None:
    # The real clock this time: run() sleeps through the recovery period.
    learner, swapped = build_learner(
        tmp_path, "ppo", clock=time.monotonic, breaker=BreakerConfig(failure_threshold=1, recovery_s=0.5)
    )
    serving = learner.serving
    bad = sim_transitions(serving, 32, seed=5)
    bad[0] = msgspec.structs.replace(bad[0], reward=math.inf)
    feed(learner, bad)
    assert not await learner.update_once()
    assert learner.status.trips == 1 and learner.paused

    feed(learner, sim_transitions(serving, 32, seed=6))  # plenty of good experience, all at once
    task = asyncio.create_task(learner.run())
    try:
        await asyncio.sleep(0.2)
        assert learner.status.updates == 0 and swapped == []  # paused: no learning yet
        deadline = asyncio.get_running_loop().time() + 10.0
        while learner.status.updates == 0:
            assert asyncio.get_running_loop().time() < deadline, "learning never resumed after recovery"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert learner.serving.version == 1 and swapped == [learner.serving]
    assert learner.status.breaker == "closed" and not learner.paused


async def test_the_breaker_opens_on_the_fifth_failure_in_its_window_and_closes_on_a_sound_probe(
    tmp_path: Path,
) -> None:
    """002's breaker through the learner: each failure rolls back at once, the fifth within 300 s
    opens the breaker (learning paused), after 60 s one probe update runs and, sound, closes it."""
    clock = FakeClock()
    learner, swapped = build_learner(tmp_path, "ppo", clock=clock, breaker=BreakerConfig())
    serving = learner.serving
    good = weights(serving)

    async def fail_once(seed: int) -> None:
        bad = sim_transitions(serving, 32, seed=seed)
        bad[3] = msgspec.structs.replace(bad[3], reward=math.nan)
        feed(learner, bad)
        assert not await learner.update_once()
        assert same_weights(weights(learner.trainee), good)  # rolled back at once, every time

    for i in range(4):
        await fail_once(20 + i)
        clock.advance(30.0)
        status = learner.status
        assert status.breaker == "closed" and not learner.paused and status.trips == 0
        assert status.failures == status.failures_in_window == i + 1 and "non-finite" in status.last_failure
    await fail_once(30)
    status = learner.status
    assert status.breaker == "open" and learner.paused and status.trips == 1
    assert status.breaker_transitions == {"closed->open": 1}
    assert status.last_transition.startswith("closed->open: 5 failures within 300s")
    assert "non-finite" in status.last_trip and status.breaker_reopens_in_s == 60.0
    feed(learner, sim_transitions(serving, 32, seed=31))
    assert not await learner.update_once()  # open: nothing runs
    assert learner.status.updates == 0 and swapped == []

    clock.advance(60.0)
    assert learner.status.breaker == "half_open" and not learner.paused
    assert await learner.update_once()  # the probe, sound
    status = learner.status
    assert status.breaker == "closed" and status.updates == 1 and swapped == [learner.serving]
    assert status.failures_in_window == 0 and status.failures == 5
    assert status.breaker_transitions == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


async def test_impala_learns_from_unrolls_with_capped_weights_and_reports_vtrace_diagnostics(
    tmp_path: Path,
) -> None:
    """002: unrolls of consecutive steps (V-trace over each), importance weights capped at
    max_importance_weight, and rho, c, weight mean, clip fractions and p95 update time in status."""
    learner, _ = build_learner(
        tmp_path, "impala", min_replay=16, impala=ImpalaConfig(batch_size=40, unroll_length=10)
    )
    assert (
        isinstance(learner.algorithm, ImpalaAlgorithm)
        and learner.algorithm.buffer.max_importance_weight == 10.0
    )
    # 4 runs x 12 steps, each run's steps chained (next_obs is the next step's obs).
    feed(learner, sim_transitions(learner.serving, 48, seed=50, envs=4))
    sample = learner.algorithm.take()
    assert sample.lengths is not None and len(sample.lengths) == 4  # 40 // 10 unrolls
    assert all(1 <= n <= 10 for n in sample.lengths) and len(sample.batch) == sample.lengths.sum()
    for first, n in zip(np.concatenate([[0], np.cumsum(sample.lengths)[:-1]]), sample.lengths, strict=True):
        unroll = sample.batch[first : first + n]
        assert len({t.run_id for t in unroll}) == 1  # one run each, consecutive steps
        assert all(a.next_obs is b.obs for a, b in itertools.pairwise(unroll))
        assert sample.weights is not None and len(set(sample.weights[first : first + n].tolist())) == 1
    assert sample.slots is not None and len(sample.slots[0]) == len(sample.batch)
    assert await learner.update_once()
    last = learner.status.last
    assert last["unrolls"] >= 1 and last["samples"] >= 4
    assert last["rho_mean"] > 0.0 and 0.0 < last["c_mean"] <= 1.0
    assert 0.0 < last["importance_weight_mean"] <= 10.0
    for key in ("clip_fraction", "c_clip_fraction", "pg_clip_fraction"):
        assert 0.0 <= last[key] <= 1.0
    assert learner.status.update_ms_p95 > 0.0


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_timing_budgets_are_watched_on_every_update(tmp_path: Path, algorithm: str) -> None:
    """Budgets no update can meet: each of the three is counted once per update; budgets no
    update can miss: nothing is."""
    tight = BudgetConfig(processing_ms=1e-6, batch_ms=1e-6, step_ms=1e-6)
    learner, _ = build_learner(tmp_path / "tight", algorithm, min_replay=16, budgets=tight)
    loose = BudgetConfig(processing_ms=1e6, batch_ms=1e6, step_ms=1e6)
    relaxed, _ = build_learner(tmp_path / "loose", algorithm, min_replay=16, budgets=loose)
    for each in (learner, relaxed):
        for seed in (40, 41):
            feed(each, sim_transitions(each.serving, 32, seed=seed))
            assert await each.update_once()
    status = learner.status
    assert status.budget_violations == {"processing": 2, "batch": 2, "step": 2}
    assert status.budget_worst_ms["step"] >= status.budget_worst_ms["batch"] > 0.0
    assert relaxed.status.budget_violations == {} and relaxed.status.updates == 2


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_weights_turning_non_finite_roll_back(
    tmp_path: Path, algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PPO: one minibatch, one epoch, so the only optimizer step is the one that blows up.
    learner, swapped = build_learner(
        tmp_path, algorithm, ppo=PPOConfig(rollout_size=32, minibatch_size=32, epochs=1, warmup_updates=0)
    )
    serving = learner.serving
    good = weights(serving)
    feed(learner, sim_transitions(serving, 32, seed=7))
    # An absurd step: the weights go to inf / NaN. (PPO sets each update's LR from its schedule.)
    monkeypatch.setattr(ppo_module, "lr_factor", lambda *_: math.inf)
    for group in learner.updater.optimizer.param_groups:
        group["lr"] = math.inf

    assert not await learner.update_once()
    assert learner.status.trips == 1 and learner.status.breaker == "open"
    assert "weights became non-finite" in learner.status.last_trip
    assert swapped == [] and learner.serving is serving and serving.version == 0
    assert same_weights(weights(serving), good)
    # The trainee is back on the good weights (it was inf / NaN a moment ago).
    assert all_finite(weights(learner.trainee)) and same_weights(weights(learner.trainee), good)


async def test_ppo_kl_far_above_the_limit_trips(tmp_path: Path) -> None:
    learner, swapped = build_learner(
        tmp_path,
        "ppo",
        ppo=PPOConfig(rollout_size=32, minibatch_size=8, epochs=4, lr=1e-3, target_kl=None, warmup_updates=0),
        breaker=BreakerConfig(failure_threshold=1, kl_limit_ppo=1e-9, recovery_s=60.0),
    )
    serving = learner.serving
    good = weights(serving)
    feed(learner, sim_transitions(serving, 32, seed=8))

    assert not await learner.update_once()
    status = learner.status
    assert status.last["approx_kl"] > 1e-9
    assert status.trips == 1 and status.breaker == "open" and status.last_trip.startswith("KL")
    assert swapped == [] and learner.serving is serving and serving.version == 0
    assert same_weights(weights(learner.trainee), good)  # the over-stepped trainee was rolled back
    assert not learner.updater.optimizer.state  # and its optimizer moments forgotten
    assert len(learner.algorithm.buffer) == 0


async def test_impala_kl_trip_after_a_swap_restores_the_good_weights_as_a_new_version(tmp_path: Path) -> None:
    learner, swapped = build_learner(
        tmp_path, "impala", breaker=BreakerConfig(failure_threshold=1, kl_limit_impala=1e-9, recovery_s=60.0)
    )
    v0 = weights(learner.serving)
    feed(learner, sim_transitions(learner.serving, 32, seed=9))
    assert await learner.update_once()  # on-policy data: KL exactly 0
    v1 = learner.serving
    assert v1.version == 1 and learner.status.trips == 0

    # The replayed version-0 steps are now off-policy for the trainee: KL > 0 > the limit.
    assert not await learner.update_once()
    assert learner.status.trips == 1 and learner.status.last_trip.startswith("KL")
    restored = learner.serving
    assert restored is not v1 and swapped == [v1, restored]
    assert restored.version == 2 and learner.status.serving_version == 2
    assert same_weights(weights(restored), v0) and all_finite(weights(restored))


async def test_reward_drop_after_a_swap_trips_once_and_serves_the_previous_good_weights(
    tmp_path: Path,
) -> None:
    learner, swapped = build_learner(
        tmp_path,
        "ppo",
        breaker=BreakerConfig(failure_threshold=1, reward_window=32, reward_drop=0.05, recovery_s=60.0),
    )
    v0_bundle = learner.serving
    v0 = weights(v0_bundle)
    feed(learner, with_rewards(sim_transitions(v0_bundle, 32, seed=10), alternating(1.0, 0.1, 32)))
    assert await learner.update_once()
    v1 = learner.serving
    assert v1.version == 1

    # Version 1's steps earn far less. They arrive in one go (one decision batch closes many
    # steps at once), more than a window's worth.
    low = sim_transitions(v1, 40, seed=11)
    assert {t.policy_version for t in low} == {1}
    feed(learner, with_rewards(low, alternating(-1.0, 0.1, 40)))
    for _ in range(5):
        await asyncio.sleep(0)  # let a scheduled rollback run

    status = learner.status
    assert status.trips == 1, status.last_trip
    assert status.last_trip.startswith("reward fell") and status.breaker == "open" and learner.paused
    restored = learner.serving
    assert swapped == [v1, restored] and restored is not v1 and restored is not v0_bundle
    assert restored.version == 2 == status.serving_version
    assert same_weights(weights(restored), v0) and same_weights(weights(learner.trainee), v0)


async def test_reward_drop_during_an_update_voids_that_update(tmp_path: Path) -> None:
    """The rollback lands while the worker thread is still training on the bad version's data:
    what that update produces must not serve, and the trainee must end on the good weights."""
    learner, swapped = build_learner(
        tmp_path,
        "ppo",
        ppo=PPOConfig(rollout_size=32, minibatch_size=8, epochs=8, warmup_updates=0, target_kl=None),
        breaker=BreakerConfig(
            failure_threshold=1, reward_window=64, reward_drop=0.05, kl_limit_ppo=1e3, recovery_s=60.0
        ),
    )
    v0 = weights(learner.serving)
    feed(learner, with_rewards(sim_transitions(learner.serving, 64, seed=21), alternating(1.0, 0.1, 64)))
    assert await learner.update_once()
    v1 = learner.serving
    low = with_rewards(sim_transitions(v1, 64, seed=22), alternating(-1.0, 0.1, 64))
    feed(learner, low[:32])  # a rollout's worth: the next update may start; the window is not full yet
    assert learner.status.trips == 0

    update = asyncio.create_task(learner.update_once())
    await asyncio.sleep(0)  # the update is now on the worker thread
    assert not update.done() and learner.buffered() == 0
    feed(learner, low[32:])  # the window fills: the reward drop is judged while the update runs
    assert learner.status.trips == 1 and learner.status.last_trip.startswith("reward fell")
    assert not update.done(), "the update finished too early to test the race"
    assert await update is False

    restored = learner.serving
    assert swapped == [v1, restored] and restored.version == 2
    assert same_weights(weights(restored), v0)
    assert same_weights(weights(learner.trainee), v0) and not learner.updater.optimizer.state
    assert learner.status.trips == 1 and learner.status.breaker == "open"


async def test_noisy_rewards_that_do_not_drop_do_not_trip(tmp_path: Path) -> None:
    learner, swapped = build_learner(
        tmp_path,
        "ppo",
        breaker=BreakerConfig(failure_threshold=1, reward_window=32, reward_drop=0.05, recovery_s=60.0),
    )
    v0_bundle = learner.serving
    feed(learner, with_rewards(sim_transitions(v0_bundle, 32, seed=12), alternating(0.0, 1.0, 32)))
    assert await learner.update_once()
    v1 = learner.serving
    # Down by 0.2 (> reward_drop) but well inside 3 standard errors of rewards this noisy.
    feed(learner, with_rewards(sim_transitions(v1, 40, seed=13), alternating(-0.2, 1.0, 40)))
    for _ in range(5):
        await asyncio.sleep(0)

    assert learner.status.trips == 0 and learner.status.breaker == "closed" and not learner.paused
    assert learner.serving is v1 and swapped == [v1]
    assert learner._good_version == 1  # judged good: later rollbacks land here


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_checkpoint_round_trip(tmp_path: Path, algorithm: str) -> None:
    learner, _ = build_learner(tmp_path, algorithm)
    feed(learner, sim_transitions(learner.serving, 32, seed=14))
    assert await learner.update_once()
    feed(learner, sim_transitions(learner.serving, 10, seed=15))
    buffered = learner.buffered()
    assert buffered == (10 if algorithm == "ppo" else 42)
    served = weights(learner.serving)
    moments = optimizer_tensor(learner)
    status = learner.status
    algo_state = learner.updater.state_dict()
    learner.save_checkpoint()

    # A fresh process: different initial weights, version 0, empty buffer, no optimizer state.
    resumed, swapped = build_learner(tmp_path, algorithm, serving=make_policy(init_seed=7))
    assert not same_weights(weights(resumed.serving), served)
    assert resumed.restore()

    assert resumed.serving.version == 1 == resumed.status.serving_version
    assert swapped == [resumed.serving]
    assert same_weights(weights(resumed.serving), served)
    assert same_weights(weights(resumed.trainee), served) and resumed.trainee is not resumed.serving
    assert resumed.buffered() == buffered
    assert torch.equal(optimizer_tensor(resumed), moments)
    assert resumed.status.updates == status.updates == 1
    assert resumed.status.samples == status.samples > 0
    assert resumed.updater.updates == algo_state["updates"]
    assert resumed.updater.samples == algo_state["samples"]
    if algorithm == "ppo":
        assert resumed.updater.lr == learner.updater.lr
        assert isinstance(resumed.algorithm, PPOAlgorithm)
        assert [t.policy_version for t in resumed.algorithm.buffer.peek()] == [1] * 10
    else:
        assert isinstance(resumed.algorithm, ImpalaAlgorithm) and isinstance(
            learner.algorithm, ImpalaAlgorithm
        )
        assert np.array_equal(resumed.algorithm.buffer.priorities(), learner.algorithm.buffer.priorities())

    # It carries on from there: the next update serves version 2.
    if algorithm == "ppo":
        feed(resumed, sim_transitions(resumed.serving, 22, seed=16))
    assert await resumed.update_once()
    assert resumed.serving.version == 2


class _Payload:
    """Unpickling this creates `marker`: any loader that runs it has executed foreign code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _corrupt(directory: Path, how: str, marker: Path) -> None:
    policy_file, extra_file = directory / "policy.safetensors", directory / "learner.pt"
    if how == "truncated-policy":
        data = policy_file.read_bytes()
        policy_file.write_bytes(data[: len(data) // 2])
    elif how == "random-learner-pt":
        extra_file.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "empty-learner-pt":
        extra_file.write_bytes(b"")
    elif how == "pickle-payload-learner-pt":
        torch.save({"algo": _Payload(marker), "status": {}}, extra_file)
    elif how == "raw-pickle-learner-pt":
        extra_file.write_bytes(pickle.dumps({"algo": _Payload(marker)}))
    elif how == "other-algorithm-learner-pt":
        state = torch.load(extra_file, weights_only=True)
        state["algo"]["algorithm"] = "impala"
        torch.save(state, extra_file)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "truncated-policy",
        "random-learner-pt",
        "empty-learner-pt",
        "pickle-payload-learner-pt",
        "raw-pickle-learner-pt",
        "other-algorithm-learner-pt",
    ],
)
async def test_corrupt_checkpoint_is_refused_and_nothing_changes(tmp_path: Path, how: str) -> None:
    learner, _ = build_learner(tmp_path, "ppo")
    feed(learner, sim_transitions(learner.serving, 32, seed=17))
    assert await learner.update_once()
    feed(learner, sim_transitions(learner.serving, 5, seed=18))
    learner.save_checkpoint()
    marker = tmp_path / "pwned"
    _corrupt(tmp_path / "learner", how, marker)

    fresh, swapped = build_learner(tmp_path, "ppo", serving=make_policy(init_seed=3))
    serving = fresh.serving
    before = weights(serving)
    assert fresh.restore() is False

    assert not marker.exists()  # nothing in the file was executed
    assert swapped == [] and fresh.serving is serving and serving.version == 0
    assert same_weights(weights(serving), before)
    # Nothing half-restored either: the trainee still starts from what serves, nothing resumed.
    assert same_weights(weights(fresh.trainee), before) and fresh.trainee.version == 0
    assert fresh.buffered() == 0 and fresh.status.updates == 0 and fresh.updater.updates == 0
    assert not fresh.updater.optimizer.state
    # And it still learns from there.
    feed(fresh, sim_transitions(serving, 32, seed=19))
    assert await fresh.update_once() and fresh.serving.version == 1


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """The payload above really runs when loaded unsafely (so its absence above means something)."""
    marker = tmp_path / "control"
    path = tmp_path / "payload.pt"
    torch.save({"algo": _Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()
    os.remove(marker)
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


async def test_corrupt_buffer_file_keeps_the_resumed_policy(tmp_path: Path) -> None:
    learner, _ = build_learner(tmp_path, "impala")
    feed(learner, sim_transitions(learner.serving, 32, seed=20))
    assert await learner.update_once()
    served = weights(learner.serving)
    learner.save_checkpoint()
    buffer_file = tmp_path / "learner" / "buffer.safetensors"
    data = buffer_file.read_bytes()
    buffer_file.write_bytes(data[: len(data) // 3])

    resumed, swapped = build_learner(tmp_path, "impala", serving=make_policy(init_seed=5))
    assert resumed.restore()  # the policy and optimizer resume; the unreadable buffer starts empty
    assert resumed.serving.version == 1 and swapped == [resumed.serving]
    assert same_weights(weights(resumed.serving), served)
    assert resumed.buffered() == 0


def test_a_recurrent_bundle_holding_run_state_is_not_reused(tmp_path: Path) -> None:
    """Reusing a retired LSTM bundle would resume runs' hidden states from two versions ago."""
    config = PolicyConfig(name="lstm", hidden_size=64, lstm_hidden=32)
    serving = create_policy("lstm", config, "cpu")
    learner = Learner(
        learner_config("impala"),
        make_policy=functools.partial(create_policy, "lstm", config, "cpu"),
        serving=serving,
        swap=lambda bundle: None,
        state_dir=tmp_path,
    )
    used = create_policy("lstm", config, "cpu")  # a bundle that served and remembers two runs
    used.act(SimEnv(2, SIM, seed=5).reset())
    assert used.tracked_runs == 2
    learner.bundles.retire(used)
    del used  # nothing references it any more: only its run memory stands in the way
    assert learner.bundles.reusable() is None
    fresh = create_policy("lstm", config, "cpu")
    learner.bundles.retire(fresh)
    del fresh
    assert learner.bundles.reusable() is not None
    learner.close()
