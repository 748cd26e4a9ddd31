"""`[learner]` and what it holds: the algorithms, the reward, the breaker; and behaviour cloning.

Plain msgspec Structs on esperd.section's base (no torch): esperd.config, esperd.sim.config and
`esperd train` read them without loading the learner.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from esperd.section import Coef, Discount, PositiveFloat, Section, check_fields
from esperd_contracts import SeedStage

RewardMode = Literal["basic", "sparse", "shaped"]
Weight = Annotated[float, Meta(ge=0.0, le=1e6)]
Threshold = Annotated[float, Meta(gt=0.0)]

#: Default lifecycle potentials: progress toward a kept seed is worth more.
DEFAULT_STAGE_POTENTIALS: dict[SeedStage, float] = {
    SeedStage.DORMANT: 0.0,
    SeedStage.GERMINATED: 1.0,
    SeedStage.TRAINING: 2.0,
    SeedStage.BLENDING: 3.0,
    SeedStage.PROBATIONARY: 4.0,
    SeedStage.FOSSILIZED: 5.0,
    SeedStage.PRUNED: 0.0,
}


class RewardConfig(Section, frozen=True):
    """Reward mode and the weight of every term (`[learner.reward]`-style table)."""

    mode: RewardMode = "basic"
    # Accuracy is in [0, 1]; scaled so one accuracy point (0.01) is worth 0.1.
    accuracy_weight: Weight = 10.0
    # basic / shaped: per step, times log(1 + added_params / host_params).
    rent_weight: Weight = 0.25
    # sparse: once, at the terminal step, times log(1 + added_params / host_params).
    param_cost_weight: Weight = 5.0
    # shaped
    gamma: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.99
    shaping_weight: Weight = 0.05
    stage_potentials: dict[SeedStage, float] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_STAGE_POTENTIALS)
    )
    intervention_cost: Weight = 0.01
    fossilize_min_improvement: float = 0.0
    min_prune_age: Annotated[int, Meta(ge=0, le=10_000)] = 3
    prune_young_penalty: Weight = 0.2
    # all modes
    rejected_penalty: Weight = 0.1
    governor_penalty: Weight = 0.2
    governor_window: Annotated[int, Meta(ge=2, le=10_000)] = 10
    governor_sigmas: Annotated[float, Meta(gt=0.0, le=100.0)] = 3.0
    governor_min_history: Annotated[int, Meta(ge=2, le=10_000)] = 5
    # Floor of sigma: max(min_std, min_relative_std * |mean|), so a smooth, slowly drifting loss
    # (tiny sigma) does not read as a blow-up.
    governor_min_std: Annotated[float, Meta(ge=0.0, le=1e6)] = 0.01
    governor_min_relative_std: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.05

    def __post_init__(self) -> None:
        if self.mode not in ("basic", "sparse", "shaped"):
            raise ValueError(f"reward mode must be basic, sparse or shaped, not {self.mode!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError("reward gamma must be in [0, 1]")
        if self.governor_min_history > self.governor_window:
            raise ValueError("governor_min_history must not exceed governor_window")


class PPOConfig(Section, frozen=True):
    """PPO hyper-parameters; defaults from the seed documents (03.2, PPO_TRAINING_CONFIG)."""

    clip_ratio: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.2
    target_kl: Annotated[float, Meta(gt=0.0)] | None = 0.01  # None: never stop early
    value_coef: Coef = 0.5
    entropy_coef: Coef = 0.01
    max_grad_norm: PositiveFloat = 0.5
    epochs: Annotated[int, Meta(ge=1, le=1000)] = 4
    minibatch_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 32
    lr: Annotated[float, Meta(gt=0.0, le=1.0)] = 3e-4
    adam_eps: PositiveFloat = 1e-5
    gamma: Discount = 0.99
    gae_lambda: Discount = 0.95
    clip_value: bool = False  # clip the value loss like the policy (off: it rarely helps)
    normalize_advantages: bool = True  # per minibatch, as CleanRL does
    # LR schedule, counted in environment steps (transitions trained on), as seed document 002
    # counts it: linear warmup to lr over warmup_steps, then linear decay to final_lr_ratio * lr
    # at total_steps (0: constant after the warmup). Unset, each is its *_updates value times
    # rollout_size (what an update trains on): 10 and 10,000 updates of 256 steps.
    warmup_updates: Annotated[int, Meta(ge=0)] = 10
    total_updates: Annotated[int, Meta(ge=0)] = 10_000
    final_lr_ratio: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.1
    rollout_size: Annotated[int, Meta(ge=1, le=10_000_000)] = 256  # transitions per update
    seed: int | None = 0  # minibatch shuffling (None: nondeterministic)
    # Recurrent policies: minibatches are whole pieces of a run's consecutive steps, up to this
    # many, each unrolled through time from the state recorded at its first step (truncated BPTT).
    bptt_length: Annotated[int, Meta(ge=1, le=10_000)] = 16
    warmup_steps: Annotated[int, Meta(ge=0)] | None = None  # None: warmup_updates * rollout_size
    total_steps: Annotated[int, Meta(ge=0)] | None = None  # None: total_updates * rollout_size

    @property
    def schedule_steps(self) -> tuple[int, int]:
        """(warmup, total) of the LR schedule, in environment steps."""
        warmup = self.warmup_updates * self.rollout_size if self.warmup_steps is None else self.warmup_steps
        total = self.total_updates * self.rollout_size if self.total_steps is None else self.total_steps
        return warmup, total

    def __post_init__(self) -> None:
        # Meta constraints are checked when decoding; this catches direct construction too.
        checks = {
            "clip_ratio": 0.0 < self.clip_ratio <= 1.0,
            "target_kl": self.target_kl is None or self.target_kl > 0.0,
            "max_grad_norm": self.max_grad_norm > 0.0,
            "epochs": self.epochs >= 1,
            "minibatch_size": self.minibatch_size >= 1,
            "lr": 0.0 < self.lr <= 1.0,
            "gamma": 0.0 <= self.gamma <= 1.0,
            "gae_lambda": 0.0 <= self.gae_lambda <= 1.0,
            "warmup_updates": self.warmup_updates >= 0,
            "total_updates": self.total_updates >= 0,
            "final_lr_ratio": 0.0 <= self.final_lr_ratio <= 1.0,
            "rollout_size": self.rollout_size >= 1,
        }
        check_fields("ppo", checks)


class ImpalaConfig(Section, frozen=True):
    """IMPALA hyper-parameters; defaults from the seed documents (03.2, IMPALA_TRAINING_CONFIG)."""

    rho_bar: Threshold | None = 1.0  # clip of the importance weights in the V-trace targets (None: off)
    c_bar: Threshold | None = 1.0  # clip of the trace-cutting coefficients c_s
    pg_rho_bar: Threshold | None = 1.0  # clip of the importance weights in the policy gradient
    baseline_coef: Coef = 0.5
    entropy_coef: Coef = 0.001
    lr: Annotated[float, Meta(gt=0.0, le=1.0)] = 1e-4
    # torch's RMSprop adds eps outside the square root (TF's reference adds it inside).
    rmsprop_eps: Annotated[float, Meta(gt=0.0)] = 0.1
    rmsprop_alpha: Annotated[float, Meta(gt=0.0, lt=1.0)] = 0.99  # decay of the squared-gradient average
    rmsprop_momentum: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0
    max_grad_norm: Threshold = 40.0
    gamma: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.99
    # Transitions per update (sampled by the caller): the seed documents' IMPALA batch size. In
    # the daemon each update is a round trip to the learner's child process, and at 64 the
    # round trips, not the learning, were what slowed decisions (benchmarks/RESULTS.md).
    batch_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 128
    # Recurrent policies: a batch's consecutive steps of one run (PPO's sequences) are unrolled
    # through time in pieces of up to this many steps, each from the state recorded at its first.
    bptt_length: Annotated[int, Meta(ge=1, le=10_000)] = 16
    # The daemon learns from unrolls: batch_size // unroll_length runs' stretches of up to this
    # many consecutive steps each, drawn from the replay buffer, V-trace over each (002: 20).
    # 1: single steps, as before.
    unroll_length: Annotated[int, Meta(ge=1, le=10_000)] = 20
    # Prioritized replay's importance weights are capped here (002), not divided by the batch's largest.
    max_importance_weight: Annotated[float, Meta(gt=0.0)] = 10.0

    def __post_init__(self) -> None:
        # Meta constraints are checked when decoding; this catches direct construction too.
        checks = {
            "rho_bar": self.rho_bar is None or self.rho_bar > 0.0,
            "c_bar": self.c_bar is None or self.c_bar > 0.0,
            "pg_rho_bar": self.pg_rho_bar is None or self.pg_rho_bar > 0.0,
            "lr": 0.0 < self.lr <= 1.0,
            "rmsprop_eps": self.rmsprop_eps > 0.0,
            "rmsprop_alpha": 0.0 < self.rmsprop_alpha < 1.0,
            "max_grad_norm": self.max_grad_norm > 0.0,
            "gamma": 0.0 <= self.gamma <= 1.0,
            "batch_size": self.batch_size >= 1,
        }
        check_fields("impala", checks)


class ImitationConfig(Section, frozen=True):
    """Behaviour-cloning hyper-parameters (defaults: what the learning-curves benchmark uses)."""

    steps: Annotated[int, Meta(ge=1, le=1_000_000)] = 1500  # optimizer steps
    batch_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 256
    lr: Annotated[float, Meta(gt=0.0, le=1.0)] = 1e-3
    value_coef: Annotated[float, Meta(ge=0.0, le=1e3)] = 0.5
    max_grad_norm: Annotated[float, Meta(gt=0.0)] = 1.0
    gamma: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.99  # of the value targets: the RL algorithm's
    lever_smoothing: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.3  # label smoothing of the levers
    seed: int = 0  # minibatch order


class BreakerConfig(Section, frozen=True):
    """When to roll back and pause learning."""

    kl_limit_ppo: Annotated[float, Meta(gt=0.0)] = 0.15  # trip when a PPO update's approx KL exceeds this
    # Replay batches are off-policy by design, so their KL runs higher without any fault.
    kl_limit_impala: Annotated[float, Meta(gt=0.0)] = 2.0
    reward_window: Annotated[int, Meta(ge=2)] = 256  # transitions per version before comparing rewards
    # Trip when the mean reward falls by more than this and by more than 3 standard errors.
    reward_drop: Annotated[float, Meta(ge=0.0)] = 0.05
    # Seed document 002's breaker (esperd.learn.breaker): every failure above rolls the weights
    # back at once; `failure_threshold` of them within `window_s` open the breaker, which pauses
    # learning for `recovery_s`, then lets one probe update through (half-open): a sound one
    # closes it, a failed one opens it again.
    failure_threshold: Annotated[int, Meta(ge=1, le=1000)] = 5
    window_s: Annotated[float, Meta(gt=0.0)] = 300.0
    recovery_s: Annotated[float, Meta(ge=0.0)] = 60.0


class BudgetConfig(Section, frozen=True):
    """Seed document 002's timing budgets, watched at run time (esperd.learn.budgets)."""

    processing_ms: Annotated[float, Meta(gt=0.0)] = 20.0  # experience -> batch, on the event loop
    batch_ms: Annotated[float, Meta(gt=0.0)] = 50.0  # one update of one batch, on the worker
    step_ms: Annotated[float, Meta(gt=0.0)] = 100.0  # a whole learner step: batch taken -> result judged
    log_interval_s: Annotated[float, Meta(gt=0.0)] = 60.0  # at most one log line per budget per window


class LearnerConfig(Section, frozen=True):
    """`[learner]` in the config file."""

    algorithm: Literal["off", "ppo", "impala"] = "off"
    rewards: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    impala: ImpalaConfig = ImpalaConfig()
    replay_capacity: Annotated[int, Meta(ge=1_000)] = 100_000
    prioritized: bool = True
    min_replay: Annotated[int, Meta(ge=1)] = 512  # IMPALA waits for this much experience
    checkpoint_interval_s: Annotated[float, Meta(gt=0.0)] = 300.0
    # Where updates run: "process" (a child process: its Python never holds the daemon's GIL)
    # or "thread" (in the daemon's process; for tests and debugging).
    worker: Literal["process", "thread"] = "process"
    worker_nice: Annotated[int, Meta(ge=0, le=19)] = 10  # the child's nice value (process worker)
    # IMPALA: swap in the newest weights at most this often (each swap builds a serving bundle
    # on the daemon's side); 0 swaps after every update. PPO swaps after every update.
    swap_min_interval_s: Annotated[float, Meta(ge=0.0)] = 0.25
    breaker: BreakerConfig = BreakerConfig()
    budgets: BudgetConfig = BudgetConfig()
