"""Offline training: `esperd train`, from a saved experience buffer and/or against the simulator.

    esperd train --algo ppo --sim --policy gnn --updates 200 --out runs/ppo
    esperd train --algo impala --experience state/learner/buffer.safetensors --policy gnn --out runs/offline

Sources of experience
  --sim          the policy acts in `esperd.sim.SimEnv` (`--envs` simulated runs stepped together).
                 PPO: each update is one fresh on-policy rollout of `rollout_size` transitions
                 ([learner.ppo]); IMPALA: each round the actors add `--envs x --unroll` steps to a
                 replay buffer ([learner] replay_capacity / prioritized) and the learner takes
                 `--replay-ratio` x that many samples from it, in batches of [learner.impala]
                 batch_size, once it holds [learner] min_replay transitions. With `--seq-len L`
                 a batch is batch_size / L unrolls of L consecutive steps of one run (V-trace
                 runs over each), else batch_size single steps (one-step V-trace).
  --experience   a file written by `ReplayBuffer.save` / `RolloutBuffer.save` (the daemon writes
                 <state_dir>/learner/buffer.safetensors). A fraction `--holdout` of its runs (or,
                 with a single run, its last transitions) is held out for evaluation; the rest is
                 learned from: PPO in file order, `rollout_size` transitions per update, epoch after
                 epoch (its clipped ratio uses the recorded behaviour log-probs, and its KL stop
                 keeps every update close to the behaviour policy); IMPALA by sampling a replay
                 buffer filled with it (V-trace corrects for the behaviour policy).
  both           IMPALA replays the file's transitions alongside the simulator's; PPO is on-policy
                 and learns from the simulator only, the file serving as the held-out set.

Warm start (`--warm-start heuristic|scripted`, esperd.warmstart): before the first update the
policy (gnn only) is fitted by behaviour cloning to the reference policy's decisions over
`--warm-start-steps` simulator steps on hosts of its own (`--warm-start-updates` optimizer steps:
cross-entropy over the legal factored actions, value head fitted to the reference's returns), and
saved as <out>/warm_start.safetensors; it is evaluated (update 0) before RL begins and is a
candidate for the best checkpoint. metrics.jsonl starts with a `warm_start` line: agreement of
the greedy policy with the reference on held-out demonstrations before and after, NLL, value MSE.
`--lever-smoothing` (0.3) clones the GERMINATE levers with label smoothing, so that RL still
samples other levers; `--anchor-coef C` (PPO) adds a behaviour-cloning term on the
demonstrations, its weight decaying from C to 0 over `--anchor-updates` updates.

Budget: `--updates N` learner updates, or `--steps N` environment steps (with --sim) or
transitions trained on (experience only).

Evaluation every `--eval-every` updates and at the end (metrics.jsonl, one JSON object a line):
  sim_return           mean episode return of `--eval-episodes` simulator episodes, always the same
                       hosts (seed `--seed` + 10,000); the policy acts greedily (argmax of every
                       head, what `[policy] deterministic = true` serves) unless `--eval-sample`.
  action_accuracy      held-out set: fraction of transitions where the policy's greedy action
                       (argmax node, then argmax op at it, then argmax levers for GERMINATE: the row
                       `act(deterministic=True)` returns) equals the recorded action row;
  node_op_accuracy     ... where the greedy (node, op) pair equals the recorded one (levers ignored);
  op_accuracy          ... where the argmax op at the *recorded* node equals the recorded op;
  nll                  mean -log p(recorded action) under the policy;
  value_mse            mean (V(s) - G)^2, G the observed discounted return (gamma of the algorithm)
                       to the end of the episode, over held-out steps of episodes that end (done)
                       in the file; when none does, over all steps with the return cut at the
                       last recorded step (`value_targets` says which).
  Accuracies measure agreement with the policy that made the recorded decisions (imitation),
  not quality: a policy that improves on its behaviour policy will disagree with it.

Best model: the highest sim_return, or without the simulator the lowest held-out value_mse;
written to <out>/best.safetensors (`save_policy_checkpoint`: the daemon loads it with
`[policy] checkpoint = "<out>/best.safetensors"` and the same name and architecture; the
ready-made section is written to <out>/policy.toml). <out>/last.safetensors holds the final
weights. A checkpoint's policy version is the number of updates that made it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from esperd.analyzer.observation import Observation
from esperd.learn.buffers import ReplayBuffer
from esperd.learn.config import ImitationConfig, LearnerConfig, RewardConfig
from esperd.learn.experience import Transition
from esperd.learn.imitation import DemonstrationAnchor, ImitationStats, discounted_returns
from esperd.learn.impala import ImpalaLearner
from esperd.learn.persist import load_experience
from esperd.learn.ppo import NonFiniteError, PPOLearner, UpdateStats, stack_hidden
from esperd.policy.base import PolicyBundle
from esperd.policy.checkpoint import load_policy_checkpoint, save_policy_checkpoint
from esperd.policy.config import PolicyConfig
from esperd.policy.registry import create_policy
from esperd.sim.config import SimConfig
from esperd.sim.env import SimEnv
from esperd.warmstart import REFERENCES, warm_start

__all__ = [
    "HeldOut",
    "TrainError",
    "TrainResult",
    "TrainSpec",
    "collect",
    "evaluate_heldout",
    "evaluate_sim",
    "make_heldout",
    "resolve_device",
    "split_holdout",
    "train",
]

ALGORITHMS = ("ppo", "impala")
LEARNABLE_POLICIES = ("gnn", "lstm")
EVAL_SEED_OFFSET = 10_000
MAX_CONSECUTIVE_FAILURES = 10


class TrainError(RuntimeError):
    """A training run that cannot start or go on (bad input, no CUDA, nothing to learn from)."""


@dataclass
class TrainSpec:
    """Everything one training run needs; `esperd train` builds it from its arguments."""

    algo: str  # ppo | impala
    policy: str = "gnn"  # gnn | lstm
    experience: str | None = None  # a saved buffer (ReplayBuffer / RolloutBuffer .save)
    sim: bool = False
    updates: int | None = None  # budget in learner updates ...
    steps: int | None = None  # ... or in env steps (sim) / transitions trained on (experience only)
    envs: int = 8
    eval_every: int = 10  # updates between evaluations (there is always one at the end)
    eval_episodes: int = 16
    eval_deterministic: bool = True  # greedy actions in the simulator evaluation
    holdout: float = 0.1  # fraction of the experience's runs held out
    out: str = "train-out"
    device: str = "auto"
    seed: int = 0
    unroll: int = 8  # IMPALA with --sim: steps per env per actor round
    replay_ratio: float = 4.0  # IMPALA with --sim: samples trained on per new transition
    sequence_length: int = 1  # IMPALA: sample unrolls of this many consecutive steps (1: single steps)
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sim_config: SimConfig | None = None  # None: SimConfig(reward=learner.rewards)
    eval_reward: RewardConfig | None = None  # None: the training reward
    progress: bool = True
    log_updates: bool = True  # one metrics.jsonl line per update besides the evaluations
    # Behaviour-cloning warm start (esperd.warmstart): fit the policy to this reference policy's
    # decisions over `warm_start_steps` simulator steps before the first RL update.
    warm_start: str | None = None  # heuristic | scripted
    warm_start_steps: int = 8192
    imitation: ImitationConfig = field(default_factory=ImitationConfig)
    # PPO after a warm start: a behaviour-cloning term on the demonstrations, weight anchor_coef
    # decaying linearly to 0 over anchor_updates updates (0: none). See DemonstrationAnchor.
    anchor_coef: float = 0.0
    anchor_updates: int = 20

    def validate(self) -> None:
        self._validate_sources()
        self._validate_budget()
        self._validate_warm_start()

    def _validate_sources(self) -> None:
        if self.algo not in ALGORITHMS:
            raise TrainError(f"--algo must be one of {', '.join(ALGORITHMS)}, not {self.algo!r}")
        if self.policy not in LEARNABLE_POLICIES:
            raise TrainError(
                f"--policy must be one of {', '.join(LEARNABLE_POLICIES)} (learnable), not {self.policy!r}"
            )
        if not self.sim and not self.experience:
            raise TrainError("nothing to learn from: give --experience PATH, --sim, or both")
        if self.experience and not Path(self.experience).is_file():
            raise TrainError(f"experience file {self.experience} does not exist")

    def _validate_budget(self) -> None:
        if self.updates is not None and self.steps is not None:
            raise TrainError("give --updates or --steps, not both")
        for name in ("updates", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainError(f"--{name} must be >= 1")
        if min(self.envs, self.eval_every, self.unroll, self.sequence_length) < 1 or self.eval_episodes < 0:
            raise TrainError(
                "--envs, --eval-every, --unroll and --seq-len must be >= 1, --eval-episodes >= 0"
            )
        if not 0.0 <= self.holdout < 1.0:
            raise TrainError("--holdout must be in [0, 1)")
        if not self.replay_ratio > 0:
            raise TrainError("--replay-ratio must be > 0")

    def _validate_warm_start(self) -> None:
        if not (self.anchor_coef >= 0 and math.isfinite(self.anchor_coef)) or self.anchor_updates < 1:
            raise TrainError("--anchor-coef must be >= 0 and --anchor-updates >= 1")
        if self.anchor_coef > 0 and (self.warm_start is None or self.algo != "ppo"):
            raise TrainError("--anchor-coef needs --warm-start and --algo ppo")
        if self.warm_start is None:
            return
        if self.warm_start not in REFERENCES:
            raise TrainError(f"--warm-start must be one of {', '.join(REFERENCES)}, not {self.warm_start!r}")
        if self.policy != "gnn":
            # Cloning single steps from a zero state would not teach a recurrent policy its memory.
            raise TrainError("--warm-start needs a feed-forward policy (--policy gnn)")
        if self.policy_config.checkpoint:
            raise TrainError("--warm-start and [policy] checkpoint both set the starting weights; give one")
        if self.warm_start_steps < 1:
            raise TrainError("--warm-start-steps must be >= 1")

    @property
    def gamma(self) -> float:
        return self.learner.ppo.gamma if self.algo == "ppo" else self.learner.impala.gamma


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


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when available, else the CPU; `cuda` without a GPU is a TrainError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainError(f"bad --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available (torch {torch.__version__})")
    return device


# ---------------------------------------------------------------- held-out set


@dataclass
class HeldOut:
    """Held-out transitions with their observed discounted returns (fixed for the whole run)."""

    transitions: list[Transition]
    returns: np.ndarray  # float32 [n], observed discounted return from each step
    value_mask: np.ndarray  # bool [n], steps whose return reaches the episode's end
    value_targets: str  # "complete" | "truncated"

    def __len__(self) -> int:
        return len(self.transitions)


def split_holdout(
    transitions: Sequence[Transition], fraction: float, seed: int
) -> tuple[list[Transition], list[Transition]]:
    """(train, held-out): whole runs held out (a shuffled `fraction` of the run ids, at least one
    when fraction > 0 and there are two or more runs); with one run, its last `fraction` of steps."""
    if fraction <= 0 or not transitions:
        return list(transitions), []
    runs = sorted({t.run_id for t in transitions})
    if len(runs) >= 2:
        rng = np.random.default_rng(seed)
        count = min(max(1, round(fraction * len(runs))), len(runs) - 1)
        held = set(rng.permutation(runs)[:count].tolist())
        return [t for t in transitions if t.run_id not in held], [t for t in transitions if t.run_id in held]
    cut = len(transitions) - max(1, round(fraction * len(transitions)))
    if cut < 1:
        return list(transitions), []
    return list(transitions[:cut]), list(transitions[cut:])


def make_heldout(transitions: Sequence[Transition], gamma: float) -> HeldOut:
    """Observed discounted returns per contiguous run sequence (see the module doc)."""
    returns, complete = discounted_returns(transitions, gamma)
    if complete.any():
        mask, targets = complete, "complete"
    else:
        mask, targets = np.ones(len(transitions), dtype=bool), "truncated"
    return HeldOut(list(transitions), returns, mask, targets)


@torch.no_grad()
def evaluate_heldout(policy: PolicyBundle, heldout: HeldOut, batch_size: int = 256) -> dict[str, float]:
    """Decision accuracies, NLL and value error of `policy` on the held-out set (module doc)."""
    if not len(heldout):
        return {}
    device = torch.device(policy.device)
    agree_row = agree_pair = agree_op = 0
    nll = 0.0
    values = np.zeros(len(heldout), dtype=np.float64)
    items = heldout.transitions
    for begin in range(0, len(items), batch_size):
        chunk = items[begin : begin + batch_size]
        observations = [t.obs for t in chunk]
        actions = torch.from_numpy(np.stack([np.asarray(t.action, dtype=np.int64) for t in chunk])).to(device)
        hidden = stack_hidden(policy, chunk, device)
        result = policy.evaluate(observations, actions, hidden)
        dist = policy.distribution(observations, hidden)  # type: ignore[attr-defined]
        greedy = dist.sample(deterministic=True)
        flat = dist.batch.ptr[:-1] + actions[:, 0]
        op_at_recorded = dist.op_probs()[flat].argmax(-1)
        agree_row += int((greedy == actions).all(-1).sum())
        agree_pair += int((greedy[:, :2] == actions[:, :2]).all(-1).sum())
        agree_op += int((op_at_recorded == actions[:, 1]).sum())
        nll -= float(result.log_probs.double().sum())
        values[begin : begin + len(chunk)] = result.values.double().cpu().numpy()
    n = len(heldout)
    err = (values - heldout.returns)[heldout.value_mask]
    return {
        "heldout": float(n),
        "action_accuracy": agree_row / n,
        "node_op_accuracy": agree_pair / n,
        "op_accuracy": agree_op / n,
        "nll": nll / n,
        "value_mse": float(np.mean(err**2)) if err.size else float("nan"),
    }


# ---------------------------------------------------------------- simulator


def collect(
    env: SimEnv,
    policy: PolicyBundle,
    observations: list[Observation],
    steps: int,
    on_episode: Callable[[float], None] | None = None,
) -> tuple[list[Transition], list[Observation]]:
    """`steps` steps of every env with the sampling policy; (transitions in step order, next observations).

    A finished episode's last step is terminal (done, no next_obs); the last step of the batch is
    not (its next_obs is the observation the next batch starts from, for bootstrapping)."""
    transitions: list[Transition] = []
    for _ in range(steps):
        result = policy.act(observations)
        following, rewards, dones, infos = env.step(result)
        actions = result.actions.numpy()
        log_probs, values = result.log_probs.tolist(), result.values.tolist()
        hidden = None if result.hidden is None else result.hidden.numpy()
        finished = []
        for e, obs in enumerate(observations):
            done = bool(dones[e])
            transitions.append(
                Transition(
                    obs=obs,
                    action=actions[e].copy(),
                    log_prob=log_probs[e],
                    value=values[e],
                    policy_version=policy.version,
                    reward=float(rewards[e]),
                    done=done,
                    next_obs=None if done else following[e],
                    hidden=None if hidden is None else hidden[e].copy(),
                )
            )
            episode = infos[e].episode
            if episode is not None:
                finished.append(episode.run_id)
                if on_episode is not None:
                    on_episode(episode.episode_return)
        if finished:
            policy.forget(finished)
        observations = following
    return transitions, observations


@torch.no_grad()
def evaluate_sim(
    policy: PolicyBundle,
    episodes: int,
    config: SimConfig,
    *,
    seed: int,
    num_envs: int = 8,
    deterministic: bool = True,
) -> tuple[float, float]:
    """(mean, sd) episode return of `episodes` simulator episodes on the hosts of `seed`.

    Runs in a torch RNG fork so evaluating never changes the training run's random stream."""
    from esperd.sim.evaluate import run_episodes

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        results = run_episodes(
            policy,
            episodes,
            num_envs=max(1, min(num_envs, episodes)),
            config=config,
            seed=seed,
            deterministic=deterministic,
        )
    forget = getattr(policy, "forget", None)
    if forget is not None:
        forget([r.run_id for r in results])
    returns = np.array([r.episode_return for r in results], dtype=np.float64)
    return float(returns.mean()), float(returns.std())


# ---------------------------------------------------------------- the run


class _Run:
    """State of one training run: policy, learner, sources, budget, evaluation, outputs."""

    def __init__(self, spec: TrainSpec) -> None:
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

    def _make_algorithm(self, anchor: DemonstrationAnchor | None) -> PPOLearner | ImpalaLearner:
        spec, learner_cfg = self.spec, self.spec.learner
        if spec.algo != "ppo":
            return ImpalaLearner(self.policy, learner_cfg.impala)
        ppo_cfg = msgspec.structs.replace(learner_cfg.ppo, seed=spec.seed)
        if learner_cfg.ppo.total_updates == LearnerConfig().ppo.total_updates:
            # Not configured: the LR decays over this run's budget.
            ppo_cfg = msgspec.structs.replace(ppo_cfg, total_updates=self.planned_updates())
        return PPOLearner(self.policy, ppo_cfg, auxiliary=anchor)

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
        return "updates", spec.updates if spec.updates is not None else 100

    def progress_of(self, unit: str) -> int:
        return {"updates": self.updates, "env_steps": self.env_steps, "samples": self.samples}[unit]

    def done(self) -> bool:
        unit, goal = self.target()
        return self.progress_of(unit) >= goal

    def planned_updates(self) -> int:
        """PPO: how many updates the budget allows (the LR decay horizon)."""
        spec, size = self.spec, self.spec.learner.ppo.rollout_size
        if spec.steps is None:
            return spec.updates if spec.updates is not None else 100
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
        cfg = self.policy_config
        fields: tuple[str, ...] = getattr(self.policy, "architecture_fields", ())
        lines = [
            "# The daemon's [policy] section for the best checkpoint of this training run",
            "[policy]",
            f'name = "{cfg.name}"',
            *(f"{f} = {_toml_value(getattr(cfg, f))}" for f in fields),
            f"deterministic = {_toml_value(self.spec.eval_deterministic)}",
            f"checkpoint = {json.dumps(str(Path(self.best_path or '').resolve()))}",
            "",
        ]
        (self.out / "policy.toml").write_text("\n".join(lines), encoding="utf-8")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN; null means "not measured"
        out[key] = value
    return out


def train(spec: TrainSpec, on_eval: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run `spec` to its budget; evaluate, keep the best, write the outputs (module doc)."""
    run = _Run(spec)
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


def _progress_bar(spec: TrainSpec, unit: str, goal: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=goal, unit=unit.replace("env_", ""), desc=f"{spec.algo} {spec.policy}", mininterval=0.5)


class _Progress:
    """Hands each new evaluation record to `on_eval` and shows it on the progress bar (if any)."""

    def __init__(self, run: _Run, on_eval: Callable[[dict[str, Any]], None] | None, bar: Any) -> None:
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


# ---------------------------------------------------------------- command line


def add_arguments(parser: Any) -> None:
    """The `esperd train` options (on an argparse parser)."""
    parser.add_argument("--algo", required=True, choices=ALGORITHMS, help="learning algorithm")
    parser.add_argument(
        "--experience", metavar="PATH", help="a saved buffer (<state_dir>/learner/buffer.safetensors)"
    )
    parser.add_argument("--sim", action="store_true", help="learn against the simulator")
    parser.add_argument(
        "--sim-config",
        metavar="TOML",
        help="simulator parameters (e.g. from `esperd sim calibrate`); the reward still comes from "
        "the [learner.rewards] config",
    )
    parser.add_argument(
        "--policy", default="gnn", choices=LEARNABLE_POLICIES, help="policy to train (default gnn)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--updates", type=_positive_int, metavar="N", help="learner updates (default 100)")
    budget.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="env steps (--sim), or transitions trained on (experience only)",
    )
    parser.add_argument(
        "--envs", type=_positive_int, default=8, metavar="N", help="simulated runs (default 8)"
    )
    parser.add_argument(
        "--eval-every", type=_positive_int, default=10, metavar="K", help="updates between evaluations (10)"
    )
    parser.add_argument(
        "--eval-episodes",
        type=_non_negative_int,
        default=16,
        metavar="M",
        help="simulator episodes per evaluation (16)",
    )
    parser.add_argument(
        "--eval-sample", action="store_true", help="evaluate the sampling policy instead of argmax"
    )
    parser.add_argument(
        "--eval-reward",
        choices=("basic", "sparse", "shaped"),
        help="reward mode of the evaluation (default: training's)",
    )
    parser.add_argument(
        "--holdout", type=_fraction, default=0.1, metavar="F", help="held-out fraction of runs (0.1)"
    )
    parser.add_argument(
        "--unroll",
        type=_positive_int,
        default=8,
        metavar="T",
        help="IMPALA --sim: steps per env per round (8)",
    )
    parser.add_argument(
        "--replay-ratio",
        type=_positive_float,
        default=4.0,
        metavar="R",
        help="IMPALA --sim: samples per new transition (4)",
    )
    parser.add_argument(
        "--seq-len",
        type=_positive_int,
        default=1,
        metavar="L",
        help="IMPALA: replay unrolls of L consecutive steps, V-trace over each (1: single steps)",
    )
    parser.add_argument(
        "--warm-start",
        choices=REFERENCES,
        help="first fit the policy to this reference policy's decisions in the simulator (behaviour cloning)",
    )
    parser.add_argument(
        "--warm-start-steps",
        type=_positive_int,
        default=TrainSpec.warm_start_steps,
        metavar="N",
        help=f"simulator steps the reference plays for the warm start ({TrainSpec.warm_start_steps})",
    )
    parser.add_argument(
        "--warm-start-updates",
        type=_positive_int,
        default=ImitationConfig().steps,
        metavar="N",
        help=f"behaviour-cloning optimizer steps ({ImitationConfig().steps})",
    )
    parser.add_argument(
        "--lever-smoothing",
        type=_fraction,
        default=ImitationConfig().lever_smoothing,
        metavar="EPS",
        help="warm start: label smoothing of the GERMINATE levers, so RL still samples others "
        f"({ImitationConfig().lever_smoothing})",
    )
    parser.add_argument(
        "--anchor-coef",
        type=_non_negative_float,
        default=TrainSpec.anchor_coef,
        metavar="C",
        help="PPO after a warm start: weight of a behaviour-cloning term on the demonstrations, "
        f"decaying to 0 over --anchor-updates ({TrainSpec.anchor_coef}: none)",
    )
    parser.add_argument(
        "--anchor-updates",
        type=_positive_int,
        default=TrainSpec.anchor_updates,
        metavar="N",
        help=f"updates over which the anchor decays ({TrainSpec.anchor_updates})",
    )
    parser.add_argument(
        "--out", default="train-out", metavar="DIR", help="output directory (default ./train-out)"
    )
    parser.add_argument(
        "--device", default="auto", metavar="cpu|cuda|auto", help="torch device (default auto)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seeds init, simulator and sampling (0)"
    )
    parser.add_argument(
        "--threads",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="torch intra-op threads (0: half the cores)",
    )
    parser.add_argument(
        "--config", "-c", dest="train_config", metavar="FILE", help="TOML with [policy] / [learner]"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")


def spec_from_args(args: Any, config_path: str | None) -> TrainSpec:
    """A TrainSpec from parsed `esperd train` arguments (ConfigError propagates)."""
    from esperd.config import load_config

    config = load_config(config_path)
    learner = config.learner
    sim_config = None
    if getattr(args, "sim_config", None):
        from esperd.sim.calibrate import load_sim_config

        try:
            sim_config = msgspec.structs.replace(load_sim_config(args.sim_config), reward=learner.rewards)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    return TrainSpec(
        algo=args.algo,
        policy=args.policy,
        experience=args.experience,
        sim=args.sim,
        updates=args.updates,
        steps=args.steps,
        envs=args.envs,
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        eval_deterministic=not args.eval_sample,
        holdout=args.holdout,
        out=args.out,
        device=args.device,
        seed=args.seed,
        unroll=args.unroll,
        replay_ratio=args.replay_ratio,
        sequence_length=args.seq_len,
        policy_config=config.policy,
        learner=learner,
        eval_reward=None
        if args.eval_reward is None
        else msgspec.structs.replace(learner.rewards, mode=args.eval_reward),
        progress=not args.quiet,
        warm_start=args.warm_start,
        warm_start_steps=args.warm_start_steps,
        imitation=ImitationConfig(steps=args.warm_start_updates, lever_smoothing=args.lever_smoothing),
        anchor_coef=args.anchor_coef,
        anchor_updates=args.anchor_updates,
        sim_config=sim_config,
    )


def main(args: Any, config_path: str | None) -> int:
    """`esperd train`: 0 on success, 2 on bad input."""
    import sys

    from esperd.config import ConfigError

    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    try:
        spec = spec_from_args(args, config_path)
        result = train(spec)
    except (ConfigError, TrainError) as exc:
        print(f"esperd train: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bad file (BufferFileError, CheckpointError) is an input error too
        from esperd.learn.persist import BufferFileError
        from esperd.policy.checkpoint import CheckpointError

        if isinstance(exc, (BufferFileError, CheckpointError)):
            print(f"esperd train: {exc}", file=sys.stderr)
            return 2
        raise
    if not args.quiet:
        best = f"{result.best_metric} {result.best_value:.4f} at update {result.best_update}"
        print(
            f"esperd train: {result.updates} updates, {result.env_steps} env steps, {result.samples} samples "
            f"in {result.seconds:.1f}s; best {best}\n"
            f"  best  {result.best_path}\n  last  {result.last_path}\n"
            f"  serve with the [policy] section in {result.out / 'policy.toml'}",
            file=sys.stderr,
        )
    return 0


def _argument(
    convert: Callable[[str], float], ok: Callable[[float], bool], expected: str
) -> Callable[[str], float]:
    """An argparse `type=` that converts with `convert` and refuses values `ok` rejects."""
    import argparse

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _argument(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _argument(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _argument(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_fraction = _argument(float, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
_non_negative_float = _argument(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
