"""Every torch path on every device this machine has: the CPU always, CUDA where there is a GPU.

CI has no GPU, so there these tests run on the CPU only; on a GPU machine (the `device` fixture
in conftest.py) the same assertions cover the CUDA path of inference, both learners, the
learner's child process and checkpoints. Results on a device are compared with a CPU copy of
the same weights, so a silent device bug (a tensor left on the wrong device, a mask lost in a
transfer) shows up as a wrong answer, not only as a crash.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from esperd.analyzer.observation import Observation
from esperd.learn.config import ImpalaConfig, PPOConfig
from esperd.learn.impala import ImpalaUpdater
from esperd.learn.learner import Learner
from esperd.learn.ppo import PPOUpdater
from esperd.policy import PolicyBundle, PolicyConfig, create_policy
from esperd.policy.checkpoint import load_policy_checkpoint, save_policy_checkpoint
from tests.support.observations import make_observation
from tests.support.timing import FakeClock
from tests.test_learner import feed, learner_config, sim_transitions, weights
from tests.test_ppo import assert_finite_stats, synthetic_transitions

torch.set_num_threads(1)

STARTUP_S = 60.0  # a process worker's child imports torch (and initializes CUDA) first


def config(name: str) -> PolicyConfig:
    return PolicyConfig(name=name, hidden_size=64, gnn_layers=2, lstm_hidden=32, dropout=0.0, init_seed=3)


def on(device: str, name: str = "gnn") -> PolicyBundle:
    return create_policy(name, config(name), device)


def cpu_copy(policy: PolicyBundle, name: str = "gnn") -> PolicyBundle:
    copy = on("cpu", name)
    copy.load_state_dict({k: v.cpu() for k, v in policy.state_dict().items()}, version=policy.version)
    return copy


def observations(count: int = 6) -> list[Observation]:
    return [make_observation(f"run-{i}", 4 + i % 5, seed=100 + i, epoch=3) for i in range(count)]


def parameters_on(policy: PolicyBundle, device: str) -> bool:
    return all(v.device.type == torch.device(device).type for v in policy.state_dict().values())


@pytest.mark.parametrize("name", ["gnn", "lstm"])
def test_act_on_the_device_matches_the_cpu(device: str, name: str) -> None:
    policy = on(device, name)
    assert parameters_on(policy, device)
    obs = observations()
    got = policy.act(obs, deterministic=True)
    want = cpu_copy(policy, name).act(obs, deterministic=True)
    assert torch.equal(got.actions, want.actions)
    assert torch.allclose(got.log_probs, want.log_probs, atol=1e-4)
    assert torch.allclose(got.values, want.values, atol=1e-4)
    assert [d.policy_version for d in got.decisions] == [0] * len(obs)


@pytest.mark.parametrize("name", ["gnn", "lstm"])
def test_evaluate_on_the_device_matches_act_and_has_gradients(device: str, name: str) -> None:
    policy = on(device, name)
    obs = observations()
    acted = policy.act(obs)
    if name == "lstm":  # evaluate the step from the hidden state act started from
        result = policy.evaluate(obs, acted.actions, hidden=acted.hidden)
    else:
        result = policy.evaluate(obs, acted.actions)
    assert result.log_probs.device.type == torch.device(device).type
    assert torch.allclose(result.log_probs.detach().cpu(), acted.log_probs, atol=1e-4)
    (result.log_probs.sum() + result.values.sum()).backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_ppo_update_on_the_device(device: str) -> None:
    policy = on(device)
    learner = PPOUpdater(policy, PPOConfig(warmup_updates=0, target_kl=None, minibatch_size=16))
    before = weights(policy)
    stats = learner.update(synthetic_transitions(policy, runs=4, steps=16))
    assert_finite_stats(stats)
    assert stats.epochs_run == 4 and stats.samples == 64
    after = weights(policy)
    assert parameters_on(policy, device)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_impala_update_on_the_device(device: str) -> None:
    policy = on(device)
    learner = ImpalaUpdater(policy, ImpalaConfig(batch_size=64))
    before = weights(policy)
    stats = learner.update(synthetic_transitions(policy, runs=4, steps=16))
    assert_finite_stats(stats)
    assert len(stats.td_errors) == 64 and all(np.isfinite(stats.td_errors))
    after = weights(policy)
    assert parameters_on(policy, device)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_learner_child_process_trains_on_the_device_and_swaps_into_it(
    device: str, algorithm: str, tmp_path: Path
) -> None:
    make = functools.partial(create_policy, "gnn", config("gnn"), device)
    serving = make()
    swapped: list[PolicyBundle] = []
    learner = Learner(
        learner_config(algorithm, worker="process"),
        make,
        serving,
        swapped.append,
        tmp_path,
        clock=FakeClock(),
    )
    try:
        feed(learner, sim_transitions(serving, 32, seed=1))
        assert await learner.update_once(), learner.status
        assert learner.status.worker_pid and learner.status.worker_deaths == 0
        new = swapped[-1]
        assert new.version == 1 and parameters_on(new, device)
        assert any(
            not torch.equal(a, b)
            for a, b in zip(weights(new).values(), weights(serving).values(), strict=True)
        )
        # The new weights serve on the device as they would on the CPU.
        obs = observations()
        got, want = new.act(obs, deterministic=True), cpu_copy(new).act(obs, deterministic=True)
        assert torch.equal(got.actions, want.actions)
    finally:
        learner.close()


def test_checkpoint_saved_on_the_device_loads_on_the_cpu(device: str, tmp_path: Path) -> None:
    policy = on(device)
    policy.load_state_dict(policy.state_dict(), version=7)
    path = save_policy_checkpoint(tmp_path / "policy.safetensors", policy)
    loaded = on("cpu")
    info = load_policy_checkpoint(path, loaded)
    assert info.version == 7 == loaded.version and parameters_on(loaded, "cpu")
    for key, value in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.cpu())
