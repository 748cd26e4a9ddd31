"""Learner throughput (PPO, IMPALA) and decision latency with the learner running vs idle.

    .venv/bin/python benchmarks/bench_learner.py [--device cpu|cuda|all] [--threads 1]
        [--transitions 2048] [--reps 7] [--phase-s 8] [--rounds 3] [--runs 64]
        [--worker process|thread] [--learner-nice N] [--swap-min-interval-s S]
        [--switch-interval-ms MS] [--latency-device cpu|cuda] [--skip-throughput] [--skip-latency]
        [--strict]

1. Throughput, default-size GNN (`PolicyConfig(name="gnn")`: hidden 128, 3 GCN layers). Transitions
   come from the simulator (`SimEnv`, 16 envs, the policy acting), so graphs, masks and rewards are
   the real thing. Timed per update (median of --reps):
     PPO    `PPOUpdater.update` on 256 on-policy transitions (default PPOConfig: 4 epochs x
            minibatch 32, GAE, bootstrap forward); once without the KL stop (every epoch runs: the
            worst case) and once at the default target KL 0.01 (what the daemon runs);
     IMPALA `ReplayBuffer.sample(B)` (prioritized) + `ImpalaUpdater.update` (default config) +
            `update_priorities`, at B = 64, the default 128 and 256.
   transitions/s = transitions in the update / seconds per update; PPO also shows the
   forward+backward samples/s (transitions x epochs run). Every PPO update starts from the weights
   that made the transitions (on-policy, as in the daemon). CPU, and CUDA when available.

2. Decision latency, learner idle vs running, in the same process: `esperd.decisions.DecisionLoop`
   with a `Scheduler` (min interval 20 ms, cooldown 0, batches of up to 64 waiting <= 5 ms), over
   --runs simulated runs held in a real `Analyzer` (`SimEnv`'s; `observe` is
   `Analyzer.observe`), publish appending to a list. A driver marks every run due every 10 ms,
   so the loop decides continuously (each run about every 20 ms). Latency of a decision = from the
   moment its run became due (the scheduler's due time) to the end of the batch's `act`.
   Phases alternate (idle, IMPALA learner, PPO learner) for --rounds rounds of --phase-s seconds,
   so background load hits all alike. "Running" is an `esperd.learn.learner.Learner`, its
   `run()` task on the same event loop, set up as the daemon runs it by default: its updates in
   a child process at nice +10 with one torch thread (`--worker process`; `--worker thread`
   runs them on a worker thread of this process, as before), IMPALA swapping its newest
   weights in at most every 0.25 s and PPO after every update (LearnerConfig defaults):
     IMPALA: a replay buffer pre-filled with simulator transitions (>= min_replay): it updates
             back to back as long as data is plentiful;
     PPO:    a feeder task tops the rollout buffer up with simulator transitions re-stamped with
             the serving version whenever the learner drained it; no KL stop, so every update
             runs all 4 epochs (the most CPU a PPO update takes).
   Measuring starts once the learner has swapped in its first update (a process worker's
   child imports torch first). The breaker's KL and reward-drop trips are disabled
   (recycled data would trip them, and a tripped learner pauses, which would measure an idle
   learner).
   Target: decision p99 with the learner running <= 1.2x idle. `--latency-device cuda` puts the
   serving policy and the learner's trainee on the GPU, as the daemon does with `[service] device`.

Threads: `torch.set_num_threads(--threads)` (default 1) for this process, so the policy runs
single-threaded intra-op kernels (this machine has 2 cores) instead of OpenMP workers spinning
on the learner's. Knobs: `--learner-nice N` (the child's nice value; with `--worker thread` the
learner thread's, which Linux schedules by its own), `--swap-min-interval-s` (IMPALA swap
coalescing; 0 swaps after every update) and `--switch-interval-ms` (Python's GIL switch
interval; default the daemon's `[service] gil_switch_interval_ms`; 0 keeps Python's 5 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import torch

from esperd.config import SchedulerConfig, ServiceConfig
from esperd.decisions import DecisionLoop, percentile
from esperd.learn.buffers import ReplayBuffer
from esperd.learn.config import BreakerConfig, ImpalaConfig, LearnerConfig, PPOConfig
from esperd.learn.experience import Transition
from esperd.learn.impala import ImpalaUpdater
from esperd.learn.learner import Learner
from esperd.learn.ppo import PPOUpdater
from esperd.logs import configure_logging
from esperd.policy import PolicyBundle, PolicyConfig, create_policy
from esperd.scheduler import Scheduler
from esperd.sim import SimConfig, SimEnv
from esperd.train import collect

P99_RATIO_TARGET = 1.2


def sim_transitions(policy: PolicyBundle, count: int, envs: int = 16, seed: int = 0) -> list[Transition]:
    env = SimEnv(envs, SimConfig(), seed=seed)
    transitions, _ = collect(env, policy, env.reset(), max(1, count // envs))
    env.close()
    return transitions


# ---------------------------------------------------------------- 1. throughput


def time_ppo(
    device: str, transitions: list[Transition], reps: int, target_kl: float | None
) -> dict[str, float]:
    policy = create_policy("gnn", PolicyConfig(name="gnn"), device)
    learner = PPOUpdater(policy, PPOConfig(target_kl=target_kl, warmup_updates=0))
    size = learner.config.rollout_size
    chunks = [transitions[i : i + size] for i in range(0, len(transitions) - size + 1, size)]
    initial = policy.state_dict()  # the weights that made the transitions
    learner.update(chunks[0])  # warm-up (allocations, cuda init)
    seconds, epochs = [], []
    for r in range(reps):
        batch = chunks[r % len(chunks)]
        policy.load_state_dict(initial)  # so every timed update starts on-policy (ratio 1)
        _sync(device)
        start = time.perf_counter()
        stats = learner.update(batch)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        epochs.append(min(stats.steps * learner.config.minibatch_size, stats.epochs_run * stats.samples))
    median = statistics.median(seconds)
    return {
        "batch": size,
        "s_per_update": median,
        "transitions_per_s": size / median,
        "samples_per_s": statistics.median(epochs) / median,
        "epochs": statistics.fmean(e / size for e in epochs),
    }


def time_impala(device: str, transitions: list[Transition], reps: int, batch: int) -> dict[str, float]:
    policy = create_policy("gnn", PolicyConfig(name="gnn"), device)
    learner = ImpalaUpdater(policy, ImpalaConfig(batch_size=batch))
    replay = ReplayBuffer(100_000, prioritized=True, seed=0)
    replay.extend(transitions)
    rng = np.random.default_rng(0)

    def step() -> None:
        sampled = replay.sample(batch, rng)
        stats = learner.update(sampled.transitions, weights=sampled.weights)
        replay.update_priorities(sampled.indices, stats.td_errors, stamps=sampled.stamps)

    step()  # warm-up
    seconds = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "batch": batch,
        "s_per_update": median,
        "transitions_per_s": batch / median,
        "samples_per_s": batch / median,
        "epochs": 1.0,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- 2. latency with the learner


class _TimedScheduler(Scheduler):
    """Remembers when each run of the batch being decided became due."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.due_of: dict[str, float] = {}

    def take_batch(self, now: float | None = None) -> list[tuple[str, float]]:
        batch = super().take_batch(now)
        self.due_of.update(batch)
        return batch


async def latency_phases(args: argparse.Namespace, pool: list[Transition]) -> dict[str, list[float]]:
    rig = _LatencyRig(args, pool)
    await rig.start()
    for round_ in range(args.rounds):
        for phase in ("idle", "impala", "ppo"):
            await rig.measure(phase, round_)
    await rig.stop()
    results = dict(rig.results)
    results["_rates_impala"] = rig.learner_rates["impala"]
    results["_rates_ppo"] = rig.learner_rates["ppo"]
    return results


class _LatencyRig:
    """The daemon's decision loop on simulated runs, every run marked due every 10 ms; each phase
    measures how long a due run waits for its decision, with no learner or one running."""

    def __init__(self, args: argparse.Namespace, pool: list[Transition]) -> None:
        self.args = args
        self.pool = pool
        self.env = SimEnv(args.runs, SimConfig(), seed=1)
        self.env.reset()
        for _ in range(5):  # a few epochs in, so health windows and seeds are not all empty
            self.env.step(_wait_rows(args.runs))
        self.run_ids = list(self.env.run_ids)
        config = SchedulerConfig(
            min_interval_s=0.02, cooldown_s=0.0, max_batch=64, max_wait_ms=5.0, ack_timeout_s=1e9
        )
        self.scheduler = _TimedScheduler(config)
        self.policy = create_policy("gnn", PolicyConfig(name="gnn"), args.latency_device)
        self.published: list[object] = []
        self.latencies: list[float] = []
        self.loop = DecisionLoop(
            self.scheduler,
            self.policy,
            self.env.analyzer.observe_many,
            self.publish,
            on_decided=self.on_decided,
        )
        self.tasks: list[asyncio.Task[None]] = []
        self.results: dict[str, list[float]] = {"idle": [], "impala": [], "ppo": []}
        self.learner_rates: dict[str, list[float]] = {"impala": [], "ppo": []}
        self.batch_sizes: dict[str, list[float]] = {"idle": [], "impala": [], "ppo": []}

    async def publish(self, command: object) -> None:
        self.published.append(command)
        if len(self.published) > 10_000:
            self.published.clear()
            self.scheduler.pending.clear()

    def on_decided(self, observations, result, used) -> None:  # type: ignore[no-untyped-def]
        now = time.monotonic()
        for obs in observations:
            due = self.scheduler.due_of.pop(obs.run_id, None)
            if due is not None:
                self.latencies.append((now - due) * 1e3)

    async def drive(self) -> None:
        while True:
            now = time.monotonic()
            for run_id in self.run_ids:
                self.scheduler.mark_due(run_id, now)
            self.loop.wake()
            await asyncio.sleep(0.01)

    async def start(self) -> None:
        # As the daemon does once it is ready (Service.start): what lives as long as the process
        # (torch, the policy, the simulator, the transition pool) is kept out of the collector.
        gc.collect()
        gc.freeze()
        self.tasks = [asyncio.create_task(self.loop.run()), asyncio.create_task(self.drive())]
        await asyncio.sleep(1.0)  # warm-up

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await _settle(self.tasks)
        self.env.close()

    async def start_learner(self, phase: str, state_dir: Path) -> tuple[Learner, list[asyncio.Task[None]]]:
        args = self.args
        learner = _learner(phase, self.loop, state_dir, len(self.pool), args)
        if args.worker == "thread" and args.learner_nice:
            await asyncio.get_running_loop().run_in_executor(
                learner._executor, _renice_this_thread, args.learner_nice
            )
        tasks = [asyncio.create_task(learner.run())]
        if phase == "impala":
            for t in self.pool:
                learner.add(t)
        else:
            tasks.append(asyncio.create_task(_feed_ppo(learner, self.pool)))
        await _first_swap(learner)
        await asyncio.sleep(0.5)  # let it get going
        return learner, tasks

    async def measure(self, phase: str, round_: int) -> None:
        learner, tasks, state = None, [], None
        if phase != "idle":
            state = tempfile.TemporaryDirectory()
            learner, tasks = await self.start_learner(phase, Path(state.name))
        self.latencies.clear()
        before_updates = learner.status.updates if learner else 0
        before_swaps = learner.status.swaps if learner else 0
        before_batches = self.loop.stats.batches
        before_decisions = self.loop.stats.decisions
        start = time.monotonic()
        await asyncio.sleep(self.args.phase_s)
        elapsed = time.monotonic() - start
        self.results[phase].extend(self.latencies)
        batches = self.loop.stats.batches - before_batches
        self.batch_sizes[phase].append((self.loop.stats.decisions - before_decisions) / max(batches, 1))
        line = (
            f"  round {round_ + 1} {phase:<7} decisions {len(self.latencies):6d}"
            f"  p50 {percentile(self.latencies, 50):7.2f} ms  p99 {percentile(self.latencies, 99):7.2f} ms"
            f"  mean batch {self.batch_sizes[phase][-1]:5.1f}"
        )
        if learner is not None:
            line += self.learner_line(
                phase,
                learner,
                learner.status.updates - before_updates,
                learner.status.swaps - before_swaps,
                elapsed,
            )
        print(line, flush=True)
        for task in tasks:
            task.cancel()
        await _settle(tasks)
        if learner is not None:
            learner.close()
            self.loop.swap_policy(self.policy)  # back to the untrained weights for the next phase
        if state is not None:
            state.cleanup()

    def learner_line(self, phase: str, learner: Learner, updates: int, swaps: int, elapsed: float) -> str:
        batch = learner.config.ppo.rollout_size if phase == "ppo" else learner.config.impala.batch_size
        rate = updates * batch / elapsed
        self.learner_rates[phase].append(rate)
        return (
            f"  learner {updates / elapsed:5.1f} updates/s ({rate:,.0f} transitions/s), "
            f"{swaps / elapsed:4.1f} swaps/s ({learner.status.bundles_reused} bundles reused), "
            f"swap pause max {learner.status.swap_pause_us_max:,.0f} us, "
            f"breaker {learner.status.breaker}, worker deaths {learner.status.worker_deaths}"
        )


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for cancelled tasks to finish, but never hang the benchmark on one that does not."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=10.0)
    if pending:
        print(f"  (warning: {len(pending)} cancelled task(s) still running after 10 s)", flush=True)


async def _first_swap(learner: Learner, timeout_s: float = 120.0) -> None:
    """Until the learner serves its first update (a process worker's child starts up first)."""
    deadline = time.monotonic() + timeout_s
    while learner.status.swaps == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the learner never swapped in {timeout_s:.0f} s: {learner.status}")
        await asyncio.sleep(0.05)


def _renice_this_thread(nice: int) -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads by their own nice value)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _wait_rows(n: int) -> np.ndarray:
    from esperd.analyzer.observation import ACTION_WIDTH, OP_INDEX
    from esperd_contracts import Op

    rows = np.zeros((n, ACTION_WIDTH), dtype=np.int64)
    rows[:, 1] = OP_INDEX[Op.WAIT]
    return rows


def _learner(
    algo: str, decisions: DecisionLoop, state_dir: Path, pool_size: int, args: argparse.Namespace
) -> Learner:
    serving = decisions.policy
    breaker = BreakerConfig(kl_limit_ppo=1e9, kl_limit_impala=1e9, reward_drop=1e9, recovery_s=0.0)
    config = LearnerConfig(
        algorithm=algo,  # type: ignore[arg-type]
        breaker=breaker,
        # No KL stop: every PPO update runs all its epochs (the most CPU a PPO update takes).
        ppo=PPOConfig(target_kl=None),
        impala=ImpalaConfig(batch_size=args.impala_batch),
        min_replay=min(1024, pool_size),
        checkpoint_interval_s=1e9,
        worker=args.worker,
        worker_nice=args.learner_nice if args.worker == "process" else 0,
        swap_min_interval_s=args.swap_min_interval_s,
    )
    return Learner(
        config,
        # A partial, not a lambda: a process worker's child builds its trainee from it.
        make_policy=functools.partial(create_policy, "gnn", PolicyConfig(name="gnn"), args.latency_device),
        serving=serving,
        swap=decisions.swap_policy,
        state_dir=state_dir,
    )


async def _feed_ppo(learner: Learner, pool: list[Transition]) -> None:
    """Keep a rollout's worth of transitions, stamped with the serving version, in the buffer."""
    size = learner.config.ppo.rollout_size
    cursor = 0
    while True:
        if learner.buffered() < size:
            version = learner.serving.version
            for _ in range(size):
                t = pool[cursor % len(pool)]
                cursor += 1
                learner.add(msgspec.structs.replace(t, policy_version=version))
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "all"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--transitions", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--phase-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--latency-device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the serving policy and the learner run in the latency phases (the daemon's "
        "[service] device: one device for both)",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=ServiceConfig().gil_switch_interval_ms,
        help="sys.setswitchinterval for the run (default: the daemon's; 0: Python's default, 5 ms)",
    )
    parser.add_argument(
        "--worker",
        default=LearnerConfig().worker,
        choices=("process", "thread"),
        help="where the learner's updates run (the daemon's default: process)",
    )
    parser.add_argument(
        "--learner-nice",
        type=int,
        default=None,
        help="the learner's nice value: its child process's (default: the daemon's, "
        f"{LearnerConfig().worker_nice}), or with --worker thread its thread's (default 0)",
    )
    parser.add_argument(
        "--swap-min-interval-s",
        type=float,
        default=LearnerConfig().swap_min_interval_s,
        help="IMPALA swaps at most this often (0: after every update)",
    )
    parser.add_argument(
        "--impala-batch",
        type=int,
        default=ImpalaConfig().batch_size,
        help="transitions per IMPALA update in the latency phases (default: the daemon's)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when the p99 target is missed")
    args = parser.parse_args()
    if args.learner_nice is None:
        args.learner_nice = LearnerConfig().worker_nice if args.worker == "process" else 0
    if args.latency_device == "cuda" and not torch.cuda.is_available():
        print("cuda requested for the latency phases but not available: CPU")
        args.latency_device = "cpu"
    return args


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    configure_logging("warning", "console")  # the learner logs every swap at info
    if args.switch_interval_ms > 0:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} torch thread(s), GIL switch interval "
        f"{sys.getswitchinterval() * 1e3:g} ms, learner worker {args.worker} at nice +{args.learner_nice} "
        f"(IMPALA swaps at most every {args.swap_min_interval_s:g} s), cuda "
        f"{'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"
    )

    start = time.perf_counter()
    pool = sim_transitions(create_policy("gnn", PolicyConfig(name="gnn"), "cpu"), args.transitions)
    sizes = [t.obs.num_nodes for t in pool]
    print(
        f"{len(pool)} simulator transitions in {time.perf_counter() - start:.1f}s "
        f"(graphs of {min(sizes)}-{max(sizes)} layers, mean {statistics.fmean(sizes):.1f}); GNN hidden 128 x "
        "3 layers\n"
    )
    if not args.skip_throughput:
        print_throughput(_devices(args.device), pool, args.reps)
    if args.skip_latency:
        return 0
    return report_latency(args, pool)


def _devices(choice: str) -> list[str]:
    devices = ["cpu"] if choice == "cpu" else (["cuda"] if choice == "cuda" else ["cpu", "cuda"])
    if "cuda" in devices and not torch.cuda.is_available():
        print("cuda requested but not available: CPU only")
        devices = ["cpu"]
    return devices


def print_throughput(devices: list[str], pool: list[Transition], reps: int) -> None:
    print(f"learner throughput (median of {reps} updates)")
    print(
        f"  {'device':<6} {'algorithm':<30} {'batch':>5} {'ms/update':>10} {'transitions/s':>14} "
        f"{'fwd+bwd samples/s':>18} {'epochs':>6}"
    )
    for device in devices:
        rows = [
            ("PPO, no KL stop (4 epochs)", time_ppo(device, pool, reps, None)),
            ("PPO, target KL 0.01", time_ppo(device, pool, reps, 0.01)),
            ("IMPALA (prioritized)", time_impala(device, pool, reps, 64)),
            (
                "IMPALA (prioritized, default)",
                time_impala(device, pool, reps, ImpalaConfig().batch_size),
            ),
            ("IMPALA (prioritized)", time_impala(device, pool, reps, 256)),
        ]
        for name, r in rows:
            print(
                f"  {device:<6} {name:<30} {int(r['batch']):>5} {r['s_per_update'] * 1e3:>10.1f} "
                f"{r['transitions_per_s']:>14,.0f} {r['samples_per_s']:>18,.0f} {r['epochs']:>6.2f}"
            )


def report_latency(args: argparse.Namespace, pool: list[Transition]) -> int:
    print(
        f"\ndecision latency, {args.runs} simulated runs, learner idle vs running "
        f"({args.rounds} rounds x {args.phase_s:.0f}s per phase, policy and learner on {args.latency_device})"
    )
    results = asyncio.run(latency_phases(args, pool))
    idle = results["idle"]
    p50_idle, p99_idle = percentile(idle, 50), percentile(idle, 99)
    print(
        f"\n  {'phase':<16} {'decisions':>9} {'p50 ms':>8} {'p99 ms':>8} {'p50 ratio':>9} {'p99 ratio':>9}  "
        "learner transitions/s"
    )
    print(f"  {'idle':<16} {len(idle):>9} {p50_idle:>8.2f} {p99_idle:>8.2f} {1.0:>9.2f} {1.0:>9.2f}")
    failed = False
    for phase in ("impala", "ppo"):
        lat = results[phase]
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        rate = statistics.fmean(results[f"_rates_{phase}"]) if results[f"_rates_{phase}"] else 0.0
        print(
            f"  {phase + ' learning':<16} {len(lat):>9} {p50:>8.2f} {p99:>8.2f} {p50 / p50_idle:>9.2f} "
            f"{p99 / p99_idle:>9.2f}  {rate:,.0f}"
        )
    for phase in ("impala", "ppo"):
        ratio = percentile(results[phase], 99) / p99_idle
        ok = ratio <= P99_RATIO_TARGET
        failed |= not ok
        print(
            f"{'PASS' if ok else 'FAIL'}  decision p99 with the {phase} learner running / idle: {ratio:.2f}x "
            f"<= {P99_RATIO_TARGET}x"
        )
    return 1 if (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
