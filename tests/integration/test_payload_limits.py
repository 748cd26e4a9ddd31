"""limits.max_payload_bytes holds end to end, against a real nats-server.

The embedded broker is started to carry messages up to esperd's limit, so a packet
between NATS's default 1 MiB and esperd's 4 MiB reaches esperd and is counted; one just
over the limit is refused and counted as too_large. An external broker that allows less
than the limit is named in status and in the log.
"""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from structlog.testing import capture_logs

from esperd.ops.natsserver import NatsServer, free_port
from esperd.service import HEADER_ALLOWANCE
from tests.integration.helpers import daemon_config, running_daemon, status, wait_for_status

MiB = 1024 * 1024
LIMIT = 4 * MiB  # limits.max_payload_bytes' default


def padded_health(size: int) -> bytes:
    """A valid health packet of exactly `size` bytes (an unknown field carries the padding)."""
    head, tail = b'{"kind":"health","layer_id":1,"health_score":0.5,"pad":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_embedded_broker_carries_packets_up_to_the_limit(tmp_path: Path) -> None:
    port = free_port()
    config = daemon_config(
        f"nats://127.0.0.1:{port}",
        tmp_path,
        nats={"embedded": True, "embedded_port": port, "jetstream": False},
    )
    async with running_daemon(config) as service:
        assert service.status().nats.max_payload_warning == ""
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            assert nc.max_payload == LIMIT + HEADER_ALLOWANCE  # what the broker's INFO says
            await nc.publish("esper.big.health", padded_health(2 * MiB))  # over NATS's default 1 MiB
            await nc.publish("esper.big.health", b"\xc1" * (3 * MiB))  # 3 MiB of bytes no msgpack starts with
            over = padded_health(LIMIT + 100)  # over esperd's limit, within the broker's
            await nc.publish("esper.big.health", over, headers={"Content-Type": "application/json"})
            await nc.flush()
            s = await wait_for_status(nc, lambda s: s["accepted_total"] + s["rejected_total"] >= 3)
            assert s["accepted_by_kind"] == {"health": 1}
            assert s["rejected_by_reason"] == {"malformed": 1, "too_large": 1}
            assert s["nats"]["max_payload"] == LIMIT + HEADER_ALLOWANCE
            # Beyond the broker's max_payload the publisher is told at once (nats-py checks the INFO).
            with pytest.raises(nats.errors.MaxPayloadError):
                await nc.publish("esper.big.health", b"x" * (LIMIT + HEADER_ALLOWANCE + 1))
        finally:
            await nc.close()


async def test_smaller_external_broker_is_named_in_status_and_log(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with capture_logs() as logs:
        async with running_daemon(daemon_config(nats_server.url, tmp_path)) as service:
            nc = await nats.connect(nats_server.url)
            try:
                s = await status(nc)
            finally:
                await nc.close()
            assert service.bus.server_max_payload == 1 * MiB  # nats-server's default
    nats_status = s["nats"]
    assert nats_status["max_payload"] == 1 * MiB
    assert f"({1 * MiB} bytes" in nats_status["max_payload_warning"]
    assert f"({LIMIT})" in nats_status["max_payload_warning"]
    warned = [e for e in logs if e["event"] == "broker max_payload below limits.max_payload_bytes"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["max_payload"] == 1 * MiB and warned[0]["max_payload_bytes"] == LIMIT


async def test_external_broker_that_carries_the_limit_gets_no_warning(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, limits={"max_payload_bytes": 512 * 1024})
    with capture_logs() as logs:
        async with running_daemon(config) as service:
            assert service.status().nats.max_payload == 1 * MiB
            assert service.status().nats.max_payload_warning == ""
    assert not [e for e in logs if "max_payload" in e["event"]]
