"""esperd's host side on its own: the wire contract and HostClient, without torch.

A training job that only talks to esperd installs `esperd-host` (msgspec and nats-py) instead
of `esperd`:

    from esperd_contracts import HealthSignal, SystemStatePacket
    from esperd_host import HostClient

`esperd_host.client` is esperd's own `esperd/client.py` (hostclient/ builds from a symlink),
so the two cannot drift apart.
"""

from __future__ import annotations

from esperd_host._version import __version__
from esperd_host.client import CommandHandler, HostClient

__all__ = ["CommandHandler", "HostClient", "__version__"]
