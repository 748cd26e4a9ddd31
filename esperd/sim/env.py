"""SimEnv: a gym-style vector environment of simulated hosts, observed through the real Analyzer.

Each run publishes real `contracts` packets (a TopologyPacket per episode, a HealthBatch and
a SystemStatePacket per epoch) into an in-process `esperd.analyzer.Analyzer`, and the
policy sees `Analyzer.observe(run_id)`: exactly the observations, masks and action space it
sees in the daemon. Actions go through the lifecycle table; rewards come from
`esperd.learn.rewards.RewardTracker` on the same state packets the daemon would record.

    env = SimEnv(8, SimConfig(), seed=0)
    obs = env.reset()
    result = policy.act(obs)
    obs, rewards, dones, infos = env.step(result)   # ActResult, [Decision], or action rows
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np

from esperd.analyzer import Analyzer, AnalyzerConfig, Observation
from esperd.analyzer.observation import ACTION_WIDTH, LEVER_COLUMN, OPS, OPTIONAL_LEVERS, lever_values
from esperd.learn.rewards import RewardTracker
from esperd.sim.config import SimConfig
from esperd.sim.dynamics import Command, HostBatch
from esperd.sim.packets import health_batch, state_packet, telemetry, topology_packet
from esperd_contracts import AckStatus, AdaptationCommand, CommandAck, Op


class EpisodeResult(msgspec.Struct, kw_only=True):
    """How one finished episode went (carried by the StepInfo of its last step)."""

    run_id: str
    architecture: str
    episode_return: float
    length: int
    final_accuracy: float
    host_params: int
    total_params: int
    added_params: int
    germinated: int
    fossilized: int
    pruned: int
    timeouts: int  # seeds the host pruned after too long on probation
    spikes: int  # blends that destabilized training
    rejected: int
    commands: int


class StepInfo(msgspec.Struct, kw_only=True):
    """One env's step: the command tried and its outcome, the reward terms, the episode if it ended.

    When `episode` is set the env was auto-reset: the observation returned for it belongs to
    the new episode, and `final_observation` is the last one of the finished episode.
    """

    run_id: str
    epoch: int
    op: Op
    layer_id: int | None
    applied: bool
    reason: str
    terms: dict[str, float]
    val_accuracy: float
    total_params: int
    episode: EpisodeResult | None = None
    final_observation: Observation | None = None

    @property
    def rejected(self) -> bool:
        return self.op is not Op.WAIT and not self.applied


#: Sees every message of every simulated run: (run id, channel, message), as a trace records them.
PacketObserver = Callable[[str, str, msgspec.Struct], None]


class SimEnv:
    """`num_envs` simulated runs stepped together, one decision per run per epoch.

    `observer`, when set, sees every topology and state packet, and every command with its ack
    (as the wire messages a real run would exchange; health batches are left out).
    """

    def __init__(
        self,
        num_envs: int = 1,
        config: SimConfig | None = None,
        seed: int | None = None,
        observer: PacketObserver | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self.num_envs = num_envs
        self.hosts = HostBatch(num_envs, self.config, np.random.default_rng(seed))
        self.analyzer = Analyzer(
            AnalyzerConfig(
                max_runs=max(1024, 2 * num_envs), max_nodes_per_run=max(4096, self.config.max_layers)
            ),
            clock=self._clock,
        )
        self.trackers = [RewardTracker(self.config.reward) for _ in range(num_envs)]
        self.run_ids: list[str] = [""] * num_envs
        self.observations: list[Observation] = []
        self.observer = observer
        self._time = 0.0
        self._command_ids = itertools.count(1)

    def _clock(self) -> float:
        return self._time

    # ------------------------------------------------------------ gym API

    def reset(self) -> list[Observation]:
        """Start a new episode in every env; their first observations."""
        for run_id in self.run_ids:
            if run_id:
                self.analyzer.remove_run(run_id)
        envs = np.arange(self.num_envs)
        self.hosts.reset(envs)
        self._time += self.config.epoch_seconds
        self._begin(envs)
        self.observations = self.analyzer.observe_many(self.run_ids)
        return self.observations

    def step(
        self, actions: Any, *, levers: frozenset[str] | None = None
    ) -> tuple[list[Observation], np.ndarray, np.ndarray, list[StepInfo]]:
        """Apply one decision per env, run one epoch; (observations, rewards, dones, infos).

        `actions`: an ActResult, a list of Decisions (run ids must match), or [num_envs, W]
        action rows (observation.ACTION_FIELDS indices; a tensor, array or list; a row shorter
        than ACTION_WIDTH leaves the optional levers it lacks to the host, as a wire command
        without them would, and so do rows of a policy that sets only `levers`: the policy's
        own Decisions would not carry the others).
        Finished envs are reset at once; see StepInfo for what they report.
        """
        if not self.observations:
            raise RuntimeError("call reset() before step()")
        commands = self._commands(actions, levers)
        outcomes = [self._apply(e, command) for e, command in enumerate(commands)]
        hosts = self.hosts
        hosts.advance()
        self._time += self.config.epoch_seconds
        tel = telemetry(hosts)
        dones = hosts.done()
        rewards = np.zeros(self.num_envs)
        infos: list[StepInfo] = []
        for e, run_id in enumerate(self.run_ids):  # every run's health in one pass (at the first state)
            self.analyzer.queue_health(run_id, health_batch(hosts, tel, e, self._time))
        done_list = dones.tolist()
        states = [state_packet(hosts, tel, e, self._time, done) for e, done in enumerate(done_list)]
        self.analyzer.ingest_states(self.run_ids, states)
        for e, (run_id, state, done) in enumerate(zip(self.run_ids, states, done_list, strict=True)):
            if self.observer is not None:
                self.observer(run_id, "state", state)
            outcome = self.trackers[e].on_state(state)
            rewards[e] = outcome.reward
            command, (applied, reason) = commands[e], outcomes[e]
            info = StepInfo(
                run_id=run_id,
                epoch=state.epoch,
                op=command.op if command else Op.WAIT,
                layer_id=command.layer_id if command else None,
                applied=applied,
                reason=reason,
                terms=outcome.terms,
                val_accuracy=state.val_accuracy,
                total_params=state.total_params,
            )
            if done:
                info.episode = self._episode_result(e, state.val_accuracy)
            infos.append(info)
        finished = np.flatnonzero(dones)
        if finished.size:
            ended = [self.run_ids[e] for e in finished.tolist()]
            for e, final in zip(finished.tolist(), self.analyzer.observe_many(ended), strict=True):
                infos[e].final_observation = final
            for run_id in ended:
                self.analyzer.remove_run(run_id)
            hosts.reset(finished)
            self._begin(finished)
        self.observations = self.analyzer.observe_many(self.run_ids)
        return self.observations, rewards, dones.copy(), infos

    def close(self) -> None:
        for run_id in self.run_ids:
            if run_id:
                self.analyzer.remove_run(run_id)
        self.observations = []

    # ------------------------------------------------------------ helpers

    def _begin(self, envs: np.ndarray) -> None:
        """Publish a fresh episode's topology and epoch-0 packets for `envs` into the analyzer."""
        hosts, now = self.hosts, self._time
        tel = telemetry(hosts)
        for e in envs.tolist():
            run_id = f"{self.config.run_prefix}-{e}-{int(hosts.episode[e])}"
            self.run_ids[e] = run_id
            topology = topology_packet(hosts, e, now)
            self.analyzer.ingest_topology(run_id, topology)
            self.analyzer.ingest_health(run_id, health_batch(hosts, tel, e, now))
            state = state_packet(hosts, tel, e, now, done=False)
            self.analyzer.ingest_state(run_id, state)
            if self.observer is not None:
                self.observer(run_id, "topology", topology)
                self.observer(run_id, "state", state)
            tracker = self.trackers[e]
            tracker.reset()
            tracker.on_state(state)  # the baseline: no reward yet

    def _apply(self, e: int, command: Command | None) -> tuple[bool, str]:
        tracker = self.trackers[e]
        if command is None or command.op is Op.WAIT:
            tracker.note_action(Op.WAIT)
            return True, ""
        applied, reason = self.hosts.apply(e, command)
        tracker.note_action(command.op, command.layer_id, rejected=not applied)
        if self.observer is not None:
            self._observe_command(e, command, applied, reason)
        return applied, reason

    def _observe_command(self, e: int, command: Command, applied: bool, reason: str) -> None:
        assert self.observer is not None
        run_id = self.run_ids[e]
        wire = AdaptationCommand(
            command_id=f"sim-{next(self._command_ids)}",
            run_id=run_id,
            layer_id=max(command.layer_id, 0),
            op=command.op,
            issued_at=self._time,
            **{name: getattr(command, name) for name in _WIRE_LEVERS},
        )
        self.observer(run_id, "command", wire)
        status = AckStatus.APPLIED if applied else AckStatus.REJECTED
        ack = CommandAck(
            command_id=wire.command_id, status=status, reason=reason[:1024], timestamp=self._time
        )
        self.observer(run_id, "ack", ack)

    def _commands(self, actions: Any, levers: frozenset[str] | None = None) -> list[Command | None]:
        decisions = getattr(actions, "decisions", actions)
        if isinstance(decisions, Sequence) and decisions and _is_decision(decisions[0]):
            return self._from_decisions(decisions)
        rows = actions.tolist() if hasattr(actions, "tolist") else [_row(a) for a in actions]
        if len(rows) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions, got {len(rows)}")
        return [self._from_row(obs, row, levers) for obs, row in zip(self.observations, rows, strict=True)]

    def _from_decisions(self, decisions: Sequence[Any]) -> list[Command | None]:
        if len(decisions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} decisions, got {len(decisions)}")
        commands: list[Command | None] = []
        for run_id, d in zip(self.run_ids, decisions, strict=True):
            if d.run_id != run_id:
                raise ValueError(f"decision for run {d.run_id!r} given where run {run_id!r} is current")
            commands.append(None if d.op is Op.WAIT else _with_target(Command.of(d)))
        return commands

    @staticmethod
    def _from_row(
        obs: Observation, row: Sequence[int], levers: frozenset[str] | None = None
    ) -> Command | None:
        if len(row) > ACTION_WIDTH:
            raise ValueError(f"an action row has at most {ACTION_WIDTH} columns, got {len(row)}")
        values = [int(x) for x in row] + [0] * (ACTION_WIDTH - len(row))
        given = frozenset(
            name
            for name in OPTIONAL_LEVERS
            if LEVER_COLUMN[name] < len(row) and (levers is None or name in levers)
        )
        node, op = values[0], values[1]
        if not 0 <= op < len(OPS):
            raise ValueError(f"op index {op} is outside [0, {len(OPS)})")
        if OPS[op] is Op.WAIT:
            return None
        layer = int(obs.layer_ids[node]) if 0 <= node < obs.num_nodes else -1  # -1: the host rejects it
        return Command(layer_id=layer, op=OPS[op], **lever_values(OPS[op], values, given))  # type: ignore[arg-type]

    def _episode_result(self, e: int, final_accuracy: float) -> EpisodeResult:
        hosts, tracker = self.hosts, self.trackers[e]
        counts = {name: int(values[e]) for name, values in hosts.counts.items()}
        added = int(hosts.added_params()[e])
        return EpisodeResult(
            run_id=self.run_ids[e],
            architecture=hosts.arch[e],
            episode_return=tracker.episode_return,
            length=tracker.steps,
            final_accuracy=final_accuracy,
            host_params=int(hosts.host_params[e]),
            total_params=int(hosts.host_params[e]) + added,
            added_params=added,
            **counts,
        )


def _is_decision(item: object) -> bool:
    return hasattr(item, "run_id") and hasattr(item, "layer_id") and hasattr(item, "op")


def _row(action: Any) -> list[int]:
    return action.as_list() if hasattr(action, "as_list") else [int(x) for x in action]


#: The lever fields a sim Command shares with the wire's AdaptationCommand.
_WIRE_LEVERS = tuple(name for name in Command.__struct_fields__ if name not in ("layer_id", "op"))


def _with_target(command: Command) -> Command:
    """A SET_ALPHA_TARGET always has a target, as the daemon sends it (1.0 without the lever)."""
    if command.op is Op.SET_ALPHA_TARGET and command.alpha_target is None:
        return msgspec.structs.replace(command, alpha_target=1.0)
    return command
