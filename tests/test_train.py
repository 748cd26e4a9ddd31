"""`esperd train`: tiny runs of each mode write loadable best/last checkpoints and finite metrics;
the held-out metrics are what they say; the command line fails clearly on bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from esperd.cli import main as cli_main
from esperd.learn import ReplayBuffer, RolloutBuffer
from esperd.learn.config import ImpalaConfig, LearnerConfig, PPOConfig
from esperd.learn.experience import Transition
from esperd.policy import PolicyConfig, build_serving_policy, create_policy, load_policy_checkpoint
from esperd.sim import SimConfig, SimEnv
from esperd.train import (
    OfflineTrainingSpec,
    TrainError,
    collect,
    evaluate_heldout,
    make_heldout,
    split_holdout,
    train,
)

torch.set_num_threads(1)

SIM = SimConfig(epochs=6, min_layers=4, max_layers=6, report_budget=False)
POLICY = PolicyConfig(name="gnn", hidden_size=64, gnn_layers=1, dropout=0.0)
LEARNER = LearnerConfig(
    ppo=PPOConfig(rollout_size=16, minibatch_size=8, epochs=2, warmup_updates=0),
    impala=ImpalaConfig(batch_size=16, lr=5e-4),
    min_replay=16,
    replay_capacity=1000,
)


def spec(tmp_path: Path, **kw: object) -> OfflineTrainingSpec:
    base: dict[str, object] = {
        "envs": 4,
        "eval_every": 2,
        "eval_episodes": 4,
        "out": str(tmp_path / "out"),
        "device": "cpu",
        "policy_config": POLICY,
        "learner": LEARNER,
        "sim_config": SIM,
        "progress": False,
    }
    base.update(kw)
    return OfflineTrainingSpec(**base)  # type: ignore[arg-type]


def metrics(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_finite(record: dict[str, object], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)


def assert_checkpoints_load(out: Path, name: str = "gnn", config: PolicyConfig = POLICY) -> None:
    for file in ("best.safetensors", "last.safetensors"):
        fresh = create_policy(name, msgspec.structs.replace(config, name=name, init_seed=123), "cpu")
        info = load_policy_checkpoint(out / file, fresh)
        assert info.version >= 1
        assert all(torch.isfinite(v).all() for v in fresh.state_dict().values() if v.is_floating_point())


def saved_experience(
    path: Path, episodes_envs: int = 4, steps: int = 14, kind: str = "replay"
) -> list[Transition]:
    """A buffer file as the daemon writes it, filled by a small policy acting in the simulator."""
    policy = create_policy("gnn", POLICY, "cpu")
    env = SimEnv(episodes_envs, SIM, seed=3)
    transitions, _ = collect(env, policy, env.reset(), steps)
    buffer = ReplayBuffer(1000, seed=0) if kind == "replay" else RolloutBuffer(1000)
    buffer.extend(transitions)
    buffer.save(path)
    return transitions


# ---------------------------------------------------------------- the three modes


def test_sim_ppo_tiny_run(tmp_path: Path) -> None:
    result = train(spec(tmp_path, algo="ppo", sim=True, updates=4))
    assert result.updates == 4 and result.env_steps == 4 * 16 and result.failures == 0
    assert result.best_metric == "sim_return" and math.isfinite(result.best_value)
    rows = metrics(result.out)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["update"] for r in evals] == [2, 4]
    for record in evals:
        assert_finite(
            record, ("sim_return", "sim_return_sd", "policy_loss", "value_loss", "entropy", "approx_kl")
        )
    assert sum(1 for r in rows if r["kind"] == "update") == 4
    assert_checkpoints_load(result.out)
    assert (result.out / "policy.toml").is_file()


@pytest.mark.parametrize("sequence_length", [1, 4])
def test_sim_impala_tiny_run(tmp_path: Path, sequence_length: int) -> None:
    result = train(
        spec(tmp_path, algo="impala", sim=True, updates=6, unroll=2, sequence_length=sequence_length)
    )
    assert result.updates == 6 and result.failures == 0
    evals = [r for r in metrics(result.out) if r["kind"] == "eval"]
    assert [r["update"] for r in evals] == [2, 4, 6]
    for record in evals:
        assert_finite(record, ("sim_return", "policy_loss", "value_loss", "entropy"))
    assert_checkpoints_load(result.out)


@pytest.mark.parametrize("algo", ["ppo", "impala"])
def test_from_a_saved_buffer(tmp_path: Path, algo: str) -> None:
    path = tmp_path / "buffer.safetensors"
    saved_experience(path, kind="replay" if algo == "impala" else "rollout")
    result = train(spec(tmp_path, algo=algo, experience=str(path), updates=4, holdout=0.25))
    assert result.updates == 4 and result.env_steps == 0
    assert result.best_metric == "value_mse" and math.isfinite(result.best_value)
    evals = [r for r in metrics(result.out) if r["kind"] == "eval"]
    assert evals and all(r["value_targets"] == "complete" for r in evals)
    for record in evals:
        assert_finite(record, ("action_accuracy", "node_op_accuracy", "op_accuracy", "nll", "value_mse"))
        assert 0.0 <= record["action_accuracy"] <= record["node_op_accuracy"] <= 1.0  # type: ignore[operator]
        assert "sim_return" not in record
    assert_checkpoints_load(result.out)


def test_lstm_with_experience_and_sim(tmp_path: Path) -> None:
    path = tmp_path / "buffer.safetensors"
    saved_experience(path)
    result = train(
        spec(tmp_path, algo="impala", policy="lstm", experience=str(path), sim=True, updates=2, unroll=1)
    )
    record = result.history[-1]
    assert_finite(record, ("sim_return", "action_accuracy", "value_mse"))
    assert_checkpoints_load(result.out, "lstm")


# ---------------------------------------------------------------- held-out metrics


def test_heldout_split_is_by_run_and_returns_are_discounted_to_the_episode_end(tmp_path: Path) -> None:
    transitions = saved_experience(tmp_path / "b.safetensors")
    train_part, held = split_holdout(transitions, 0.25, seed=0)
    assert {t.run_id for t in train_part}.isdisjoint({t.run_id for t in held})
    assert len(train_part) + len(held) == len(transitions) and held

    heldout = make_heldout(held, gamma=0.5)
    run = held[0].run_id
    steps = [i for i, t in enumerate(held) if t.run_id == run]
    episode = steps[: next(k for k, i in enumerate(steps) if held[i].done) + 1]
    rewards = [held[i].reward for i in episode]
    expected = sum(r * 0.5**k for k, r in enumerate(rewards))
    assert heldout.returns[episode[0]] == pytest.approx(expected, rel=1e-5)
    assert heldout.value_mask[episode].all() and heldout.value_targets == "complete"


def test_heldout_accuracy_is_one_on_the_policys_own_greedy_actions(tmp_path: Path) -> None:
    policy = create_policy("gnn", POLICY, "cpu")
    env = SimEnv(2, SIM, seed=5)
    observations = env.reset()
    result = policy.act(observations, deterministic=True)
    transitions = [
        Transition(obs=o, action=result.actions[i].numpy(), log_prob=0.0, value=0.0, policy_version=0)
        for i, o in enumerate(observations)
    ]
    scores = evaluate_heldout(policy, make_heldout(transitions, 0.99))
    assert scores["action_accuracy"] == scores["node_op_accuracy"] == scores["op_accuracy"] == 1.0
    assert scores["nll"] == pytest.approx(-float(result.log_probs.sum()) / 2, rel=1e-4)
    # Returns are all zero here (no rewards, no episode end): value_mse is the mean squared value.
    assert scores["value_mse"] == pytest.approx(float((result.values.double() ** 2).mean()), rel=1e-4)


# ---------------------------------------------------------------- the command line


def test_cli_trains_and_the_daemon_serves_the_best_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str
) -> None:
    config = tmp_path / "esperd.toml"
    config.write_text(
        "[policy]\nhidden_size = 64\ngnn_layers = 1\ndropout = 0.0\n"
        "[learner.ppo]\nrollout_size = 16\nminibatch_size = 8\nepochs = 1\n"
    )
    out = tmp_path / "run"
    argv = [
        "train",
        "--algo",
        "ppo",
        "--sim",
        "--updates",
        "2",
        "--envs",
        "4",
        "--eval-episodes",
        "2",
        "--eval-every",
        "1",
        "--out",
        str(out),
        "--device",
        device,
        "--config",
        str(config),
        "--quiet",
    ]
    assert cli_main(argv) == 0
    assert {p.name for p in out.iterdir()} >= {
        "best.safetensors",
        "last.safetensors",
        "metrics.jsonl",
        "policy.toml",
    }
    from esperd.config import load_config

    served = build_serving_policy(load_config(out / "policy.toml").policy, "cpu")
    assert not served.fell_back and served.checkpoint is not None
    assert served.policy.name == "gnn" and served.checkpoint.version >= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--sim"], "--algo"),
        (["train", "--algo", "sarsa", "--sim"], "invalid choice: 'sarsa'"),
        (["train", "--algo", "ppo", "--policy", "heuristic", "--sim"], "invalid choice: 'heuristic'"),
        (["train", "--algo", "ppo", "--sim", "--updates", "0"], "expected a positive integer, got '0'"),
        (["train", "--algo", "ppo", "--sim", "--updates", "3", "--steps", "9"], "not allowed with argument"),
        (["train", "--algo", "ppo", "--sim", "--holdout", "1.5"], "expected a fraction in [0, 1)"),
    ],
)
def test_cli_parse_errors_are_clear(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to learn from: give --experience PATH, --sim, or both"),
        (["--experience", "/nonexistent/buffer.safetensors"], "does not exist"),
    ],
)
def test_cli_input_errors_exit_2_with_a_message(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["train", "--algo", "ppo", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_experience_file_and_missing_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a buffer")
    assert (
        cli_main(["train", "--algo", "impala", "--experience", str(garbage), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "esperd train:" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert (
            cli_main(["train", "--algo", "ppo", "--sim", "--device", "cuda", "--out", str(tmp_path / "c")])
            == 2
        )
        assert "CUDA is not available" in capsys.readouterr().err


def test_spec_validation() -> None:
    with pytest.raises(TrainError, match="--policy"):
        OfflineTrainingSpec(algo="ppo", policy="heuristic", sim=True).validate()
    with pytest.raises(TrainError, match="not both"):
        OfflineTrainingSpec(algo="ppo", sim=True, updates=1, steps=1).validate()
    assert np.isclose(OfflineTrainingSpec(algo="impala", sim=True).gamma, ImpalaConfig().gamma)


def test_the_command_line_defaults_are_the_spec_defaults() -> None:
    """The options are generated from the spec (esperd.train.cli.OPTIONS): with nothing but the
    required --algo, every field an option sets keeps the spec's own default, and the help shows it."""
    import argparse
    import dataclasses

    from esperd.train.cli import OPTIONS, add_arguments, spec_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    spec = spec_from_args(parser.parse_args(["--algo", "impala"]), None)
    default = OfflineTrainingSpec(algo="impala")
    set_by_options = {o.field.split(".")[0] for o in OPTIONS if o.field is not None}
    assert set_by_options >= {"envs", "holdout", "sequence_length", "imitation", "progress"}
    for name in set_by_options:
        assert getattr(spec, name) == getattr(default, name), name
    unset = {f.name for f in dataclasses.fields(OfflineTrainingSpec)} - set_by_options
    assert unset == {"policy_config", "learner", "sim_config", "eval_reward", "log_updates"}
    text = parser.format_help()
    assert f"({default.warm_start_steps})" in text and f"({default.imitation.steps})" in text
