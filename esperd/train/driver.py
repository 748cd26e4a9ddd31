"""The driver of one `esperd train` run: sources, budget, updates, evaluations, outputs.

`train(spec)` runs an OfflineTrainingSpec to its budget (docs/training.md says what it does and
writes); TrainingRun holds the run's state between steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from esperd.analyzer.observation import Observation
from esperd.learn.buffers import ReplayBuffer
from esperd.learn.config import LearnerConfig
from esperd.learn.experience import Transition
from esperd.learn.imitation import DemonstrationAnchor, ImitationStats
from esperd.learn.impala import ImpalaUpdater
from esperd.learn.persist import load_experience
from esperd.learn.ppo import NonFiniteError, PPOUpdater, UpdateStats
from esperd.policy.checkpoint import load_policy_checkpoint, save_policy_checkpoint
from esperd.policy.registry import create_policy
from esperd.sim.config import SimConfig
from esperd.sim.env import SimEnv
from esperd.train.device import resolve_device
from esperd.train.evaluation import (
    EVAL_SEED_OFFSET,
    HeldOut,
    evaluate_heldout,
    evaluate_sim,
    make_heldout,
    split_holdout,
)
from esperd.train.policytoml import policy_section
from esperd.train.rollout import collect
from esperd.train.spec import DEFAULT_UPDATES, OfflineTrainingSpec, TrainError
from esperd.train.warmstart import warm_start

MAX_CONSECUTIVE_FAILURES = 10


@dataclass
class TrainResult:
    out: Path
    best_path: Path | None  # None when nothing was evaluated
    last_path: Path
    best_metric: str  # "sim_return" | "value_mse"
    best_value: float
    best_update: int
    updates: int
    env_steps: int
    samples: int
    seconds: float
    failures: int  # updates skipped on NonFiniteError
    history: list[dict[str, Any]]  # the evaluation records, as written to metrics.jsonl


class TrainingRun:
    """State of one training run: policy, learner, sources, budget, evaluation, outputs."""

    def __init__(self, spec: OfflineTrainingSpec) -> None:
        spec.validate()
        self.spec = spec
        self.device = resolve_device(spec.device)
        torch.manual_seed(spec.seed)
        self.rng = np.random.default_rng(spec.seed)
        self.out = Path(spec.out)
        self.out.mkdir(parents=True, exist_ok=True)

        cfg = msgspec.structs.replace(spec.policy_config, name=spec.policy, init_seed=spec.seed)
        self.policy_config = msgspec.structs.replace(cfg, checkpoint=None, compile=False)
        self.policy = create_policy(spec.policy, self.policy_config, self.device)
        if cfg.checkpoint:  # warm start from the configured checkpoint
            load_policy_checkpoint(cfg.checkpoint, self.policy)
        self.imitation: ImitationStats | None = None
        # Before the learner is made, so that its optimizer starts fresh on the fitted weights.
        anchor = self._warm_start() if spec.warm_start is not None else None
        self.start_version = self.policy.version
        self.algo = self._make_algorithm(anchor)
        self.train_set, self.heldout = self._split_experience()

        learner_cfg = spec.learner
        sim_cfg = spec.sim_config or SimConfig(reward=learner_cfg.rewards)
        self.sim_config = sim_cfg
        self.eval_config = (
            sim_cfg if spec.eval_reward is None else msgspec.structs.replace(sim_cfg, reward=spec.eval_reward)
        )
        self.env: SimEnv | None = None
        self.observations: list[Observation] = []
        if spec.sim:
            self.env = SimEnv(spec.envs, sim_cfg, seed=spec.seed)
            self.observations = self.env.reset()

        self.replay: ReplayBuffer | None = None
        if spec.algo == "impala":
            capacity = max(learner_cfg.replay_capacity, len(self.train_set))
            self.replay = ReplayBuffer(capacity, prioritized=learner_cfg.prioritized, seed=spec.seed)
            self.replay.extend(self.train_set)
        self.cursor = 0  # PPO from a file: next transition of the training part
        self._pending_updates = 0.0  # IMPALA with --sim: updates owed to the replay ratio
        self._evaluated_at = -1

        self.updates = 0
        self.env_steps = 0
        self.samples = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.train_returns: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.best_metric = "sim_return" if spec.sim and spec.eval_episodes > 0 else "value_mse"
        self.best_value = math.nan
        self.best_update = -1
        self.best_path: Path | None = None
        self.last_stats: UpdateStats | None = None
        self.started = time.perf_counter()
        self.metrics = (self.out / "metrics.jsonl").open("w", encoding="utf-8")
        if self.imitation is not None:
            # The cloned policy as it was before RL: to serve or compare with the trained ones.
            save_policy_checkpoint(self.out / "warm_start.safetensors", self.policy)
            self._write(
                {"kind": "warm_start", "reference": spec.warm_start, **msgspec.structs.asdict(self.imitation)}
            )

    def _warm_start(self) -> DemonstrationAnchor | None:
        """Clone the reference controller (sets self.imitation); the anchor to its demonstrations."""
        spec = self.spec
        assert spec.warm_start is not None
        self.imitation, demonstrations = warm_start(
            self.policy,
            spec.warm_start,
            steps=spec.warm_start_steps,
            sim_config=spec.sim_config or SimConfig(reward=spec.learner.rewards),
            envs=spec.envs,
            seed=spec.seed,
            config=msgspec.structs.replace(spec.imitation, gamma=spec.gamma, seed=spec.seed),
        )
        if spec.anchor_coef <= 0:
            return None
        return DemonstrationAnchor(
            self.policy,
            demonstrations,
            coef=spec.anchor_coef,
            decay_updates=spec.anchor_updates,
            batch_size=spec.imitation.batch_size,
            seed=spec.seed,
        )

    def _make_algorithm(self, anchor: DemonstrationAnchor | None) -> PPOUpdater | ImpalaUpdater:
        spec, learner_cfg = self.spec, self.spec.learner
        if spec.algo != "ppo":
            return ImpalaUpdater(self.policy, learner_cfg.impala)
        ppo_cfg = msgspec.structs.replace(learner_cfg.ppo, seed=spec.seed)
        if learner_cfg.ppo.total_updates == LearnerConfig().ppo.total_updates:
            # Not configured: the LR decays over this run's budget.
            ppo_cfg = msgspec.structs.replace(ppo_cfg, total_updates=self.planned_updates())
        return PPOUpdater(self.policy, ppo_cfg, auxiliary=anchor)

    def _split_experience(self) -> tuple[list[Transition], HeldOut]:
        """Experience from a file: the training part and the held-out set."""
        spec = self.spec
        if not spec.experience:
            return [], HeldOut([], np.zeros(0, np.float32), np.zeros(0, bool), "none")
        loaded = load_experience(spec.experience).transitions
        if not loaded:
            raise TrainError(f"experience file {spec.experience} holds no transitions")
        train_set, held = split_holdout(loaded, spec.holdout, spec.seed)
        if spec.algo == "ppo" and spec.sim:
            held = held + train_set  # PPO is on-policy: the file only evaluates
            train_set = []
        if not spec.sim and not train_set:
            raise TrainError("every transition of the experience file is held out; lower --holdout")
        return train_set, make_heldout(held, spec.gamma)

    # ------------------------------------------------------------ budget

    def target(self) -> tuple[str, int]:
        spec = self.spec
        if spec.steps is not None:
            return ("env_steps" if spec.sim else "samples"), spec.steps
        return "updates", spec.updates if spec.updates is not None else DEFAULT_UPDATES

    def progress_of(self, unit: str) -> int:
        return {"updates": self.updates, "env_steps": self.env_steps, "samples": self.samples}[unit]

    def done(self) -> bool:
        unit, goal = self.target()
        return self.progress_of(unit) >= goal

    def planned_updates(self) -> int:
        """PPO: how many updates the budget allows (the LR decay horizon)."""
        spec, size = self.spec, self.spec.learner.ppo.rollout_size
        if spec.steps is None:
            return spec.updates if spec.updates is not None else DEFAULT_UPDATES
        if spec.sim:
            return math.ceil(spec.steps / (math.ceil(size / spec.envs) * spec.envs))
        return math.ceil(spec.steps / size)

    # ------------------------------------------------------------ one step

    def step(self) -> None:
        """Gather experience as the algorithm needs and make (at most) one learner update."""
        if self.spec.algo == "ppo":
            batch = self._ppo_batch()
            self._update(batch, None)
        else:
            self._impala_step()

    def _on_episode(self, episode_return: float) -> None:
        self.train_returns.append(episode_return)

    def _collect(self, steps: int) -> list[Transition]:
        assert self.env is not None
        transitions, self.observations = collect(
            self.env, self.policy, self.observations, steps, self._on_episode
        )
        self.env_steps += len(transitions)
        return transitions

    def _ppo_batch(self) -> list[Transition]:
        size = self.algo.config.rollout_size  # type: ignore[union-attr]
        if self.env is not None:
            return self._collect(max(1, math.ceil(size / self.spec.envs)))
        data = self.train_set
        if self.cursor >= len(data):
            self.cursor = 0
        batch = data[self.cursor : self.cursor + size]
        self.cursor += size
        return batch

    def _impala_step(self) -> None:
        assert self.replay is not None
        cfg = self.spec.learner
        batch_size = self.algo.config.batch_size  # type: ignore[union-attr]
        rounds = 1
        if self.env is not None:
            new = self._collect(self.spec.unroll)
            self.replay.extend(new)
            if len(self.replay) < min(cfg.min_replay, self.replay.capacity):
                return
            self._pending_updates += self.spec.replay_ratio * len(new) / batch_size
            rounds = int(self._pending_updates)
            self._pending_updates -= rounds
        for _ in range(rounds):
            if self.done():
                return
            self._impala_update(batch_size)
            if self.due_eval():
                self.evaluate()

    def _impala_update(self, batch_size: int) -> None:
        """One IMPALA update on a replay sample: single steps, or unrolls of --seq-len steps."""
        assert self.replay is not None
        length = self.spec.sequence_length
        if length <= 1:
            sampled = self.replay.sample(batch_size, self.rng)
            stats = self._update(sampled.transitions, sampled.weights)
            if stats is not None and stats.td_errors:
                self.replay.update_priorities(sampled.indices, stats.td_errors, stamps=sampled.stamps)
            return
        unrolls = self.replay.sample_sequences(max(1, batch_size // length), length, self.rng)
        lengths = np.array([len(seq) for seq in unrolls.sequences])
        flat = [t for seq in unrolls.sequences for t in seq]
        stats = self._update(flat, np.repeat(unrolls.weights, lengths))
        if stats is not None and stats.td_errors:
            # An unroll's start gets the mean |td| over the unroll as its priority.
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            per_unroll = np.add.reduceat(np.abs(np.asarray(stats.td_errors)), starts) / lengths
            self.replay.update_priorities(unrolls.indices, per_unroll, stamps=unrolls.stamps)

    def _update(self, batch: list[Transition], weights: np.ndarray | None) -> UpdateStats | None:
        if not batch:
            return None
        try:
            stats = (
                self.algo.update(batch) if weights is None else self.algo.update(batch, weights=weights)  # type: ignore[call-arg]
            )
        except NonFiniteError as exc:
            self.failures += 1
            self.consecutive_failures += 1
            self._write({"kind": "failure", "update": self.updates, "error": str(exc)})
            if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise TrainError(
                    f"{self.consecutive_failures} updates in a row were non-finite: {exc}"
                ) from exc
            return None
        self.consecutive_failures = 0
        self.updates += 1
        self.samples += len(batch)
        self.policy.version = self.start_version + self.updates
        self.last_stats = stats
        if self.spec.log_updates:
            row = {k: v for k, v in msgspec.structs.asdict(stats).items() if k != "td_errors"}
            self._write({"kind": "update", "env_steps": self.env_steps, **row})
        return stats

    # ------------------------------------------------------------ evaluation

    def due_eval(self) -> bool:
        return (
            self.updates > 0
            and self.updates % self.spec.eval_every == 0
            and self._evaluated_at != self.updates
        )

    def evaluate(self) -> dict[str, Any]:
        spec = self.spec
        self._evaluated_at = self.updates
        record: dict[str, Any] = {
            "kind": "eval",
            "update": self.updates,
            "version": self.policy.version,
            "env_steps": self.env_steps,
            "samples": self.samples,
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        if self.env is not None and spec.eval_episodes > 0:
            mean, sd = evaluate_sim(
                self.policy,
                spec.eval_episodes,
                self.eval_config,
                seed=spec.seed + EVAL_SEED_OFFSET,
                num_envs=spec.envs,
                deterministic=spec.eval_deterministic,
            )
            record["sim_return"], record["sim_return_sd"] = mean, sd
        if self.train_returns:
            recent = self.train_returns[-max(spec.envs, 16) :]
            record["train_return"] = float(np.mean(recent))
            record["train_episodes"] = len(self.train_returns)
        if len(self.heldout):
            record.update(evaluate_heldout(self.policy, self.heldout))
            record["value_targets"] = self.heldout.value_targets
        if self.last_stats is not None:
            s = self.last_stats
            record.update(
                policy_loss=s.policy_loss,
                value_loss=s.value_loss,
                entropy=s.entropy,
                approx_kl=s.approx_kl,
                explained_variance=s.explained_variance,
                lr=s.lr,
            )
        value = record.get(self.best_metric)
        if value is not None and math.isfinite(value):
            better = (
                math.isnan(self.best_value)
                or (self.best_metric == "sim_return" and value > self.best_value)
                or (self.best_metric == "value_mse" and value < self.best_value)
            )
            if better:
                self.best_value, self.best_update = float(value), self.updates
                self.best_path = save_policy_checkpoint(self.out / "best.safetensors", self.policy)
                record["best"] = True
        self.history.append(record)
        self._write(record)
        return record

    # ------------------------------------------------------------ outputs

    def _write(self, row: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(_jsonable(row)) + "\n")

    def finish(self) -> TrainResult:
        if self._evaluated_at != self.updates:
            self.evaluate()
        last = save_policy_checkpoint(self.out / "last.safetensors", self.policy)
        if self.best_path is None:  # nothing to rank by (e.g. a file with no held-out data)
            self.best_path = save_policy_checkpoint(self.out / "best.safetensors", self.policy)
            self.best_update = self.updates
        self._write_policy_toml()
        self.metrics.close()
        if self.env is not None:
            self.env.close()
        return TrainResult(
            out=self.out,
            best_path=self.best_path,
            last_path=last,
            best_metric=self.best_metric,
            best_value=self.best_value,
            best_update=self.best_update,
            updates=self.updates,
            env_steps=self.env_steps,
            samples=self.samples,
            seconds=time.perf_counter() - self.started,
            failures=self.failures,
            history=self.history,
        )

    def _write_policy_toml(self) -> None:
        """The daemon's `[policy]` section that serves best.safetensors."""
        fields: tuple[str, ...] = getattr(self.policy, "architecture_fields", ())
        text = policy_section(
            self.policy_config, fields, self.spec.eval_deterministic, Path(self.best_path or "")
        )
        (self.out / "policy.toml").write_text(text, encoding="utf-8")


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN; null means "not measured"
        out[key] = value
    return out


def train(spec: OfflineTrainingSpec, on_eval: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run `spec` to its budget; evaluate, keep the best, write the outputs (module doc)."""
    run = TrainingRun(spec)
    unit, goal = run.target()
    progress = _Progress(run, on_eval, _progress_bar(spec, unit, goal) if spec.progress else None)
    try:
        if spec.warm_start is not None:
            run.evaluate()  # the cloned policy: the curve's start, and a candidate for best
        while run.progress_of(unit) < goal:
            before = run.progress_of(unit)
            run.step()
            if spec.algo == "ppo" and run.due_eval():
                run.evaluate()
            progress.show(run.progress_of(unit) - before)
    finally:
        progress.close()
    result = run.finish()
    progress.show(0)  # the final evaluation
    return result


def _progress_bar(spec: OfflineTrainingSpec, unit: str, goal: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=goal, unit=unit.replace("env_", ""), desc=f"{spec.algo} {spec.policy}", mininterval=0.5)


class _Progress:
    """Hands each new evaluation record to `on_eval` and shows it on the progress bar (if any)."""

    def __init__(self, run: TrainingRun, on_eval: Callable[[dict[str, Any]], None] | None, bar: Any) -> None:
        self.run = run
        self.on_eval = on_eval
        self.bar = bar
        self.seen = 0

    def show(self, advanced: int) -> None:
        for record in self.run.history[self.seen :]:
            if self.on_eval is not None:
                self.on_eval(record)
            if self.bar is not None:
                self.bar.set_postfix(_postfix(record), refresh=False)
        self.seen = len(self.run.history)
        if self.bar is not None and advanced:
            self.bar.update(advanced)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {}
    for key, label in (("sim_return", "return"), ("value_mse", "v_mse"), ("action_accuracy", "acc")):
        value = record.get(key)
        if isinstance(value, float) and math.isfinite(value):
            shown[label] = f"{value:.3f}"
    return shown
