"""What esperd says, readable by a person, against a real nats-server and a real daemon.

Commands go out in the encoding the run's hosts speak (JSON for `nats pub`, msgpack for
HostClient) unless `[nats] command_encoding` says otherwise; confidence and urgency are
rounded to 4 decimals; every published command validates against command.json with the
`jsonschema` package; `esperd watch` and `esperd status` print the lifecycle and the
status decoded.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.cli.watch import watch
from esperd.ops.natsserver import NatsServer
from esperd_contracts import Codec, HealthSignal, SystemStatePacket
from tests.integration.helpers import daemon_config, running_daemon, wait_for_status
from tests.integration.test_decisions_e2e import (
    JSON_PACKETS,
    JSON_TOPOLOGY,
    POLICY,
    SCHEDULER,
    hosts,
    layered_topology,
    next_command,
)
from tests.support.timing import until

ROOT = Path(__file__).resolve().parents[2]
COMMAND_SCHEMA = json.loads((ROOT / "contracts" / "schema" / "command.json").read_text(encoding="utf-8"))
CODEC = Codec()


class RawTap:
    """Every command published, as bytes with its Content-Type."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, str | None]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.seen.append((msg.subject, msg.data, msg.headers.get("Content-Type") if msg.headers else None))

    def for_run(self, run_id: str) -> list[tuple[bytes, str | None]]:
        return [(d, ct) for s, d, ct in self.seen if s == f"esper.{run_id}.command"]


async def raw_tap(nc: Client) -> RawTap:
    tap = RawTap()
    await nc.subscribe("esper.*.command", cb=tap.on_msg)
    await nc.flush()
    return tap


async def drive_json_run(nc: Client, run_id: str) -> None:
    """What a person types with `nats pub`: a declining conv layer, then a state packet."""
    await nc.publish(f"esper.{run_id}.topology", JSON_TOPOLOGY)
    await wait_for_status(nc, lambda s: s["accepted_by_kind"].get("topology", 0) >= 1)
    for channel, data in JSON_PACKETS:
        await nc.publish(f"esper.{run_id}.{channel}", data)


def drive_host(host: Any) -> None:
    """What HostClient sends: attention layer 5 of 8 declines."""
    kinds = ["conv", "conv", "conv", "attention", "attention", "attention", "mlp", "linear"]
    host.send_topology(layered_topology(kinds))
    for health in (0.5, 0.4, 0.3, 0.2):
        host.send_health([HealthSignal(layer_id=i, health_score=health if i == 5 else 0.9) for i in range(8)])
    host.send_state(SystemStatePacket(epoch=6, val_accuracy=0.7, val_loss=0.9))


def assert_valid_command_json(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    jsonschema.validate(doc, COMMAND_SCHEMA)
    for score in ("confidence", "urgency"):
        assert round(doc[score], 4) == doc[score], f"{score} not rounded: {data!r}"
        assert len(repr(doc[score])) <= 6, f"{score} printed with float32 noise: {data!r}"  # e.g. 0.9123
    return doc


async def test_auto_encoding_follows_each_runs_hosts_and_commands_match_the_schema(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)
    async with running_daemon(config), hosts(nats_server.url, "grow") as (grow,):
        tap = await raw_tap(nats_client)
        await drive_json_run(nats_client, "typed")
        drive_host(grow)
        from_host = await next_command(grow)  # HostClient decodes what it was sent
        await until(lambda: tap.for_run("typed") and tap.for_run("grow"))

    [(typed_data, typed_type)] = tap.for_run("typed")
    assert typed_type == "application/json"
    doc = assert_valid_command_json(typed_data)  # raw bytes, as `nats sub` shows them
    assert (doc["kind"], doc["run_id"], doc["layer_id"], doc["op"]) == ("command", "typed", 1, "germinate")

    [(host_data, host_type)] = tap.for_run("grow")
    assert host_type == "application/msgpack" and not host_data.startswith(b"{")
    decoded = CODEC.decode_command(host_data, host_type)
    assert decoded.command_id == from_host.command_id
    assert_valid_command_json(CODEC.encode_json(decoded))  # its JSON form obeys the schema too


async def test_command_encoding_json_and_msgpack_override_the_hosts(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    for mode, expected in (("json", "application/json"), ("msgpack", "application/msgpack")):
        config = daemon_config(
            nats_server.url,
            tmp_path / mode,
            nats={"command_encoding": mode},
            scheduler=SCHEDULER,
            policy=POLICY,
        )
        typed, host_run = f"typed-{mode}", f"grow-{mode}"
        async with running_daemon(config), hosts(nats_server.url, host_run) as (grow,):
            tap = await raw_tap(nats_client)
            await drive_json_run(nats_client, typed)
            drive_host(grow)
            await next_command(grow)  # HostClient reads either encoding
            await until(lambda: tap.for_run(typed) and tap.for_run(host_run))  # noqa: B023
        for run_id in (typed, host_run):
            [(data, content_type)] = tap.for_run(run_id)
            assert content_type == expected, (mode, run_id)
            assert data.startswith(b"{") == (mode == "json")
            if mode == "json":
                assert_valid_command_json(data)


class Watching:
    """`watch()` running in this loop, writing into a StringIO, stopped on exit."""

    def __init__(self, url: str, run: str = "") -> None:
        self.url, self.run = url, run
        self.out = io.StringIO()
        self.lines = -1
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Watching:
        ready = asyncio.Event()
        self._task = asyncio.create_task(
            watch(self.url, self.out, self._stop, run=self.run, on_ready=lambda _: ready.set())
        )
        await asyncio.wait_for(ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        self.lines = await asyncio.wait_for(self._task, 10)


async def test_watch_prints_commands_acks_and_rejections_one_line_each(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)
    async with (
        running_daemon(config),
        hosts(nats_server.url, "grow") as (grow,),
        Watching(nats_server.url) as watching,
    ):
        drive_host(grow)
        command = await next_command(grow)
        grow.ack(command, applied=False, reason="no memory for a seed")
        await nats_client.publish("esper.grow.health", b"not a packet")
        await until(lambda: watching.out.getvalue().count("\n") >= 3)
    text = watching.out.getvalue().splitlines()
    assert watching.lines == len(text) == 3, text
    assert "grow: germinate        layer 5" in text[0] and f"id {command.command_id[:8]}" in text[0]
    assert "[heuristic v1, confidence " in text[0]
    assert text[1].endswith("grow: ack              germinate layer 5 -> REJECTED: no memory for a seed")
    assert "REJECTED malformed on esper.grow.health" in text[2]


async def test_watch_for_one_run_shows_that_run_only(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)
    async with (
        running_daemon(config),
        hosts(nats_server.url, "grow", "other") as (grow, other),
        Watching(nats_server.url, run="grow") as watching,
    ):
        drive_host(other)
        await nats_client.publish("esper.other.health", b"not a packet")
        await next_command(other)
        drive_host(grow)
        await next_command(grow)
        # Another reason: esperd.rejected reports each reason at most once a second.
        await nats_client.publish("esper.grow.health", b'{"kind":"health","layer_id":1,"health_score":7}')
        await until(lambda: watching.out.getvalue().count("\n") >= 2)
        await asyncio.sleep(0.3)  # anything about `other` would have arrived by now
    text = watching.out.getvalue()
    assert "other" not in text
    assert "grow: germinate" in text and "REJECTED" in text and "esper.grow.health" in text


def esperd_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "esperd.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


async def test_status_command_pretty_prints_and_fails_clearly(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    # No esperd on the broker yet: a clear error, exit 1.
    none = await asyncio.to_thread(esperd_cli, "status", "--server", nats_server.url, "--timeout", "2")
    assert none.returncode == 1 and "no esperd answers on esperd.status" in none.stderr, none.stderr
    async with running_daemon(daemon_config(nats_server.url, tmp_path)):
        await nats_client.publish("esper.r1.health", b'{"kind":"health","layer_id":1,"health_score":7}')
        await wait_for_status(nats_client, lambda s: s["rejected_total"] >= 1)
        shown = await asyncio.to_thread(esperd_cli, "status", "--server", nats_server.url)
        raw = await asyncio.to_thread(esperd_cli, "status", "--server", nats_server.url, "--json")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert (
        lines[0].startswith("esperd ") and "policy heuristic v1" in lines[0] and "NATS connected" in lines[0]
    )
    assert any(line.split() == ["rejected_by_reason", "invalid=1"] for line in lines), shown.stdout
    assert "nats" in lines and any(line.split()[:1] == ["max_payload"] for line in lines)
    assert raw.returncode == 0 and json.loads(raw.stdout)["rejected_by_reason"] == {"invalid": 1}
    gone = await asyncio.to_thread(esperd_cli, "status", "--server", "nats://127.0.0.1:1", "--timeout", "2")
    assert gone.returncode == 1 and "cannot reach NATS at nats://127.0.0.1:1" in gone.stderr
    assert "Traceback" not in gone.stderr + none.stderr


async def test_watch_command_runs_as_a_process(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "esperd.cli",
        "watch",
        "--server",
        nats_server.url,
        "--duration",
        "30",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        banner = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert b"esperd watch: esper.*.command, esper.*.ack, esperd.rejected" in banner
        ack = b'{"kind":"ack","command_id":"c0ffee00","status":"applied"}'
        await nats_client.publish("esper.r9.ack", ack)
        await nats_client.flush()
        # Generous: the test once failed on a VM at load average 10+ (the line or the exit ran late).
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"r9: ack              command c0ffee00 (not seen) -> applied" in line
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        assert await asyncio.wait_for(proc.wait(), 30) == 0
