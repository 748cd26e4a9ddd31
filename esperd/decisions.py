"""The decision loop: due runs -> one batched policy forward -> commands.

Knows the scheduler, the analyzer's Observation and the PolicyBundle protocol, and
nothing of NATS: observing a run and publishing a command are injected callables.
The policy's forward runs on one dedicated worker thread; the event loop only
awaits it, so ingestion keeps flowing while a batch is being decided.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import msgspec
import structlog

from esperd.analyzer.masks import mask_cooling
from esperd.analyzer.observation import OP_INDEX, Observation
from esperd.policy.base import Action, ActResult, Decision, PolicyBundle
from esperd.rails import Block, Rails, forced_wait
from esperd.scheduler import Scheduler
from esperd_contracts import AdaptationCommand, Op
from esperd_contracts.status import DecisionStats

log = structlog.get_logger("esperd.decisions")

WAIT_INDEX = OP_INDEX[Op.WAIT]
#: A WAIT carries no levers.
_NO_LEVERS: dict[str, None] = {
    name: None
    for name in (
        "blueprint",
        "blend",
        "tempo",
        "dwell_epochs",
        "isolation",
        "lr_multiplier",
        "steepness",
        "alpha_target",
        "alpha_speed",
        "alpha_curve",
    )
}

#: Observations of the given runs, in order; None for a run that is unknown or finished. One call
#: per batch, so the analyzer can build them in one vectorized pass.
Observe = Callable[[Sequence[str]], Sequence[Observation | None]]
Publish = Callable[[AdaptationCommand], Awaitable[None]]
OnDecided = Callable[[Sequence[Observation], ActResult, PolicyBundle], None]
#: The ownership epoch under which this instance may command a run right now; None: it may not.
EpochOf = Callable[[str], int | None]
#: Told of every decision a rail blocked (for `esperd watch`): the blocked decision and why.
OnBlocked = Callable[[Decision, Block], Awaitable[None]]


def unfenced(run_id: str) -> int:
    """A single instance owns every run, under epoch 0."""
    return 0


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of samples; 0 for none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    # ceil(q/100 * n), computed as q * n / 100 so that whole ranks stay exact (q=99, n=100 -> 99).
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered) / 100) - 1))
    return ordered[rank]


class DecisionLoop:
    """Micro-batches due runs across all runs and decides them in one forward pass."""

    def __init__(
        self,
        scheduler: Scheduler,
        policy: PolicyBundle,
        observe: Observe,
        publish: Publish,
        *,
        deterministic: bool = False,
        on_decided: OnDecided | None = None,
        observe_latency: Callable[[float], None] | None = None,
        epoch_of: EpochOf = unfenced,
        clock: Callable[[], float] = time.monotonic,
        rails: Rails | None = None,
        on_blocked: OnBlocked | None = None,
        tracked: Callable[[str], bool] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.policy = policy
        self.observe = observe
        self.publish = publish
        self.deterministic = deterministic
        self.on_decided = on_decided
        self.observe_latency = observe_latency  # seconds from due to published, per command (metrics)
        self.epoch_of = epoch_of
        self.rails = rails
        self.on_blocked = on_blocked
        # Whether a run is still tracked: one dropped while its batch was decided (evicted, done)
        # gets neither a command nor a recorded step, which would outlive it.
        self.tracked = tracked
        self._stats = DecisionStats()
        self._clock = clock
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esperd-policy")
        self._forward_ms: collections.deque[float] = collections.deque(maxlen=1024)
        self._latency_ms: collections.deque[float] = collections.deque(maxlen=1024)
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=1024)
        self._busy = asyncio.Lock()

    @property
    def stats(self) -> DecisionStats:
        """Counters, with the percentiles and mean brought up to date (computed on read, not per batch)."""
        stats = self._stats
        stats.batch_size_mean = round(statistics.fmean(self._batch_sizes), 2) if self._batch_sizes else 0.0
        stats.forward_ms_p50 = round(percentile(self._forward_ms, 50), 3)
        stats.forward_ms_p99 = round(percentile(self._forward_ms, 99), 3)
        stats.latency_ms_p50 = round(percentile(self._latency_ms, 50), 3)
        stats.latency_ms_p99 = round(percentile(self._latency_ms, 99), 3)
        return stats

    def wake(self) -> None:
        """Tell the loop the due set changed."""
        self._wake.set()

    def swap_policy(self, policy: PolicyBundle) -> None:
        """Serve `policy` from the next batch on; a batch in flight finishes on the old one."""
        self.policy = policy

    async def run(self) -> None:
        """Decide forever (until cancelled). It may be run again after it raised; see `close`."""
        while True:
            await self._wait_for_batch()
            await self.decide_once()

    def close(self) -> None:
        """Release the policy's worker thread (after the last batch)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def finish_in_flight(self) -> None:
        """Wait for the batch being decided, if any (used on shutdown)."""
        async with self._busy:
            return

    async def decide_once(self) -> int:
        """Decide every run due now (one batch); returns how many commands went out."""
        async with self._busy:
            now = self._clock()
            due = self.scheduler.take_batch(now)
            observations = self._observations([run_id for run_id, _ in due], now)
            if not observations:
                return 0
            due_at = dict(due)
            policy = self.policy  # one version decides the whole batch, even if a swap lands now
            started = time.perf_counter()
            try:
                if policy.runs_inline:
                    result = policy.act(observations, self.deterministic)
                else:
                    result = await asyncio.get_running_loop().run_in_executor(
                        self._executor, policy.act, observations, self.deterministic
                    )
            except Exception:
                self._stats.failures += 1
                log.exception("policy act failed", policy=policy.name, batch=len(observations))
                return 0
            self._note_forward((time.perf_counter() - started) * 1e3, len(observations))
            observations, result = self._still_tracked(observations, result)
            if not observations:
                return 0
            recorded, result, blocked = self._apply_rails(observations, result, now)
            if self.on_decided is not None:
                try:
                    self.on_decided(recorded, result, policy)
                except Exception:  # recording must never cost the decisions themselves
                    log.exception("decision hook failed")
            sent = await self._publish_decisions(result.decisions, due_at, observations, now)
            await self._report_blocked(blocked)
            return sent

    def _still_tracked(
        self, observations: list[Observation], result: ActResult
    ) -> tuple[list[Observation], ActResult]:
        """The batch without the runs dropped while it was being decided (counted as `dropped`)."""
        if self.tracked is None:
            return observations, result
        keep = [i for i, obs in enumerate(observations) if self.tracked(obs.run_id)]
        if len(keep) == len(observations):
            return observations, result
        self._stats.dropped += len(observations) - len(keep)
        return [observations[i] for i in keep], result.rows(keep)

    async def _report_blocked(self, blocked: list[tuple[Decision, Block]]) -> None:
        if self.on_blocked is None:
            return
        for decision, block in blocked:
            try:
                await self.on_blocked(decision, block)
            except Exception:  # a report must never cost the decisions themselves
                log.exception("blocked-decision report failed")

    def _apply_rails(
        self, observations: list[Observation], result: ActResult, now: float
    ) -> tuple[list[Observation], ActResult, list[tuple[Decision, Block]]]:
        """Every policy's decisions through the rails, in this one place: a blocked decision becomes
        the forced WAIT that was done (esperd.rails), in what is published and in what is recorded.
        Returns what to record, the result to publish, and each blocked decision with its rail."""
        rails = self.rails
        if rails is None:
            return observations, result, []
        blocked: list[tuple[int, Block]] = []
        for i, (obs, decision) in enumerate(zip(observations, result.decisions, strict=True)):
            block = rails.check(
                obs, decision.action.node, decision.op, decision.confidence, decision.urgency, now
            )
            if block is not None:
                blocked.append((i, block))
        blocked += self._allot_pool(observations, result.decisions, {i for i, _ in blocked})
        if not blocked:
            return observations, result, []
        recorded = list(observations)
        decisions = list(result.decisions)
        rows = [i for i, _ in blocked]  # one indexed write per tensor: torch's per-item writes are slow
        actions = result.actions.clone()
        actions[rows] = 0  # node 0, WAIT: the one action a forced-WAIT observation allows
        actions[rows, 1] = WAIT_INDEX
        log_probs = result.log_probs.clone()
        log_probs[rows] = 0.0  # its probability is 1, under any weights
        for i, block in blocked:
            rails.count_block(block)
            original = decisions[i]
            recorded[i] = forced_wait(observations[i])
            decisions[i] = msgspec.structs.replace(
                original,
                layer_id=int(observations[i].layer_ids[0]),
                op=Op.WAIT,
                action=Action(0, WAIT_INDEX),
                log_prob=0.0,
                reason=(
                    f"{original.op.value} layer {original.layer_id} blocked by rail {block.rail}: "
                    f"{block.detail}"
                ),
                **_NO_LEVERS,
            )
        replaced = dataclasses.replace(result, actions=actions, log_probs=log_probs, decisions=decisions)
        return recorded, replaced, [(result.decisions[i], block) for i, block in blocked]

    def _allot_pool(
        self, observations: list[Observation], decisions: list[Decision], blocked: set[int]
    ) -> list[tuple[int, Block]]:
        """The germinations the shared seed pool has no seed left for (the rails choose which)."""
        assert self.rails is not None
        wanting = [i for i, d in enumerate(decisions) if d.op is Op.GERMINATE and i not in blocked]
        if not wanting:
            return []
        losers = self.rails.allot_pool(
            [(observations[i], decisions[i].confidence, decisions[i].urgency) for i in wanting]
        )
        return [(wanting[k], self.rails.pool_block()) for k in losers]

    def _observations(self, runs: list[str], now: float) -> list[Observation]:
        # A run no longer ours is another instance's to decide, whatever it was due for.
        ours = [run_id for run_id in runs if self.epoch_of(run_id) is not None]
        observations = []
        for run_id, obs in zip(ours, self.observe(ours), strict=True):
            if obs is None or obs.num_nodes == 0:
                continue  # unknown, finished, or no layers yet: nothing to decide
            obs = mask_cooling(obs, self.scheduler.cooling_layers(run_id, now))
            observations.append(obs if self.rails is None else self.rails.mask(obs, now))
        return observations

    async def _publish_decisions(
        self,
        decisions: list[Decision],
        due_at: dict[str, float],
        observations: Sequence[Observation] = (),
        now: float = 0.0,
    ) -> int:
        sent = 0
        stats = self._stats
        deadline_ms = self.scheduler.config.decision_deadline_ms
        for i, decision in enumerate(decisions):
            stats.decisions += 1
            if decision.op is Op.WAIT:
                stats.waits += 1
                continue
            # Checked again per command: a run can be dropped while an earlier command of this batch
            # is published, and a command noted for it now would outlive it (in the rails, a seed
            # pool slot held forever; in the scheduler, a pending command).
            if self.tracked is not None and not self.tracked(decision.run_id):
                stats.dropped += 1
                continue
            # Checked again now, after the forward pass: a freeze (or a lost lease) during it must
            # not let a command out under an ownership this instance no longer has.
            epoch = self.epoch_of(decision.run_id)
            if epoch is None:
                stats.fenced += 1
                continue
            limit = 0
            if self.rails is not None and i < len(observations):
                limit = self.rails.note_sent(observations[i], decision.action.node, decision.op, now)
            command = to_command(decision, epoch, max_seed_params=limit)
            self.scheduler.note_command(
                command.command_id,
                command.run_id,
                command.layer_id,
                command.op.value,
                blueprint=command.blueprint.value if command.blueprint is not None else "",
            )
            await self.publish(command)
            sent += 1
            by_op = stats.commands_by_op
            by_op[command.op.value] = by_op.get(command.op.value, 0) + 1
            latency_ms = (self._clock() - due_at.get(decision.run_id, self._clock())) * 1e3
            self._latency_ms.append(latency_ms)
            if self.observe_latency is not None:
                self.observe_latency(latency_ms / 1e3)
            if latency_ms > deadline_ms:
                stats.late += 1
        stats.commands += sent
        return sent

    def _note_forward(self, ms: float, batch: int) -> None:
        self._forward_ms.append(ms)
        self._batch_sizes.append(batch)
        stats = self._stats
        stats.batches += 1
        stats.last_batch_size = batch
        stats.batch_size_max = max(stats.batch_size_max, batch)

    async def _wait_for_batch(self) -> None:
        """Return once some run is due and either the batch is full or it has waited max_wait_ms."""
        config = self.scheduler.config
        while True:
            first = self.scheduler.next_due_at()
            now = self._clock()
            if first is None:
                await self._sleep_until_woken(None)
                continue
            if first > now:
                await self._sleep_until_woken(first - now)
                continue
            deadline = first + config.max_wait_ms / 1e3
            full = config.max_batch
            while self.scheduler.ready_count(at_most=full) < full and self._clock() < deadline:
                await self._sleep_until_woken(deadline - self._clock())
            return

    async def _sleep_until_woken(self, delay_s: float | None) -> None:
        """Sleep `delay_s` (None: until woken), returning early on wake()."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._wake.wait()


def to_command(decision: Decision, epoch: int = 0, max_seed_params: int = 0) -> AdaptationCommand:
    """The wire command for a (non-WAIT) decision, under ownership `epoch` (a GERMINATE carries
    `max_seed_params`, the rails' limit)."""
    germinate = decision.op is Op.GERMINATE
    alpha = decision.op is Op.SET_ALPHA_TARGET
    return AdaptationCommand(
        command_id=uuid.uuid4().hex,
        run_id=decision.run_id,
        layer_id=decision.layer_id,
        op=decision.op,
        confidence=published_unit(decision.confidence),
        urgency=published_unit(decision.urgency),
        policy=decision.policy,
        policy_version=decision.policy_version,
        issued_at=time.time(),
        blueprint=decision.blueprint if germinate else None,
        blend=decision.blend if germinate else None,
        tempo=decision.tempo if germinate else None,
        dwell_epochs=decision.dwell_epochs if germinate else None,
        isolation=decision.isolation if germinate else None,
        lr_multiplier=decision.lr_multiplier if germinate else None,
        steepness=decision.steepness if germinate else None,
        # A host needs a target: without one from the policy, a full blend (the host ramps to it
        # over the rest of the tempo, or as alpha_speed and alpha_curve say).
        alpha_target=(1.0 if decision.alpha_target is None else decision.alpha_target) if alpha else None,
        alpha_speed=decision.alpha_speed if alpha else None,
        alpha_curve=decision.alpha_curve if alpha else None,
        reason=decision.reason or describe(decision),
        epoch=epoch,
        max_seed_params=max_seed_params if germinate else 0,
    )


def _optional_levers(decision: Decision) -> str:
    """The optional levers a decision sets, as ", dwell 3, shared, lr x2" (empty when none)."""
    parts = []
    if decision.dwell_epochs is not None:
        parts.append(f"dwell {decision.dwell_epochs}")
    if decision.isolation is not None:
        parts.append(decision.isolation.value)
    if decision.lr_multiplier is not None:
        parts.append(f"lr x{decision.lr_multiplier:g}")
    if decision.steepness is not None:
        parts.append(f"steepness {decision.steepness:g}")
    if decision.alpha_speed is not None:
        parts.append(f"{decision.alpha_speed.value} speed")
    if decision.alpha_curve is not None:
        parts.append(f"{decision.alpha_curve.value} curve")
    return "".join(f", {p}" for p in parts)


def published_unit(value: float) -> float:
    """A policy's [0, 1] score as published: clamped, rounded to 4 decimals.

    A float32 score printed as a double reads 0.699999988; the policy means 0.7.
    """
    return round(min(1.0, max(0.0, float(value))), 4)


def describe(decision: Decision) -> str:
    """A one-line human-readable account of a decision."""
    levers = ""
    if decision.op is Op.GERMINATE and decision.blueprint is not None:
        blend = decision.blend.value if decision.blend else "-"
        tempo = decision.tempo.value if decision.tempo else "-"
        levers = f" with {decision.blueprint.value} ({blend}, {tempo}{_optional_levers(decision)})"
    elif decision.op is Op.SET_ALPHA_TARGET:
        target = 1.0 if decision.alpha_target is None else decision.alpha_target
        levers = f" to {target:g}{_optional_levers(decision)}"
    return (
        f"{decision.op.value} layer {decision.layer_id}{levers}: "
        f"{decision.policy} v{decision.policy_version}, "
        f"confidence {decision.confidence:.2f}, urgency {decision.urgency:.2f}"
    )
