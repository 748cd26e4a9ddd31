"""What one offline training run is asked to do, and the checks it must pass before it starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from esperd.learn.config import ImitationConfig, LearnerConfig, RewardConfig
from esperd.policy.config import PolicyConfig
from esperd.sim.config import SimConfig
from esperd.train.warmstart import REFERENCES

ALGORITHMS = ("ppo", "impala")
LEARNABLE_POLICIES = ("gnn", "lstm")
DEFAULT_UPDATES = 100  # the budget when neither `updates` nor `steps` is given


class TrainError(RuntimeError):
    """A training run that cannot start or go on (bad input, no CUDA, nothing to learn from)."""


@dataclass
class OfflineTrainingSpec:
    """Everything one `esperd train` run needs (esperd.train.cli builds it from the command line).

    Not the learner worker's TrainerSpec (esperd.learn.worker), which sets up the daemon's updates."""

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
    # Behaviour-cloning warm start (esperd.train.warmstart): fit the policy to this reference policy's
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
