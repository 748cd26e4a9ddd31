"""Shared fixtures: a real nats-server on a free loopback port, and a client for it.

Everything under tests/integration/ is marked `integration` here (see pyproject.toml's markers),
so `make test-fast` can leave it out. No torch import: the fast tier must not pay for it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import structlog
from nats.aio.client import Client

from esperd.ops.natsserver import NatsServer

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `device` runs on every torch device this machine has: "cpu" everywhere,
    and "cuda" too where there is a GPU. torch is imported only for such tests."""
    if "device" in metafunc.fixturenames:
        import torch

        metafunc.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])


@pytest.fixture(autouse=True)
def _restore_logging_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that runs a command in-process (a benchmark's main, esperd's CLI) configures
    structlog and the root logger for the whole process: put both back after every test.

    Such a configuration must not cache loggers either: a module-level logger first used under
    it would keep its processors for the rest of the session, and a later test's
    `capture_logs()` would see nothing."""
    configure = structlog.configure
    monkeypatch.setattr(
        structlog, "configure", lambda **kw: configure(**{**kw, "cache_logger_on_first_use": False})
    )
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**config)
    structlog.contextvars.clear_contextvars()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


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
