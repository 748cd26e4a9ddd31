"""`esperd train --warm-start`: the reference's demonstrations are what it decided, the cloned
policy is saved and evaluated before RL, and bad options are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from esperd.cli import main as cli_main
from esperd.learn.config import ImitationConfig, LearnerConfig, PPOConfig
from esperd.policy import PolicyConfig, create_policy, load_policy_checkpoint
from esperd.sim import ScriptedPolicy, SimConfig, SimEnv
from esperd.train import OfflineTrainingSpec, TrainError, train
from esperd.train.warmstart import (
    HOLDOUT_EVERY,
    REFERENCES,
    record_demonstrations,
    reference_policy,
    split_runs,
    warm_start,
)

torch.set_num_threads(1)

SIM = SimConfig(epochs=12, min_layers=4, max_layers=6, report_budget=False)  # seeds must start late
POLICY = PolicyConfig(name="gnn", hidden_size=64, gnn_layers=1, dropout=0.0)


def test_demonstrations_record_the_references_decisions_in_step_order() -> None:
    env = SimEnv(3, SIM, seed=1)
    steps = record_demonstrations(ScriptedPolicy(), env, 13)  # one 12-epoch episode and a step
    assert len(steps) == 3 * 13
    again = ScriptedPolicy()
    for t in steps:
        assert np.array_equal(t.action, again.act([t.obs])[0])  # stateless: same observation, same row
    done = [t for t in steps if t.done]
    assert len(done) == 3 and all(t.next_obs is None for t in done)
    assert all(a.next_obs is b.obs for a, b in zip(steps[:-3], steps[3:], strict=True) if not a.done)


def test_heldout_runs_are_every_tenth_run() -> None:
    steps = record_demonstrations(ScriptedPolicy(), SimEnv(4, SIM, seed=2), 12 * 5)  # 20 runs
    train_part, held = split_runs(steps)
    runs = list(dict.fromkeys(t.run_id for t in steps))
    assert {t.run_id for t in held} == set(runs[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY])
    assert len(train_part) + len(held) == len(steps)


@pytest.mark.parametrize("reference", REFERENCES)
def test_both_references_clone(reference: str) -> None:
    policy = create_policy("gnn", POLICY, "cpu")
    stats, demonstrations = warm_start(
        policy,
        reference,
        steps=96,
        sim_config=SIM,
        envs=4,
        seed=0,
        config=ImitationConfig(steps=20, batch_size=32),
    )
    assert stats.samples == len(demonstrations) > 0
    assert np.isfinite(stats.nll_after) and stats.nll_after < stats.nll_before
    with pytest.raises(ValueError, match="heuristic, scripted"):
        reference_policy("oracle")


def test_train_clones_first_saves_the_clone_and_evaluates_it_before_rl(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(
        OfflineTrainingSpec(
            algo="ppo",
            sim=True,
            updates=2,
            envs=4,
            eval_every=1,
            eval_episodes=4,
            out=str(out),
            device="cpu",
            policy_config=POLICY,
            learner=LearnerConfig(
                ppo=PPOConfig(rollout_size=16, minibatch_size=8, epochs=1, warmup_updates=0)
            ),
            sim_config=SIM,
            progress=False,
            warm_start="heuristic",
            warm_start_steps=96,
            imitation=ImitationConfig(steps=10, batch_size=32),
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "warm_start" and rows[0]["reference"] == "heuristic" and rows[0]["steps"] == 10
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["update"] for r in evals] == [0, 1, 2] and evals[0]["version"] == 0
    # The clone is saved as it was before RL, and it is what update 0 evaluated.
    clone = create_policy("gnn", POLICY, "cpu")
    load_policy_checkpoint(out / "warm_start.safetensors", clone)
    assert clone.version == 0 and result.updates == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"warm_start": "oracle"}, "--warm-start must be one of heuristic, scripted"),
        ({"warm_start": "heuristic", "policy": "lstm"}, "feed-forward"),
        ({"warm_start": "heuristic", "warm_start_steps": 0}, "--warm-start-steps"),
        ({"anchor_coef": 1.0}, "--anchor-coef needs --warm-start"),
        ({"warm_start": "heuristic", "algo": "impala", "anchor_coef": 1.0}, "--algo ppo"),
        ({"warm_start": "heuristic", "anchor_coef": -1.0}, "must be >= 0"),
        (
            {
                "warm_start": "heuristic",
                "policy_config": PolicyConfig(name="gnn", checkpoint="w.safetensors"),
            },
            "give one",
        ),
    ],
)
def test_spec_refuses_bad_warm_starts(changes: dict[str, object], message: str) -> None:
    with pytest.raises(TrainError, match=message):
        OfflineTrainingSpec(**{"algo": "ppo", "sim": True, **changes}).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--warm-start", "oracle"], "invalid choice: 'oracle'"),
        (["--warm-start", "heuristic", "--warm-start-steps", "0"], "expected a positive integer, got '0'"),
        (["--warm-start", "heuristic", "--lever-smoothing", "1"], "expected a fraction in [0, 1), got '1'"),
        (["--warm-start", "heuristic", "--anchor-coef", "nan"], "expected a number >= 0, got 'nan'"),
        (
            ["--warm-start", "heuristic", "--warm-start-updates", "-3"],
            "expected a positive integer, got '-3'",
        ),
    ],
)
def test_cli_refuses_bad_warm_start_options(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--algo", "ppo", "--sim", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_warm_start_of_an_lstm_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--algo", "ppo", "--sim", "--policy", "lstm", "--warm-start", "scripted"]
    assert cli_main([*argv, "--out", str(tmp_path)]) == 2
    assert "feed-forward" in capsys.readouterr().err


def test_cli_passes_the_warm_start_options_on() -> None:
    import argparse

    from esperd.train import add_arguments, spec_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--algo", "ppo", "--sim", "--warm-start", "scripted", "--warm-start-steps", "64"]
    argv += [
        "--warm-start-updates",
        "7",
        "--lever-smoothing",
        "0.1",
        "--anchor-coef",
        "0.5",
        "--anchor-updates",
        "3",
    ]
    spec = spec_from_args(parser.parse_args(argv), None)
    assert (spec.warm_start, spec.warm_start_steps, spec.imitation.steps) == ("scripted", 64, 7)
    assert (spec.imitation.lever_smoothing, spec.anchor_coef, spec.anchor_updates) == (0.1, 0.5, 3)
    spec.validate()
