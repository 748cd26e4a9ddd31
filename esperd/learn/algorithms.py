"""The loop side of each learning algorithm: how closed steps are buffered, when an update is
due, how its batch is drawn, what follows a sound update, a swap or a trip, and which buffer a
checkpoint saves.

The Learner (esperd.learn.learner) holds one of these and asks it; it has no PPO/IMPALA
branches of its own. The gradient math runs elsewhere, in the learner's worker
(esperd.learn.worker, which builds esperd.learn.ppo.PPOUpdater or esperd.learn.impala.ImpalaUpdater).
Everything here runs on the event loop's thread: the buffers are only ever touched from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from esperd.learn.buffers import ReplayBuffer, RolloutBuffer
from esperd.learn.config import LearnerConfig
from esperd.learn.experience import Transition
from esperd.learn.ppo import UpdateStats
from esperd.learn.worker import Slots


@dataclass(slots=True)
class Sample:
    """A batch to learn from and where its transitions live in the replay buffer (None: a rollout)."""

    batch: list[Transition]
    weights: np.ndarray | None = None  # importance weights, one per transition
    slots: Slots | None = None  # (replay slot, fill stamp) of each transition, for the worker
    priority_slots: np.ndarray | None = None  # whose priority the update's TD errors set
    priority_stamps: np.ndarray | None = None
    lengths: np.ndarray | None = None  # unrolls: steps in each (their TD errors are averaged)


class Algorithm(Protocol):
    """What the Learner needs to know of an algorithm on the loop side."""

    name: str
    config: LearnerConfig
    keeps_learning: bool  # update again at once while enough data is buffered (no wait for new steps)
    buffer: RolloutBuffer | ReplayBuffer  # what a checkpoint saves and restores

    @property
    def kl_limit(self) -> float:
        """An update whose approximate KL exceeds this is a failure."""
        ...

    def add(self, transition: Transition) -> None: ...

    def update_due(self) -> bool: ...

    def take(self) -> Sample: ...

    def swap_due(self, since_last_swap_s: float) -> bool: ...

    def after_update(self, sample: Sample, stats: UpdateStats) -> None: ...

    def on_serve(self, version: int) -> None: ...

    def on_trip(self) -> None: ...


class PPOAlgorithm:
    """On-policy: a rollout of `rollout_size` steps of the serving version, used once."""

    name = "ppo"
    keeps_learning = False

    def __init__(self, config: LearnerConfig) -> None:
        self.config = config  # read at each use: the Learner hands a replaced config on
        self.buffer: RolloutBuffer = RolloutBuffer(capacity=max(4 * config.ppo.rollout_size, 1024))

    @property
    def kl_limit(self) -> float:
        return self.config.breaker.kl_limit_ppo

    def add(self, transition: Transition) -> None:
        self.buffer.add(transition)

    def update_due(self) -> bool:
        return self.buffer.ready(self.config.ppo.rollout_size)

    def take(self) -> Sample:
        return Sample(self.buffer.drain())

    def swap_due(self, since_last_swap_s: float) -> bool:
        return True  # the next rollout must come from the weights just trained

    def after_update(self, sample: Sample, stats: UpdateStats) -> None:
        pass

    def on_serve(self, version: int) -> None:
        self.buffer.set_min_version(version)  # steps of older versions are off-policy now

    def on_trip(self) -> None:
        self.buffer.drain()  # on-policy data from a rejected trajectory is useless now


class ImpalaAlgorithm:
    """Off-policy: (prioritized) replay, single steps or unrolls, updates as long as data is in;
    swaps coalesced to at most one per `swap_min_interval_s`."""

    name = "impala"
    keeps_learning = True

    def __init__(self, config: LearnerConfig) -> None:
        self.config = config  # read at each use: the Learner hands a replaced config on
        self.buffer: ReplayBuffer = ReplayBuffer(
            capacity=config.replay_capacity,
            prioritized=config.prioritized,
            max_importance_weight=config.impala.max_importance_weight,
        )

    @property
    def kl_limit(self) -> float:
        return self.config.breaker.kl_limit_impala

    def add(self, transition: Transition) -> None:
        self.buffer.add(transition)

    def update_due(self) -> bool:
        return len(self.buffer) >= self.config.min_replay

    def take(self) -> Sample:
        impala = self.config.impala
        length = impala.unroll_length
        if length <= 1:
            sampled = self.buffer.sample(impala.batch_size)
            return Sample(
                sampled.transitions,
                weights=np.asarray(sampled.weights, dtype=np.float32),
                slots=(sampled.indices, sampled.stamps),
                priority_slots=sampled.indices,
                priority_stamps=sampled.stamps,
            )
        # Unrolls of consecutive steps of one run (002): V-trace runs over each (the updater groups
        # a run's contiguous steps, so two drawn unrolls that continue each other are one). Every
        # step carries its unroll's importance weight; priorities go to the unrolls' first steps.
        unrolls = self.buffer.sample_sequences(max(1, impala.batch_size // length), length)
        lengths = np.array([len(seq) for seq in unrolls.sequences], dtype=np.int64)
        taken = np.arange(length)[:, None] < lengths[None, :]  # [length, B]: steps present
        assert unrolls.slot_stamps is not None
        return Sample(
            [t for seq in unrolls.sequences for t in seq],
            weights=np.repeat(np.asarray(unrolls.weights, dtype=np.float32), lengths),
            # Batch order is unroll by unroll: transpose the time-major grids before masking.
            slots=(unrolls.slots.T[taken.T], unrolls.slot_stamps.T[taken.T]),
            priority_slots=unrolls.indices,
            priority_stamps=unrolls.stamps,
            lengths=lengths,
        )

    def swap_due(self, since_last_swap_s: float) -> bool:
        return since_last_swap_s >= self.config.swap_min_interval_s

    def after_update(self, sample: Sample, stats: UpdateStats) -> None:
        """The update's TD errors become the drawn transitions' priorities."""
        if sample.priority_slots is None or not stats.td_errors:
            return
        td = np.abs(np.asarray(stats.td_errors, dtype=np.float64))
        if sample.lengths is not None:  # an unroll's first step gets its mean |td| as its priority
            starts = np.concatenate([[0], np.cumsum(sample.lengths)[:-1]])
            td = np.add.reduceat(td, starts) / sample.lengths
        self.buffer.update_priorities(sample.priority_slots, td, stamps=sample.priority_stamps)

    def on_serve(self, version: int) -> None:
        pass  # off-policy: V-trace corrects for steps of older versions

    def on_trip(self) -> None:
        pass  # replayed steps stay: V-trace weighs them by the policy now training


def make_algorithm(config: LearnerConfig) -> PPOAlgorithm | ImpalaAlgorithm:
    """The loop side of `config.algorithm` ("ppo" or "impala")."""
    if config.algorithm == "ppo":
        return PPOAlgorithm(config)
    if config.algorithm == "impala":
        return ImpalaAlgorithm(config)
    raise ValueError(f"no learning algorithm {config.algorithm!r}")
