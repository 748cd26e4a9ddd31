"""`esperd record` and TraceTap against a real nats-server: one JSONL trace per run."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client

from esperd.client import HostClient
from esperd.ops.natsserver import NatsServer
from esperd.ops.traces import TraceTap, read_trace, trace_files
from esperd_contracts import (
    AdaptationCommand,
    Codec,
    HealthSignal,
    Op,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)
from tests.support.timing import until


async def test_tap_writes_one_decoded_trace_per_run(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    codec = Codec()
    host = await HostClient.connect(nats_server.url, "run-a", prefix="tr1")
    async with TraceTap(nats_client, tmp_path, prefix="tr1") as tap:
        host.send_topology(TopologyPacket(nodes=[TopologyNode(layer_id=0, layer_type="conv")]))
        host.send_health([HealthSignal(layer_id=0, health_score=0.4)])
        host.send_state(SystemStatePacket(epoch=2, val_accuracy=0.5, metrics={"lr": 0.1}))
        await host.flush()  # the host's pump publishes in the background: keep the order known
        command = AdaptationCommand(command_id="c1", run_id="run-a", layer_id=0, op=Op.PRUNE)
        await nats_client.publish("tr1.run-a.command", codec.encode(command))
        # Two connections: wait for the command to be recorded so that the ack comes after it.
        await until(lambda: tap.writer.stats.by_channel.get("command", 0) >= 1)
        host.ack(command, applied=False, reason="no slot")
        await nats_client.publish("tr1.run-b.state", b'{"kind":"state","epoch":1,"val_accuracy":0.25}')
        await nats_client.publish("tr1.run-b.health", b"\xc1 not msgpack")  # undecodable: kept, flagged
        await nats_client.publish("tr1.run-a.bogus", b"{}")  # no such channel: not written
        await host.flush()
        await until(lambda: tap.writer.stats.messages >= 7)
    await host.close()
    stats = tap.writer.stats
    assert stats.runs == 2 and stats.undecodable == 1
    files = {p.stem: p for p in trace_files(tmp_path)}
    assert set(files) == {"run-a", "run-b"}
    a = read_trace(files["run-a"])
    assert [r.channel for r in a] == ["topology", "health", "state", "command", "ack"]
    assert a[2].msg is not None and a[2].msg["epoch"] == 2 and a[2].msg["metrics"] == {"lr": 0.1}
    assert a[3].msg is not None and a[3].msg["op"] == "prune"
    assert a[4].msg is not None and a[4].msg["status"] == "rejected" and a[4].msg["reason"] == "no slot"
    assert all(r.t > 1e9 for r in a) and [r.t for r in a] == sorted(r.t for r in a)
    b = read_trace(files["run-b"])
    assert b[0].msg == {"kind": "state", "epoch": 1, "val_accuracy": 0.25}
    assert b[1].msg is None and b[1].error
    # Every line is plain JSON a tool we did not write can read.
    for line in files["run-a"].read_text().splitlines():
        assert json.loads(line)["run"] == "run-a"


def test_read_trace_skips_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"t":1.0,"run":"r","channel":"state","msg":{"kind":"state"}}\n{"t":2.0,"run":"r","cha')
    records = read_trace(path)
    assert len(records) == 1 and records[0].t == 1.0


def _start_recorder(out: Path, url: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "esperd.cli", "record", "--out", str(out), "--server", url]
    return subprocess.Popen([*command, "--prefix", "tr2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def test_record_cli_writes_traces_and_exits_zero_on_sigterm(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    out = tmp_path / "traces"
    proc = _start_recorder(out, nats_server.url)
    try:
        line = await asyncio.to_thread(proc.stderr.readline)  # type: ignore[union-attr]
        assert b"recording" in line
        # The subscription may be a moment behind the banner: publish until the file appears.
        deadline = asyncio.get_running_loop().time() + 15
        while not (out / "r1.jsonl").exists():
            assert asyncio.get_running_loop().time() < deadline, "no trace written"
            await nats_client.publish("tr2.r1.state", b'{"kind":"state","epoch":3}')
            await nats_client.flush()
            await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.to_thread(proc.communicate, timeout=15)
    assert proc.returncode == 0
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["runs"] == 1 and summary["messages"] >= 1
    assert all(r.msg is not None and r.msg["epoch"] == 3 for r in read_trace(out / "r1.jsonl"))


def test_writer_routes_runs_to_subdirectories_and_drops_unrouted_ones(tmp_path: Path) -> None:
    from esperd.ops.traces import TraceWriter

    writer = TraceWriter(tmp_path, route={"a": "fit", "b": "holdout"}.get)
    for run in ("a", "b", "c"):
        assert writer.write_raw(f"esper.{run}.state", b'{"kind":"state","epoch":1}') is (run != "c")
    writer.close()
    assert [p.relative_to(tmp_path).as_posix() for p in trace_files(tmp_path)] == [
        "fit/a.jsonl",
        "holdout/b.jsonl",
    ]
    assert writer.stats.foreign == 1 and writer.stats.runs == 2
