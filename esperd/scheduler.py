"""Which runs are due a decision, and which layers are cooling down.

Pure bookkeeping (no NATS, no torch): the service feeds it events and asks it for
the next micro-batch. A run becomes due on each state packet and on a material
health change, never more often than `min_interval_s`; a layer that received a
command is left alone for `cooldown_s` unless the command was rejected or timed out,
and in any case until the host has answered it (or it timed out).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

import msgspec

from esperd.config import SchedulerConfig
from esperd_contracts import AckStatus
from esperd_contracts.status import SchedulerStatus


class PendingCommand(msgspec.Struct, frozen=True):
    """A command published and not yet acked."""

    run_id: str
    layer_id: int
    issued_at: float
    op: str
    blueprint: str = ""  # a GERMINATE's blueprint: a rejection masks it for the layer


class Scheduler:
    """Due runs (oldest first), per-run rate limit, per-layer cooldowns, ack timeouts."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._due_at: dict[str, float] = {}  # run -> when it became due (or will, if deferred)
        self._heap: list[tuple[float, str]] = []  # (due time, run); stale entries skipped lazily
        self._last_decided: dict[str, float] = {}
        self._cooldowns: dict[str, dict[int, float]] = {}  # run -> layer -> until
        self.pending: dict[str, PendingCommand] = {}  # command id -> command
        self._pending_layers: dict[str, dict[int, int]] = {}  # run -> layer -> commands awaiting an ack
        # Runs whose last decision was made with a layer held back only because its command was
        # unanswered: the answer makes them due again, so a late ack costs a decision, not a state packet.
        self._held_for_ack: set[str] = set()
        self.overflow = 0
        self.stale = 0
        self.expired = 0  # commands never answered within ack_timeout_s
        self.unknown_acks = 0  # acks for no pending command: late, duplicated, or never ours
        self.acks_by_status: dict[str, int] = {}  # applied, rejected, timed_out (a key appears when counted)

    # --------------------------------------------------------------- due runs

    def mark_due(self, run_id: str, now: float | None = None) -> bool:
        """Make a run due (deferred to respect the per-run interval). False if the queue was full."""
        if run_id in self._due_at:
            return True  # already queued: one decision covers every trigger
        if len(self._due_at) >= self.config.max_pending:
            self.overflow += 1
            return False
        now = self._clock() if now is None else now
        last = self._last_decided.get(run_id)
        at = now if last is None else max(now, last + self.config.min_interval_s)
        self._due_at[run_id] = at
        heapq.heappush(self._heap, (at, run_id))
        return True

    def next_due_at(self) -> float | None:
        """When the earliest queued run is (or becomes) due; None if nothing is queued."""
        self._drop_stale_heads()
        return self._heap[0][0] if self._heap else None

    def ready_count(self, now: float | None = None, at_most: int | None = None) -> int:
        """How many queued runs are due now; stops counting at `at_most` (a full batch)."""
        now = self._clock() if now is None else now
        count = 0
        for at in self._due_at.values():
            if at <= now:
                count += 1
                if count == at_most:
                    break
        return count

    def take_batch(self, now: float | None = None) -> list[tuple[str, float]]:
        """Up to `max_batch` (run, due time) pairs due now, oldest-due first; they leave the queue."""
        now = self._clock() if now is None else now
        batch: list[tuple[str, float]] = []
        while self._heap and len(batch) < self.config.max_batch:
            self._drop_stale_heads()
            if not self._heap or self._heap[0][0] > now:
                break
            at, run_id = heapq.heappop(self._heap)
            del self._due_at[run_id]
            self._last_decided[run_id] = now
            batch.append((run_id, at))
        return batch

    def forget_run(self, run_id: str) -> None:
        """Drop everything about a run (evicted or finished)."""
        self._due_at.pop(run_id, None)
        self._last_decided.pop(run_id, None)
        self._cooldowns.pop(run_id, None)
        self._pending_layers.pop(run_id, None)
        self._held_for_ack.discard(run_id)
        for command_id in [c for c, p in self.pending.items() if p.run_id == run_id]:
            del self.pending[command_id]

    def is_queued(self, run_id: str) -> bool:
        """Whether a run waits for a decision."""
        return run_id in self._due_at

    @property
    def queued(self) -> int:
        return len(self._due_at)

    def _drop_stale_heads(self) -> None:
        while self._heap and self._due_at.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    # -------------------------------------------------------------- cooldowns

    def note_command(
        self,
        command_id: str,
        run_id: str,
        layer_id: int,
        op: str,
        now: float | None = None,
        *,
        blueprint: str = "",
    ) -> None:
        """A command went out: cool its layer down and wait for the ack."""
        now = self._clock() if now is None else now
        self._cooldowns.setdefault(run_id, {})[layer_id] = now + self.config.cooldown_s
        self.pending[command_id] = PendingCommand(run_id, layer_id, now, op, blueprint)
        layers = self._pending_layers.setdefault(run_id, {})
        layers[layer_id] = layers.get(layer_id, 0) + 1

    def note_ack(self, run_id: str, command_id: str, applied: bool) -> PendingCommand | None:
        """The host of `run_id` answered. A rejection frees the layer at once. None when this run has
        no such command pending: unknown, late, duplicated, or another run's (which stays pending).

        When the answer frees the last layer that held back the run's previous decision, the run is
        due again (see `mark_due`; the per-run interval still applies)."""
        command = self.pending.get(command_id)
        if command is None:
            self.unknown_acks += 1
            return None
        if command.run_id != run_id:
            return None  # pending for another run: the caller refuses this ack (it is not counted here)
        del self.pending[command_id]
        self._count((AckStatus.APPLIED if applied else AckStatus.REJECTED).value)
        self._settled(command)
        if not applied:
            self._release(command)
        if run_id in self._held_for_ack and run_id not in self._pending_layers:
            self._held_for_ack.discard(run_id)
            self.mark_due(run_id)
        return command

    def is_pending(self, command_id: str) -> bool:
        """Whether a command waits for its ack (for whichever run)."""
        return command_id in self.pending

    def expire_pending(self, now: float | None = None) -> list[tuple[str, PendingCommand]]:
        """Commands unacked past `ack_timeout_s`: forgotten, and their layers freed."""
        now = self._clock() if now is None else now
        limit = now - self.config.ack_timeout_s
        expired = [(cid, p) for cid, p in self.pending.items() if p.issued_at <= limit]
        for command_id, command in expired:
            del self.pending[command_id]
            self._settled(command)
            self._release(command)
        if expired:
            self.expired += len(expired)
            self._count("timed_out", len(expired))
        return expired

    def _count(self, outcome: str, n: int = 1) -> None:
        self.acks_by_status[outcome] = self.acks_by_status.get(outcome, 0) + n

    def status(self) -> SchedulerStatus:
        """The `scheduler` section of `esperd.status`."""
        return SchedulerStatus(
            queued=self.queued,
            overflow=self.overflow,
            pending_commands=len(self.pending),
            expired_commands=self.expired,
            unknown_acks=self.unknown_acks,
        )

    def cooling_layers(self, run_id: str, now: float | None = None) -> set[int]:
        """Layers of a run that must not be targeted right now: cooling down, or waiting for the ack
        of a command (a second command before the host answered the first could be applied twice)."""
        awaiting = self._pending_layers.get(run_id)
        layers = self._cooldowns.get(run_id)
        if layers:
            now = self._clock() if now is None else now
            for layer_id in [lid for lid, until in layers.items() if until <= now]:
                del layers[layer_id]
        cooling = set(layers) if layers else set()
        if awaiting and not cooling.issuperset(awaiting):
            self._held_for_ack.add(run_id)  # some layer is held back by an unanswered command alone
        else:
            self._held_for_ack.discard(run_id)
        return cooling.union(awaiting) if awaiting else cooling

    def _settled(self, command: PendingCommand) -> None:
        layers = self._pending_layers.get(command.run_id)
        if layers is None:
            return
        left = layers.get(command.layer_id, 0) - 1
        if left > 0:
            layers[command.layer_id] = left
        else:
            layers.pop(command.layer_id, None)
            if not layers:
                del self._pending_layers[command.run_id]

    def _release(self, command: PendingCommand) -> None:
        layers = self._cooldowns.get(command.run_id, {})
        # Only this command's own cooldown: a newer command on the same layer keeps its own.
        if layers.get(command.layer_id) == command.issued_at + self.config.cooldown_s:
            del layers[command.layer_id]
