"""The learner: turns recorded experience into new serving weights.

Its updates run in a niced child process by default (`[learner] worker = "process"`, see
esperd.learn.worker: the learner's Python then never holds the daemon's GIL), or on a worker
thread. The event loop keeps the buffers and the breaker, hands the worker batches and swaps
the resulting weights in. A swap replaces the serving PolicyBundle object as a whole (a
reference assignment on the loop thread), so a batch in flight finishes on the version it
started with and every later batch sees the new one. IMPALA, which updates many times a
second, swaps at most once per `swap_min_interval_s` (the newest sound weights; training
goes on in between); PPO swaps after every update (its next rollout must be on-policy).

Safety: a non-finite loss or gradient, a KL far above target, non-finite weights, or a clear
reward drop after a swap is a failure: it rolls the learner back to the last good weights at
once (a policy that produced NaN is never served). The circuit breaker (esperd.learn.breaker,
seed document 002) counts failures: `failure_threshold` within `window_s` open it and pause
learning for `recovery_s`; then one probe update runs (half-open), and closes it if sound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np
import structlog

from esperd.learn import checkpoints
from esperd.learn.algorithms import Algorithm, Sample, make_algorithm
from esperd.learn.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from esperd.learn.budgets import BudgetWatch
from esperd.learn.bundles import BundlePool
from esperd.learn.config import LearnerConfig
from esperd.learn.experience import Transition
from esperd.learn.impala import ImpalaUpdater
from esperd.learn.ppo import NonFiniteError, PPOUpdater, UpdateStats
from esperd.learn.worker import (
    Slots,
    State,
    ThreadWorker,
    TrainerSpec,
    Worker,
    WorkerDied,
    WorkerError,
    clone_state,
    make_worker,
)
from esperd.policy.base import PolicyBundle
from esperd_contracts.status import LearnerStatus

log = structlog.get_logger("esperd.learn")

PolicyFactory = Callable[[], PolicyBundle]


Swap = Callable[[PolicyBundle], None]


class Learner:
    """Owns the buffers, the breaker and the serving policy; its worker owns the training copy
    of the policy and the optimizer (in a child process by default, see esperd.learn.worker)."""

    def __init__(
        self,
        config: LearnerConfig,
        make_policy: PolicyFactory,
        serving: PolicyBundle,
        swap: Swap,
        state_dir: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """With the process worker, `make_policy` must pickle (a module-level function or a
        functools.partial of one) and the Learner must be built on the event loop's thread."""
        if config.algorithm == "off":
            raise ValueError("learner algorithm is off")
        if not serving.is_learnable:
            raise ValueError(f"policy {serving.name!r} is not learnable; serve gnn or lstm to learn")
        self._config = config
        self._make_policy = make_policy
        self._swap = swap
        self._clock = clock
        self.state_dir = state_dir
        self.serving = serving
        self._good = clone_state(serving.state_dict())
        self._good_version = serving.version
        spec = TrainerSpec(make_policy, config.algorithm, config.ppo, config.impala)
        self.worker: Worker = make_worker(
            config.worker, spec, self._good, serving.version, nice=config.worker_nice
        )
        # The loop side of PPO or IMPALA: its buffer, when an update is due, how a batch is drawn.
        self.algorithm: Algorithm = make_algorithm(config)
        self._counters = LearnerStatus(
            algorithm=config.algorithm,
            serving_version=serving.version,
            worker=self.worker.mode,
            worker_pid=self.worker.pid,
        )
        # One thread that waits on the worker process (or, in thread mode, runs the update).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esperd-learner")
        self._wake = asyncio.Event()
        self._paused_until = 0.0  # a failed worker's restart backoff
        self.budgets = BudgetWatch(config.budgets, clock)
        self._update_seconds: collections.deque[float] = collections.deque(maxlen=1024)
        breaker = config.breaker
        self.breaker = CircuitBreaker(
            BreakerPolicy(
                failure_threshold=breaker.failure_threshold,
                window_s=breaker.window_s,
                recovery_s=breaker.recovery_s,
            ),
            clock,
        )
        self._updating = False  # an update is running on the worker
        self._inflight: asyncio.Future[tuple[UpdateStats, PolicyBundle | None]] | None = None
        self._stopping = False
        self._save_lock = threading.Lock()
        # The worker holds sound weights newer than what serves, held back by swap coalescing
        # (fetched from it when their turn comes).
        self._held_back = False
        self.bundles = BundlePool()  # bundles that served before, for reuse by a later swap
        self._last_swap = -math.inf
        self._failures_in_a_row = 0  # worker failures since the last sound update
        window = config.breaker.reward_window
        self._good_rewards: collections.deque[float] = collections.deque(maxlen=window)
        self._recent_rewards: collections.deque[float] = collections.deque(maxlen=window)
        self._next_checkpoint = clock() + config.checkpoint_interval_s
        self._checkpoint_failures_in_a_row = 0
        # Bumped whenever the weights an update started from stop being the ones to train on (a
        # breaker trip, a checkpoint adopted on reload): that update's result is void.
        self._lineage = 0
        self._started = clock()

    @property
    def config(self) -> LearnerConfig:
        return self._config

    @config.setter
    def config(self, config: LearnerConfig) -> None:
        """A replaced config reaches the algorithm too (it reads its knobs at each use)."""
        self._config = config
        self.algorithm.config = config

    @property
    def status(self) -> LearnerStatus:
        """The `learner` section of `esperd.status`: counters, buffer, serving version, breaker."""
        breaker = self.breaker
        state = breaker.state
        last = breaker.last_transition
        return msgspec.structs.replace(
            self._counters,
            buffered=self.buffered(),
            serving_version=self.serving.version,
            breaker=state.value,
            trips=breaker.transitions["closed->open"] + breaker.transitions["half_open->open"],
            failures=breaker.failures_total,
            failures_in_window=breaker.failures_in_window,
            last_failure=breaker.last_failure,
            breaker_transitions=dict(breaker.transitions),
            last_transition="" if last is None else f"{last.old}->{last.new}: {last.reason}",
            breaker_reopens_in_s=round(breaker.reopens_in_s, 3),
            budget_violations=dict(self.budgets.violations),
            budget_worst_ms={k: round(v, 3) for k, v in self.budgets.worst_ms.items()},
            update_ms_p95=round(_p95(self._update_seconds) * 1e3, 3),
        )

    @property
    def trainee(self) -> PolicyBundle:
        """The training copy of the policy (thread worker only; a process worker keeps it in the child)."""
        return self._thread_worker().trainer.trainee

    @property
    def updater(self) -> PPOUpdater | ImpalaUpdater:
        """The PPO/IMPALA updater: the gradient math and the optimizer (thread worker only)."""
        return self._thread_worker().trainer.updater

    def _thread_worker(self) -> ThreadWorker:
        if isinstance(self.worker, ThreadWorker):
            return self.worker
        # AttributeError, not TypeError: to callers these are attributes a process worker lacks.
        raise AttributeError("the trainee and optimizer live in the learner's worker process")

    def close(self) -> None:
        """Stop the worker process (after the final checkpoint, which needs its optimizer state)."""
        self._stopping = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.worker.close()

    # -------------------------------------------------------------- intake

    def add(self, transition: Transition) -> None:
        """A sink for the recorder (event loop thread)."""
        self._note_reward(transition)
        self.algorithm.add(transition)
        if self.algorithm.update_due():
            self._wake.set()

    # -------------------------------------------------------------- the loop

    async def run(self) -> None:
        """Update whenever enough fresh experience is in, until quiesced or cancelled.

        It may be run again after it raised (the service's supervisor restarts it); the
        executor stays open until `close`.
        """
        while not self._stopping:
            await self._wait_for_work()
            if self._stopping:
                break
            if self._held_back and self._swap_due():
                await self._serve_latest()  # held-back weights whose turn came with no update
            if self.paused:
                await asyncio.sleep(self._pause_left())
                self._wake.set()  # look again after the pause, even if no new step arrives
                continue
            if self.algorithm.update_due():
                await self.update_once()
                if self.algorithm.keeps_learning and self.algorithm.update_due():
                    self._wake.set()  # off-policy: keep learning while data is plentiful
            if self._clock() >= self._next_checkpoint:
                await self.checkpoint()

    async def _wait_for_work(self) -> None:
        """Until woken, or until held-back weights are due to swap in, or a failed checkpoint's retry."""
        timer = None
        deadlines = []
        if self._held_back:
            deadlines.append(self._last_swap + self.config.swap_min_interval_s)
        if self._checkpoint_failures_in_a_row:
            deadlines.append(self._next_checkpoint)  # retried even if no new experience comes in
        if deadlines:
            # A timer that sets the event, not asyncio.wait_for: in 3.11 that can swallow a
            # cancellation that lands as the wait ends, and the learner would not stop.
            delay = max(min(deadlines) - self._clock(), 0.0)
            timer = asyncio.get_running_loop().call_later(delay, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()
        self._wake.clear()
        await asyncio.sleep(0)  # Event.wait does not yield when already set: never spin

    async def quiesce(self) -> None:
        """Start no more updates and let the one in flight finish (before the final checkpoint)."""
        self._stopping = True
        self._wake.set()  # let run() see it and return
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(inflight)

    @property
    def paused(self) -> bool:
        """No update now: the breaker is open, or a failed worker's restart backs off."""
        return self._clock() < self._paused_until or self.breaker.state is BreakerState.OPEN

    def _pause_left(self) -> float:
        return max(self._paused_until - self._clock(), self.breaker.reopens_in_s, 0.0)

    async def update_once(self) -> bool:
        """One update off the loop, then a swap if it was sound and due. True if a new version serves."""
        if self._stopping or not self.breaker.allow():  # open; or half-open with its probe out
            return False
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        sample = self.algorithm.take()  # on the loop thread: the buffers are only ever touched from here
        if not sample.batch:
            self.breaker.release_probe()
            return False
        self.budgets.observe("processing", (time.perf_counter() - started) * 1e3)
        try:
            return await self._update(loop, sample)
        finally:
            elapsed = time.perf_counter() - started
            self.budgets.observe("step", elapsed * 1e3)
            self._update_seconds.append(elapsed)

    async def _update(self, loop: asyncio.AbstractEventLoop, sample: Sample) -> bool:
        """update_once's update of a taken batch: train on the worker, judge, swap."""
        batch, weights, slots = sample.batch, sample.weights, sample.slots
        lineage = self._lineage
        self._updating = True
        try:
            self._inflight = loop.run_in_executor(self._executor, self._train, batch, weights, slots)
            stats, candidate = await self._inflight
        except NonFiniteError as exc:
            self._updating = False
            self._trip(f"non-finite update: {exc}")
            return False
        except (WorkerDied, WorkerError) as exc:
            self._updating = False
            self.breaker.release_probe()  # no verdict on the weights: a worker fault, not a failed update
            self._worker_failed(exc)
            return False
        finally:
            self._updating = False
        if self._lineage != lineage:
            # The breaker tripped (a reward drop) or new weights were adopted while this update ran:
            # its result is void, and the trainee, which the worker was still changing, goes back
            # to the good weights now.
            self.breaker.release_probe()
            self._reset_trainee()
            return False
        self.budgets.observe("batch", stats.seconds * 1e3)
        self.algorithm.after_update(sample, stats)
        self._note_stats(stats, len(batch))
        kl_limit = self.algorithm.kl_limit
        if not math.isfinite(stats.approx_kl) or stats.approx_kl > kl_limit:
            self._trip(f"KL {stats.approx_kl:.4f} > {kl_limit:.4f}")
            return False
        self._failures_in_a_row = 0
        self._breaker_success()
        if candidate is None:
            self._held_back = True  # the newest weights swap in once the interval has passed
            return False
        self._serve_new(candidate)
        return True

    def _train(
        self, batch: list[Transition], weights: np.ndarray | None, slots: Slots | None
    ) -> tuple[UpdateStats, PolicyBundle | None]:
        """Executor thread: one update on the worker, and the next serving bundle on its new
        weights if a swap is due (else the weights stay in the worker until one is)."""
        swap = self._swap_due()
        stats, state = self.worker.update(batch, weights, with_state=swap, slots=slots)
        return stats, self._build(state) if state is not None else None

    def _swap_due(self) -> bool:
        return self.algorithm.swap_due(self._clock() - self._last_swap)

    def _build(self, state: State) -> PolicyBundle:
        """A serving bundle on `state`, not serving now (its version is set when it is served)."""
        candidate = self.bundles.reusable()
        if candidate is None:
            candidate = self._make_policy()
        else:
            self._counters.bundles_reused += 1
        candidate.load_state_dict(state)
        return candidate

    async def _serve_latest(self) -> None:
        """Swap in held-back weights (their interval passed and no update brought newer ones)."""
        lineage = self._lineage
        loop = asyncio.get_running_loop()
        try:
            candidate = await loop.run_in_executor(self._executor, self._build_from_worker)
        except (WorkerDied, WorkerError) as exc:
            self._worker_failed(exc)
            return
        if self._lineage == lineage and self._held_back:  # not voided by a trip or an adoption meanwhile
            self._serve_new(candidate)

    def _build_from_worker(self) -> PolicyBundle:
        return self._build(self.worker.weights())

    def _serve_new(self, candidate: PolicyBundle) -> None:
        candidate.version = self.serving.version + 1
        self._held_back = False
        self._serve(candidate)

    def _serve(self, candidate: PolicyBundle) -> None:
        # The pause is the hand-over alone, the only moment a batch could wait on a swap; the
        # bookkeeping after it runs while the decision loop already serves the new bundle.
        previous, self.serving = self.serving, candidate
        started = time.perf_counter()
        self._swap(candidate)
        pause_us = (time.perf_counter() - started) * 1e6
        self.algorithm.on_serve(candidate.version)
        self._last_swap = self._clock()
        self._counters.swaps += 1
        self._counters.swap_pause_us_max = round(max(self._counters.swap_pause_us_max, pause_us), 1)
        self._counters.serving_version = candidate.version
        log.info("policy swapped", version=candidate.version, pause_us=round(pause_us, 1))
        self.bundles.retire(previous)

    def adopt(self, bundle: PolicyBundle) -> None:
        """Serve weights from outside (a checkpoint reloaded on SIGHUP) as the next version.

        They become the good weights and the trainee's (fresh optimizer moments); an update in
        flight, trained from the old weights, is void; PPO's rollout restarts on them.
        """
        bundle.version = self.serving.version + 1
        self._lineage += 1
        self._held_back = False
        self._good = clone_state(bundle.state_dict())
        self._good_version = bundle.version
        self._good_rewards.clear()
        self._recent_rewards.clear()
        self._serve(bundle)
        if not self._updating:
            self._reset_trainee()  # else update_once does it when the void update returns

    def _worker_failed(self, exc: Exception) -> None:
        """The worker process died or failed: restart it on the last good weights; never crash.

        Its optimizer moments and counters are lost (the next checkpoint saves the new ones).
        Failures in a row pause learning 1, 2, 4 ... s (at most `recovery_s`), so a child that
        cannot live does not respawn in a loop.
        """
        self._failures_in_a_row += 1
        self._counters.worker_deaths += 1
        self._counters.last_worker_error = str(exc)
        self._held_back = False
        pause_s = min(2.0 ** (self._failures_in_a_row - 1), max(self.config.breaker.recovery_s, 1.0))
        self._paused_until = max(self._paused_until, self._clock() + pause_s)
        log.error(
            "learner worker failed; restarting it on the last good weights",
            error=str(exc),
            failures_in_a_row=self._failures_in_a_row,
            pause_s=pause_s,
            good_version=self._good_version,
        )
        try:
            self.worker.restart(self._good, self.serving.version)
        except OSError as err:  # e.g. out of processes: the next failure tries again
            log.error("learner worker restart failed", error=str(err))
        self._counters.worker_pid = self.worker.pid

    # -------------------------------------------------------------- breaker

    def _breaker_success(self) -> None:
        before = self.breaker.state
        self.breaker.record_success()
        if before is not self.breaker.state:
            log.info("learner circuit breaker closed: the probe update was sound")

    def _trip(self, why: str) -> None:
        """A failed update: roll the trainee (and, if it is bad, the serving policy) back to the last
        good weights at once, and count the failure on the breaker (which may open and pause learning).

        Synchronous, on the loop thread: a later step judged in the same batch sees the trip done.
        While an update runs on the worker, the trainee is left to `update_once`, which voids it.
        """
        before = self.breaker.state
        state = self.breaker.record_failure(why)
        if state is BreakerState.OPEN and before is not BreakerState.OPEN:
            self._counters.last_trip = why
        self._lineage += 1
        self._held_back = False  # held-back weights came from the rejected trajectory
        if not self._updating:
            self._reset_trainee()
        if self.serving.version != self._good_version:
            restored = self._make_policy()
            restored.load_state_dict(self._good, version=self.serving.version + 1)
            self._serve(restored)
            self._good_version = restored.version  # same good weights, served under a new number
        self._recent_rewards.clear()
        self.algorithm.on_trip()
        log.warning(
            "learner update failed; rolled back to the last good weights",
            reason=why,
            breaker=state.value,
            failures_in_window=self.breaker.failures_in_window,
            serving_version=self.serving.version,
        )
        if state is BreakerState.OPEN and before is not BreakerState.OPEN:
            log.warning(
                "learner circuit breaker opened; learning paused",
                reason=self.breaker.last_transition.reason if self.breaker.last_transition else why,
                recovery_s=self.config.breaker.recovery_s,
            )

    def _reset_trainee(self) -> None:
        """Good weights and fresh optimizer moments (a process worker applies it before its next update)."""
        self.worker.load_weights(self._good, self.serving.version, reset_optimizer=True)

    def _note_reward(self, transition: Transition) -> None:
        """Sort a closed step's reward: made by the good version, or by one newer than it."""
        if not math.isfinite(transition.reward):
            return
        if transition.policy_version == self._good_version:
            self._good_rewards.append(transition.reward)
        elif transition.policy_version > self._good_version:
            self._recent_rewards.append(transition.reward)
            self._judge_recent_versions()

    def _judge_recent_versions(self) -> None:
        """Once a window of rewards from versions newer than the good one is in: trip or promote.

        Judged over every version since the good one, not version by version: IMPALA swaps
        after each update, long before one version alone collects a window.
        """
        window = self.config.breaker.reward_window
        recent, before = self._recent_rewards, self._good_rewards
        if len(recent) < window:
            return
        if len(before) >= window // 2:
            drop = _mean(before) - _mean(recent)
            # Per-step rewards are noisy: a drop must also be well outside the noise.
            noise = 3.0 * math.sqrt(_variance(before) / len(before) + _variance(recent) / len(recent))
            if drop > max(self.config.breaker.reward_drop, noise):
                self._trip(f"reward fell by {drop:.4f} after swap")
                return
        self._good = clone_state(self.serving.state_dict())
        self._good_version = self.serving.version
        self._good_rewards = collections.deque(recent, maxlen=window)
        self._recent_rewards = collections.deque(maxlen=window)

    # -------------------------------------------------------------- stats, checkpoints

    def _note_stats(self, stats: UpdateStats, samples: int) -> None:
        self._counters.updates += 1
        self._counters.samples += samples
        elapsed = max(self._clock() - self._started, 1e-9)
        self._counters.samples_per_s = round(self._counters.samples / elapsed, 2)
        self._counters.last = {
            k: round(float(v), 6)
            for k, v in msgspec.structs.asdict(stats).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    def buffered(self) -> int:
        return len(self.algorithm.buffer)

    async def checkpoint(self) -> bool:
        """Save policy, optimizer, counters and buffer into the state directory (off the loop).

        A failed save (a full disk, an unwritable directory) is logged, counted in status and
        retried after 1 s, 2 s, 4 s ... (at most `checkpoint_interval_s`); learning goes on.
        """
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.save_checkpoint)
        except Exception as exc:  # noqa: BLE001 - OSError mostly, but torch and safetensors raise others
            self._checkpoint_failed(exc)
            return False
        self._checkpoint_failures_in_a_row = 0
        self._next_checkpoint = self._clock() + self.config.checkpoint_interval_s
        self._counters.checkpoints += 1
        self._counters.checkpoint_retry_in_s = 0.0
        return True

    def _checkpoint_failed(self, exc: Exception) -> None:
        self._checkpoint_failures_in_a_row += 1
        retry_s = min(2.0 ** (self._checkpoint_failures_in_a_row - 1), self.config.checkpoint_interval_s)
        self._next_checkpoint = self._clock() + retry_s
        self._counters.checkpoint_failures += 1
        self._counters.last_checkpoint_error = f"{type(exc).__name__}: {exc}"
        self._counters.last_checkpoint_error_at = datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        )
        self._counters.checkpoint_retry_in_s = retry_s
        log.error(
            "learner checkpoint failed; learning goes on, retrying",
            error=self._counters.last_checkpoint_error,
            failures_in_a_row=self._checkpoint_failures_in_a_row,
            retry_in_s=retry_s,
        )

    def save_checkpoint(self) -> None:
        """Write policy, optimizer and counters, and buffer (any thread; one save at a time)."""
        with self._save_lock:  # a periodic save may still run when the final one starts
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        directory = checkpoints.save(
            self.state_dir, self.serving, self._export_algo(), self._counters, self.algorithm.buffer
        )
        log.info(
            "learner checkpoint saved",
            directory=str(directory),
            version=self.serving.version,
            buffered=self.buffered(),
        )

    def _export_algo(self) -> dict[str, object] | None:
        """The worker's optimizer state and counters; None (the old learner.pt stays) if it failed."""
        try:
            return self.worker.export_algo()
        except (WorkerDied, WorkerError) as exc:
            log.error("learner optimizer state not saved: the worker failed", error=str(exc))
            return None

    def restore(self) -> bool:
        """Resume from the state directory's checkpoint, if any. False when there is none or it is
        unusable; then nothing changed (every part is read and checked before any is applied)."""
        try:
            saved = checkpoints.read(self.state_dir, self._make_policy, self.config.algorithm)
            if saved is None:
                return False
            self.worker.import_algo(saved.algo)  # the last step; a failed import changed nothing
        except Exception as exc:  # noqa: BLE001 - torch.load and the optimizers raise many types
            log.error("learner checkpoint unusable; starting fresh", error=str(exc))
            return False
        buffer = self.algorithm.buffer
        buffer_file = checkpoints.buffer_file(self.state_dir)
        if buffer_file.exists():
            try:
                buffer.load(buffer_file)
            except Exception as exc:  # noqa: BLE001 - the policy and optimizer still resume
                buffer.clear()
                log.error("learner buffer unusable; starting with an empty buffer", error=str(exc))
        restored = saved.policy
        self.worker.load_weights(restored.state_dict(), restored.version, reset_optimizer=False)
        self._good, self._good_version = clone_state(restored.state_dict()), restored.version
        self.serving = restored
        self._swap(restored)
        self._counters.serving_version = restored.version
        self._counters.updates = saved.updates
        self._counters.samples = saved.samples
        log.info("learner resumed", version=restored.version, buffered=self.buffered())
        return True


def _p95(samples: collections.deque[float]) -> float:
    """The 95th percentile (nearest rank) of samples; 0 for none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _mean(values: collections.deque[float]) -> float:
    return sum(values) / len(values)


def _variance(values: collections.deque[float]) -> float:
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
