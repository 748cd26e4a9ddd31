"""Several esperd instances sharing the runs, with leases and fencing tokens from JetStream key-value.

The lease primitive is NATS's own: a JetStream key-value bucket whose entries expire after the
bucket's TTL, written with revision checks (`create` succeeds only if the key is absent,
`update(last=revision)` only if nobody wrote it since). The broker is the arbiter; no instance
trusts another's clock or its own view of who is alive.

- `members.<instance>`: each instance re-puts its record every `heartbeat_s`; the key expires
  `dead_after_s` after the last put, so the keys present are the live members.
- `partitions.<p>`: the lease on partition `p` (runs hash to `partitions` partitions, see
  `esperd.ops.ownership`). The instance that rendezvous hashing assigns `p` to among the live members
  creates the key; its revision then is the partition's *epoch*, the fencing token every command
  for a run in `p` carries. Revisions are the bucket stream's sequence numbers, so a later lease
  on the same partition always has a larger epoch. The holder renews with `update(last=…)`; if it
  stops (frozen, dead, cut off) the key expires and the new assignee creates it afresh.

`esperd.ops.ownership.Leases` keeps a local deadline per lease and gives the partition up the moment
it passes; the `ClusterAgent` here is the NATS side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from esperd.config import ClusterConfig
from esperd.logs import RateLimiter
from esperd.ops.ownership import Leases, OnLost, targets
from esperd_contracts.status import ClusterStatus, ClusterView, MemberView

log = structlog.get_logger("esperd.ops.cluster")

INSTANCE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
LEASE_MARGIN = 0.25  # of the bucket TTL: a lease is given up locally this long before it can expire
STALE_AFTER_BEATS = 2.5  # a member whose record has not changed for this many heartbeats is stale
GONE_KEPT_S = 60.0  # how long the view lists a member that has gone


class ClusterError(RuntimeError):
    """Cluster mode cannot work on this broker (no JetStream, an unusable bucket)."""


class MemberRecord(msgspec.Struct, kw_only=True):
    """What an instance writes under `members.<instance>`."""

    instance: str
    host: str = ""
    pid: int = 0
    started_at: float = 0.0  # unix time
    partitions: dict[int, int] = {}  # partition -> epoch, as of the instance's last renewal
    runs: int = 0
    partition_count: int = 0  # its [cluster] partitions: every member must use the same


class LeaseRecord(msgspec.Struct, kw_only=True):
    """What a lease holder writes under `partitions.<p>`."""

    owner: str
    acquired_at: float = 0.0  # unix time


def lease_clock() -> float:
    """Seconds on a clock that keeps counting while the machine is suspended (Linux: CLOCK_BOOTTIME)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def default_instance_id() -> str:
    """`<hostname>-<pid>`, with anything a subject token cannot hold replaced by `_`."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:48] or "esperd"
    return f"{host}-{os.getpid()}"


def instance_status_subject(instance: str) -> str:
    """The subject one instance answers its status on."""
    return f"esperd.status.{instance}"


class ClusterAgent:
    """Keeps this instance's membership record and partition leases in the bucket; see the module doc."""

    def __init__(
        self,
        config: ClusterConfig,
        nc: Client,
        instance: str,
        *,
        on_lost: OnLost,
        on_acquired: Callable[[list[int]], Awaitable[None]] | None = None,
        runs: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = lease_clock,
    ) -> None:
        self.config = config
        self.nc = nc
        self.me = instance
        self.errors = 0  # failed ticks (broker away, JetStream timeouts)
        self.acquisitions = 0
        self.leases = Leases(
            config.partitions, config.dead_after_s, LEASE_MARGIN * config.dead_after_s, on_lost, clock
        )
        self._on_acquired = on_acquired
        self._runs = runs
        self._clock = clock
        self._record = MemberRecord(
            instance=instance,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
            partition_count=config.partitions,
        )
        # JetStream calls time out well within a lease: a slow broker must not stall a tick past it.
        self._js = nc.jetstream(timeout=max(0.5, min(2.0, config.heartbeat_s)))
        self._kv: KeyValue | None = None
        self._stream = f"KV_{config.bucket}"
        self._members: dict[str, MemberRecord] = {}
        self._seen: dict[str, tuple[int, float]] = {}  # member -> (revision, when it last changed)
        self._gone: dict[str, tuple[float, bool]] = {}  # member -> (when, whether it left cleanly)
        self._view_at = clock()
        self._wake = asyncio.Event()
        self._error_log = RateLimiter(10.0)
        self._encoder = msgspec.json.Encoder()
        self._member_decoder = msgspec.json.Decoder(MemberRecord)
        self._lease_decoder = msgspec.json.Decoder(LeaseRecord)
        self.foreign_messages = 0  # messages for runs this instance does not own now (not processed)
        self.handovers = 0  # runs given up: their partition went to another member, or its lease lapsed

    # ---------------------------------------------------------------- lifecycle

    def status(self) -> ClusterStatus:
        """The `cluster` section of `esperd.status`."""
        return ClusterStatus(
            instance=self.me,
            members=self.members,
            foreign_messages=self.foreign_messages,
            handovers=self.handovers,
            partitions={p: lease.epoch for p, lease in sorted(self.leases.held.items())},
            lease_lapses=self.leases.lapses,
            acquisitions=self.acquisitions,
            errors=self.errors,
            view=self.view(),
        )

    async def start(self) -> None:
        """Bind the bucket, announce ourselves, settle, and take our partitions (one tick)."""
        await self._bind()
        await self._register()
        await asyncio.sleep(self.config.settle_s)
        await self._read_members()
        self._check_agreement()
        await self.tick()
        log.info(
            "cluster joined",
            instance=self.me,
            members=sorted(self._members),
            partitions=len(self.leases.held),
            lease_ttl_s=self.leases.ttl_s,
        )

    async def run(self) -> None:
        """Renew and rebalance every `heartbeat_s` (or sooner when woken) until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.heartbeat_s)
            self._wake.clear()
            await self.tick()

    async def leave(self) -> None:
        """Give every partition back and remove our record, so peers take over at their next tick."""
        released = self.leases.release(list(self.leases.held), "leaving")
        if self._kv is None or not self.nc.is_connected:
            return
        await asyncio.gather(
            *(self._delete(self._partition_key(lease.partition), lease.revision) for lease in released),
            self._delete(self._member_key(self.me), None),
        )

    # --------------------------------------------------------------------- tick

    async def tick(self) -> None:
        """Notice lapses, read the members, release, renew and acquire, then renew our record."""
        self.leases.check()
        if self._kv is None or not self.nc.is_connected:
            return  # leases lapse on their own deadlines; nothing here can extend them
        try:
            await self._read_members()
        except (TimeoutError, nats.errors.Error) as exc:
            self._note_error("cluster membership read failed", exc)
            return
        count = self.config.partitions
        # A member with another partition count refuses to start; it must not take our share meanwhile.
        peers = [name for name, record in self._members.items() if record.partition_count == count]
        wanted = targets(self.me, peers, count)
        held = self.leases.held
        handed = [p for p in held if p not in wanted]
        if handed:
            await self._release(handed, "handed over")
        results = await asyncio.gather(
            *(self._renew(p) for p in held if p in wanted),
            *(self._acquire(p) for p in sorted(wanted - held.keys())),
        )
        gained = [p for p in results if p is not None]
        if gained:
            self.acquisitions += len(gained)
            log.info("partitions acquired", instance=self.me, partitions=gained)
            if self._on_acquired is not None:
                await self._on_acquired(gained)
        try:
            await self._register()  # after the lease work, so peers' views show what we hold now
        except (TimeoutError, nats.errors.Error) as exc:
            self._note_error("cluster membership renewal failed", exc)
        self._view_at = self._clock()

    def wake(self) -> None:
        """Tick now rather than at the next heartbeat."""
        self._wake.set()

    # ---------------------------------------------------------------------- view

    @property
    def members(self) -> list[str]:
        return sorted({self.me, *self._members})

    def view(self) -> ClusterView:
        """The cluster as of the last tick (our own entry is current)."""
        now = self._clock()
        stale_after = STALE_AFTER_BEATS * self.config.heartbeat_s
        mine = {lease.partition: lease.epoch for lease in self.leases.held.values()}
        views = [
            MemberView(self.me, sorted(mine), mine, self._runs(), 0.0, False, self._record.host, os.getpid())
        ]
        for name in sorted(self._members):
            if name == self.me:
                continue
            record = self._members[name]
            age = now - self._seen.get(name, (0, now))[1]
            views.append(
                MemberView(
                    name,
                    sorted(record.partitions),
                    dict(record.partitions),
                    record.runs,
                    round(age, 3),
                    age > stale_after,
                    record.host,
                    record.pid,
                )
            )
        claimed = {p for v in views if not v.stale for p in v.partitions}
        return ClusterView(
            members=views,
            gone=sorted(n for n, (at, left) in self._gone.items() if now - at < GONE_KEPT_S and not left),
            left=sorted(n for n, (at, left) in self._gone.items() if now - at < GONE_KEPT_S and left),
            unowned_partitions=[p for p in range(self.config.partitions) if p not in claimed],
            age_s=round(now - self._view_at, 3),
        )

    # ------------------------------------------------------------------ helpers

    async def _bind(self) -> None:
        """Create (or find) the bucket; fail clearly when the broker has no JetStream."""
        js = self.nc.jetstream(timeout=5.0)  # creating the bucket may take a while on a busy broker
        try:
            await js.account_info()
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            raise ClusterError(
                "cluster mode needs JetStream on the broker (nats-server -js, or a `jetstream {}` "
                f"block in its config) for its leases: {type(exc).__name__}"
            ) from None
        except nats.js.errors.APIError as exc:
            raise ClusterError(f"cluster mode needs JetStream on the broker: {exc.description}") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise ClusterError(
                "cluster mode needs JetStream on the broker: it did not answer in 5 s"
            ) from None
        config = KeyValueConfig(
            bucket=self.config.bucket,
            description="esperd membership and partition leases",
            history=1,
            ttl=self.config.dead_after_s,
            storage=StorageType.FILE,  # revisions (the fencing epochs) must survive a broker restart
            direct=True,  # reads by key take the direct-get API: cheap, and one permission to grant
        )
        try:
            self._kv = await js.create_key_value(config)
        except nats.js.errors.BadRequestError:  # exists with another TTL: keep its TTL, all must agree
            self._kv = await js.key_value(self.config.bucket)
        info = await js.stream_info(self._stream)
        ttl = info.config.max_age or 0.0
        if ttl <= 0:
            raise ClusterError(f"bucket {self.config.bucket} has no TTL: its leases would never expire")
        if abs(ttl - self.config.dead_after_s) > 1e-6:
            log.warning(
                "lease bucket keeps its own TTL",
                bucket=self.config.bucket,
                ttl_s=ttl,
                dead_after_s=self.config.dead_after_s,
                hint="delete the bucket while no instance runs to change it",
            )
            self.leases.set_ttl(ttl, LEASE_MARGIN * ttl)

    def _check_agreement(self) -> None:
        """Refuse to serve beside a member that hashes runs to another number of partitions.

        Its partition 3 would not hold the runs ours does, so two instances could both own a run.
        Each member registers before it reads the others, so of two started together at least one
        sees the other.
        """
        count = self.config.partitions
        odd = {
            n: r.partition_count
            for n, r in self._members.items()
            if n != self.me and r.partition_count != count
        }
        if odd:
            raise ClusterError(
                f"cluster.partitions is {count} here but {odd} on live members of bucket "
                f"{self.config.bucket}: every instance must use the same number"
            )

    def _member_key(self, instance: str) -> str:
        return f"members.{instance}"

    def _partition_key(self, partition: int) -> str:
        return f"partitions.{partition}"

    async def _register(self) -> None:
        assert self._kv is not None
        record = self._record
        record.partitions = {lease.partition: lease.epoch for lease in self.leases.held.values()}
        record.runs = self._runs()
        await self._kv.put(self._member_key(self.me), self._encoder.encode(record))

    async def _read_members(self) -> None:
        """The members whose records have not expired, and when each record last changed."""
        assert self._kv is not None
        prefix = f"$KV.{self.config.bucket}."
        info = await self._js.stream_info(self._stream, subjects_filter=f"{prefix}members.>")
        keys = [subject[len(prefix) :] for subject in (info.state.subjects or {})]
        entries = await asyncio.gather(*(self._get(key) for key in keys))
        now = self._clock()
        members: dict[str, MemberRecord] = {}
        # A listed key with no value is a deletion marker: that member left cleanly. An expired
        # record is not listed at all.
        left = {
            key.removeprefix("members.") for key, entry in zip(keys, entries, strict=True) if entry is None
        }
        for entry in entries:
            if entry is None:
                continue
            try:
                record = self._member_decoder.decode(entry.value)
            except msgspec.DecodeError:
                continue
            members[record.instance] = record
            revision, _ = self._seen.get(record.instance, (-1, now))
            if revision != entry.revision:
                self._seen[record.instance] = (entry.revision, now)
        for name in set(self._members) - set(members):
            self._gone[name] = (now, name in left)
            self._seen.pop(name, None)
        for name in set(members) & set(self._gone):
            del self._gone[name]
        self._members = members

    async def _get(self, key: str) -> KeyValue.Entry | None:
        assert self._kv is not None
        try:
            return await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # deleted (left) or expired since the listing
            return None

    async def _acquire(self, partition: int) -> int | None:
        """Create the partition's lease; returns the partition if we now hold it."""
        assert self._kv is not None
        key = self._partition_key(partition)
        value = self._encoder.encode(LeaseRecord(owner=self.me, acquired_at=time.time()))
        sent_at = self._clock()
        try:
            revision = await self._kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            revision = await self._take_back(key, value)
            if revision is None:
                return None
            sent_at, revision = revision
        except (TimeoutError, nats.errors.Error) as exc:
            self._note_error("lease acquisition failed", exc)
            return None
        return partition if self.leases.acquired(partition, revision, sent_at) else None

    async def _take_back(self, key: str, value: bytes) -> tuple[float, int] | None:
        """A lease still recorded under our own name (we lapsed, or restarted with this instance id).

        Nobody else holds it, so we may overwrite it; the new revision is a new epoch, so anything
        sent under the old one is fenced off.
        """
        assert self._kv is not None
        try:
            entry = await self._kv.get(key)
            if self._lease_decoder.decode(entry.value).owner != self.me:
                return None  # held by a peer: it hands it over, or it expires
            sent_at = self._clock()
            return sent_at, await self._kv.update(key, value, last=entry.revision)
        except (TimeoutError, nats.errors.Error, msgspec.DecodeError):
            return None

    async def _renew(self, partition: int) -> None:
        assert self._kv is not None
        lease = self.leases.held.get(partition)
        if lease is None:
            return
        value = self._encoder.encode(LeaseRecord(owner=self.me, acquired_at=time.time()))
        sent_at = self._clock()
        try:
            revision = await self._kv.update(self._partition_key(partition), value, last=lease.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            # Expired at the broker (and perhaps taken): whatever we thought, it is not ours.
            self.leases.release([partition], "lease lost")
            return
        except (TimeoutError, nats.errors.Error) as exc:
            self._note_error("lease renewal failed", exc)  # the local deadline decides from here
            return
        self.leases.renewed(partition, revision, sent_at)

    async def _release(self, partitions: list[int], reason: str) -> None:
        """Stop using the partitions first, then delete their leases so the assignee can take them."""
        released = self.leases.release(partitions, reason)
        await asyncio.gather(
            *(self._delete(self._partition_key(lease.partition), lease.revision) for lease in released)
        )

    async def _delete(self, key: str, last: int | None) -> None:
        assert self._kv is not None
        with contextlib.suppress(TimeoutError, nats.errors.Error):  # it expires anyway
            await self._kv.delete(key, last=last)

    def _note_error(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        allowed, suppressed = self._error_log.allow(what)
        if allowed:
            log.warning(what, instance=self.me, error=str(exc) or type(exc).__name__, suppressed=suppressed)
