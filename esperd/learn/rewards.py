"""Per-step rewards for one run, computed from its consecutive SystemStatePackets.

Pure (no NATS, no torch): the daemon's recorder and the simulator use the same code.

Modes (`RewardConfig.mode`), each step t -> t+1 between two state packets:

  basic   accuracy_weight * (val_acc' - val_acc) - rent_weight * log(1 + added / host)
  sparse  0 until `done`; then accuracy_weight * val_acc' - param_cost_weight * log(1 + added / host)
  shaped  basic, plus potential-based shaping gamma * Phi(s') - Phi(s) over the seeds' lifecycle
          stages (Phi = 0 at the terminal step, so the optimal policy is unchanged), a small cost
          per non-WAIT op, and anti-gaming terms: a fossilized seed whose total improvement is
          below `fossilize_min_improvement` has no potential (no credit for fossilizing it), and
          pruning a seed younger than `min_prune_age` epochs is penalised.

Every mode also pays `rejected_penalty` per rejected command and `governor_penalty` when the
validation or training loss blows up (above mean + k sigma of its recent history).

Episodes: a `done` packet closes the episode (terminal: no bootstrap); an evicted run is
truncated (`RewardTracker.truncate`: bootstrap from the value of the last state).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping

import msgspec

from esperd.learn.config import RewardConfig
from esperd_contracts import Op, SeedSlotState, SeedStage, SystemStatePacket

#: Stages in which a seed exists but is not yet permanent.
LIVE_STAGES = frozenset(
    {SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY}
)

#: Names of the reward terms a RewardStep may carry (0.0 when a term does not apply).
TERMS: tuple[str, ...] = (
    "accuracy",
    "rent",
    "terminal",
    "param_cost",
    "shaping",
    "intervention",
    "prune_young",
    "rejected",
    "governor",
)


class RewardStep(msgspec.Struct, kw_only=True):
    """One step's reward, its terms (see TERMS), and how the episode stands after it."""

    reward: float
    terms: dict[str, float]
    terminal: bool = False  # the run said `done`: do not bootstrap
    truncated: bool = False  # the run was evicted: bootstrap from the last value

    @property
    def ends_episode(self) -> bool:
        return self.terminal or self.truncated


# ---------------------------------------------------------------- pure terms


def added_params(packet: SystemStatePacket) -> int:
    """Parameters added on top of the host (seeds): total - host, never negative."""
    return max(packet.total_params - packet.host_params, 0)


def param_rent(host_params: int, total_params: int) -> float:
    """log(1 + added / host): grows with added parameters, slower the bigger they get. 0 if host unknown."""
    if host_params <= 0:
        return 0.0
    return math.log1p(max(total_params - host_params, 0) / host_params)


def slot_potential(slot: SeedSlotState, config: RewardConfig) -> float:
    """One slot's lifecycle potential; a fossilized seed that did not help earns none (anti-gaming)."""
    if slot.stage is SeedStage.FOSSILIZED and slot.total_improvement < config.fossilize_min_improvement:
        return 0.0
    return config.stage_potentials.get(slot.stage, 0.0)


def stage_potential(slots: Iterable[SeedSlotState], config: RewardConfig) -> float:
    """Phi(s): the shaping weight times the sum of the slots' lifecycle potentials."""
    return config.shaping_weight * sum(slot_potential(slot, config) for slot in slots)


def shaping_term(prev: SystemStatePacket, cur: SystemStatePacket, config: RewardConfig) -> float:
    """gamma * Phi(s') - Phi(s), with Phi(terminal) = 0 (keeps the optimal policy unchanged)."""
    next_phi = 0.0 if cur.done else stage_potential(cur.seeds, config)
    return config.gamma * next_phi - stage_potential(prev.seeds, config)


def episode_flags(done: bool, evicted: bool) -> tuple[bool, bool]:
    """(terminal, truncated): `done` closes an episode; eviction truncates it (bootstrapped)."""
    return done, evicted and not done


def discount(step: RewardStep, gamma: float) -> float:
    """The discount to the next state: 0 after a terminal step, else gamma (truncation bootstraps)."""
    return 0.0 if step.terminal else gamma


class LossGovernor:
    """Flags a loss above mean + k sigma of its recent history (the blow-up governor)."""

    def __init__(
        self,
        window: int = 10,
        sigmas: float = 3.0,
        min_history: int = 5,
        min_std: float = 0.01,
        min_relative_std: float = 0.05,
    ) -> None:
        self.sigmas = sigmas
        self.min_history = min_history
        self.min_std = min_std
        self.min_relative_std = min_relative_std
        self._history: deque[float] = deque(maxlen=window)

    def check(self, value: float) -> bool:
        """Whether `value` blows up against the history so far; then remember it."""
        blown = False
        n = len(self._history)
        if n >= self.min_history:
            mean = math.fsum(self._history) / n
            # Deviations are scaled before squaring: losses may be as large as the wire
            # allows (1e300), and a plain square would overflow.
            scale = max(abs(x - mean) for x in self._history) or 1.0
            std = scale * math.sqrt(math.fsum(((x - mean) / scale) ** 2 for x in self._history) / n)
            floor = max(self.min_std, self.min_relative_std * abs(mean))
            blown = value > mean + self.sigmas * max(std, floor)
        self._history.append(value)
        return blown

    def reset(self) -> None:
        self._history.clear()


# ---------------------------------------------------------------- tracker


class RewardTracker:
    """Rewards for one run's episode, fed in order: actions and rejections, then each state packet.

        tracker.note_action(Op.GERMINATE, layer_id=3)   # what the policy did (WAIT too)
        tracker.note_rejected()                           # a rejected ack came back
        step = tracker.on_state(packet)                   # the reward of the step it closes

    The first state packet only sets the baseline (reward 0). Call `reset()` between episodes.
    """

    def __init__(self, config: RewardConfig | None = None) -> None:
        self.config = config or RewardConfig()
        c = self.config
        self._val_governor, self._train_governor = (
            LossGovernor(
                c.governor_window,
                c.governor_sigmas,
                c.governor_min_history,
                c.governor_min_std,
                c.governor_min_relative_std,
            )
            for _ in range(2)
        )
        self.reset()

    def reset(self) -> None:
        self.prev: SystemStatePacket | None = None
        self.episode_return = 0.0
        self.steps = 0
        self.done = False
        self._ops = 0  # non-WAIT ops issued since the last packet
        self._rejected = 0
        self._prunes: set[int] = set()  # layers the policy pruned since the last packet
        self._births: dict[int, int] = {}  # layer -> epoch of the first packet showing its live seed
        self._val_governor.reset()
        self._train_governor.reset()

    # ------------------------------------------------------------ inputs

    def note_action(self, op: Op, layer_id: int | None = None, *, rejected: bool = False) -> None:
        """The policy's decision for the current step (WAIT included; a rejection may come later)."""
        if op is Op.WAIT:
            return
        self._ops += 1
        if rejected:
            self._rejected += 1
        elif op is Op.PRUNE and layer_id is not None:
            self._prunes.add(layer_id)

    def note_rejected(self, count: int = 1) -> None:
        """A host rejected `count` of the commands (acks may arrive after the next packet)."""
        self._rejected += count

    def on_state(self, packet: SystemStatePacket) -> RewardStep:
        """The reward of the step that `packet` closes."""
        prev = self.prev
        terms = dict.fromkeys(TERMS, 0.0)
        blown = self._val_governor.check(packet.val_loss) | self._train_governor.check(packet.train_loss)
        if prev is not None:
            self._fill_terms(terms, prev, packet)
            terms["rejected"] = -self.config.rejected_penalty * self._rejected
            terms["governor"] = -self.config.governor_penalty if blown else 0.0
        self._update_births(packet)
        self.prev = packet
        self._ops = self._rejected = 0
        self._prunes.clear()
        reward = sum(terms.values())
        if prev is not None:
            self.episode_return += reward
            self.steps += 1
        self.done = self.done or packet.done
        return RewardStep(reward=reward, terms=terms, terminal=packet.done)

    def truncate(self) -> RewardStep:
        """The run was evicted: close the episode without a terminal state (bootstrap from it)."""
        terms = dict.fromkeys(TERMS, 0.0)
        terms["rejected"] = -self.config.rejected_penalty * self._rejected
        self._rejected = self._ops = 0
        reward = sum(terms.values())
        self.episode_return += reward
        return RewardStep(reward=reward, terms=terms, truncated=True)

    # ------------------------------------------------------------ terms

    def _fill_terms(self, terms: dict[str, float], prev: SystemStatePacket, cur: SystemStatePacket) -> None:
        c = self.config
        rent = param_rent(cur.host_params, cur.total_params)
        if c.mode == "sparse":
            if cur.done:
                terms["terminal"] = c.accuracy_weight * cur.val_accuracy
                terms["param_cost"] = -c.param_cost_weight * rent
            return
        terms["accuracy"] = c.accuracy_weight * (cur.val_accuracy - prev.val_accuracy)
        terms["rent"] = -c.rent_weight * rent
        if c.mode == "shaped":
            terms["shaping"] = shaping_term(prev, cur, c)
            terms["intervention"] = -c.intervention_cost * self._ops
            terms["prune_young"] = -c.prune_young_penalty * self._young_prunes(prev, cur)

    def _young_prunes(self, prev: SystemStatePacket, cur: SystemStatePacket) -> int:
        """Seeds the policy pruned (and the packet confirms) before they were min_prune_age old."""
        if not self._prunes:
            return 0
        now = _stages(cur.seeds)
        young = 0
        for layer in self._prunes:
            born = self._births.get(layer)
            if born is None or now.get(layer) is not SeedStage.PRUNED:
                continue  # age unknown, or the prune did not take
            if prev.epoch - born < self.config.min_prune_age:
                young += 1
        return young

    def _update_births(self, packet: SystemStatePacket) -> None:
        for layer, stage in _stages(packet.seeds).items():
            if stage in LIVE_STAGES:
                self._births.setdefault(layer, packet.epoch)
            elif stage is not SeedStage.FOSSILIZED:
                self._births.pop(layer, None)


def _stages(slots: Iterable[SeedSlotState]) -> Mapping[int, SeedStage]:
    return {slot.layer_id: slot.stage for slot in slots if slot.seed_id == 0}
