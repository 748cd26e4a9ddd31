"""The learner's process worker (esperd.learn.worker): the same updates as in-process, the
breaker across the process boundary, checkpoints through the child, a child killed for real
(restarted, the daemon's side unharmed), signals it must ignore, no orphan when its parent is
SIGKILLed; and swap coalescing.

A real GNN policy (hidden 64) on simulator transitions, as in tests/test_learner.py.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from esperd.learn.buffers import ReplayBuffer
from esperd.learn.config import ImpalaConfig, LearnerConfig, PPOConfig
from esperd.learn.learner import Learner
from esperd.learn.persist import decode_experience, encode_experience
from esperd.learn.worker import ProcessWorker, ThreadWorker, TrainerSpec, WorkerError
from esperd.policy import PolicyBundle, create_policy
from tests.support.timing import FakeClock
from tests.test_learner import (
    feed,
    learner_config,
    policy_config,
    same_weights,
    sim_transitions,
    weights,
)

# Most tests here start the learner's child process (a cold torch import each).
pytestmark = pytest.mark.slow

torch.set_num_threads(1)

# Picklable (the child builds its trainee from it), unlike a lambda.
MAKE_POLICY = functools.partial(create_policy, "gnn", policy_config(), "cpu")
STARTUP_S = 60.0  # a cold child imports torch; the machine may be busy


def build(
    tmp_path: Path, algorithm: str, *, clock: FakeClock | None = None, **overrides: object
) -> tuple[Learner, list[PolicyBundle]]:
    swapped: list[PolicyBundle] = []
    config = learner_config(algorithm, **{"worker": "process", **overrides})
    learner = Learner(
        config, MAKE_POLICY, MAKE_POLICY(), swapped.append, tmp_path, clock=clock or FakeClock()
    )
    return learner, swapped


@pytest.fixture
def learners() -> Iterator[list[Learner]]:
    """Learners to close after the test (their children must not outlive it)."""
    made: list[Learner] = []
    yield made
    for learner in made:
        learner.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _untimed(last: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in last.items() if k != "seconds"}


def test_config_defaults_to_a_niced_process_worker() -> None:
    config = LearnerConfig()
    assert config.worker == "process" and config.worker_nice == 10 and config.swap_min_interval_s == 0.25
    decoded = msgspec.convert({"worker": "thread", "worker_nice": 5}, LearnerConfig)
    assert decoded.worker == "thread" and decoded.worker_nice == 5
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"worker": "fork"}, LearnerConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"worker_nice": 20}, LearnerConfig)


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_process_worker_trains_exactly_like_the_thread_worker(
    tmp_path: Path, algorithm: str, learners: list[Learner]
) -> None:
    proc, swapped = build(tmp_path / "p", algorithm)
    learners.append(proc)
    thread, _ = build(tmp_path / "t", algorithm, worker="thread")
    assert isinstance(proc.worker, ProcessWorker) and isinstance(thread.worker, ThreadWorker)
    assert proc.status.worker == "process" and proc.status.worker_pid not in (0, os.getpid())
    batch = sim_transitions(proc.serving, 32, seed=1)
    feed(proc, batch)
    feed(thread, batch)

    before = weights(proc.serving)
    assert await proc.update_once() and await thread.update_once()
    assert proc.serving.version == 1 == thread.serving.version and swapped == [proc.serving]
    assert not same_weights(weights(proc.serving), before)
    if algorithm == "ppo":
        # Same seed, one torch thread, the same rollout: the very same weights and stats.
        # (IMPALA's replay buffers draw their own random samples.)
        assert same_weights(weights(proc.serving), weights(thread.serving))
        assert _untimed(proc.status.last) == _untimed(thread.status.last)
    assert proc.status.swap_pause_us_max > 0.0  # measured (its size: benchmarks/bench_learner.py)
    with pytest.raises(AttributeError):
        _ = proc.trainee  # it lives in the child


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_nan_in_the_child_trips_the_breaker_and_never_serves(
    tmp_path: Path, algorithm: str, learners: list[Learner]
) -> None:
    learner, swapped = build(tmp_path, algorithm, min_replay=16)
    learners.append(learner)
    serving = learner.serving
    good = weights(serving)
    bad = sim_transitions(serving, 32, seed=4)
    bad = [msgspec.structs.replace(t, reward=math.nan) for t in bad]
    feed(learner, bad)

    assert not await learner.update_once()
    assert learner.status.trips == 1 and "non-finite" in learner.status.last_trip
    assert swapped == [] and learner.serving is serving and same_weights(weights(serving), good)
    assert learner.status.worker_deaths == 0  # a breaker trip, not a worker failure


async def test_checkpoint_round_trip_through_the_child(tmp_path: Path, learners: list[Learner]) -> None:
    learner, _ = build(tmp_path, "impala")
    learners.append(learner)
    feed(learner, sim_transitions(learner.serving, 32, seed=14))
    assert await learner.update_once()
    served = weights(learner.serving)
    moments = learner.worker.export_algo()
    learner.save_checkpoint()

    resumed, swapped = build(tmp_path, "impala")
    learners.append(resumed)
    assert resumed.restore()
    assert resumed.serving.version == 1 and swapped == [resumed.serving]
    assert same_weights(weights(resumed.serving), served)
    again = resumed.worker.export_algo()  # the child imported the saved optimizer state
    assert again["updates"] == moments["updates"] == 1
    first = min(moments["optimizer"]["state"])
    key = "square_avg"
    assert torch.equal(again["optimizer"]["state"][first][key], moments["optimizer"]["state"][first][key])
    assert await resumed.update_once() and resumed.serving.version == 2


@pytest.mark.parametrize("when", ["idle", "mid-update"])
async def test_a_killed_child_is_logged_counted_and_restarted_and_learning_goes_on(
    tmp_path: Path, when: str, learners: list[Learner]
) -> None:
    clock = FakeClock()
    learner, swapped = build(tmp_path, "ppo", clock=clock)
    learners.append(learner)
    feed(learner, sim_transitions(learner.serving, 32, seed=1))
    assert await learner.update_once()  # the child is up and has trained once
    v1 = learner.serving
    first_pid = learner.worker.pid

    # Mid-update: a batch big enough that the update cannot finish before the kill lands.
    feed(learner, sim_transitions(v1, 32 if when == "idle" else 512, seed=2))
    if when == "idle":
        os.kill(first_pid, signal.SIGKILL)
        assert not await learner.update_once()
    else:
        update = asyncio.create_task(learner.update_once())
        await asyncio.sleep(0.02)  # the batch is on its way to the child, or in its update
        os.kill(first_pid, signal.SIGKILL)
        assert not await update

    status = learner.status
    assert status.worker_deaths == 1 and "SIGKILL" in status.last_worker_error
    assert status.worker_pid != first_pid and alive(status.worker_pid) and not alive(first_pid)
    assert learner.serving is v1 and swapped == [v1] and status.trips == 0  # nothing served or tripped
    assert learner.paused  # a short pause before the next try

    clock.now += 60.0
    feed(learner, sim_transitions(v1, 32, seed=3))
    assert await learner.update_once()  # the restarted child learns from the last good weights
    assert learner.serving.version == 2 and learner.status.worker_deaths == 1


async def test_the_child_ignores_sigterm_and_sigint(tmp_path: Path, learners: list[Learner]) -> None:
    learner, _ = build(tmp_path, "ppo")
    learners.append(learner)
    feed(learner, sim_transitions(learner.serving, 32, seed=1))
    assert await learner.update_once()  # started and past its imports
    pid = learner.worker.pid
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    await asyncio.sleep(0.2)
    assert alive(pid)
    feed(learner, sim_transitions(learner.serving, 32, seed=2))
    assert await learner.update_once() and learner.status.worker_deaths == 0


async def test_close_ends_the_child(tmp_path: Path) -> None:
    learner, _ = build(tmp_path, "impala")
    feed(learner, sim_transitions(learner.serving, 32, seed=1))
    assert await learner.update_once()
    pid = learner.worker.pid
    learner.close()
    assert not alive(pid)


PARENT = textwrap.dedent(
    """
    import functools, sys, time
    from pathlib import Path
    from esperd.learn.learner import Learner
    from esperd.learn.config import LearnerConfig
    from esperd.policy import PolicyConfig, create_policy
    config = PolicyConfig(name="gnn", hidden_size=64, gnn_layers=2)
    make = functools.partial(create_policy, "gnn", config, "cpu")
    learner = Learner(LearnerConfig(algorithm="impala"), make, make(), lambda b: None, Path(sys.argv[1]))
    learner.worker.export_algo()  # wait until the child is up
    print("child", learner.worker.pid, flush=True)
    time.sleep(600)
    """
)


def test_sigkill_of_the_parent_leaves_no_orphan(tmp_path: Path) -> None:
    with subprocess.Popen(  # the with closes its stdout pipe
        [sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1]
    ) as parent:
        try:
            assert parent.stdout is not None
            line = b""
            while not line.startswith(b"child "):  # past the parent's log lines
                line = parent.stdout.readline()
                assert line, "the parent exited early"
            child = int(line.split()[1])
            assert alive(child)
            parent.kill()
            parent.wait()
            deadline = time.monotonic() + 5.0
            while alive(child):
                assert time.monotonic() < deadline, f"child {child} outlived its SIGKILLed parent"
                time.sleep(0.05)
        finally:
            if parent.poll() is None:
                parent.kill()


# ---------------------------------------------------------------- swap coalescing


async def test_impala_swaps_at_most_once_per_interval_and_serves_the_newest_weights(tmp_path: Path) -> None:
    clock = FakeClock()
    learner, swapped = build(tmp_path, "impala", clock=clock, worker="thread", swap_min_interval_s=1.0)
    feed(learner, sim_transitions(learner.serving, 32, seed=1))
    assert await learner.update_once()  # the first swap is due at once
    assert learner.serving.version == 1

    assert not await learner.update_once()  # trained, held back: the interval has not passed
    assert not await learner.update_once()
    assert learner.status.updates == 3 and learner.status.swaps == 1 and learner.serving.version == 1

    clock.now += 1.0
    assert await learner.update_once()  # due again: the newest weights, as the next version
    assert learner.serving.version == 2 and swapped[-1] is learner.serving
    assert same_weights(weights(learner.serving), weights(learner.trainee))
    assert [b.version for b in swapped] == [1, 2]


@pytest.mark.parametrize("worker", ["thread", "process"])
async def test_held_back_weights_swap_in_when_updates_stop(
    tmp_path: Path, worker: str, learners: list[Learner]
) -> None:
    learner, swapped = build(tmp_path, "impala", clock=time.monotonic, worker=worker, swap_min_interval_s=0.3)
    learners.append(learner)
    feed(learner, sim_transitions(learner.serving, 32, seed=1))
    assert await learner.update_once() and not await learner.update_once()
    assert learner.serving.version == 1
    # The second update's weights stayed in the worker: what serves is the first update's.
    assert not same_weights(weights(learner.serving), learner.worker.weights())
    learner.config = msgspec.structs.replace(learner.config, min_replay=10_000)  # no more updates
    task = asyncio.create_task(learner.run())
    try:
        deadline = time.monotonic() + 5.0
        while learner.serving.version < 2:
            assert time.monotonic() < deadline, "the held-back weights never served"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert same_weights(weights(learner.serving), learner.worker.weights())
    assert learner.status.updates == 2 and [b.version for b in swapped] == [1, 2]


async def test_a_trip_discards_held_back_weights(tmp_path: Path) -> None:
    clock = FakeClock()
    learner, swapped = build(tmp_path, "impala", clock=clock, worker="thread", swap_min_interval_s=1.0)
    good = weights(learner.serving)
    feed(learner, sim_transitions(learner.serving, 32, seed=1))
    assert await learner.update_once() and not await learner.update_once()
    learner._trip("test")
    assert not learner._held_back
    assert learner.serving.version == 2 and same_weights(weights(learner.serving), good)
    assert [b.version for b in swapped] == [1, 2]


async def test_a_retired_bundle_is_reused_only_once_nothing_holds_it(tmp_path: Path) -> None:
    serving: list[PolicyBundle] = []

    def swap(bundle: PolicyBundle) -> None:
        serving[:] = [bundle]  # as the DecisionLoop does: only the serving bundle is kept

    learner = Learner(
        learner_config("impala", worker="thread"),
        MAKE_POLICY,
        MAKE_POLICY(),
        swap,
        tmp_path,
        clock=FakeClock(),
    )
    feed(learner, sim_transitions(learner.serving, 32, seed=1))
    assert await learner.update_once()
    in_flight = learner.serving  # a batch still deciding on version 1
    frozen = weights(in_flight)
    assert await learner.update_once()  # version 2 reuses version 0's bundle (nothing holds it)
    assert learner.status.bundles_reused == 1
    assert await learner.update_once()  # version 3: version 1 is still held, so a new bundle
    assert await learner.update_once()
    assert in_flight.version == 1 and same_weights(weights(in_flight), frozen)
    assert all(b is not in_flight for b in (learner.serving, *serving))
    reused = learner.status.bundles_reused
    del in_flight
    assert await learner.update_once() and await learner.update_once()
    assert learner.status.bundles_reused == reused + 2
    assert [learner.serving.version, serving[0].version] == [6, 6]
    assert same_weights(weights(learner.serving), weights(learner.trainee))


def test_a_lambda_factory_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="picklable policy factory"):
        Learner(
            learner_config("ppo", worker="process"), lambda: MAKE_POLICY(), MAKE_POLICY(), print, tmp_path
        )


async def test_close_during_an_update_ends_it_as_a_stopped_worker(tmp_path: Path) -> None:
    learner, swapped = build(
        tmp_path,
        "ppo",
        ppo=PPOConfig(rollout_size=32, minibatch_size=8, epochs=50, warmup_updates=0, target_kl=None),
    )
    feed(learner, sim_transitions(learner.serving, 32, seed=1))
    task = asyncio.create_task(learner.run())
    deadline = time.monotonic() + STARTUP_S
    while not learner._updating:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.done()
    learner.close()  # the executor thread still waits on the child: it ends with WorkerDied, quietly
    assert swapped == [] and not await learner.update_once()


def assert_same_struct(a: msgspec.Struct, b: msgspec.Struct) -> None:
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y), name
        elif isinstance(x, msgspec.Struct):
            assert_same_struct(x, y)
        else:
            assert x == y, (name, x, y)


def test_a_batch_crosses_to_the_child_as_the_same_transitions() -> None:
    """The child trains on what the daemon sent, field by field, episode ends included; shared
    observations and topologies cross once (encoded as the experience file encodes them)."""
    import pickle

    policy = MAKE_POLICY()
    batch = sim_transitions(policy, 200, seed=3, envs=8)
    assert any(t.next_obs is None for t in batch) and any(t.next_obs is not None for t in batch)
    batch[7] = msgspec.structs.replace(batch[7], hidden=np.ones((2, 4), dtype=np.float32), truncated=True)
    arrays, meta = pickle.loads(pickle.dumps(encode_experience(batch, kind="batch")))
    back = decode_experience(meta, arrays).transitions
    assert len(back) == len(batch)
    for sent, got in zip(batch, back, strict=True):
        assert_same_struct(sent, got)
    assert back[7].hidden is not None and back[0].hidden is None
    versions = {(o.run_id, o.topology_version) for t in batch for o in (t.obs, t.next_obs) if o is not None}
    assert meta["counts"]["topologies"] == len(versions)
    assert meta["counts"]["steps"] < 2 * len(batch)  # a step's next_obs is the next step's obs


def test_replay_transitions_cross_to_the_child_once_then_by_slot() -> None:
    """IMPALA names a replay batch's transitions by (slot, stamp): the child is sent each one
    once, trains on exactly what an in-process worker trains on, and a refilled slot's new
    occupant is sent again."""
    pool = sim_transitions(MAKE_POLICY(), 24, seed=2)
    replay = ReplayBuffer(8, prioritized=False, seed=0)
    replay.extend(pool[:8])
    spec = TrainerSpec(MAKE_POLICY, "impala", PPOConfig(), ImpalaConfig(batch_size=16))
    state = MAKE_POLICY().state_dict()
    proc, thread = ProcessWorker(spec, state, 0, nice=0), ThreadWorker(spec, state, 0)
    try:
        rng = np.random.default_rng(0)
        known: set[tuple[int, int]] = set()
        for round_ in range(4):
            if round_ == 2:
                replay.extend(pool[8:20])  # every slot refilled: new stamps, new transitions
            sampled = replay.sample(16, rng)
            got, got_state = proc.update(
                sampled.transitions, sampled.weights, slots=(sampled.indices, sampled.stamps)
            )
            want, want_state = thread.update(sampled.transitions, sampled.weights)
            assert got_state is not None and want_state is not None
            assert same_weights(got_state, want_state), f"round {round_}"
            assert got.policy_loss == want.policy_loss
            known |= set(zip(sampled.indices.tolist(), sampled.stamps.tolist(), strict=True))
            assert proc.transitions_sent == len(known), f"round {round_}"
        assert len(known) > 8  # the refilled slots were sent again
    finally:
        proc.close()


def test_a_slot_the_child_never_got_is_an_error_not_a_wrong_batch() -> None:
    pool = sim_transitions(MAKE_POLICY(), 4, seed=2)
    spec = TrainerSpec(MAKE_POLICY, "impala", PPOConfig(), ImpalaConfig(batch_size=4))
    proc = ProcessWorker(spec, MAKE_POLICY().state_dict(), 0, nice=0)
    try:
        _, state = proc.update(pool, None, with_state=False, slots=(np.arange(4), np.arange(4)))
        assert state is None and proc.transitions_sent == 4
        proc._held.add(np.array([[5], [99]]))  # as if slot 5's occupant had been sent
        with pytest.raises(WorkerError, match="never sent"):
            proc.update(pool[:1], None, slots=(np.array([5]), np.array([99])))
    finally:
        proc.close()
