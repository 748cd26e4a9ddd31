"""The analyzer: every run's live graph, fed one message at a time, observed on demand."""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import msgspec

from esperd.analyzer.config import AnalyzerConfig, AnalyzerError
from esperd.analyzer.graph import Graph
from esperd.analyzer.ingest import QueuedHealth, apply_health
from esperd.analyzer.many import ingest_states, observe_runs
from esperd.analyzer.observation import Observation
from esperd.analyzer.run import RunState, RunSummary
from esperd.analyzer.table import NodeArena
from esperd_contracts import Blueprint, HealthBatch, HealthSignal, Op, SystemStatePacket, TopologyPacket
from esperd_contracts.status import MAX_LISTED_RUNS, AnalysisStatus

# (run, nodes, edges) -> "" to let a run's graph grow to that size, or why not.
SizeGate = Callable[[str, int, int], str]


class AnalyzerSummary(msgspec.Struct, kw_only=True):
    """Read-only status view: run count and one summary per run (most recently active last)."""

    runs: int
    max_runs: int
    per_run: list[RunSummary]


class Analyzer:
    """Keeps one RunState per run id. Which runs exist is the run table's call (esperd.runs):
    the analyzer creates a run on its first message and forgets it on `remove_run`. A
    `size_gate` is asked before any run's graph grows (a topology, or layers inferred from
    signals), and can refuse it (AnalyzerError "memory_budget").

    Every `ingest_*` returns whether the run changed materially since it was last observed
    (a problematic / needs-attention flag flipped, health moved more than
    `material_health_delta`, a seed changed stage, a new topology was adopted, or the run
    finished),
    which is the scheduler's cue to decide again. `now` defaults to the injected clock.

    Health can also be queued (`queue_health`) and applied later, many messages of many runs in one
    vectorized pass (`flush`, which names the runs that changed materially). Whatever reads or
    changes a run otherwise applies the queue first, so a queued message is never seen out of order.
    Not thread-safe: the event loop owns it.
    """

    def __init__(
        self,
        config: AnalyzerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        size_gate: SizeGate | None = None,
    ) -> None:
        self.config = config or AnalyzerConfig()
        self._clock = clock
        self._size_gate = size_gate
        self._arena = NodeArena(self.config.default_health, self.config.window_size)
        self._queue: list[QueuedHealth] = []
        self._queued_runs: list[RunState] = []
        self._changed: set[str] = set()  # runs a flush found changed, not yet handed out
        # Activity order (each ingest moves its run to the end): the summary lists runs that way.
        self._runs: OrderedDict[str, RunState] = OrderedDict()

    # ----------------------------------------------------------------- ingest

    def ingest_topology(self, run_id: str, packet: TopologyPacket, now: float | None = None) -> bool:
        """Replace the run's graph with the host's (validated first; raises AnalyzerError)."""
        graph = Graph.from_topology(
            packet, max_nodes=self.config.max_nodes_per_run, max_edges=self.config.max_edges_per_run
        )
        self._apply_queue()
        self._check_size(run_id, graph.num_nodes, graph.num_edges)
        run = self._touch(run_id, now)
        run.host_topology_version = packet.topology_version
        return run.adopt(graph)

    def ingest_health(
        self, run_id: str, message: HealthSignal | HealthBatch, now: float | None = None
    ) -> bool:
        """Apply one signal or a batch of them now; each signal costs O(1)."""
        self.queue_health(run_id, message, now)
        self._apply_queue()
        changed = run_id in self._changed
        self._changed.discard(run_id)
        return changed

    def queue_health(
        self, run_id: str, message: HealthSignal | HealthBatch, now: float | None = None
    ) -> None:
        """Queue one signal or a batch of them, to be applied by `flush` (or by whatever touches the
        analyzer next). A layer first seen here is added now: AnalyzerError if the run may not grow."""
        run = self._touch(run_id, now)
        if isinstance(message, HealthBatch):
            entry = run.queue_signals(message.signals, message.timestamp, run.last_seen)
        else:
            entry = run.queue_signals((message,), 0.0, run.last_seen)
        self._queue.append(entry)
        self._queued_runs.append(run)

    def flush(self) -> set[str]:
        """Apply the queued health; the runs changed materially since the last flush (by queued
        health applied here or earlier on the way to another operation)."""
        self._apply_queue()
        changed, self._changed = self._changed, set()
        return changed

    @property
    def queued(self) -> int:
        """Messages queued and not yet applied."""
        return len(self._queue)

    def ingest_state(self, run_id: str, packet: SystemStatePacket, now: float | None = None) -> bool:
        """Apply a state packet: training numbers and seed slot states."""
        self._apply_queue()
        run = self._touch(run_id, now)
        return run.ingest_state(packet, run.last_seen)

    def ingest_states(
        self, run_ids: Sequence[str], packets: Sequence[SystemStatePacket], now: float | None = None
    ) -> list[bool]:
        """`[ingest_state(run_id, packet) ...]` for many runs (one packet each), their seed slots
        applied in one vectorized pass (esperd.analyzer.many)."""
        self._apply_queue()
        runs = [self._touch(run_id, now) for run_id in run_ids]
        return ingest_states(runs, packets, runs[0].last_seen) if runs else []

    def ingest(
        self,
        run_id: str,
        message: TopologyPacket | HealthSignal | HealthBatch | SystemStatePacket,
        now: float | None = None,
    ) -> bool:
        """Dispatch any analyzer-bound message by type."""
        if isinstance(message, TopologyPacket):
            return self.ingest_topology(run_id, message, now)
        if isinstance(message, (HealthSignal, HealthBatch)):
            return self.ingest_health(run_id, message, now)
        if isinstance(message, SystemStatePacket):
            return self.ingest_state(run_id, message, now)
        raise TypeError(f"the analyzer does not take {type(message).__name__}")

    def note_ack(
        self,
        run_id: str,
        layer_id: int,
        op: Op,
        applied: bool,
        *,
        blueprint: Blueprint | None = None,
        timestamp: float = 0.0,
    ) -> bool:
        """A host's answer to a command. Applied: the slot's stage moves at once (the next packet
        reconciles it). Rejected GERMINATE: its blueprint is masked on that layer. False for a run
        the analyzer does not know (or an applied op our view did not allow)."""
        self._apply_queue()
        run = self._runs.get(run_id)
        if run is None:
            return False
        if applied:
            return run.note_applied(layer_id, op, timestamp, blueprint)
        run.note_rejected(layer_id, op, blueprint)
        return True

    # ----------------------------------------------------------------- output

    def observe(self, run_id: str, now: float | None = None) -> Observation:
        """The run's current Observation for the policy."""
        self._apply_queue()
        return self._run(run_id).observe(self._now(now))

    def observe_many(self, run_ids: Sequence[str], now: float | None = None) -> list[Observation]:
        """`[observe(run_id) for run_id in run_ids]` in one vectorized pass over their nodes
        (esperd.analyzer.many): the same observations, for a fraction of the cost with many runs."""
        self._apply_queue()
        return observe_runs([self._run(run_id) for run_id in run_ids], self._now(now))

    def clusters(self, run_id: str) -> list[list[int]]:
        """The run's problem clusters as lists of layer ids."""
        self._apply_queue()
        return self._run(run_id).clusters()

    def run_summary(self, run_id: str, now: float | None = None) -> RunSummary:
        self._apply_queue()
        return self._run(run_id).summary(self._now(now))

    def summary(self, now: float | None = None) -> AnalyzerSummary:
        self._apply_queue()
        t = self._now(now)
        return AnalyzerSummary(
            runs=len(self._runs),
            max_runs=self.config.max_runs,
            per_run=[run.summary(t) for run in self._runs.values()],
        )

    def analysis(self, limit: int = MAX_LISTED_RUNS) -> AnalysisStatus:
        """Every run's analysis summary, totalled; the `limit` runs with the most problematic
        layers (then the least healthy) listed, those with nothing flagged left out."""
        self._apply_queue()
        every = [run.analysis() for run in self._runs.values()]
        flagged = [a for a in every if a.problematic or a.needs_attention]
        flagged.sort(key=lambda a: (-a.problematic, -a.needs_attention, a.overall_health, a.run_id))
        return AnalysisStatus(
            runs=len(every),
            runs_with_problems=sum(1 for a in every if a.problematic),
            problematic_layers=sum(a.problematic for a in every),
            attention_layers=sum(a.needs_attention for a in every),
            clusters=sum(a.clusters for a in every),
            per_run=flagged[:limit],
        )

    def run_ids(self) -> list[str]:
        return list(self._runs)

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def get_run(self, run_id: str) -> RunState | None:
        """The run's state, for read-only inspection (tests, debugging)."""
        self._apply_queue()
        return self._runs.get(run_id)

    # -------------------------------------------------------------- lifecycle

    def remove_run(self, run_id: str) -> bool:
        """Forget a run now (e.g. once its episode is closed). False if it was not known."""
        self._apply_queue()
        self._changed.discard(run_id)
        run = self._runs.pop(run_id, None)
        if run is None:
            return False
        run.release()
        return True

    # ---------------------------------------------------------------- helpers

    def _apply_queue(self) -> None:
        """Apply every queued message (one vectorized pass); note the runs that changed."""
        if not self._queue:
            return
        queue, runs = self._queue, self._queued_runs
        self._queue, self._queued_runs = [], []
        applied = apply_health(self._arena, queue, self.config)
        for run, material, flipped in zip(
            runs, applied.material.tolist(), applied.flipped.tolist(), strict=True
        ):
            run.applied(flipped)
            if material:
                self._changed.add(run.run_id)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _check_size(self, run_id: str, nodes: int, edges: int) -> None:
        """Ask the size gate (the run table's memory budget) before a run's graph grows."""
        if self._size_gate is None:
            return
        refusal = self._size_gate(run_id, nodes, edges)
        if refusal:
            raise AnalyzerError("memory_budget", refusal)

    def _run(self, run_id: str) -> RunState:
        run = self._runs.get(run_id)
        if run is None:
            raise AnalyzerError("unknown_run", f"no state for run {run_id!r}")
        return run

    def _touch(self, run_id: str, now: float | None) -> RunState:
        """The run, created if new, marked active at `now`."""
        t = self._now(now)
        run = self._runs.get(run_id)
        if run is None:
            check = functools.partial(self._check_size, run_id) if self._size_gate is not None else None
            run = self._runs[run_id] = RunState(run_id, self.config, self._arena, t, check)
        else:
            self._runs.move_to_end(run_id)
        run.last_seen = t
        return run
