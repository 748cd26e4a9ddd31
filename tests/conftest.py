"""Shared fixtures: a real nats-server on a free loopback port, and a client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import torch
from nats.aio.client import Client

from esperd.natsserver import NatsServer

#: The torch devices this machine has: tests that take the `device` fixture run on each.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """A torch device: "cpu" everywhere, and "cuda" too on a machine with a GPU."""
    return str(request.param)


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
