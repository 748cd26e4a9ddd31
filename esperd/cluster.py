"""Several esperd instances sharing the runs: each run is owned by exactly one live instance.

Instances announce themselves on `esperd.cluster.heartbeat` (core NATS, so it works the
same on one broker or a NATS cluster) and each keeps the set of live members. A run's
owner is chosen by rendezvous hashing over the live members: every instance computes the
same owner from the same membership, and when an instance joins or dies only the runs
it gains or held move. An instance drops messages for runs it does not own.

The ownership logic (`Membership`) is pure; `ClusterAgent` is the NATS side.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Callable
from typing import Annotated

import msgspec
import structlog
from msgspec import Meta
from nats.aio.client import Client
from nats.aio.msg import Msg

log = structlog.get_logger("esperd.cluster")

HEARTBEAT_SUBJECT = "esperd.cluster.heartbeat"
HELLO_SUBJECT = "esperd.cluster.hello"


class ClusterConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[cluster]` in the config file."""

    enabled: bool = False
    instance_id: str = ""  # empty: <hostname>-<pid>
    heartbeat_s: Annotated[float, Meta(gt=0.0)] = 1.0
    dead_after_s: Annotated[float, Meta(gt=0.0)] = 3.5  # a member silent this long is gone
    settle_s: Annotated[float, Meta(ge=0.0)] = 0.5  # listen this long for peers before serving


class Heartbeat(msgspec.Struct):
    instance_id: str
    started_at: float
    leaving: bool = False


class Membership:
    """Live members (by last heartbeat) and who owns which run."""

    def __init__(self, me: str, dead_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.me = me
        self.dead_after_s = dead_after_s
        self._clock = clock
        self._seen: dict[str, float] = {me: clock()}
        self._members: tuple[str, ...] = (me,)

    @property
    def members(self) -> tuple[str, ...]:
        return self._members

    def heard(self, instance_id: str, leaving: bool = False) -> bool:
        """Note a heartbeat; True if the membership changed."""
        if leaving:
            self._seen.pop(instance_id, None)
        else:
            self._seen[instance_id] = self._clock()
        return self._refresh()

    def expire(self) -> bool:
        """Forget silent members; True if the membership changed."""
        self._seen[self.me] = self._clock()
        limit = self._clock() - self.dead_after_s
        for member in [m for m, at in self._seen.items() if at < limit]:
            del self._seen[member]
        return self._refresh()

    def owner(self, run_id: str) -> str:
        """The live member that owns `run_id` (highest rendezvous score)."""
        return max(self._members, key=lambda member: _score(member, run_id))

    def owns(self, run_id: str) -> bool:
        return len(self._members) == 1 or self.owner(run_id) == self.me

    def _refresh(self) -> bool:
        members = tuple(sorted(self._seen))
        changed = members != self._members
        self._members = members
        return changed


def _score(member: str, run_id: str) -> int:
    digest = hashlib.blake2b(f"{member}\x00{run_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ClusterAgent:
    """Heartbeats on NATS and keeps a Membership current; calls `on_change` when it changes."""

    def __init__(
        self, config: ClusterConfig, nc: Client, on_change: Callable[[tuple[str, ...]], None]
    ) -> None:
        self.config = config
        self.nc = nc
        self.membership = Membership(config.instance_id or default_instance_id(), config.dead_after_s)
        self._on_change = on_change
        self._started_at = time.time()
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(Heartbeat)
        self._subs: list[object] = []

    @property
    def me(self) -> str:
        return self.membership.me

    async def start(self) -> None:
        """Subscribe, say hello (peers answer at once), and listen for `settle_s`."""
        self._subs.append(await self.nc.subscribe(HEARTBEAT_SUBJECT, cb=self._on_heartbeat))
        self._subs.append(await self.nc.subscribe(HELLO_SUBJECT, cb=self._on_hello))
        await self.nc.flush()
        await self.nc.flush()
        await self.nc.publish(HELLO_SUBJECT, self._encoder.encode(self._heartbeat()))
        await asyncio.sleep(self.config.settle_s)
        log.info("cluster joined", instance=self.me, members=list(self.membership.members))

    async def run(self) -> None:
        """Heartbeat and expire silent members forever (until cancelled)."""
        while True:
            await self._beat()
            if self.membership.expire():
                self._changed()
            await asyncio.sleep(self.config.heartbeat_s)

    async def leave(self) -> None:
        """Tell peers we are going, so they take our runs over at once."""
        if self.nc.is_connected:
            await self.nc.publish(HEARTBEAT_SUBJECT, self._encoder.encode(self._heartbeat(leaving=True)))
            await self.nc.flush()

    def _heartbeat(self, leaving: bool = False) -> Heartbeat:
        return Heartbeat(self.me, self._started_at, leaving)

    async def _beat(self) -> None:
        if self.nc.is_connected:
            await self.nc.publish(HEARTBEAT_SUBJECT, self._encoder.encode(self._heartbeat()))

    async def _on_hello(self, msg: Msg) -> None:
        await self._on_heartbeat(msg)
        await self._beat()  # answer a newcomer without waiting for our next beat

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = self._decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if beat.instance_id != self.me and self.membership.heard(beat.instance_id, beat.leaving):
            self._changed()

    def _changed(self) -> None:
        members = self.membership.members
        log.info("cluster membership changed", instance=self.me, members=list(members))
        self._on_change(members)
