"""Simulated hosts over NATS: each run publishes like a real training job and obeys esperd's commands.

One `HostClient` per run (its own connection, as separate training jobs would have). Every
`epoch_s` seconds all runs advance one epoch together and publish a HealthBatch and a
SystemStatePacket; a run's first epoch is preceded by its TopologyPacket. Commands are applied
as they arrive, through the same dynamics and lifecycle table as the in-process SimEnv, and
acked applied or rejected (with the reason). A finished run (`done`) is followed by a new
episode under a new run id, since esperd closes a run on `done`: run ids are
`<run_prefix>-<session>-<i>-<episode>`, where the session token differs per SimHosts, so a
restarted simulator is not mistaken for runs esperd already saw finish.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Callable

import msgspec
import nats
import numpy as np

from esperd.client import HostClient
from esperd.sim.config import SimConfig
from esperd.sim.dynamics import Command, HostBatch
from esperd.sim.packets import health_batch, state_packet, telemetry, topology_packet
from esperd_contracts import DEFAULT_PREFIX, AdaptationCommand

#: Called for every command received: (run id, command, applied, reason if rejected).
CommandObserver = Callable[[str, AdaptationCommand, bool, str], None]


class HostStats(msgspec.Struct, kw_only=True):
    """What the simulated hosts did, for printing and tests."""

    epochs: int = 0
    episodes_finished: int = 0
    commands: int = 0
    applied: int = 0
    rejected: int = 0
    by_op: dict[str, int] = msgspec.field(default_factory=dict)
    foreign: int = 0  # commands addressed to another run id (ignored, not acked)
    after_close: int = 0  # commands that arrived after the run's client closed (ignored)
    connection_errors: int = 0  # e.g. refused while the broker starts; the client retries
    final_accuracies: list[float] = msgspec.field(default_factory=list)


class SimHosts:
    """`runs` simulated training runs talking to esperd over NATS."""

    def __init__(
        self,
        url: str,
        runs: int,
        *,
        config: SimConfig | None = None,
        seed: int | None = 0,
        epoch_s: float = 0.5,
        episodes: int = 0,
        prefix: str = DEFAULT_PREFIX,
        on_command: CommandObserver | None = None,
        session: str | None = None,
    ) -> None:
        self.url = url
        self.config = config or SimConfig()
        self.hosts = HostBatch(runs, self.config, np.random.default_rng(seed))
        self.epoch_s = epoch_s
        self.episodes = episodes  # per run; 0 = forever
        self.prefix = prefix
        self.on_command = on_command
        self.stats = HostStats()
        self.clients: list[HostClient | None] = [None] * runs
        self.run_ids = [""] * runs
        # None: a fresh random token; "": none (run ids <run_prefix>-<i>-<episode>, as SimEnv names them).
        self.session = uuid.uuid4().hex[:6] if session is None else session
        self._episodes_started = collections.Counter[int]()

    async def run(self, stop: asyncio.Event | None = None, max_epochs: int = 0) -> HostStats:
        """Publish until `stop` is set, every run has played `episodes`, or `max_epochs` have passed."""
        stop = stop or asyncio.Event()
        runs = range(self.hosts.num_envs)
        self.hosts.reset(np.arange(self.hosts.num_envs))
        try:
            await asyncio.gather(*(self._begin(e) for e in runs))
            while not stop.is_set() and any(c is not None for c in self.clients):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.epoch_s)
                if stop.is_set():
                    break
                await self._epoch()
                if max_epochs and self.stats.epochs >= max_epochs:
                    break
        finally:
            await asyncio.gather(*(self._end(e) for e in runs), return_exceptions=True)
        return self.stats

    # ------------------------------------------------------------ episodes

    async def _begin(self, e: int) -> None:
        """Connect run `e`'s client for a new episode and publish its topology and epoch 0."""
        hosts = self.hosts
        session = f"{self.session}-" if self.session else ""
        run_id = f"{self.config.run_prefix}-{session}{e}-{int(hosts.episode[e])}"
        nc = await nats.connect(
            self.url, max_reconnect_attempts=-1, name=f"esperd-sim-{run_id}", error_cb=self._connection_error
        )
        client = HostClient(nc, run_id, prefix=self.prefix)
        await client.start(on_command=lambda command, e=e: self._on_command(e, command))
        self.clients[e], self.run_ids[e] = client, run_id
        self._episodes_started[e] += 1
        now = time.time()
        tel = telemetry(hosts)
        client.send_topology(topology_packet(hosts, e, now))
        client.send_health(health_batch(hosts, tel, e, now))
        client.send_state(state_packet(hosts, tel, e, now, done=False))

    async def _end(self, e: int) -> None:
        client, self.clients[e] = self.clients[e], None
        if client is not None:
            await client.close()

    async def _epoch(self) -> None:
        """Advance every run one epoch and publish; start the next episode of finished runs."""
        hosts = self.hosts
        hosts.advance()
        self.stats.epochs += 1
        now = time.time()
        tel = telemetry(hosts)
        done = hosts.done()
        for e, client in enumerate(self.clients):
            if client is None:
                continue
            client.send_health(health_batch(hosts, tel, e, now))
            client.send_state(state_packet(hosts, tel, e, now, done=bool(done[e])))
        for e in np.flatnonzero(done).tolist():
            if self.clients[e] is None:
                continue
            self.stats.episodes_finished += 1
            self.stats.final_accuracies.append(float(hosts.accuracy[e]))
            await self._end(e)
            if not self.episodes or self._episodes_started[e] < self.episodes:
                hosts.reset([e])
                await self._begin(e)

    async def _connection_error(self, exc: Exception) -> None:
        del exc  # counted, not printed: nats-py retries by itself
        self.stats.connection_errors += 1

    # ------------------------------------------------------------ commands

    def _on_command(self, e: int, command: AdaptationCommand) -> None:
        client = self.clients[e]
        if client is None:
            self.stats.after_close += 1  # in flight while this episode's run was shutting down
            return
        if command.run_id != self.run_ids[e]:
            self.stats.foreign += 1
            return
        applied, reason = self.hosts.apply(e, Command.of(command))
        client.ack(command, applied, reason)
        stats = self.stats
        stats.commands += 1
        stats.applied += applied
        stats.rejected += not applied
        stats.by_op[command.op.value] = stats.by_op.get(command.op.value, 0) + 1
        if self.on_command is not None:
            self.on_command(self.run_ids[e], command, applied, reason)


def describe_command(run_id: str, command: AdaptationCommand, applied: bool, reason: str) -> str:
    """One line per command received, as `python -m esperd.sim` and the quick-start demo print them."""
    levers = ""
    if command.blueprint is not None:
        blend = command.blend.value if command.blend else "-"
        tempo = command.tempo.value if command.tempo else "-"
        levers = f" {command.blueprint.value} ({blend}, {tempo})"
    outcome = "applied" if applied else f"REJECTED: {reason}"
    return (
        f"  {run_id}: {command.op.value:<16} layer {command.layer_id:<3}{levers}  "
        f"[{command.policy} v{command.policy_version}, confidence {command.confidence:.2f}] -> {outcome}"
    )
