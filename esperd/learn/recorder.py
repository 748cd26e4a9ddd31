"""The recorder: turns decisions, state packets, acks and evictions into closed Transitions.

Knows nothing of NATS; the event loop owns it and calls it (not thread-safe). Per run it
keeps a RewardTracker and at most one *open* step -- the run's latest decision, WAIT
included. Rewards from the run's state packets accumulate into the open step; the step
closes when

  * the run is decided again: next_obs is the new decision's observation (the same object
    the new open step holds as obs), reward is everything accumulated since;
  * a state packet says `done`: terminal (done=True, next_obs=None); the episode ends;
  * the run is evicted (idle, or pushed out by `max_runs`): truncated (truncated=True,
    done=False). The state after the last action was never observed, so next_obs is the
    step's own observation: learners bootstrap from V(next_obs) as for any non-terminal
    step, which here means V(s_t) stands in for V(s_t+1).

Closed transitions go to every sink (`add_sink`): the rollout and replay buffers. Sinks
get the same Transition object and must treat it as read-only.

Rejections are matched by run, not by command: the tracker charges the penalty with the
next state packet, into whichever step is open then (the rejected command's own step,
unless the run was decided again before that packet arrived).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from esperd.analyzer.observation import ACTION_WIDTH, Observation
from esperd.learn.config import RewardConfig
from esperd.learn.experience import Transition
from esperd.learn.rewards import RewardStep, RewardTracker
from esperd.policy.base import ActResult, PolicyBundle
from esperd_contracts import SystemStatePacket
from esperd_contracts.status import RecorderStats

log = structlog.get_logger("esperd.learn.recorder")

Sink = Callable[[Transition], object]


@dataclass(slots=True)
class _OpenStep:
    obs: Observation
    action: np.ndarray
    log_prob: float
    value: float
    policy_version: int
    hidden: np.ndarray | None
    reward: float = 0.0


@dataclass(slots=True)
class _Run:
    tracker: RewardTracker
    open: _OpenStep | None = None
    steps: int = 0  # transitions closed in this episode


class Recorder:
    """Records every decision as the open step of its run and closes it with its rewards."""

    def __init__(
        self,
        reward_config: RewardConfig | None = None,
        *,
        max_runs: int = 4096,
        sinks: Sequence[Sink] = (),
        returns_window: int = 100,
    ) -> None:
        if max_runs < 1:
            raise ValueError("max_runs must be >= 1")
        self.reward_config = reward_config or RewardConfig()
        self.max_runs = int(max_runs)
        self._sinks: list[Sink] = list(sinks)
        # Activity order: the least recently active run is first, and goes first when full.
        self._runs: collections.OrderedDict[str, _Run] = collections.OrderedDict()
        self.recent_returns: collections.deque[float] = collections.deque(maxlen=returns_window)
        self.decisions = 0
        self.transitions_closed = 0
        self.terminal = 0
        self.truncated = 0
        self.episodes_closed = 0
        self.rejections = 0
        self.runs_dropped = 0
        self.unattributed_reward = 0.0
        self.sink_errors = 0
        self.version_mismatches = 0

    # ------------------------------------------------------------ sinks

    def add_sink(self, sink: Sink) -> None:
        """Deliver every closed transition to `sink` (e.g. `RolloutBuffer.add`, `ReplayBuffer.add`)."""
        self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        self._sinks.remove(sink)

    # ------------------------------------------------------------ inputs

    def decision_hook(
        self, observations: Sequence[Observation], result: ActResult, policy: PolicyBundle
    ) -> None:
        """`DecisionLoop(on_decided=recorder.decision_hook)`: same as `on_decided`."""
        self.on_decided(observations, result, policy.version)

    def on_decided(
        self, observations: Sequence[Observation], result: ActResult, policy_version: int | None = None
    ) -> None:
        """Open a step per decided run (WAIT included), closing each run's previous step.

        The version recorded is the one each Decision carries (stamped inside `act`, under the
        bundle's lock by `build_decisions`): an in-place weight load may land between `act` and
        this call. A different `policy_version` is only counted (`version_mismatches`).
        """
        batch = len(observations)
        actions = result.actions.detach().cpu().numpy()
        if actions.shape != (batch, ACTION_WIDTH) or len(result.decisions) != batch:
            raise ValueError(
                f"{batch} observations but actions {tuple(actions.shape)} and "
                f"{len(result.decisions)} decisions"
            )
        actions = np.array(actions, dtype=np.int64)  # our own copy: rows are views of it
        log_probs = result.log_probs.detach().cpu().tolist()
        values = result.values.detach().cpu().tolist()
        hidden = None
        if result.hidden is not None:
            hidden = np.array(result.hidden.detach().cpu().numpy(), dtype=np.float32)
        for i, obs in enumerate(observations):
            decision = result.decisions[i]
            version = decision.policy_version
            if policy_version is not None and version != policy_version:
                self.version_mismatches += 1
            run = self._touch(obs.run_id)
            if run.open is not None:
                self._close(run, next_obs=obs)
            run.tracker.note_action(decision.op, decision.layer_id)
            run.open = _OpenStep(
                obs=obs,
                action=actions[i],
                log_prob=float(log_probs[i]),
                value=float(values[i]),
                policy_version=int(version),
                hidden=None if hidden is None else hidden[i],
            )
            self.decisions += 1

    def on_state(self, run_id: str, packet: SystemStatePacket) -> RewardStep:
        """Feed the run's reward tracker; the reward joins the open step. `done` closes the episode."""
        run = self._touch(run_id)
        step = run.tracker.on_state(packet)
        if run.open is not None:
            run.open.reward += step.reward
        else:
            self.unattributed_reward += step.reward
        if packet.done:
            if run.open is not None:
                self._close(run, next_obs=None, done=True)
            self._end_episode(run_id, run)
        return step

    def on_ack(self, run_id: str, command_id: str | None = None, applied: bool = True) -> None:
        """A host answered a command of this run; a rejection costs the rejection penalty."""
        if not applied:
            self.note_rejected(run_id)

    def note_rejected(self, run_id: str, count: int = 1) -> None:
        """`count` commands of this run were rejected (charged with the run's next state packet)."""
        run = self._runs.get(run_id)
        if run is None:
            return  # episode already closed or run forgotten: nothing left to charge
        run.tracker.note_rejected(count)
        self.rejections += count

    def on_evicted(self, run_id: str) -> None:
        """The run went away without `done`: truncate its episode (bootstrapped) and forget it."""
        run = self._runs.get(run_id)
        if run is not None:
            self._truncate(run_id, run)

    def truncate_all(self) -> int:
        """Truncate every run's episode (shutdown: hand open steps to the sinks before saving)."""
        count = len(self._runs)
        for run_id, run in list(self._runs.items()):
            self._truncate(run_id, run)
        return count

    # ------------------------------------------------------------ state

    @property
    def open_steps(self) -> int:
        return sum(run.open is not None for run in self._runs.values())

    def tracker(self, run_id: str) -> RewardTracker | None:
        """The run's reward tracker, for inspection."""
        run = self._runs.get(run_id)
        return None if run is None else run.tracker

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def stats(self) -> RecorderStats:
        returns = self.recent_returns
        return RecorderStats(
            runs=len(self._runs),
            open_steps=self.open_steps,
            decisions=self.decisions,
            transitions_closed=self.transitions_closed,
            terminal=self.terminal,
            truncated=self.truncated,
            episodes_closed=self.episodes_closed,
            rejections=self.rejections,
            runs_dropped=self.runs_dropped,
            unattributed_reward=round(self.unattributed_reward, 6),
            sink_errors=self.sink_errors,
            version_mismatches=self.version_mismatches,
            mean_episode_return=round(sum(returns) / len(returns), 6) if returns else 0.0,
        )

    # ------------------------------------------------------------ internals

    def _touch(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is not None:
            self._runs.move_to_end(run_id)
            return run
        while len(self._runs) >= self.max_runs:
            # Bounded memory: the least recently active run's episode is cut short, as an eviction.
            oldest_id, oldest = next(iter(self._runs.items()))
            self.runs_dropped += 1
            self._truncate(oldest_id, oldest)
        run = _Run(RewardTracker(self.reward_config))
        self._runs[run_id] = run
        return run

    def _truncate(self, run_id: str, run: _Run) -> None:
        step = run.tracker.truncate()  # charges rejections not yet paid by a state packet
        if run.open is not None:
            run.open.reward += step.reward
            self._close(run, next_obs=run.open.obs, truncated=True)
        self._end_episode(run_id, run)

    def _end_episode(self, run_id: str, run: _Run) -> None:
        if run.steps:
            self.episodes_closed += 1
            self.recent_returns.append(run.tracker.episode_return)
        # Forgetting the run is the tracker reset: a later packet starts a fresh episode and baseline.
        self._runs.pop(run_id, None)

    def _close(
        self, run: _Run, *, next_obs: Observation | None, done: bool = False, truncated: bool = False
    ) -> None:
        step = run.open
        assert step is not None
        run.open = None
        transition = Transition(
            obs=step.obs,
            action=step.action,
            log_prob=step.log_prob,
            value=step.value,
            policy_version=step.policy_version,
            reward=step.reward,
            done=done,
            truncated=truncated,
            next_obs=next_obs,
            hidden=step.hidden,
        )
        run.steps += 1
        self.transitions_closed += 1
        self.terminal += done
        self.truncated += truncated
        for sink in self._sinks:
            try:
                sink(transition)
            except Exception:  # a broken sink must not stop decisions or the other sinks
                self.sink_errors += 1
                log.exception("experience sink failed", sink=repr(sink), run_id=step.obs.run_id)
