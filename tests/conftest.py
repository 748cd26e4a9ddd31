"""Shared fixtures: a real nats-server on a free loopback port, and a client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from esperd.natsserver import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server (with JetStream) for the whole session."""
    work: Path = tmp_path_factory.mktemp("nats")
    server = NatsServer(store_dir=work / "js", work_dir=work)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A plain nats-py client connected to the session server."""
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()
