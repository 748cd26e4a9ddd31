"""Which instance may steer which run: partitions, their assignment, and leases with a local deadline.

Pure logic (no NATS; the clock is injected). Runs hash to one of `P` partitions with 32-bit FNV-1a
modulo P, the hash nats-server's `partition(P, …)` subject mapping uses, so a broker-side mapping
and esperd agree on where a run belongs. A partition is assigned by rendezvous hashing over the
live members. An instance may act on a partition only while it holds the partition's lease *and*
its own clock says the lease cannot have expired at the broker yet: `Leases` keeps that local
deadline and gives up a partition the moment it is passed (a freeze, a GC pause, a paused VM),
whatever the instance was doing at the time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable

import msgspec

_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """32-bit FNV-1a, as Go's hash/fnv New32a (and so nats-server's `partition()` mapping)."""
    h = _FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return h


def partition_of(run_id: str, partitions: int) -> int:
    """The partition a run belongs to."""
    return fnv1a_32(run_id.encode()) % partitions


def _score(member: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{member}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(members: Iterable[str], partitions: int) -> dict[int, str]:
    """Partition -> member, by rendezvous hashing: when a member joins or leaves only its share moves."""
    live = sorted(set(members))
    if not live:
        return {}
    return {p: max(live, key=lambda m: _score(m, p)) for p in range(partitions)}


def targets(me: str, members: Iterable[str], partitions: int) -> set[int]:
    """The partitions `me` should hold, given the live members (`me` always counts as live)."""
    return {p for p, owner in assign({me, *members}, partitions).items() if owner == me}


class Lease(msgspec.Struct):
    """One partition this instance holds."""

    partition: int
    epoch: int  # the lease's revision when acquired: the fencing token its commands carry
    revision: int  # the latest revision (renewals move it; the epoch stays)
    deadline: float  # local clock: past this the broker may have expired the lease


OnLost = Callable[[list[int], str], None]
LAPSED = "lease lapsed"  # the reason `on_lost` gets when a lease's local deadline passed


class Leases:
    """The partitions held, each valid until a local deadline; lapses are noticed on every read.

    The deadline is `sent_at + ttl - margin`, `sent_at` being when the write that created or renewed
    the lease was *sent*: the broker stamps (and later expires) it no earlier than that. `on_lost`
    is called synchronously with the partitions that were given up and why, before the caller
    that noticed goes on, so per-run state is dropped before anything is acted on.
    """

    def __init__(
        self,
        partitions: int,
        ttl_s: float,
        margin_s: float,
        on_lost: OnLost,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if margin_s >= ttl_s:
            raise ValueError("the lease margin must be shorter than the lease")
        self.partitions = partitions
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.lapses = 0  # partitions given up because their local deadline passed
        self._on_lost = on_lost
        self._clock = clock
        self._held: dict[int, Lease] = {}

    def now(self) -> float:
        return self._clock()

    def set_ttl(self, ttl_s: float, margin_s: float) -> None:
        """Use the broker's actual lease TTL (before any lease is held)."""
        if self._held:
            raise RuntimeError("the lease TTL cannot change while leases are held")
        if margin_s >= ttl_s:
            raise ValueError("the lease margin must be shorter than the lease")
        self.ttl_s, self.margin_s = ttl_s, margin_s

    @property
    def held(self) -> dict[int, Lease]:
        """The leases still valid now (lapsed ones are given up first)."""
        self.check()
        return dict(self._held)

    def epoch_for(self, run_id: str) -> int | None:
        """The epoch under which this instance may act on `run_id` now; None if it may not."""
        lease = self._held.get(partition_of(run_id, self.partitions))
        if lease is None:
            return None
        if self._clock() >= lease.deadline:
            self._lapse([lease.partition])
            return None
        return lease.epoch

    def owns(self, run_id: str) -> bool:
        return self.epoch_for(run_id) is not None

    def check(self) -> list[int]:
        """Give up every lease whose deadline has passed; returns their partitions."""
        now = self._clock()
        lapsed = sorted(p for p, lease in self._held.items() if now >= lease.deadline)
        if lapsed:
            self._lapse(lapsed)
        return lapsed

    def acquired(self, partition: int, revision: int, sent_at: float) -> bool:
        """A create sent at `sent_at` succeeded with `revision`; False if it came back too late to use."""
        deadline = sent_at + self.ttl_s - self.margin_s
        if self._clock() >= deadline:
            return False
        self._held[partition] = Lease(partition, revision, revision, deadline)
        return True

    def renewed(self, partition: int, revision: int, sent_at: float) -> bool:
        """A renewal sent at `sent_at` succeeded; False if the lease lapsed meanwhile (it stays given up)."""
        lease = self._held.get(partition)
        if lease is None:
            return False
        if self._clock() >= lease.deadline:  # a lapse is final even if the broker still had it
            self._lapse([partition])
            return False
        lease.revision = revision
        lease.deadline = max(lease.deadline, sent_at + self.ttl_s - self.margin_s)
        return True

    def release(self, partitions: Iterable[int], reason: str) -> list[Lease]:
        """Give up leases on purpose (handed over, renewal refused, leaving); returns what was held."""
        released = [self._held.pop(p) for p in sorted(set(partitions)) if p in self._held]
        if released:
            self._on_lost([lease.partition for lease in released], reason)
        return released

    def _lapse(self, partitions: list[int]) -> None:
        for p in partitions:
            self._held.pop(p, None)
        self.lapses += len(partitions)
        self._on_lost(partitions, LAPSED)
