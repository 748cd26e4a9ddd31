"""Split brain after a freeze, for real: two esperd processes, SIGSTOP one past its lease, SIGCONT it.

Regression test for "Split brain after a freeze" and "One hung member makes esperd.status time out":
the frozen instance's runs move to the other, and when it resumes it acts on none of the packets
buffered while it was frozen (before the fix it sent commands for runs the other instance owned,
inside that one's cooldown). Commands carry the lease epoch; one sent under an older epoch is
dropped by HostClient and the reference host. While one member is frozen, the live member's own
status subject and its cluster view answer every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.client import HostClient
from esperd.ops.natsserver import NatsServer
from esperd.ops.ownership import partition_of, targets
from esperd_contracts import AdaptationCommand, Codec
from esperd_examples.host.train import HostConfig, HostRun

ESPERD = [sys.executable, "-m", "esperd.cli"]
P = 16
RUNS = [f"sb{i}" for i in range(24)]
HEARTBEAT_S, TTL_S = 0.25, 1.5
CODEC = Codec()


def write_config(tmp_path: Path, url: str, name: str, bucket: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[nats]
servers = ["{url}"]
reconnect_wait_s = 0.2
[service]
state_dir = "{tmp_path / name}"
drain_timeout_s = 5.0
log_format = "json"
[cluster]
enabled = true
instance_id = "{name}"
heartbeat_s = {HEARTBEAT_S}
dead_after_s = {TTL_S}
settle_s = 0.3
partitions = {P}
bucket = "{bucket}"
[scheduler]
min_interval_s = 0.05
cooldown_s = 0.3
ack_timeout_s = 0.3
max_wait_ms = 2.0
[policy]
name = "heuristic"
[policy.heuristic]
min_epoch = 3
train_dwell_epochs = 3
probation_epochs = 1
""",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def esperd_process(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """esperd as a child process (output to a file: a full pipe must never block it)."""
    with log.open("wb") as out:
        proc = subprocess.Popen([*ESPERD, "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def status_of(nc: Client, name: str, timeout: float = 1.0) -> dict[str, Any] | None:
    try:
        reply = await nc.request(f"esperd.status.{name}", b"", timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    return json.loads(reply.data)


async def wait_until(check: Any, timeout: float, what: str) -> Any:
    """Poll an async `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


class Wire:
    """Every command published, in arrival order, with its raw bytes and headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[AdaptationCommand, bytes, dict[str, str]]] = []

    async def on_command(self, msg: Msg) -> None:
        headers = dict(msg.headers or {})
        command = CODEC.decode_command(msg.data, headers.get("Content-Type"))
        self.seen.append((command, msg.data, headers))

    def commands(self, since: int = 0) -> list[AdaptationCommand]:
        return [command for command, _, _ in self.seen[since:]]


class Hosts:
    """24 simulated training runs: a state packet per run every 0.1 s, the heuristic's bait every 0.5 s."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.on = asyncio.Event()
        self.epoch = 6

    async def run(self) -> None:
        tick = 0
        while True:
            await self.on.wait()
            if tick % 5 == 0:  # like a host re-sending its graph now and then: a new owner rebuilds from it
                for run in RUNS:
                    await send_bait(self.nc, run)
            tick += 1
            for run in RUNS:
                state = {"kind": "state", "epoch": self.epoch, "val_accuracy": 0.61, "val_loss": 1.2}
                await self.nc.publish(f"esper.{run}.state", json.dumps(state).encode())
            self.epoch += 1
            await asyncio.sleep(0.1)

    async def pause(self, settle_s: float = 0.8) -> None:
        """Stop sending and let everything already sent be decided and delivered."""
        self.on.clear()
        await self.nc.flush()
        await asyncio.sleep(settle_s)


async def send_bait(nc: Client, run: str) -> None:
    """Telemetry that makes the heuristic germinate layer 1 (unhealthy, declining) on each state packet."""
    topology = {
        "kind": "topology",
        "nodes": [
            {"layer_id": 0, "name": "stem", "layer_type": "conv"},
            {"layer_id": 1, "name": "block1", "layer_type": "conv"},
            {"layer_id": 2, "name": "head", "layer_type": "linear"},
        ],
        "edges": [[0, 1], [1, 2], [0, 2]],
    }
    await nc.publish(f"esper.{run}.topology", json.dumps(topology).encode())
    for signals in ([(1, 0.5)], [(0, 0.9), (1, 0.4)], [(1, 0.3)], [(2, 0.95), (1, 0.2)]):
        batch = {"kind": "health_batch", "signals": [{"layer_id": i, "health_score": h} for i, h in signals]}
        await nc.publish(f"esper.{run}.health", json.dumps(batch).encode())


def partitions(status: dict[str, Any] | None) -> dict[int, int]:
    """partition -> epoch held, from a status answer."""
    if not status or not status.get("cluster"):
        return {}
    return {int(p): e for p, e in status["cluster"]["partitions"].items()}


@contextlib.asynccontextmanager
async def host_clients(url: str) -> AsyncIterator[dict[str, HostClient]]:
    """One real HostClient per run, sharing one connection."""
    nc = await nats.connect(url)
    clients = {run: HostClient(nc, run) for run in RUNS}
    for client in clients.values():
        await client.start()
    try:
        yield clients
    finally:
        await nc.close()


@pytest.mark.timeout(180)
async def test_a_frozen_instance_acts_on_nothing_it_lost_and_status_never_waits_for_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    bucket = f"sb{uuid.uuid4().hex[:10]}"
    url = nats_server.url
    nc = await nats.connect(url)
    wire = Wire()
    await nc.subscribe("esper.*.command", cb=wire.on_command)
    hosts = Hosts(nc)
    a_conf, b_conf = (write_config(tmp_path, url, name, bucket) for name in ("a", "b"))
    with (
        esperd_process(a_conf, tmp_path / "a.log") as proc_a,
        esperd_process(b_conf, tmp_path / "b.log") as proc_b,
    ):
        async with host_clients(url) as clients:
            feeder = asyncio.create_task(hosts.run())
            try:
                await run_scenario(nc, wire, hosts, clients, proc_a, proc_b, tmp_path)
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
    await nc.close()


async def run_scenario(
    nc: Client,
    wire: Wire,
    hosts: Hosts,
    clients: dict[str, HostClient],
    proc_a: subprocess.Popen[bytes],
    proc_b: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    b_targets = targets("b", ["a"], P)
    b_runs = [r for r in RUNS if partition_of(r, P) in b_targets]
    assert b_runs, "the run ids must put some runs on b"

    async def split() -> bool:
        a, b = await status_of(nc, "a"), await status_of(nc, "b")
        return set(partitions(b)) == b_targets and len(partitions(a)) + len(partitions(b)) == P

    await wait_until(split, 60, "a and b to start and split the partitions")

    # Both serve their runs.
    hosts.on.set()
    await wait_until(
        lambda: _async(lambda: {c.run_id for c in wire.commands()} >= set(RUNS)), 20, "commands for every run"
    )
    await hosts.pause()
    b_before = partitions(await status_of(nc, "b"))
    assert set(b_before) == b_targets
    b_old_epochs = set(b_before.values())
    assert {c.epoch for c in wire.commands() if c.run_id in b_runs} <= b_old_epochs

    # Freeze b. Hosts keep sending: b's share piles up unread in its socket.
    os.kill(proc_b.pid, signal.SIGSTOP)
    hosts.on.set()

    # (c) a's own subject answers every time, and its cluster view names b as stale (then gone).
    latencies = []
    for _ in range(10):
        started = time.monotonic()
        answer = await status_of(nc, "a", timeout=1.0)
        latencies.append(time.monotonic() - started)
        assert answer is not None, "a's status timed out while b was frozen"
    cli = await asyncio.to_thread(
        subprocess.run,
        [*ESPERD, "status", "--server", nats_server_url(nc), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 1, cli.stdout + cli.stderr  # a member did not answer
    lines = cli.stdout.splitlines()
    assert lines[0].startswith("a: esperd ") and "NATS connected" in lines[0], cli.stdout
    assert lines[1] in (
        "b: NOT ANSWERING (stale: stopped renewing its lease)",
        "b: GONE (its lease expired)",
    ), lines

    # b's leases expire at the broker; a takes every partition under newer epochs and serves b's runs.
    async def a_has_all() -> dict[int, int]:
        held = partitions(await status_of(nc, "a"))
        return held if len(held) == P else {}

    a_all = await wait_until(a_has_all, 15, "a to take b's partitions")
    assert all(a_all[p] > b_before[p] for p in b_targets)
    view = (await status_of(nc, "a"))["cluster"]["view"]  # type: ignore[index]
    assert [m["instance"] for m in view["members"]] == ["a"] and "b" in view["gone"]
    mark = len(wire.seen)
    await wait_until(
        lambda: _async(lambda: any(c.run_id in b_runs for c in wire.commands(mark))),
        10,
        "a to command b's runs",
    )
    await hosts.pause()
    assert max(latencies) < 1.0

    # Resume b with nothing new on the wire: only packets buffered during the freeze could make it act.
    resumed_at = len(wire.seen)
    os.kill(proc_b.pid, signal.SIGCONT)

    async def b_rejoined() -> dict[int, int]:
        held = partitions(await status_of(nc, "b"))
        return held if set(held) == b_targets else {}

    b_after = await wait_until(b_rejoined, 15, "b to rejoin and get its partitions back")
    await asyncio.sleep(1.0)
    after_resume = wire.commands(resumed_at)
    # (a) b acted on none of the buffered packets: not one command went out after SIGCONT.
    assert after_resume == [], [(c.run_id, c.epoch, c.op.value) for c in after_resume]
    b_status = await status_of(nc, "b")
    assert b_status is not None
    assert b_status["cluster"]["lease_lapses"] >= len(b_targets)  # it noticed it had missed its window
    assert b_status["cluster"]["foreign_messages"] > 0  # the buffered packets, dropped
    assert all(b_after[p] > a_all[p] for p in b_targets)  # rejoined under newer epochs still

    # Traffic again: b serves its runs under the new epochs.
    mark = len(wire.seen)
    hosts.on.set()
    await wait_until(
        lambda: _async(lambda: any(c.epoch in b_after.values() for c in wire.commands(mark))),
        10,
        "b to command",
    )
    await hosts.pause()

    # Per run, epochs never went backwards on the wire; every host saw only the newest.
    by_run: dict[str, list[int]] = {}
    for command in wire.commands():
        by_run.setdefault(command.run_id, []).append(command.epoch)
    assert all(epochs == sorted(epochs) for epochs in by_run.values()), by_run
    assert all(client.stale_commands == 0 for client in clients.values())

    # (b) A command b sent before it noticed carries its old epoch: replayed now, exactly as b sent it,
    # HostClient drops it and the reference host's command handling ignores it.
    run = b_runs[0]
    stale, raw, headers = next(
        seen for seen in wire.seen if seen[0].run_id == run and seen[0].epoch in b_old_epochs
    )
    newest = next(c for c in reversed(wire.commands()) if c.run_id == run)
    client = clients[run]
    assert client.newest_epoch == newest.epoch == b_after[partition_of(run, P)] > stale.epoch
    while not client.commands.empty():
        client.commands.get_nowait()
    await nc.publish(f"esper.{run}.command", raw, headers=headers)
    await nc.flush()
    await wait_until(
        lambda: _async(lambda: client.stale_commands == 1), 5, "HostClient to drop the stale command"
    )
    assert client.commands.empty()
    host = HostRun(HostConfig(epochs=1), run_id=run)
    host.handle(newest)
    assert host.handle(stale) is not None and host.report.stale_commands == 1
    assert proc_a.poll() is None and proc_b.poll() is None


def nats_server_url(nc: Client) -> str:
    assert nc.connected_url is not None
    return f"nats://{nc.connected_url.netloc}"


async def _async(predicate: Any) -> Any:
    return predicate()
