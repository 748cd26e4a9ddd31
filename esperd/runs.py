"""The run table: the one place that admits, tracks and drops training runs.

A run is admitted by its first message, within `max_runs`. It is active until its host says
`done`; then it keeps its slot for `done_grace_s` only, so that late acks still match their
commands, and is dropped (at once, if a new run needs the slot). A run that goes silent is
dropped after `idle_ttl_s`. Whatever the reason, a drop goes through `RunTable.drop`, which
tells every other owner of per-run state (analyzer, scheduler, recorder, the policy's
per-run memory) through the one `forget` callback the service wires in.

A run id that comes back after `done` (a training job restarted under the same id) starts a
new episode: a topology, or a state packet that is not `done` or whose epoch is below the
final one, drops the finished episode's state and admits the run afresh. Other late
messages (a health signal, a repeated `done`) are accepted and not ingested. Recently
finished ids are remembered (ids and final epochs only, at most `max_runs` of them) so that a
reuse after the grace is counted too.

Memory: what each run costs is estimated from its node and edge counts (`estimated_bytes`),
and the table keeps the sum over every tracked run within `memory_budget_bytes`. The budget is
checked when a run is admitted (its base cost) and whenever its graph grows (the analyzer asks
`resize` first, for a topology and for layers inferred from signals); what does not fit is
refused with reason `memory_budget`, once finished runs have given up their grace.

Pure bookkeeping: no NATS, no torch. The event loop owns it (not thread-safe).
"""

from __future__ import annotations

import enum
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import structlog

from esperd_contracts import HealthBatch, HealthSignal, SystemStatePacket, TopologyPacket
from esperd_contracts.status import RunTableStatus

log = structlog.get_logger("esperd.runs")

RunMessage = TopologyPacket | HealthSignal | HealthBatch | SystemStatePacket

MIB = 1 << 20
# Upper bounds of one run's memory, over every serving policy, as benchmarks/bench_run_memory.py
# measures it (RSS per run: analyzer tables and windows, the policy's per-run caches, the
# recorder's open step). Edges get their own term: a run may declare 16 edges per layer.
RUN_BASE_BYTES = 48 * 1024
NODE_BYTES = 4 * 1024
EDGE_BYTES = 256


def estimated_bytes(nodes: int, edges: int) -> int:
    """What a run with this graph costs in memory, by the table's estimate."""
    return RUN_BASE_BYTES + NODE_BYTES * nodes + EDGE_BYTES * edges


class DropReason(enum.StrEnum):
    """Why a run left the table (the keys of `dropped_by_reason`)."""

    IDLE = "idle"  # silent for idle_ttl_s
    DONE = "done"  # finished, and its grace for late acks is over (or its slot was needed)
    HANDOVER = "handover"  # another instance owns it now
    LEASE_LAPSED = "lease_lapsed"  # this instance missed its own lease deadline (frozen, paused, cut off)
    REUSED = "reused"  # its id started a new episode after `done`
    REFUSED = "refused"  # the message that admitted it was refused: the admission is undone


class Verdict(enum.Enum):
    """What to do with a message for a run."""

    TRACK = "track"  # the run is active: ingest the message
    LATE = "late"  # the run said `done`: a late message, accepted and not ingested
    REFUSE = "refuse"  # no room: reject the message with `reason`


class Admission(msgspec.Struct, frozen=True):
    verdict: Verdict
    new: bool = False  # this message admitted the run (`cancel` undoes that if it is refused)
    reason: str = ""
    detail: str = ""


@dataclass(slots=True)
class _Run:
    last_seen: float
    done_at: float | None = None
    final_epoch: int = 0
    nodes: int = 0
    edges: int = 0
    bytes: int = RUN_BASE_BYTES


Forget = Callable[[str, DropReason], None]


def starts_new_episode(message: RunMessage, final_epoch: int) -> bool:
    """Whether a message for a finished run means its id is in use again (a restarted job)."""
    if isinstance(message, TopologyPacket):
        return True
    if isinstance(message, SystemStatePacket):
        return not message.done or message.epoch < final_epoch
    return False


class RunTable:
    """Admits runs within `max_runs`, tracks activity and `done`, and drops them (see the module doc)."""

    def __init__(
        self,
        *,
        max_runs: int,
        idle_ttl_s: float,
        done_grace_s: float,
        memory_budget_bytes: int = 1 << 62,
        forget: Forget | None = None,  # told of every drop (the service fans it out to every owner)
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_runs < 1:
            raise ValueError("max_runs must be >= 1")
        self.max_runs = max_runs
        self.idle_ttl_s = idle_ttl_s
        self.done_grace_s = done_grace_s
        self.memory_budget_bytes = memory_budget_bytes
        self._forget = forget
        self._clock = clock
        # Activity order: each tracked message moves its run to the end, so idle runs gather at the front.
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._finishing: OrderedDict[str, float] = OrderedDict()  # run -> when it said done, oldest first
        self._finished: OrderedDict[str, int] = OrderedDict()  # dropped finished ids -> final epoch
        self.used_bytes = 0
        self.nodes = 0
        self.edges = 0
        self.admitted = 0
        self.reused = 0
        self.dropped_by_reason: Counter[str] = Counter()

    # ------------------------------------------------------------ admission

    def admit(self, run_id: str, message: RunMessage, now: float | None = None) -> Admission:
        """Let a message in for its run: track it (admitting a new run), call it late, or refuse it."""
        now = self._clock() if now is None else now
        run = self._runs.get(run_id)
        if run is not None and run.done_at is None:
            run.last_seen = now
            self._runs.move_to_end(run_id)
            return Admission(Verdict.TRACK)
        if run is not None:
            if not starts_new_episode(message, run.final_epoch):
                return Admission(Verdict.LATE)
            reused_after: int | None = run.final_epoch
            self.drop(run_id, DropReason.REUSED)
        else:
            reused_after = self._finished.get(run_id)
            if reused_after is not None and not starts_new_episode(message, reused_after):
                reused_after = None  # a straggler from the finished job: a plain new run
        if not self._release_finished(runs=1, bytes_=RUN_BASE_BYTES):
            if len(self._runs) >= self.max_runs:
                detail = f"already tracking {self.max_runs} runs"
                return Admission(Verdict.REFUSE, reason="too_many_runs", detail=detail)
            return Admission(Verdict.REFUSE, reason="memory_budget", detail=self._over_budget(RUN_BASE_BYTES))
        self._runs[run_id] = _Run(last_seen=now)
        self.used_bytes += RUN_BASE_BYTES
        self.admitted += 1
        if reused_after is not None:
            self._finished.pop(run_id, None)
            self.reused += 1
            log.info("run id reused after done: new episode", run_id=run_id, final_epoch=reused_after)
        return Admission(Verdict.TRACK, new=True)

    def resize(self, run_id: str, nodes: int, edges: int) -> str:
        """A run's graph is about to become `nodes` x `edges`: "" if it fits the budget, else why not.

        Growth beyond the budget is refused (the run keeps its current graph); shrinking always fits.
        """
        run = self._runs.get(run_id)
        if run is None:
            return ""  # not a run of the table's: nothing to account
        cost = estimated_bytes(nodes, edges)
        growth = cost - run.bytes
        if growth > 0 and not self._release_finished(runs=0, bytes_=growth):
            return f"run {run_id} at {nodes} layers and {edges} edges: {self._over_budget(growth)}"
        self.used_bytes += growth
        self.nodes += nodes - run.nodes
        self.edges += edges - run.edges
        run.nodes, run.edges, run.bytes = nodes, edges, cost
        return ""

    def cancel(self, run_id: str) -> None:
        """Undo the admission of a run whose first message was refused downstream."""
        if self.drop(run_id, DropReason.REFUSED):
            self.admitted -= 1

    def finish(self, run_id: str, epoch: int, now: float | None = None) -> None:
        """The host said `done`: no more decisions; the slot is kept `done_grace_s` for late acks."""
        run = self._runs.get(run_id)
        if run is None or run.done_at is not None:
            return
        run.done_at = self._clock() if now is None else now
        run.final_epoch = epoch
        self._finishing[run_id] = run.done_at

    # ------------------------------------------------------------ dropping

    def drop(self, run_id: str, reason: DropReason) -> bool:
        """Forget a run everywhere (the one way out of the table). False if it was not tracked."""
        run = self._runs.pop(run_id, None)
        if run is None:
            return False
        self._finishing.pop(run_id, None)
        self.used_bytes -= run.bytes
        self.nodes -= run.nodes
        self.edges -= run.edges
        if run.done_at is not None and reason is not DropReason.REUSED:
            self._remember_finished(run_id, run.final_epoch)
        if reason is not DropReason.REFUSED:
            self.dropped_by_reason[reason.value] += 1
        if self._forget is not None:
            self._forget(run_id, reason)
        return True

    def drop_where(self, predicate: Callable[[str], bool], reason: DropReason) -> list[str]:
        """Drop every run the predicate selects (e.g. the runs another instance now owns)."""
        chosen = [run_id for run_id in self._runs if predicate(run_id)]
        for run_id in chosen:
            self.drop(run_id, reason)
        return chosen

    def expire(self, now: float | None = None) -> list[tuple[str, DropReason]]:
        """Drop finished runs past their grace and runs idle for idle_ttl_s; returns what went, and why."""
        now = self._clock() if now is None else now
        dropped: list[tuple[str, DropReason]] = []
        while self._finishing:
            run_id, done_at = next(iter(self._finishing.items()))
            if done_at + self.done_grace_s > now:
                break
            self.drop(run_id, DropReason.DONE)
            dropped.append((run_id, DropReason.DONE))
        idle_before = now - self.idle_ttl_s
        while self._runs:
            run_id, run = next(iter(self._runs.items()))
            if run.last_seen > idle_before:
                break
            reason = DropReason.DONE if run.done_at is not None else DropReason.IDLE
            self.drop(run_id, reason)
            dropped.append((run_id, reason))
        return dropped

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def run_ids(self) -> list[str]:
        return list(self._runs)

    def is_active(self, run_id: str) -> bool:
        """Tracked and not finished: decisions are due for it."""
        run = self._runs.get(run_id)
        return run is not None and run.done_at is None

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped_by_reason.values())

    def status(self) -> RunTableStatus:
        return RunTableStatus(
            tracked=len(self._runs),
            finishing=len(self._finishing),
            max_runs=self.max_runs,
            admitted=self.admitted,
            reused=self.reused,
            dropped_by_reason=dict(self.dropped_by_reason),
            nodes=self.nodes,
            edges=self.edges,
            memory_budget_bytes=self.memory_budget_bytes,
            memory_used_bytes=self.used_bytes,
        )

    # ------------------------------------------------------------ internals

    def _release_finished(self, runs: int, bytes_: int) -> bool:
        """Whether there is room for `runs` more runs and `bytes_` more bytes, after dropping finished
        runs (oldest first) before their grace is over if that is what it takes."""

        def short() -> bool:
            return (
                len(self._runs) + runs > self.max_runs or self.used_bytes + bytes_ > self.memory_budget_bytes
            )

        while short() and self._finishing:
            self.drop(next(iter(self._finishing)), DropReason.DONE)
        return not short()

    def _over_budget(self, more: int) -> str:
        budget, used = self.memory_budget_bytes / MIB, self.used_bytes / MIB
        return (
            f"~{more / MIB:.2f} MiB more would exceed the memory budget of {budget:g} MiB "
            f"(~{used:.1f} MiB in use by {len(self._runs)} runs)"
        )

    def _remember_finished(self, run_id: str, final_epoch: int) -> None:
        self._finished[run_id] = final_epoch
        self._finished.move_to_end(run_id)
        while len(self._finished) > self.max_runs:
            self._finished.popitem(last=False)
