"""The service wiring: the one place that knows every part of esperd.

Lifecycle: start (embedded broker if configured, connect, micro service,
subscriptions, READY) -> serve until a stop is requested -> stop taking work,
answer what is in flight, drain NATS, stop the embedded broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import gc
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service as MicroService, ServiceConfig as MicroConfig

import esperd
from esperd.analyzer.analyzer import Analyzer
from esperd.analyzer.config import AnalyzerError
from esperd.analyzer.observation import Observation
from esperd.bus import Bus
from esperd.config import MAX_NATS_PAYLOAD, Config, ConfigError, state_path
from esperd.decisions import DecisionLoop
from esperd.intake import Accepted, Intake, Rejection
from esperd.learn.learner import Learner
from esperd.learn.recorder import Recorder
from esperd.logs import LogLevel
from esperd.ops.cluster import ClusterAgent, default_instance_id, instance_status_subject
from esperd.ops.metrics import LatencyHistogram, MetricsServer, Snapshot, StatusCollector
from esperd.ops.natsserver import NatsServer, NatsServerError
from esperd.ops.notify import SystemdNotifier
from esperd.ops.ownership import LAPSED, partition_of
from esperd.ops.reload import apply_live, plan_reload
from esperd.ops.statedir import prepare_state_dir
from esperd.ops.subjectmap import verify_mapping
from esperd.ops.supervisor import Supervisor
from esperd.policy import PolicyBundle, create_policy
from esperd.policy.checkpoint import (
    CheckpointError,
    build_serving_policy,
    checkpoint_digest,
    load_policy_checkpoint,
)
from esperd.rails import Block, Rails
from esperd.runs import MIB, DropReason, RunTable, Verdict
from esperd.scheduler import Scheduler
from esperd_contracts import (
    BLOCKED_SUBJECT,
    REJECTED_SUBJECT,
    STATUS_SUBJECT,
    AckStatus,
    Blueprint,
    CommandAck,
    HealthBatch,
    HealthSignal,
    Op,
    SubjectError,
    SystemStatePacket,
    parse_subject,
)
from esperd_contracts.status import ClusterStatus, LearnerStatus, PolicyStatus, ReloadStatus, Status

if TYPE_CHECKING:
    from esperd.policy.base import Decision

log = structlog.get_logger("esperd.service")


class Service:
    """esperd as one object: `await Service(config).run()` serves until `request_stop()`."""

    def __init__(
        self,
        config: Config,
        env: Mapping[str, str] | None = None,
        *,
        reload_config: Callable[[], Config] | None = None,
        log_level: LogLevel | None = None,
    ) -> None:
        """`reload_config` reads the config again (on SIGHUP); `log_level` is the logging's control.

        Raises StateDirError at once if `service.state_dir` cannot be created or written.
        """
        prepare_state_dir(config.service.state_dir)
        self.config = config
        self._reload_config = reload_config
        self._log_level = log_level
        self.bus = Bus(config.nats, payload_limit=config.limits.max_payload_bytes)
        self.intake = Intake(config.limits, config.nats.subject_prefix)
        self.runs = RunTable(
            max_runs=config.analyzer.max_runs,
            idle_ttl_s=config.analyzer.idle_ttl_s,
            done_grace_s=config.analyzer.done_grace_s,
            memory_budget_bytes=int(config.analyzer.memory_budget_mb * MIB),
            forget=self._forget_run,
        )
        self.notifier = SystemdNotifier(os.environ if env is None else env)
        self.analyzer = Analyzer(config.analyzer, size_gate=self.runs.resize)
        self.scheduler = Scheduler(config.scheduler)
        configure_torch_threads(config.service.torch_threads)
        sys.setswitchinterval(config.service.gil_switch_interval_ms / 1e3)
        device = resolve_device(config.service.device)
        self.device = device
        serving = build_serving_policy(config.policy, device)
        self.policy_fallback_reason = str(serving.error) if serving.error else ""
        self._checkpoint_digest = checkpoint_digest(config.policy.checkpoint)  # what a reload compares to
        # Names this instance: its status subject, its cluster membership, its metrics label.
        self.instance = config.cluster.instance_id or default_instance_id()
        # Decision latencies for the Prometheus histogram, only when metrics are served.
        self.latency = LatencyHistogram() if config.metrics.listen else None
        self._metrics: MetricsServer | None = None
        self.recorder = Recorder(config.learner.rewards, max_runs=config.analyzer.max_runs)
        self.decisions = DecisionLoop(
            self.scheduler,
            serving.policy,
            observe=self._observe,
            publish=self.bus.publish_command,
            deterministic=config.policy.deterministic,
            on_decided=self.recorder.decision_hook,
            observe_latency=self.latency.observe if self.latency is not None else None,
            epoch_of=self._epoch_of,
            rails=Rails(config.rails, selection=config.policy.selection),
            on_blocked=self._report_blocked,
            tracked=self._decidable,
        )
        self.learner = self._build_learner(serving.policy, device)
        self.cluster: ClusterAgent | None = None
        self._background: set[asyncio.Task[None]] = set()  # short one-off tasks (unsubscribing)
        self.started_at = time.monotonic()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._embedded: NatsServer | None = None
        self._micro: MicroService | None = None
        self.supervisor = Supervisor(self._task_gave_up)
        self.failed_tasks: list[str] = []  # tasks given up on: the process must exit non-zero
        self.reload_status = ReloadStatus()
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._json = msgspec.json.Encoder()
        self._yield_at = 0.0  # perf_counter time by which the message handler lets the loop run
        self._unyielded_bytes = 0  # payload bytes handled since the handler last let the loop run
        self._apply_at = 0.0  # perf_counter time by which queued health is applied while messages wait

    def _build_learner(self, serving: PolicyBundle, device: str) -> Learner | None:
        config = self.config
        if config.learner.algorithm == "off":
            return None
        if not serving.is_learnable:
            log.warning(
                "learner off: the serving policy cannot learn",
                policy=serving.name,
                configured=config.policy.name,
            )
            return None
        learner = Learner(
            config.learner,
            # A partial, not a lambda: the learner's worker process builds its trainee from it.
            make_policy=functools.partial(create_policy, serving.name, config.policy, device),
            serving=serving,
            swap=self.decisions.swap_policy,
            state_dir=state_path(config),
        )
        learner.restore()
        self.recorder.add_sink(learner.add)
        return learner

    # ------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Ask the service to stop (signal handlers call this)."""
        self._stop.set()

    def _task_gave_up(self, name: str, error: str) -> None:
        """A background task kept failing: stop cleanly, then exit non-zero so systemd restarts us."""
        self.failed_tasks.append(name)
        self.request_stop()

    async def run(self) -> None:
        """Start, serve until stopped, and shut down cleanly."""
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        """Bring every part up; READY is sent once the subscriptions are live."""
        self.started_at = time.monotonic()
        if self.config.metrics.listen:
            self._start_metrics()  # first: a taken port is reported before anything else starts
        if self.config.nats.embedded:
            await self._start_embedded()
        try:
            await self.bus.connect(self._stop)
        except ConnectionError:
            if self._stop.is_set():  # stopped while the broker was unreachable: a clean stop
                log.info("stopped before NATS was reachable")
                return
            raise
        await self._start_micro()
        await self._start_intake()
        if self.notifier.enabled and self.notifier.watchdog_interval() is not None:
            self.supervisor.spawn("watchdog", self.notifier.run_watchdog)
        if self._embedded is not None:
            self.supervisor.spawn("embedded-broker", self._keep_embedded_broker)
        self.supervisor.spawn("status-log", self._status_log_loop)
        self.supervisor.spawn("decisions", self.decisions.run)
        self.supervisor.spawn("housekeeping", self._housekeeping_loop)
        if self.learner is not None:
            self.supervisor.spawn("learner", self.learner.run)
        # Everything built so far (torch, the policy, config) lives as long as the process: keep it
        # out of the collector, or every full collection walks it (slow with torch loaded; figures
        # in benchmarks/RESULTS.md, "Measurements quoted in the code").
        # Collect first, so that only live objects are frozen.
        gc.collect()
        gc.freeze()
        self.ready.set()
        self.notifier.ready()
        log.info(
            "esperd ready",
            version=esperd.__version__,
            servers=list(self.config.nats.servers),
            prefix=self.config.nats.subject_prefix,
        )
        if self._reload_again:  # a SIGHUP came while starting
            self.request_reload()

    async def _start_intake(self) -> None:
        """Join the cluster (if any); subscribe to every run, or (partition mapping) per partition held."""
        if self.config.cluster.enabled:
            await self._start_cluster()
        if not self.config.cluster.mapped_prefix:
            await self.bus.subscribe_inbound(self._on_raw)

    async def _start_cluster(self) -> None:
        """Check the broker's partition mapping (if configured), join, take our partitions."""
        assert self.bus.nc is not None
        if self.config.cluster.mapped_prefix:
            probe = await self.bus.side_connection()
            try:
                await verify_mapping(probe, self.config.cluster.partitions)
            finally:
                await probe.close()
        self.cluster = ClusterAgent(
            self.config.cluster,
            self.bus.nc,
            self.instance,
            on_lost=self._on_partitions_lost,
            on_acquired=self._on_partitions_acquired,
            runs=lambda: len(self.analyzer),
        )
        await self.cluster.start()
        self.supervisor.spawn("cluster", self.cluster.run)

    async def stop(self) -> None:
        """Stop taking work, finish what is in flight, drain NATS, stop the embedded broker."""
        if self._stopping:
            return
        self._stopping = True
        self.supervisor.stopping()  # tasks that end from here on were asked to
        self.notifier.stopping()
        log.info("esperd stopping", drain_timeout_s=self.config.service.drain_timeout_s)
        await self._drain()
        await self._stop_tasks()
        if self.learner is not None:
            await self._save_learner()
            self.learner.close()  # its worker process, now that the optimizer state is saved
        await self._stop_listeners()
        log.info(
            "esperd stopped",
            accepted_total=self.intake.accepted_total,
            rejected_total=self.intake.rejected_total,
        )

    async def _drain(self) -> None:
        """Stop taking work, let the batch in flight publish, drain NATS: within drain_timeout_s."""
        timeout = self.config.service.drain_timeout_s
        with anyio.move_on_after(timeout) as scope:
            if self.bus.nc is not None:
                await self.bus.unsubscribe_inbound()
                await self.decisions.finish_in_flight()  # its commands still go out before the drain
                if self.cluster is not None:
                    await self.cluster.leave()  # peers take our runs over now, not after a timeout
                if self._micro is not None:
                    with contextlib.suppress(Exception):
                        await self._micro.stop()
                await self.bus.close(timeout)
        if scope.cancelled_caught:
            log.warning("drain timed out; exiting anyway")

    async def _stop_tasks(self) -> None:
        """End the learner's updates, a reload in progress and every supervised task."""
        if self.learner is not None:
            await self.learner.quiesce()  # the final checkpoint must not race an optimizer step
        if self._reload_task is not None:
            self._reload_task.cancel()
            await asyncio.gather(self._reload_task, return_exceptions=True)
        await self.supervisor.stop()
        self.decisions.close()

    async def _stop_listeners(self) -> None:
        """Last: the embedded broker, then the metrics listener (scrapes work until the end)."""
        if self._embedded is not None:
            self._embedded.stop()
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)

    # --------------------------------------------------------------- reload

    def request_reload(self) -> None:
        """Read the config file again and apply what can change live (SIGHUP calls this)."""
        if self._stopping:
            return
        busy = self._reload_task is not None and not self._reload_task.done()
        if busy or not self.ready.is_set():
            self._reload_again = True  # once started / once the reload in progress is done
            return
        self._reload_again = False
        self._reload_task = asyncio.create_task(self._reload_now(), name="reload")

    async def _reload_now(self) -> None:
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            await self.reload()
        except Exception as exc:  # a bug must cost this reload, never the daemon
            log.exception("reload failed")
            self._reload_refused(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.notifier.ready()
            self._reload_task = None
        if self._reload_again:
            self.request_reload()

    async def reload(self) -> bool:
        """Apply the config file as it is now: log level, `[scheduler]`, `[limits]` (see
        esperd.ops.reload for the exceptions), and a new
        `[policy] checkpoint` (a new path, or the same file with new contents), swapped in as the
        next version. Other changes are reported as needing a restart. An unreadable or invalid
        config, or an unusable checkpoint, is refused as a whole: nothing changes. True if applied."""
        if self._reload_config is None:
            self._reload_refused("no config file to read again")
            return False
        try:
            new = await asyncio.to_thread(self._reload_config)
        except ConfigError as exc:
            self._reload_refused(str(exc))
            return False
        plan = plan_reload(self.config, new)
        applied, needs_restart = list(plan.live), list(plan.restart)
        try:
            swapped = await self._reload_checkpoint(new.policy.checkpoint)
        except CheckpointError as exc:
            self._reload_refused(str(exc))
            return False
        if swapped:
            applied.append("policy.checkpoint")  # also when only the file's contents changed
            if self.learner is None and self.config.learner.algorithm != "off":
                needs_restart.append("learner.algorithm")  # the configured policy serves again
        self._apply_live(new)
        self._reloaded(sorted(set(applied)), sorted(needs_restart))
        return True

    async def _reload_checkpoint(self, path: str | None) -> bool:
        """Swap in the checkpoint at `path` if it is not the one loaded already; True if swapped.
        CheckpointError (nothing changed) if it is unusable or cannot serve here."""
        if not path:
            return False
        try:
            loaded = await asyncio.to_thread(self._changed_checkpoint, path)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint refused, the serving policy stays: {exc}") from None
        if loaded is None:
            return False
        bundle, digest = loaded
        self._swap_in_checkpoint(bundle)
        self._checkpoint_digest = digest
        return True

    def _apply_live(self, new: Config) -> None:
        if self._log_level is not None:
            self._log_level.set(new.service.log_level)
        self.scheduler.config = new.scheduler
        self.intake.set_limits(new.limits)
        self.config = apply_live(self.config, new)
        self.decisions.wake()  # a shorter interval may make runs due now

    def _reloaded(self, applied: list[str], needs_restart: list[str]) -> None:
        status = self.reload_status
        status.reloads += 1
        status.last_at = _utc_now()
        status.last_error = ""
        status.applied = applied
        status.needs_restart = needs_restart
        log.info(
            "config reloaded",
            applied=applied,
            needs_restart=needs_restart,
            policy=self.decisions.policy.name,
            policy_version=self.decisions.policy.version,
        )
        if needs_restart:
            log.warning("config changes need a restart to apply", keys=needs_restart)

    def _changed_checkpoint(self, path: str) -> tuple[PolicyBundle, str] | None:
        """Worker thread: the checkpoint at `path` loaded into a new bundle of the configured
        policy, if it is not the one loaded already; CheckpointError if it is unusable."""
        digest = checkpoint_digest(path)
        if path == self.config.policy.checkpoint and digest == self._checkpoint_digest:
            return None
        policy_config = msgspec.structs.replace(self.config.policy, checkpoint=path)
        bundle = create_policy(policy_config.name, policy_config, self.device)
        load_policy_checkpoint(path, bundle)
        return bundle, digest

    def _swap_in_checkpoint(self, bundle: PolicyBundle) -> None:
        """Serve `bundle` as the next version (through the learner, which trains on it from now
        on); CheckpointError if it cannot serve here."""
        serving = self.decisions.policy
        if self.learner is not None:
            if serving.name != bundle.name:
                raise CheckpointError(
                    f"the {serving.name} fallback serves and learns; serving the {bundle.name} "
                    "checkpoint needs a restart"
                )
            self.learner.adopt(bundle)  # as version + 1, like a learner swap
        else:
            bundle.version = serving.version + 1
            self.decisions.swap_policy(bundle)
        self.policy_fallback_reason = ""
        log.info("policy checkpoint swapped in", policy=bundle.name, version=bundle.version)

    def _reload_refused(self, why: str) -> None:
        status = self.reload_status
        status.refused += 1
        status.last_at = _utc_now()
        status.last_error = why
        log.error("reload refused; nothing changed", error=why)

    async def _save_learner(self) -> None:
        """Close open steps (truncated: bootstrapped on resume) and checkpoint policy and buffer."""
        assert self.learner is not None
        self.recorder.truncate_all()
        try:
            await asyncio.to_thread(self.learner.save_checkpoint)
        except Exception:  # a failed save must not turn a clean stop into a crash
            log.exception("final learner checkpoint failed")

    def _start_metrics(self) -> None:
        collector = StatusCollector(asyncio.get_running_loop(), self._metrics_snapshot)
        self._metrics = MetricsServer(self.config.metrics.listen, [collector])
        self._metrics.start()
        log.info("metrics listening", listen=self.config.metrics.listen, port=self._metrics.port)

    def _metrics_snapshot(self) -> Snapshot:
        """One scrape's view (called on the event loop's thread)."""
        assert self.latency is not None
        return Snapshot(self.status(), self.latency.cumulative(), self.latency.sum, self.instance)

    async def _start_embedded(self) -> None:
        nats_cfg = self.config.nats
        store = state_path(self.config, "jetstream") if nats_cfg.jetstream else None
        self._embedded = NatsServer(
            nats_cfg.embedded_host,
            nats_cfg.embedded_port,
            store_dir=store,
            work_dir=state_path(self.config, "nats"),
            max_payload=embedded_max_payload(self.config.limits.max_payload_bytes),
        )
        # On the loop thread on purpose: the broker's parent-death signal is tied to the
        # thread that starts it. Start-up takes milliseconds and nothing is served yet.
        self._embedded.start()
        log.info(
            "embedded nats-server started",
            url=self._embedded.url,
            jetstream=bool(store),
            max_payload=self._embedded.max_payload,
        )

    async def _keep_embedded_broker(self) -> None:
        """Watch the embedded nats-server; when it has died, raise (the supervisor logs, counts
        and backs off), and on the next run start it again on its port and store. The client
        reconnects to it by itself."""
        broker = self._embedded
        assert broker is not None
        if not broker.running:
            broker.start()  # on the loop thread, as at start-up (its parent-death signal)
            log.warning("embedded nats-server restarted", url=broker.url)
        while broker.running:  # noqa: ASYNC110 - a child process has nothing to await on the loop
            await asyncio.sleep(1.0)
        raise NatsServerError(broker.exit_reason())

    async def _start_micro(self) -> None:
        assert self.bus.nc is not None
        self._micro = await add_service(
            self.bus.nc,
            MicroConfig(
                name="esperd",
                version=esperd.__version__,
                description="Tamiyo: strategic controller for Esper morphogenetic training",
                metadata={"instance": self.instance},
            ),
        )
        # The shared subject reaches one instance at random (a queue group): fine alone, but with
        # several a hung one makes some requests time out, so each also answers on its own subject.
        await self._micro.add_endpoint(
            EndpointConfig(name="status", subject=STATUS_SUBJECT, handler=self._on_status)
        )
        await self._micro.add_endpoint(
            EndpointConfig(
                name="instance-status",
                subject=instance_status_subject(self.instance),
                handler=self._on_status,
            )
        )

    # --------------------------------------------------------------- intake

    async def _on_raw(self, subject: str, data: bytes, content_type: str | None) -> None:
        if self.cluster is not None and not self._mine(subject):
            self.cluster.foreign_messages += 1
            return
        try:
            outcome = self.intake.check(subject, data, content_type)
            if isinstance(outcome, Accepted):
                refusal = self._dispatch(outcome, subject)
                if refusal is None:
                    self.intake.count_accepted(outcome)
                outcome = refusal
            if outcome is not None:
                await self._report(outcome)
        except Exception:  # a bug must cost one message, never the subscription
            log.exception("handler failed", subject=subject)
            await self._report(self.intake.reject("internal_error", "handler raised", subject, data=data))
        if not self.bus.inbound_pending():
            self._apply_health()  # nothing is waiting: the loop runs (and may decide) next
            self._unyielded_bytes = 0
            return
        # Let the event loop run now and then. nats-py's reader task moves data from the socket into
        # the subscription's pending queue; this handler otherwise never suspends, so it would drain
        # the whole queue before the reader reads again. The reader then fell behind a flood, the
        # broker buffered for us until its max_pending and cut the connection (every run's messages
        # lost, uncounted, status unanswered until the reconnect), and nats.max_pending_bytes never
        # applied. Yielding after each read's worth of bytes (or a millisecond) keeps the reader
        # ahead of the handler: a flood overflows the pending queue instead, dropped by the client
        # and counted in status (nats.slow_consumer_drops). A yield per message did that too, at
        # the cost of a loop turn per message.
        self._unyielded_bytes += len(data)
        now = time.perf_counter()
        if self._unyielded_bytes >= YIELD_EVERY_BYTES or now >= self._yield_at:
            if now >= self._apply_at:  # queued health waits a little longer: larger passes cost less
                self._apply_health()
                self._apply_at = now + APPLY_EVERY_S
            await asyncio.sleep(0)
            self._unyielded_bytes = 0
            self._yield_at = time.perf_counter() + YIELD_EVERY_S

    def _apply_health(self) -> None:
        """Apply the health queued since the last call (one vectorized pass over every run) and make
        the runs it changed materially due: when no message is waiting, and every APPLY_EVERY_S
        while they keep coming. (Whatever reads a run in the meantime, an observation for a
        decision say, gets the queue applied first by the analyzer itself.)"""
        if not self.analyzer.queued:
            return
        due = False
        for run_id in self.analyzer.flush():
            due |= self.scheduler.mark_due(run_id)
        if due:
            self.decisions.wake()

    def _dispatch(self, accepted: Accepted, subject: str) -> Rejection | None:
        """Hand a checked message to the parts that use it; a refusal (counted) if one of them refuses it."""
        run_id, message = accepted.run_id, accepted.message
        if isinstance(message, CommandAck):
            return self._on_ack(run_id, message, subject)
        admission = self.runs.admit(run_id, message)
        if admission.verdict is Verdict.REFUSE:
            return self.intake.reject(admission.reason, admission.detail, subject, run_id)
        if admission.verdict is Verdict.LATE:
            return None  # the run said done; a restarted job announces itself (see esperd.runs)
        try:
            if isinstance(message, (HealthSignal, HealthBatch)):
                self.analyzer.queue_health(run_id, message)  # applied by _apply_health, for many at once
                changed = False
            else:
                changed = self.analyzer.ingest(run_id, message)
        except AnalyzerError as exc:
            if admission.new:
                self.runs.cancel(run_id)  # a run whose first message is refused never existed
            return self.intake.reject(exc.reason, str(exc), subject, run_id)
        self.bus.note_encoding(run_id, accepted.json)  # after ingest: only for runs esperd tracks
        if isinstance(message, SystemStatePacket):
            self.recorder.on_state(run_id, message)  # the reward lands before the next decision
            if message.done:
                self.runs.finish(run_id, message.epoch)  # no more decisions; dropped after the grace
                return None
        if (isinstance(message, SystemStatePacket) or changed) and self.scheduler.mark_due(run_id):
            self.decisions.wake()
        return None

    def _forget_run(self, run_id: str, reason: DropReason) -> None:
        """Every owner of per-run state forgets the run (RunTable.drop calls this, and only it)."""
        self.analyzer.remove_run(run_id)
        self.scheduler.forget_run(run_id)
        self.recorder.on_evicted(run_id)  # truncates an open episode; a finished one is already closed
        self.decisions.policy.forget([run_id])
        if self.decisions.rails is not None:
            self.decisions.rails.forget(run_id)
        self.bus.forget_run(run_id)
        log.debug("run dropped", run_id=run_id, reason=reason.value)

    def _mine(self, subject: str) -> bool:
        """Whether this instance owns the subject's run now (bad subjects are ours to reject).

        Asked per message, so a lease that lapsed while the process was frozen is noticed (and the
        partition's runs dropped) before the first packet buffered during the freeze is used.
        """
        assert self.cluster is not None
        try:
            run_id, _ = parse_subject(subject, self.config.nats.subject_prefix)
        except SubjectError:
            return True
        return self.cluster.leases.owns(run_id)

    def _epoch_of(self, run_id: str) -> int | None:
        """The fencing token for a command to `run_id` now; None if this instance must not send one."""
        return 0 if self.cluster is None else self.cluster.leases.epoch_for(run_id)

    def _on_partitions_lost(self, partitions: list[int], reason: str) -> None:
        """Drop every run of partitions we no longer hold (their new owner rebuilds them from packets)."""
        assert self.cluster is not None
        gone = set(partitions)
        count = self.config.cluster.partitions
        why = DropReason.LEASE_LAPSED if reason == LAPSED else DropReason.HANDOVER
        lost = self.runs.drop_where(lambda run_id: partition_of(run_id, count) in gone, why)
        if lost:
            self.cluster.handovers += len(lost)
        if self.config.cluster.mapped_prefix:
            # Called from synchronous code (a lapse can be noticed mid-message): unsubscribe soon;
            # until then their messages are dropped as not ours.
            task = asyncio.get_running_loop().create_task(self.bus.unsubscribe_partitions(gone))
            self._background.add(task)
            task.add_done_callback(self._one_off_done)
        log.info("partitions given up", reason=reason, partitions=sorted(gone), runs=len(lost))

    def _one_off_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background step failed", task=task.get_name(), error=repr(task.exception()))

    def _cluster_status(self) -> ClusterStatus | None:
        if self.cluster is None:
            return None
        return msgspec.structs.replace(self.cluster.status(), subscribed=self.bus.partition_subscriptions)

    async def _on_partitions_acquired(self, partitions: list[int]) -> None:
        """With the broker's partition mapping, start taking the new partitions' messages."""
        cluster = self.config.cluster
        if not cluster.mapped_prefix:
            return
        for partition in partitions:
            await self.bus.subscribe_partition(
                partition, cluster.mapped_prefix, cluster.partitions, self._on_raw
            )
        if self.bus.nc is not None:
            await self.bus.nc.flush()

    def _on_ack(self, run_id: str, ack: CommandAck, subject: str) -> Rejection | None:
        """Settle the command an ack answers, matched on (run, command id)."""
        command = self.scheduler.note_ack(run_id, ack.command_id, ack.status is AckStatus.APPLIED)
        if command is None:
            if self.scheduler.is_pending(ack.command_id):  # pending for another run: never settled from here
                detail = f"command {ack.command_id!r} was not sent to run {run_id!r}"
                return self.intake.reject("ack_run_mismatch", detail, subject, run_id)
            return None  # late (after the timeout), duplicated, or never ours: the scheduler counted it
        if self.scheduler.is_queued(run_id):  # the answer freed a decision the run was held back from
            self.decisions.wake()
        applied = ack.status is AckStatus.APPLIED
        self.recorder.on_ack(run_id, ack.command_id, applied=applied)
        self.analyzer.note_ack(
            run_id,
            command.layer_id,
            Op(command.op),
            applied,
            blueprint=Blueprint(command.blueprint) if command.blueprint else None,
            timestamp=ack.timestamp,
        )
        if ack.status is AckStatus.REJECTED:
            if command.op == Op.GERMINATE.value and self.decisions.rails is not None:
                self.decisions.rails.note_rejected(run_id, command.layer_id)
            log.info(
                "command rejected by host",
                run_id=run_id,
                command_id=ack.command_id,
                op=command.op,
                layer_id=command.layer_id,
                reason=ack.reason,
            )
        return None

    def _decidable(self, run_id: str) -> bool:
        """Tracked and not finished: a decision for it may go out and be recorded."""
        return self.runs.is_active(run_id) and run_id in self.analyzer

    def _observe(self, run_ids: Sequence[str]) -> list[Observation | None]:
        """The decidable runs' observations, built together; None for a dropped or finished run."""
        decidable = [run_id for run_id in run_ids if self._decidable(run_id)]
        built = dict(zip(decidable, self.analyzer.observe_many(decidable), strict=True))
        return [built.get(run_id) for run_id in run_ids]

    async def _report_blocked(self, decision: Decision, block: Block) -> None:
        """Tell `esperd watch` (on esperd.blocked) of a decision a rail kept from its host."""
        if self.bus.connected:
            report = {
                "run_id": decision.run_id,
                "layer_id": decision.layer_id,
                "op": decision.op.value,
                "rail": block.rail.value,
                "detail": block.detail,
                "policy": decision.policy,
                "policy_version": decision.policy_version,
                "confidence": round(decision.confidence, 4),
                "urgency": round(decision.urgency, 4),
            }
            await self.bus.publish_json(BLOCKED_SUBJECT, self._json.encode(report))

    async def _report(self, rejection: Rejection) -> None:
        if self.intake.should_report(rejection) and self.bus.connected:
            await self.bus.publish_json(REJECTED_SUBJECT, self._json.encode(rejection))

    # --------------------------------------------------------------- status

    def status(self) -> Status:
        """A snapshot of counters and health: each part reports its own section."""
        intake = self.intake
        decisions = self.decisions.stats
        return Status(
            version=esperd.__version__,
            uptime_s=round(time.monotonic() - self.started_at, 3),
            runs=len(self.runs),
            accepted_total=intake.accepted_total,
            rejected_total=intake.rejected_total,
            rejected_by_reason=dict(intake.rejected_by_reason),
            accepted_by_kind=dict(intake.accepted_by_kind),
            commands_total=decisions.commands,
            acks_by_status=dict(self.scheduler.acks_by_status),
            policy=PolicyStatus(
                self.decisions.policy.name, self.decisions.policy.version, self.policy_fallback_reason
            ),
            decisions=decisions,
            scheduler=self.scheduler.status(),
            nats=self.bus.status(),
            evicted_runs=self.runs.dropped_total,
            experience=self.recorder.stats(),
            stopping=self._stopping,
            learner=self._learner_status(),
            cluster=self._cluster_status(),
            run_table=self.runs.status(),
            tasks=self.supervisor.status(),
            reload=msgspec.structs.replace(self.reload_status),
            instance=self.instance,
            rails=self.decisions.rails.status() if self.decisions.rails is not None else None,
            analysis=self.analyzer.analysis(),
        )

    def _learner_status(self) -> LearnerStatus | None:
        return self.learner.status if self.learner is not None else None

    async def _on_status(self, request: Request) -> None:
        await request.respond(self._json.encode(self.status()), headers={"Content-Type": "application/json"})

    async def _housekeeping_loop(self) -> None:
        """Drop finished and idle runs and expire unanswered commands, once a second."""
        while True:
            await asyncio.sleep(1.0)
            self.housekeeping()

    def housekeeping(self) -> None:
        self.scheduler.expire_pending()
        dropped = self.runs.expire()
        if dropped:
            by_reason = Counter(reason.value for _, reason in dropped)
            log.info("runs dropped", runs=len(dropped), **by_reason)

    async def _status_log_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.service.status_interval_s)
            s = self.status()
            log.info(
                "status",
                runs=s.runs,
                accepted=s.accepted_total,
                rejected=s.rejected_total,
                commands=s.commands_total,
                connected=s.nats.connected,
            )


# How much the message handler may take in before it lets the event loop (and nats-py's reader)
# run: nats-py's read size in bytes, or a millisecond (see _on_raw).
YIELD_EVERY_BYTES = 32 * 1024
YIELD_EVERY_S = 0.001
# How long queued health may wait while messages keep coming (see _apply_health).
APPLY_EVERY_S = 0.002

# NATS counts headers in max_payload, esperd's limit counts the payload alone: room for the
# Content-Type header (and a few more), so a payload just over the limit still reaches esperd
# and is refused and counted as too_large there.
HEADER_ALLOWANCE = 4096


def embedded_max_payload(limit: int) -> int:
    """The embedded broker's max_payload for esperd's `limits.max_payload_bytes`."""
    return min(limit + HEADER_ALLOWANCE, MAX_NATS_PAYLOAD)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def configure_torch_threads(threads: int) -> None:
    """Set torch's intra-op thread count (0 = half the cores, at least one)."""
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))


def resolve_device(name: str) -> str:
    """`auto` means the first CUDA device when there is one, else the CPU."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
