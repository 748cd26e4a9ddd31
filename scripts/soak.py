"""Soak: many runs starting and ending against `esperd` as a process; RSS sampled over time.

    .venv/bin/python scripts/soak.py [--duration-s 180] [--slots 40] [--idle-ttl-s 2] [--max-runs 256]
        [--sample-s 2] [--seed 1] [--policy heuristic] [--learner off] [--out benchmarks/results/soak.md]

A private nats-server on a free loopback port and `esperd --config FILE` as a child process.
`--slots` simulated hosts run side by side for `--duration-s`; each slot runs one training run
after another under a fresh run id: topology (8-32 layers), then 3-15 rounds of a health batch
and a state packet (a seed in TRAINING, so the heuristic answers with commands, which the host
acks) every 0.1-0.2 s, then either a `done` state packet or silence (the run idles out after
`--idle-ttl-s`). Every `--sample-s` the daemon's RSS (VmRSS from /proc/<pid>/status) and its
status are recorded.

Checks (exit 1 if any fails): RSS plateaus (max over the last third <= max over the first third
x 1.2 + 16 MiB, and, stricter, grows by at most 8 MiB between the two); `runs` never exceeds
`--max-runs`; evicted_runs grows; after the load stops every run is evicted (runs back to 0,
evicted_runs = runs started, nothing queued or pending, no experience kept per run); no
rejections; SIGTERM exits 0. Writes a Markdown report (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd_contracts import (
    AckStatus,
    Codec,
    CommandAck,
    HealthBatch,
    HealthSignal,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)

ROOT = Path(__file__).resolve().parents[1]

MIB = 2**20


def rss_of(pid: int) -> int:
    """Resident set size of a process in bytes (VmRSS from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for {pid}")


def config_toml(url: str, state_dir: Path, args: argparse.Namespace) -> str:
    learner = f'[learner]\nalgorithm = "{args.learner}"\n'
    if args.learner != "off":
        learner += "replay_capacity = 1000\nmin_replay = 256\ncheckpoint_interval_s = 60.0\n"
    return f"""[nats]
servers = ["{url}"]
reconnect_wait_s = 0.2
[service]
state_dir = "{state_dir}"
drain_timeout_s = 10.0
log_level = "warning"
log_format = "json"
torch_threads = 1
device = "cpu"
[analyzer]
idle_ttl_s = {args.idle_ttl_s}
max_runs = {args.max_runs}
[scheduler]
min_interval_s = 0.05
cooldown_s = 0.0
ack_timeout_s = 30.0
[policy]
name = "{args.policy}"
[policy.heuristic]
min_epoch = 0
train_dwell_epochs = 3
{learner}"""


class Hosts:
    """`slots` simulated hosts on one connection, each running one short training run after another."""

    def __init__(self, nc: Client, slots: int, seed: int) -> None:
        self.nc, self.slots = nc, slots
        self.rng = random.Random(seed)
        self.codec = Codec()
        self.live: set[str] = set()
        self.started = self.done = self.silent = self.published = self.commands = self.acks = 0
        self._stop = asyncio.Event()

    async def run(self, duration_s: float) -> None:
        await self.nc.subscribe("esper.*.command", cb=self._on_command)
        await self.nc.flush()
        tasks = [asyncio.create_task(self._slot(i)) for i in range(self.slots)]
        await asyncio.sleep(duration_s)
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await self.nc.flush()

    async def _publish(self, run: str, channel: str, msg: Any) -> None:
        await self.nc.publish(
            f"esper.{run}.{channel}", self.codec.encode(msg), headers={"Content-Type": "application/msgpack"}
        )
        self.published += 1

    async def _slot(self, slot: int) -> None:
        r = random.Random(self.rng.random())
        await asyncio.sleep(r.random())  # stagger the slots
        serial = 0
        while not self._stop.is_set():
            serial += 1
            run = f"soak-{slot:03d}-{serial:05d}"
            self.started += 1
            self.live.add(run)
            layers = r.randrange(8, 33)
            kinds = ("conv", "linear", "attention", "mlp")
            nodes = [
                TopologyNode(layer_id=i, name=f"l{i}", layer_type=kinds[i % 4], params=1000 * (i + 1))
                for i in range(layers)
            ]
            await self._publish(
                run, "topology", TopologyPacket(nodes=nodes, edges=[(i, i + 1) for i in range(layers - 1)])
            )
            seed_layer = r.randrange(layers)
            for epoch in range(r.randrange(3, 16)):
                if self._stop.is_set():
                    break
                signals = [HealthSignal(layer_id=i, health_score=r.uniform(0.3, 1.0)) for i in range(layers)]
                await self._publish(run, "health", HealthBatch(signals=signals))
                seeds = [SeedSlotState(layer_id=seed_layer, stage=SeedStage.TRAINING, epochs_in_stage=3)]
                await self._publish(
                    run,
                    "state",
                    SystemStatePacket(epoch=epoch, val_accuracy=r.random(), val_loss=r.random(), seeds=seeds),
                )
                await asyncio.sleep(r.uniform(0.1, 0.2))
            if r.random() < 0.5:
                await self._publish(run, "state", SystemStatePacket(epoch=99, val_accuracy=0.9, done=True))
                self.done += 1
            else:
                self.silent += 1  # just goes quiet: the daemon must evict it after idle_ttl_s
            self.live.discard(run)

    async def _on_command(self, msg: Msg) -> None:
        self.commands += 1
        run = msg.subject.split(".")[1]
        if run not in self.live:
            return  # a host that has finished no longer answers
        command = self.codec.decode_command(
            msg.data, msg.headers.get("Content-Type") if msg.headers else None
        )
        await self._publish(
            run,
            "ack",
            CommandAck(
                command_id=command.command_id,
                status=AckStatus.APPLIED,
                layer_id=command.layer_id,
                timestamp=time.time(),
            ),
        )
        self.acks += 1


async def ask_status(nc: Client, timeout: float = 5.0) -> dict[str, Any]:
    reply = await nc.request("esperd.status", b"", timeout=timeout)
    return json.loads(reply.data)


async def wait_status(nc: Client, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await ask_status(nc, 1.0)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def sampler(
    nc: Client, pid: int, every_s: float, samples: list[dict[str, Any]], t0: float, failures: list[str]
) -> None:
    while True:
        sample: dict[str, Any] = {"t": time.monotonic() - t0}
        with contextlib.suppress(OSError):
            sample["rss"] = rss_of(pid)
        try:
            sample["status"] = await ask_status(nc)
        except Exception as exc:  # noqa: BLE001 - counted
            failures.append(f"{sample['t']:.1f}s: {type(exc).__name__}")
        samples.append(sample)
        await asyncio.sleep(every_s)


def thirds(values: list[float]) -> tuple[list[float], list[float]]:
    n = len(values)
    k = max(1, n // 3)
    return values[:k], values[n - k :]


def slope_mib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, in MiB per minute."""
    if len(points) < 2:
        return 0.0
    ts = [t for t, _ in points]
    ys = [v / MIB for _, v in points]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


async def soak(args: argparse.Namespace) -> int:
    from esperd.ops.natsserver import NatsServer

    work = Path(tempfile.mkdtemp(prefix="esperd-soak-"))
    server = NatsServer(work_dir=work / "nats")
    server.start()
    config = work / "esperd.toml"
    config.write_text(config_toml(server.url, work / "state", args), encoding="utf-8")
    log_path = work / "esperd.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "esperd.cli", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    print(f"nats-server {server.url}; esperd pid {proc.pid}; work dir {work}", flush=True)
    samples: list[dict[str, Any]] = []
    failures: list[str] = []
    checks: list[tuple[str, bool, str]] = []
    try:
        control = await nats.connect(server.url, name="soak-control")
        hosts_nc = await nats.connect(server.url, name="soak-hosts", pending_size=64 * MIB)
        await wait_status(control)
        t0 = time.monotonic()
        task = asyncio.create_task(sampler(control, proc.pid, args.sample_s, samples, t0, failures))
        hosts = Hosts(hosts_nc, args.slots, args.seed)
        print(
            f"soak: {args.slots} slots for {args.duration_s:.0f} s, idle_ttl_s {args.idle_ttl_s}", flush=True
        )
        await hosts.run(args.duration_s)
        load_samples = len(samples)
        # Let every run idle out: idle_ttl_s plus a housekeeping tick or two.
        deadline = time.monotonic() + args.idle_ttl_s + 10
        final: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                final = await ask_status(control)
                if final["runs"] == 0 and final["evicted_runs"] >= hosts.started:
                    break
            await asyncio.sleep(0.5)
        await asyncio.sleep(args.sample_s)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        rss_end = rss_of(proc.pid)
        alive = proc.poll() is None
        await hosts_nc.close()
        await control.close()

        load = [s for s in samples[:load_samples] if "rss" in s]
        rss = [s["rss"] for s in load]
        first, last = thirds(rss)
        runs_series = [s["status"]["runs"] for s in samples if "status" in s]
        evicted_series = [s["status"]["evicted_runs"] for s in samples[:load_samples] if "status" in s]
        queued_max = max((s["status"]["scheduler"]["queued"] for s in samples if "status" in s), default=0)
        pending_max = max(
            (s["status"]["scheduler"]["pending_commands"] for s in samples if "status" in s), default=0
        )
        second_half = [(s["t"], s["rss"]) for s in load[len(load) // 2 :]]
        bound = max(first) * 1.2 + 16 * MIB
        checks += [
            ("esperd alive", alive, f"pid {proc.pid}"),
            (
                "status answered every sample",
                not failures,
                f"{len(samples)} samples, failures {failures[:3]}",
            ),
            (
                "RSS plateaus: last-third max <= first-third max x 1.2 + 16 MiB",
                max(last) <= bound,
                f"{max(last) / MIB:.1f} MiB <= {bound / MIB:.1f} MiB (first third max {max(first) / MIB:.1f} "
                "MiB)",
            ),
            (
                "RSS growth, last-third max - first-third max <= 8 MiB",
                max(last) - max(first) <= 8 * MIB,
                f"{(max(last) - max(first)) / MIB:+.1f} MiB over {hosts.started} runs",
            ),
            (
                "runs <= max_runs at every sample",
                max(runs_series) <= args.max_runs,
                f"max {max(runs_series)} <= {args.max_runs}",
            ),
            (
                "evicted_runs grows under load",
                len(evicted_series) > 2 and evicted_series[-1] > evicted_series[len(evicted_series) // 3] > 0,
                f"{evicted_series[len(evicted_series) // 3]} -> {evicted_series[-1]}",
            ),
            (
                "every run evicted afterwards",
                final.get("runs") == 0 and final.get("evicted_runs") == hosts.started,
                f"runs {final.get('runs')}, evicted_runs {final.get('evicted_runs')} of {hosts.started} "
                "started",
            ),
            (
                "nothing queued or pending afterwards",
                final["scheduler"]["queued"] == 0 and final["scheduler"]["pending_commands"] == 0,
                (
                    f"queued {final['scheduler']['queued']} (max {queued_max}), pending "
                    f"{final['scheduler']['pending_commands']}"
                    f" (max {pending_max})"
                ),
            ),
            (
                "no experience kept per run afterwards",
                final["experience"]["runs"] == 0 and final["experience"]["open_steps"] == 0,
                f"experience runs {final['experience']['runs']}, open steps "
                f"{final['experience']['open_steps']}",
            ),
            (
                "no rejections, no slow-consumer drops",
                final["rejected_total"] == 0
                and not final["nats"].get("slow_consumer_drops")
                and final["nats"]["errors"] == 0,
                f"rejected {final['rejected_by_reason']}, nats {final['nats']}",
            ),
        ]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        checks.append(("SIGTERM -> exit 0", code == 0, f"exit {code}"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    report = render(
        args, samples, load_samples, hosts, final, checks, rss_end, slope_mib_per_min(second_half), log_path
    )
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report, encoding="utf-8")  # noqa: ASYNC240 - the load is over
        print(f"wrote {args.out}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def render(
    args: argparse.Namespace,
    samples: list[dict[str, Any]],
    load_samples: int,
    hosts: Hosts,
    final: dict[str, Any],
    checks: list[tuple[str, bool, str]],
    rss_end: int,
    slope: float,
    log_path: Path,
) -> str:
    import msgspec

    cmd = "python scripts/soak.py " + " ".join(sys.argv[1:])
    lines = log_path.read_text(errors="replace").splitlines()
    errors = sum('"level": "error"' in line for line in lines)
    out = [
        "# Soak: runs starting and ending (esperd as a process, real nats-server)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        (
            f"Machine: {platform.machine()} Linux, {os.cpu_count()} cores (shared), Python "
            f"{platform.python_version()}, msgspec {msgspec.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        ),
        "",
        (
            f"Settings: {args.slots} host slots for {args.duration_s:.0f} s, analyzer idle_ttl_s "
            f"{args.idle_ttl_s}, "
            f"max_runs {args.max_runs}, policy {args.policy}, learner {args.learner}; each run: topology "
            "(8-32 layers), "
            "3-15 rounds of health batch + state every 0.1-0.2 s (a seed in TRAINING: the heuristic sends "
            "ADVANCE, "
            "the host acks while it lives), then `done` (half) or silence (half)."
        ),
        "",
        "## Checks",
        "",
        "| check | result | figure |",
        "|---|---|---|",
    ]
    out += [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in checks]
    out += [
        "",
        "## Load",
        "",
        (
            f"- runs started {hosts.started} ({hosts.started / args.duration_s:.1f}/s): {hosts.done} ended "
            "with `done`, "
            f"{hosts.silent} went silent; messages published {hosts.published}; commands received "
            f"{hosts.commands}, "
            f"acked {hosts.acks}"
        ),
        (
            f"- daemon at the end: accepted {final.get('accepted_total')}, commands "
            f"{final.get('commands_total')}, "
            f"evicted_runs {final.get('evicted_runs')}, expired commands "
            f"{final['scheduler']['expired_commands']}, "
            f"unknown acks {final['scheduler']['unknown_acks']}"
        ),
        (
            f"- RSS slope over the second half of the load: {slope:+.2f} MiB/min; RSS after every run was "
            "evicted: "
            f"{rss_end / MIB:.1f} MiB"
        ),
        f"- esperd log: {len(lines)} lines at level warning, {errors} errors",
        "",
        "## RSS and status over time",
        "",
        "| t (s) | RSS (MiB) | runs | evicted_runs | queued | pending cmds | experience runs | accepted |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, s in enumerate(samples):
        st = s.get("status")
        mark = "" if i < load_samples else " (idle)"
        if st is None:
            out.append(f"| {s['t']:.0f}{mark} | {s.get('rss', 0) / MIB:.1f} | - | - | - | - | - | - |")
            continue
        out.append(
            f"| {s['t']:.0f}{mark} | {s.get('rss', 0) / MIB:.1f} | {st['runs']} | {st['evicted_runs']} | "
            f"{st['scheduler']['queued']} | {st['scheduler']['pending_commands']} | "
            f"{st['experience']['runs']} | {st['accepted_total']} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--slots", type=int, default=40)
    parser.add_argument("--idle-ttl-s", type=float, default=2.0)
    parser.add_argument("--max-runs", type=int, default=256)
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policy", default="heuristic")
    parser.add_argument("--learner", default="off", choices=("off", "ppo", "impala"))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
