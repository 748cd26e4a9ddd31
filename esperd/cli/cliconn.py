"""The NATS connection of esperd's operator commands (`esperd watch`, `esperd status`).

A broker that cannot be reached at start is a clear error within `timeout_s`, not an
endless retry; once connected, a broker restart is ridden out (reconnect forever) and
said on stderr.
"""

from __future__ import annotations

import asyncio
import sys

import nats
from nats.aio.client import Client


class UnreachableError(ConnectionError):
    """No NATS server answered at the given URL."""


async def connect_for_cli(server: str, name: str, timeout_s: float = 5.0) -> Client:
    """A connection to `server`, or UnreachableError naming it and why."""
    last_error: list[str] = []
    client: list[Client] = []

    async def on_error(exc: Exception) -> None:
        last_error[:] = [str(exc) or type(exc).__name__]

    async def on_disconnected() -> None:
        if client and client[0].is_closed:
            return  # our own close(), not a lost broker
        print(f"{name}: disconnected from {server}; reconnecting", file=sys.stderr, flush=True)

    async def on_reconnected() -> None:
        print(f"{name}: reconnected to {server}", file=sys.stderr, flush=True)

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                server,
                name=name,
                connect_timeout=min(2.0, timeout_s),
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            ),
            timeout_s,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        why = last_error[0] if last_error else (str(exc) or type(exc).__name__)
        raise UnreachableError(f"cannot reach NATS at {server} within {timeout_s:g}s ({why})") from None
    client.append(nc)
    return nc
