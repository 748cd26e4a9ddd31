"""Prometheus exposition: esperd's counters on an HTTP listener (`[metrics] listen`).

Nothing is counted twice: at each scrape the collector takes one `esperd.status`
snapshot on the event loop's thread (where every counter lives, so it is consistent)
and turns it into metric families; prometheus-client writes the text format. The one
thing status cannot give, a decision-latency histogram, is observed when a command
goes out (a bisect and two additions on the loop thread).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from esperd.rails import Rail
from esperd_contracts import MESSAGE_TYPES, AckStatus, AdaptationCommand, Op
from esperd_contracts.status import ClusterStatus, Status

#: The label every esperd metric carries: which instance it is (Prometheus's own `instance`
#: label names the scrape target, so a label of that name would be renamed on ingestion).
INSTANCE_LABEL = "esperd_instance"
#: Label values shown from the first scrape (at 0), so that rate() has a start.
INBOUND_KINDS = tuple(cls.__struct_config__.tag for cls in MESSAGE_TYPES if cls is not AdaptationCommand)
COMMAND_OPS = tuple(op.value for op in Op if op is not Op.WAIT)
RAILS = tuple(rail.value for rail in Rail)
BREAKER_TRANSITIONS = ("closed->open", "open->half_open", "half_open->closed", "half_open->open")
ACK_OUTCOMES = (*(status.value for status in AckStatus), "timed_out")
#: Upper bounds (seconds) of the decision-latency buckets: run due -> command published.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MetricsListenError(RuntimeError):
    """The metrics listener could not be started (bad address, port taken)."""


class LatencyHistogram:
    """Bucketed decision latencies. Observed and read on the event loop's thread only."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations <= le) for every bucket, +Inf last."""
        total, out = 0, []
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class Snapshot:
    """What one scrape reads: a status, the histogram's buckets, the instance."""

    def __init__(self, status: Status, latency: list[tuple[str, int]], latency_sum: float, instance: str):
        self.status, self.latency, self.latency_sum, self.instance = status, latency, latency_sum, instance


class _Families:
    """Builds metric families that all carry the instance label."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.out: list[Any] = []

    def counter(self, name: str, doc: str, value: float) -> None:
        family = CounterMetricFamily(name, doc, labels=[INSTANCE_LABEL])
        family.add_metric([self.instance], value)
        self.out.append(family)

    def gauge(self, name: str, doc: str, value: float) -> None:
        family = GaugeMetricFamily(name, doc, labels=[INSTANCE_LABEL])
        family.add_metric([self.instance], value)
        self.out.append(family)

    def counters_by(
        self, name: str, doc: str, label: str, values: dict[str, int], known: Iterable[str] = ()
    ) -> None:
        """One counter per label value; `known` values are shown from the start, at 0."""
        family = CounterMetricFamily(name, doc, labels=[INSTANCE_LABEL, label])
        for key, value in sorted({**dict.fromkeys(known, 0), **values}.items()):
            family.add_metric([self.instance, key], value)
        self.out.append(family)


def families(snapshot: Snapshot) -> list[Any]:
    """Every esperd metric family for one snapshot (pure: no I/O, no locks)."""
    s, f = snapshot.status, _Families(snapshot.instance)
    info = InfoMetricFamily("esperd", "esperd's version and serving policy", labels=[INSTANCE_LABEL])
    info.add_metric([snapshot.instance], {"version": s.version, "policy": s.policy.name})
    f.out.append(info)
    f.gauge("esperd_uptime_seconds", "Seconds since esperd started", s.uptime_s)
    f.gauge("esperd_stopping", "1 while esperd shuts down", float(s.stopping))
    # Intake.
    f.counters_by(
        "esperd_messages_accepted", "Messages accepted, by kind", "kind", s.accepted_by_kind, INBOUND_KINDS
    )
    f.counters_by("esperd_messages_rejected", "Messages refused, by reason", "reason", s.rejected_by_reason)
    # Decisions.
    d = s.decisions
    f.counter("esperd_decision_batches", "Batches decided (one policy forward each)", d.batches)
    f.counter("esperd_decisions", "Decisions made (WAIT included)", d.decisions)
    f.counter("esperd_decision_waits", "Decisions that were WAIT (no command)", d.waits)
    f.counter("esperd_decision_failures", "Policy forwards that raised", d.failures)
    f.counter("esperd_decisions_late", "Commands published after decision_deadline_ms", d.late)
    f.counter(
        "esperd_decisions_fenced", "Commands not sent: ownership of the run lapsed while deciding", d.fenced
    )
    f.counters_by("esperd_commands", "Commands published, by op", "op", d.commands_by_op, COMMAND_OPS)
    if s.rails is not None:
        f.counters_by(
            "esperd_rail_blocks",
            "Decisions a rail kept from their host (each became a WAIT), by rail",
            "rail",
            s.rails.blocked_by_rail,
            RAILS,
        )
        f.counters_by(
            "esperd_rail_masks",
            "Decisions where a rail masked ops out before the policy chose, by rail",
            "rail",
            s.rails.masked_by_rail,
            RAILS,
        )
        if s.rails.seed_pool:
            pool = s.rails
            f.gauge(
                "esperd_seed_pool_size",
                "Live seeds all runs may share ([rails] max_seeds_total)",
                pool.seed_pool,
            )
            f.gauge(
                "esperd_seed_pool_live",
                "Live seeds and germinations in flight across runs",
                pool.seed_pool_live,
            )
    latency = HistogramMetricFamily(
        "esperd_decision_latency_seconds",
        "From a run becoming due to its command being published",
        labels=[INSTANCE_LABEL],
    )
    latency.add_metric([snapshot.instance], snapshot.latency, sum_value=snapshot.latency_sum)
    f.out.append(latency)
    # Acks and the scheduler.
    f.counters_by(
        "esperd_acks",
        "Command outcomes, by status (applied, rejected, timed_out)",
        "status",
        s.acks_by_status,
        ACK_OUTCOMES,
    )
    f.counter(
        "esperd_acks_unknown",
        "Acks for no pending command (late, duplicated, foreign)",
        s.scheduler.unknown_acks,
    )
    f.gauge("esperd_scheduler_queued", "Runs due and waiting for a decision", s.scheduler.queued)
    f.counter("esperd_scheduler_overflow", "Due runs dropped: the queue was full", s.scheduler.overflow)
    f.gauge("esperd_commands_pending", "Commands published and not yet acked", s.scheduler.pending_commands)
    # Runs.
    f.gauge("esperd_runs", "Runs tracked", s.runs)
    if s.run_table is not None:
        f.gauge("esperd_runs_max", "The most runs esperd tracks (analyzer.max_runs)", s.run_table.max_runs)
        f.counter(
            "esperd_runs_admitted", "Runs admitted (a reused run id counts again)", s.run_table.admitted
        )
        f.counters_by(
            "esperd_runs_evicted",
            "Runs dropped, by reason (idle, done, handover, lease_lapsed, reused)",
            "reason",
            s.run_table.dropped_by_reason,
        )
        f.counter("esperd_runs_reused", "Run ids that started a new episode after done", s.run_table.reused)
        f.gauge(
            "esperd_runs_memory_used_bytes",
            "Estimated memory of every tracked run's state",
            s.run_table.memory_used_bytes,
        )
        f.gauge(
            "esperd_runs_memory_budget_bytes",
            "The limit on that estimate (analyzer.memory_budget_mb)",
            s.run_table.memory_budget_bytes,
        )
    else:
        f.counter("esperd_runs_evicted", "Runs dropped", s.evicted_runs)
    # NATS.
    n = s.nats
    f.gauge("esperd_nats_connected", "1 while connected to NATS", float(n.connected))
    f.counter("esperd_nats_reconnects", "Reconnections to NATS", n.reconnects)
    f.counter("esperd_nats_errors", "NATS errors reported by the client", n.errors)
    f.counter(
        "esperd_nats_dropped_publishes", "Publishes lost while the broker was away", n.dropped_publishes
    )
    f.counter(
        "esperd_nats_slow_consumer_drops",
        "Inbound messages dropped by the client: esperd fell behind (nats.max_pending_bytes)",
        n.slow_consumer_drops,
    )
    f.gauge("esperd_nats_max_payload_bytes", "The broker's max_payload (from its INFO)", n.max_payload)
    # Policy and learner.
    f.gauge("esperd_policy_version", "Version of the serving policy", s.policy.version)
    if s.learner is not None:
        le = s.learner
        f.counter("esperd_learner_updates", "Learner updates (optimizer steps)", le.updates)
        f.counter("esperd_learner_samples", "Transitions trained on", le.samples)
        f.gauge("esperd_learner_buffered", "Transitions waiting in the learner's buffer", le.buffered)
        f.counter("esperd_learner_swaps", "New weights swapped into serving", le.swaps)
        f.counter("esperd_learner_trips", "Circuit-breaker trips (rolled back, learning paused)", le.trips)
        f.gauge(
            "esperd_learner_breaker_open", "1 while the breaker pauses learning", float(le.breaker == "open")
        )
        f.gauge(
            "esperd_learner_breaker_half_open",
            "1 while the breaker lets one probe update through",
            float(le.breaker == "half_open"),
        )
        f.counter(
            "esperd_learner_failures",
            "Failed learner updates (non-finite, KL, reward drop), each rolled back",
            le.failures,
        )
        f.counters_by(
            "esperd_learner_budget_violations",
            "Learner timings over 002's budgets (processing 20 ms, batch 50 ms, step 100 ms), by budget",
            "budget",
            le.budget_violations,
            ("processing", "batch", "step"),
        )
        f.counters_by(
            "esperd_learner_breaker_transitions",
            "Circuit-breaker state changes, by transition",
            "transition",
            le.breaker_transitions,
            BREAKER_TRANSITIONS,
        )
        f.counter(
            "esperd_learner_worker_deaths",
            "Learner worker processes that died and were restarted",
            le.worker_deaths,
        )
        f.counter(
            "esperd_learner_checkpoint_failures",
            "Periodic learner checkpoints that failed (each retried with backoff)",
            le.checkpoint_failures,
        )
    # Supervision and reloads.
    f.counters_by(
        "esperd_task_restarts",
        "Background tasks restarted after ending unexpectedly, by task",
        "task",
        {name: task.restarts for name, task in s.tasks.items()},
    )
    f.counter("esperd_reloads", "SIGHUP reloads applied", s.reload.reloads)
    f.counter("esperd_reloads_refused", "SIGHUP reloads refused (nothing changed)", s.reload.refused)
    if s.cluster is not None:
        _cluster_families(f, s.cluster)
    return f.out


def _cluster_families(f: _Families, c: ClusterStatus) -> None:
    f.gauge("esperd_cluster_members", "Live esperd instances sharing the runs", len(c.members))
    f.gauge("esperd_cluster_partitions", "Partitions this instance holds a lease on", len(c.partitions))
    f.counter(
        "esperd_cluster_foreign_messages", "Messages for runs this instance does not own", c.foreign_messages
    )
    f.counter("esperd_cluster_handovers", "Runs given up: partition handed over or lease lapsed", c.handovers)
    f.counter(
        "esperd_cluster_lease_lapses",
        "Partitions given up because this instance missed its lease",
        c.lease_lapses,
    )
    f.counter("esperd_cluster_errors", "Lease or membership renewals that failed", c.errors)


class StatusCollector(Collector):
    """Collects on the event loop's thread at each scrape (the HTTP server runs in its own)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, take: Callable[[], Snapshot], timeout_s: float = 5.0
    ) -> None:
        self._loop, self._take, self._timeout_s = loop, take, timeout_s

    def collect(self) -> Iterator[Any]:
        future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(self._take())
            except BaseException as exc:  # noqa: BLE001 - handed to the scraping thread
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(take)
        # A stuck event loop makes the scrape fail (HTTP 500) instead of reading counters mid-update.
        yield from families(future.result(self._timeout_s))


def parse_listen(listen: str) -> tuple[str, int]:
    """("host", port) of `host:port` or `[v6]:port`."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """The HTTP listener serving `GET /metrics` from a private registry."""

    def __init__(self, listen: str, collectors: Iterable[Collector]) -> None:
        self.listen = listen
        self.registry = CollectorRegistry()
        for collector in collectors:
            self.registry.register(collector)
        ProcessCollector(
            registry=self.registry
        )  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_port) if self._server is not None else 0

    def start(self) -> None:
        """Listen now; MetricsListenError (one line, no traceback needed) if that is impossible."""
        try:
            host, port = parse_listen(self.listen)
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except (OSError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            raise MetricsListenError(
                f"metrics.listen = {self.listen!r}: cannot listen there ({why})"
            ) from None

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
