"""Helpers for integration tests: run the daemon in-process and poll its status."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonschema
from nats.aio.client import Client

from esperd.config import Config, config_from_dict
from esperd.service import Service
from esperd_contracts.schema import SCHEMA_DIR, STATUS_FILE


def daemon_config(url: str, state_dir: Path, **sections: dict[str, Any]) -> Config:
    """A config pointing at a test broker, with a private state dir."""
    raw: dict[str, Any] = {
        "nats": {"servers": [url], "reconnect_wait_s": 0.2},
        "service": {"state_dir": str(state_dir), "drain_timeout_s": 5.0, "use_uvloop": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@contextlib.asynccontextmanager
async def running_daemon(config: Config) -> AsyncIterator[Service]:
    """A Service running in this event loop; stopped (and awaited) on exit."""
    service = Service(config, env={})
    task = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task.done():
            task.result()  # surface the start-up error
        raise TimeoutError("daemon did not become ready")
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 20)


#: The published schema of the status reply: every answer a test reads is checked against it by
#: the `jsonschema` package (not by esperd's own decoder).
STATUS_SCHEMA = json.loads((SCHEMA_DIR / STATUS_FILE).read_text(encoding="utf-8"))
_STATUS_VALIDATOR = jsonschema.validators.validator_for(STATUS_SCHEMA)(STATUS_SCHEMA)


async def status(nc: Client, timeout: float = 2.0) -> dict[str, Any]:
    """The daemon's `esperd.status` answer, valid under contracts/schema/status.json."""
    reply = await nc.request("esperd.status", b"", timeout=timeout)
    answer: dict[str, Any] = json.loads(reply.data)
    error = jsonschema.exceptions.best_match(_STATUS_VALIDATOR.iter_errors(answer))
    if error is not None:
        raise AssertionError(
            f"esperd.status answer does not match status.json: {error.message} at {error.json_path}"
        )
    return answer


async def wait_for_status(
    nc: Client, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """Poll status until `predicate` holds; returns the last status (assert on it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = await status(nc, timeout=1.0)
        except AssertionError:
            raise  # an answer that breaks the schema is a failure, not a daemon still starting
        except Exception:  # noqa: BLE001 - not answering yet (e.g. mid-reconnect)
            await asyncio.sleep(0.1)
            continue
        if predicate(last):
            return last
        await asyncio.sleep(0.05)
    return last
