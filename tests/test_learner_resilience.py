"""The Learner survives a failing checkpoint, can run again after a failure, and adopts
reloaded weights as the next version.

In process, no broker (tests/integration/test_supervision.py runs the same faults in a real
daemon): a real GNN, real simulator experience, a thread worker. The unwritable checkpoint
directory is a regular file where `<state_dir>/learner` should be: unwritable for root too.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from tests.test_learner import FakeClock, build_learner, make_policy, sim_transitions


def block_checkpoint_dir(state_dir: Path) -> Path:
    blocker = state_dir / "learner"
    blocker.write_text("a file where the checkpoint directory should be")
    return blocker


async def test_a_failed_checkpoint_is_counted_retried_with_backoff_and_learning_goes_on(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    learner, swapped = build_learner(tmp_path, "ppo", clock=clock, checkpoint_interval_s=60.0)
    blocker = block_checkpoint_dir(tmp_path)

    assert await learner.checkpoint() is False
    status = learner.status
    assert status.checkpoint_failures == 1 and status.checkpoints == 0
    assert "FileExistsError" in status.last_checkpoint_error and "learner" in status.last_checkpoint_error
    assert status.last_checkpoint_error_at.endswith("+00:00")
    assert status.checkpoint_retry_in_s == 1.0
    assert await learner.checkpoint() is False
    assert learner.status.checkpoint_failures == 2 and learner.status.checkpoint_retry_in_s == 2.0
    for _ in range(10):
        await learner.checkpoint()
    assert learner.status.checkpoint_retry_in_s == 60.0  # the backoff stops at the interval

    for t in sim_transitions(learner.serving, 64):  # learning is unaffected
        learner.add(t)
    assert await learner.update_once() is True
    assert learner.status.updates == 1 and swapped[-1].version == 1

    blocker.unlink()  # the operator fixes it: the next attempt succeeds
    assert await learner.checkpoint() is True
    assert learner.status.checkpoints == 1 and learner.status.checkpoint_retry_in_s == 0.0
    assert (tmp_path / "learner" / "policy.safetensors").is_file()
    learner.close()


@pytest.mark.slow
async def test_the_run_loop_retries_a_failed_checkpoint_and_keeps_updating(tmp_path: Path) -> None:
    learner, swapped = build_learner(
        tmp_path, "ppo", clock=asyncio.get_running_loop().time, checkpoint_interval_s=0.2
    )
    blocker = block_checkpoint_dir(tmp_path)
    task = asyncio.create_task(learner.run())
    try:
        for i in range(12):  # a rollout's worth at a time, from the version serving (PPO is on-policy)
            for t in sim_transitions(learner.serving, 32, seed=i):
                learner.add(t)
            await asyncio.sleep(0.05)
            deadline = asyncio.get_running_loop().time() + 20
            while learner.status.updates < i + 1:
                assert not task.done(), task
                assert asyncio.get_running_loop().time() < deadline, "no update"
                await asyncio.sleep(0.01)
        assert learner.status.checkpoint_failures >= 2 and not task.done()
        assert learner.status.updates >= 10 and swapped[-1].version >= 10
        # With no new experience at all, the retry still comes (1 s after the last failure, at most).
        blocker.unlink()
        deadline = asyncio.get_running_loop().time() + 10
        while learner.status.checkpoints == 0:
            assert asyncio.get_running_loop().time() < deadline, "the retry never came"
            await asyncio.sleep(0.05)
    finally:
        await learner.quiesce()
        await asyncio.wait_for(task, 20)
        learner.close()
    assert (tmp_path / "learner" / "policy.safetensors").is_file()


async def test_run_can_start_again_after_it_was_cancelled(tmp_path: Path) -> None:
    learner, swapped = build_learner(tmp_path, "ppo")
    first = asyncio.create_task(learner.run())
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    second = asyncio.create_task(learner.run())  # as the supervisor restarts it
    for t in sim_transitions(learner.serving, 40):
        learner.add(t)
    deadline = asyncio.get_running_loop().time() + 20
    while learner.status.updates == 0:
        assert asyncio.get_running_loop().time() < deadline and not second.done(), second
        await asyncio.sleep(0.01)
    await learner.quiesce()
    await asyncio.wait_for(second, 20)
    learner.close()
    assert swapped[-1].version == 1


async def test_adopt_serves_outside_weights_as_the_next_version_and_trains_on_them(tmp_path: Path) -> None:
    learner, swapped = build_learner(tmp_path, "ppo")
    for t in sim_transitions(learner.serving, 40):
        learner.add(t)
    assert await learner.update_once() is True
    outside = make_policy(init_seed=7)
    learner.adopt(outside)
    assert outside.version == 2 and swapped[-1] is outside and learner.serving is outside
    assert learner.status.serving_version == 2
    for key, value in outside.state_dict().items():  # the trainee starts from the adopted weights
        assert torch.equal(learner.trainee.state_dict()[key], value), key
    for t in sim_transitions(outside, 40):
        learner.add(t)
    assert await learner.update_once() is True
    assert swapped[-1].version == 3
    learner.close()


async def test_adopt_voids_an_update_in_flight(tmp_path: Path) -> None:
    learner, swapped = build_learner(tmp_path, "ppo")
    for t in sim_transitions(learner.serving, 40):
        learner.add(t)
    update = asyncio.create_task(learner.update_once())
    for _ in range(100_000):  # until it really is on the worker
        if learner._updating:
            break
        await asyncio.sleep(0)
    assert learner._updating
    outside = make_policy(init_seed=7)
    learner.adopt(outside)
    assert await update is False  # trained from the old weights: not served
    assert learner.serving is outside and swapped[-1] is outside and outside.version == 1
    for key, value in outside.state_dict().items():
        assert torch.equal(learner.trainee.state_dict()[key], value), key
    learner.close()
