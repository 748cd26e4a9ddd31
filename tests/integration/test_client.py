"""HostClient (the training-loop side) against a real nats-server and the daemon running in-process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.client import HostClient
from esperd.ops.natsserver import NatsServer
from esperd.service import Service
from esperd_contracts import (
    AckStatus,
    AdaptationCommand,
    BlendAlgorithm,
    Blueprint,
    Codec,
    CommandAck,
    HealthSignal,
    Op,
    SystemStatePacket,
    Tempo,
    TopologyNode,
    TopologyPacket,
)
from tests.integration.helpers import daemon_config, running_daemon, wait_for_status
from tests.support.timing import until

CODEC = Codec()


def command(
    run_id: str, command_id: str = "cmd-1", layer_id: int = 1, op: Op = Op.GERMINATE
) -> AdaptationCommand:
    return AdaptationCommand(
        command_id=command_id,
        run_id=run_id,
        layer_id=layer_id,
        op=op,
        confidence=0.9,
        urgency=0.6,
        policy="heuristic",
        policy_version=3,
        issued_at=time.time(),
        blueprint=Blueprint.CONV_LIGHT if op is Op.GERMINATE else None,
        blend=BlendAlgorithm.SIGMOID if op is Op.GERMINATE else None,
        tempo=Tempo.STANDARD if op is Op.GERMINATE else None,
    )


def same_command(a: AdaptationCommand, b: AdaptationCommand) -> bool:
    # A decoded command is a positional twin of the class: compare the JSON forms.
    return CODEC.encode_json(a) == CODEC.encode_json(b)


async def collect(nc: Client, subject: str) -> list[Msg]:
    """Subscribe and gather every message on `subject` into the returned (live) list."""
    got: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    await settle(nc)
    return got


async def settle(*ncs: Client) -> None:
    """Make sure every SUB these connections sent is live at the broker.

    nats-py 2.16's flush() writes its PING straight to the socket, ahead of commands
    still queued for its flusher task, so the PONG can come back before a SUB sent
    just before it was seen: one flush after subscribing does not guarantee the
    subscription (see test_command_right_after_start_is_never_lost). A second flush
    goes out after the flusher has run.
    """
    for nc in ncs:
        await nc.flush()


@contextlib.asynccontextmanager
async def daemon(
    server: NatsServer, state_dir: Path, **sections: dict[str, object]
) -> AsyncIterator[Service]:
    async with running_daemon(daemon_config(server.url, state_dir, **sections)) as service:  # type: ignore[arg-type]
        assert service.bus.nc is not None
        await settle(service.bus.nc)
        yield service


async def connect(server: NatsServer, run_id: str, **kwargs: object) -> HostClient:
    client = await HostClient.connect(server.url, run_id, **kwargs)
    await settle(client.nc)
    return client


# ------------------------------------------------------------------ telemetry


async def test_telemetry_reaches_the_daemon(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    wire = await collect(nats_client, "esper.host-tel.>")
    async with daemon(nats_server, tmp_path):
        client = await connect(nats_server, "host-tel")
        try:
            client.send_topology(
                TopologyPacket(
                    nodes=[
                        TopologyNode(layer_id=0, name="stem", layer_type="conv"),
                        TopologyNode(layer_id=1, name="head", layer_type="linear"),
                    ],
                    edges=[(0, 1)],
                )
            )
            client.send_health(
                [HealthSignal(layer_id=0, health_score=0.9), HealthSignal(layer_id=1, health_score=0.4)]
            )
            client.send_state(SystemStatePacket(epoch=0, val_accuracy=0.1, val_loss=2.0))
            await client.flush()
            st = await wait_for_status(nats_client, lambda s: s["accepted_total"] >= 3)
        finally:
            await client.close()
    assert st["accepted_total"] == 3
    assert st["accepted_by_kind"] == {"topology": 1, "health_batch": 1, "state": 1}
    assert st["rejected_total"] == 0
    assert st["runs"] == 1
    assert client.published == 3
    assert client.dropped == 0
    await until(lambda: len(wire) >= 3)
    assert [m.subject for m in wire[:3]] == [
        "esper.host-tel.topology",
        "esper.host-tel.health",
        "esper.host-tel.state",
    ]
    for msg in wire[:3]:
        assert msg.headers is not None and msg.headers.get("Content-Type") == "application/msgpack"


async def test_send_health_wraps_signals_in_one_batch(nats_server: NatsServer, nats_client: Client) -> None:
    wire = await collect(nats_client, "esper.host-batch.health")
    client = await connect(nats_server, "host-batch")
    try:
        client.send_health([HealthSignal(layer_id=i, health_score=0.5) for i in range(5)])
        await client.flush()
        await until(lambda: len(wire) >= 1)
    finally:
        await client.close()
    assert len(wire) == 1
    batch = CODEC.decode(wire[0].data, "application/msgpack")
    assert type(batch).__struct_config__.tag == "health_batch"
    assert [s.layer_id for s in batch.signals] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
    assert batch.timestamp > 0  # type: ignore[union-attr]


async def test_custom_prefix(nats_server: NatsServer, nats_client: Client, tmp_path: Path) -> None:
    wire = await collect(nats_client, "lab.esper.host-pfx.>")
    async with daemon(nats_server, tmp_path, nats={"subject_prefix": "lab.esper"}):
        client = await connect(nats_server, "host-pfx", prefix="lab.esper")
        try:
            client.send_state(SystemStatePacket(epoch=1))
            await client.flush()
            st = await wait_for_status(nats_client, lambda s: s["accepted_total"] >= 1)
        finally:
            await client.close()
    assert st["accepted_by_kind"] == {"state": 1}
    assert [m.subject for m in wire] == ["lab.esper.host-pfx.state"]


async def test_state_packets_carry_the_clients_budget_and_validation_size(
    nats_server: NatsServer, nats_client: Client
) -> None:
    wire = await collect(nats_client, "esper.host-budget.state")
    client = await HostClient.connect(nats_server.url, "host-budget", total_epochs=48, val_samples=600)
    try:
        client.send_state(SystemStatePacket(epoch=1))
        client.send_state(SystemStatePacket(epoch=2, total_epochs=50))  # the packet's own value wins
        await client.flush()
        await until(lambda: len(wire) >= 2)
    finally:
        await client.close()
    first, second = (CODEC.decode(m.data, "application/msgpack") for m in wire)
    assert (first.total_epochs, first.val_samples) == (48, 600)  # type: ignore[union-attr]
    assert (second.total_epochs, second.val_samples) == (50, 600)  # type: ignore[union-attr]


# ------------------------------------------------------------------ commands


async def test_command_arrives_on_the_queue(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    async with daemon(nats_server, tmp_path):
        client = await connect(nats_server, "host-q")
        try:
            sent = command("host-q", "c-queue")
            await nats_client.publish(
                "esper.host-q.command", CODEC.encode(sent), headers={"Content-Type": "application/msgpack"}
            )
            got = await asyncio.wait_for(client.commands.get(), 5)
            # JSON, without a header, is sniffed.
            sent_json = command("host-q", "c-json", op=Op.PRUNE, layer_id=7)
            await nats_client.publish("esper.host-q.command", CODEC.encode_json(sent_json))
            got_json = await asyncio.wait_for(client.commands.get(), 5)
        finally:
            await client.close()
    assert isinstance(got, AdaptationCommand)
    assert same_command(got, sent)
    assert got.command_id == "c-queue" and got.op is Op.GERMINATE and got.layer_id == 1
    assert got_json.command_id == "c-json" and got_json.op is Op.PRUNE and got_json.layer_id == 7
    assert client.bad_commands == 0


async def test_command_goes_to_the_handler(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    handled: list[AdaptationCommand] = []
    async_handled: list[AdaptationCommand] = []

    def on_command(cmd: AdaptationCommand) -> None:
        handled.append(cmd)

    async def on_command_async(cmd: AdaptationCommand) -> None:
        await asyncio.sleep(0)
        async_handled.append(cmd)

    async with daemon(nats_server, tmp_path):
        sync_client = HostClient(await _connect(nats_server), "host-h1")
        await sync_client.start(on_command=on_command)
        async_client = HostClient(await _connect(nats_server), "host-h2")
        await async_client.start(on_command=on_command_async)
        await settle(sync_client.nc, async_client.nc)
        try:
            await nats_client.publish("esper.host-h1.command", CODEC.encode(command("host-h1", "h1-a")))
            await nats_client.publish("esper.host-h1.command", CODEC.encode(command("host-h1", "h1-b")))
            await nats_client.publish("esper.host-h2.command", CODEC.encode(command("host-h2", "h2-a")))
            await until(lambda: len(handled) >= 2 and len(async_handled) >= 1)
        finally:
            await sync_client.close()
            await async_client.close()
    assert [c.command_id for c in handled] == ["h1-a", "h1-b"]
    assert [c.command_id for c in async_handled] == ["h2-a"]
    # With a handler, nothing queues.
    assert sync_client.commands.empty() and async_client.commands.empty()


async def test_a_failing_handler_does_not_stop_later_commands(
    nats_server: NatsServer, nats_client: Client
) -> None:
    seen: list[str] = []

    def on_command(cmd: AdaptationCommand) -> None:
        seen.append(cmd.command_id)
        if cmd.command_id == "boom":
            raise RuntimeError("host bug")

    client = HostClient(await _connect(nats_server), "host-boom")
    await client.start(on_command=on_command)
    await settle(client.nc)
    try:
        await nats_client.publish("esper.host-boom.command", CODEC.encode(command("host-boom", "boom")))
        await nats_client.publish("esper.host-boom.command", CODEC.encode(command("host-boom", "after")))
        await until(lambda: len(seen) >= 2)
    finally:
        await client.close()
    assert seen == ["boom", "after"]


async def test_ack_goes_to_the_ack_subject(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    wire = await collect(nats_client, "esper.host-ack.ack")
    async with daemon(nats_server, tmp_path):
        client = await connect(nats_server, "host-ack")
        try:
            await nats_client.publish(
                "esper.host-ack.command", CODEC.encode(command("host-ack", "a-1", layer_id=4))
            )
            await nats_client.publish(
                "esper.host-ack.command", CODEC.encode(command("host-ack", "a-2", layer_id=5, op=Op.PRUNE))
            )
            first = await asyncio.wait_for(client.commands.get(), 5)
            second = await asyncio.wait_for(client.commands.get(), 5)
            client.ack(first, applied=True)
            client.ack(second, applied=False, reason="no free slot " + "x" * 5000)
            await client.flush()
            await until(lambda: len(wire) >= 2)
            st = await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("ack", 0) >= 2)
        finally:
            await client.close()
    assert len(wire) == 2
    acks = [CODEC.decode(m.data, m.headers.get("Content-Type") if m.headers else None) for m in wire]
    assert all(isinstance(a, CommandAck) for a in acks)
    applied, refused = acks
    assert (applied.command_id, applied.status, applied.layer_id) == ("a-1", AckStatus.APPLIED, 4)
    assert applied.reason == ""
    assert applied.timestamp > 0
    assert (refused.command_id, refused.status, refused.layer_id) == ("a-2", AckStatus.REJECTED, 5)
    assert refused.reason.startswith("no free slot ")
    assert len(refused.reason) == 1024  # cut to the contract's bound, so the daemon takes it
    assert st["accepted_by_kind"].get("ack") == 2
    assert st["rejected_total"] == 0


async def test_garbage_command_is_counted_and_later_commands_still_arrive(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    async with daemon(nats_server, tmp_path):
        client = await connect(nats_server, "host-junk")
        try:
            await nats_client.publish("esper.host-junk.command", b"\x00\xffgarbage")
            await nats_client.publish("esper.host-junk.command", b'{"kind":"command","command_id":"x"}')
            # A valid message, but not a command.
            await nats_client.publish(
                "esper.host-junk.command", CODEC.encode(HealthSignal(layer_id=1, health_score=0.5))
            )
            await nats_client.publish("esper.host-junk.command", CODEC.encode(command("host-junk", "good")))
            got = await asyncio.wait_for(client.commands.get(), 5)
        finally:
            await client.close()
    assert got.command_id == "good"
    assert client.bad_commands == 3
    assert client.commands.empty()


async def test_a_command_older_than_the_newest_epoch_is_ignored(
    nats_server: NatsServer, nats_client: Client
) -> None:
    """Fencing: an instance that lost the run (frozen past its lease) may still send under its old epoch."""
    client = await connect(nats_server, "host-fence")
    try:
        for command_id, epoch in (("old-1", 7), ("new-1", 12), ("stale", 7), ("new-2", 12), ("newer", 15)):
            fenced = msgspec.structs.replace(command("host-fence", command_id), epoch=epoch)
            await nats_client.publish("esper.host-fence.command", CODEC.encode(fenced))
        await nats_client.flush()
        got = [await asyncio.wait_for(client.commands.get(), 5) for _ in range(4)]
        await asyncio.sleep(0.1)
    finally:
        await client.close()
    assert [c.command_id for c in got] == ["old-1", "new-1", "new-2", "newer"]
    assert client.stale_commands == 1 and client.newest_epoch == 15
    assert client.commands.empty()


async def test_command_queue_is_bounded(nats_server: NatsServer, nats_client: Client) -> None:
    client = await connect(nats_server, "host-full", buffer=2)
    try:
        for i in range(3):
            await nats_client.publish("esper.host-full.command", CODEC.encode(command("host-full", f"q-{i}")))
        await nats_client.flush()
        await until(lambda: client.dropped_commands >= 1)
    finally:
        await client.close()
    assert client.commands.qsize() == 2
    assert client.dropped_commands == 1
    assert client.dropped == 0


# ------------------------------------------------------------------ the bounded outbox


async def test_full_buffer_drops_the_oldest(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    wire = await collect(nats_client, "esper.host-buf.state")
    async with daemon(nats_server, tmp_path):
        client = await connect(nats_server, "host-buf", buffer=4)
        try:
            # Synchronously, as a training step would: the pump gets no chance to run in between.
            for epoch in range(10):
                client.send_state(SystemStatePacket(epoch=epoch))
            assert client.dropped == 6
            assert client.published == 0
            await client.flush()
            await until(lambda: len(wire) >= 4)
            st = await wait_for_status(nats_client, lambda s: s["accepted_total"] >= 4)
            await asyncio.sleep(0.1)  # nothing else trickles in
        finally:
            await client.close()
    assert client.published == 4
    assert client.dropped == 6
    epochs = [CODEC.decode(m.data, "application/msgpack").epoch for m in wire]  # type: ignore[union-attr]
    assert epochs == [6, 7, 8, 9]  # the newest state matters most
    assert st["accepted_by_kind"] == {"state": 4}


async def test_buffer_not_full_drops_nothing(nats_server: NatsServer, nats_client: Client) -> None:
    wire = await collect(nats_client, "esper.host-ok.state")
    client = await connect(nats_server, "host-ok", buffer=8)
    try:
        for epoch in range(8):
            client.send_state(SystemStatePacket(epoch=epoch))
        await client.flush()
        await until(lambda: len(wire) >= 8)
    finally:
        await client.close()
    assert client.dropped == 0 and client.published == 8
    assert [CODEC.decode(m.data).epoch for m in wire] == list(range(8))  # type: ignore[union-attr]


async def _connect(server: NatsServer) -> Client:
    return await nats.connect(server.url)


# ------------------------------------------------------------------ start() readiness


async def test_command_right_after_start_is_never_lost(nats_server: NatsServer, nats_client: Client) -> None:
    """start() returns once the command subscription is live: nothing published after it is lost.

    Repeated because the race it guards against loses a message only now and then.
    """
    lost: list[int] = []
    for i in range(100):
        run = f"host-ready-{i}"
        client = await HostClient.connect(nats_server.url, run)  # no extra flush here, on purpose
        try:
            await nats_client.publish(f"esper.{run}.command", CODEC.encode(command(run, f"r-{i}")))
            try:
                await asyncio.wait_for(client.commands.get(), 0.5)
            except TimeoutError:
                lost.append(i)
        finally:
            await client.close()
    assert lost == [], f"commands lost right after start(): iterations {lost}"
