"""Partitioned subjects: the broker maps each run's inbound subjects onto its partition.

With `[cluster] mapped_prefix` set, the broker carries a subject mapping (nats-server's own
`partition()` transform) that republishes `<prefix>.<run>.<channel>` for the four inbound channels
as `<mapped_prefix>.<partition>.<run>.<channel>`, the partition being FNV-1a of the run id modulo
`[cluster] partitions` (`esperd.ops.ownership.partition_of`). Each instance then subscribes only to the
partitions it holds a lease on, so it receives only its share of the traffic. Commands are not
mapped: esperd publishes them on `<prefix>.<run>.command`, where hosts listen.

The broker config that does it, and the start-up probe that checks the broker really maps as configured.
"""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.ops.cluster import ClusterError
from esperd.ops.ownership import partition_of
from esperd_contracts import Channel

#: Inbound channels the broker maps (commands stay where hosts listen).
MAPPED_CHANNELS = (Channel.TOPOLOGY, Channel.HEALTH, Channel.STATE, Channel.ACK)
#: esperd's own probe: mapped by the same rule, used by nobody else.
PROBE_SUBJECT = "esperd.probe"
PROBES = 16  # with another partition count, 16 probes all agree by chance with p <= 2**-16


class MappingError(ClusterError):
    """The broker does not map subjects to partitions as this instance is configured to expect."""


def mapping_config(prefix: str, mapped_prefix: str, partitions: int) -> str:
    """The nats-server `mappings` block that partitions `prefix`'s inbound subjects (and the probe)."""
    lines = [
        f"# esperd: {prefix}.<run>.<channel> -> {mapped_prefix}.<partition of {partitions}>.<run>.<channel>"
    ]
    lines.append("mappings = {")
    for channel in MAPPED_CHANNELS:
        source = f"{prefix}.*.{channel.value}"
        target = f"{mapped_prefix}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{channel.value}"
        lines.append(f'  "{source}": "{target}"')
    lines.append(
        f'  "{PROBE_SUBJECT}.*": "{PROBE_SUBJECT}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"'
    )
    lines.append("}")
    return "\n".join(lines) + "\n"


async def verify_mapping(nc: Client, partitions: int, timeout_s: float = 2.0) -> None:
    """Publish probes and check the broker maps each onto the partition we compute; MappingError if not."""
    tokens = [f"p{uuid.uuid4().hex[:16]}" for _ in range(PROBES)]
    seen: dict[str, int] = {}
    done = asyncio.Event()

    async def on_probe(msg: Msg) -> None:
        _, _, rest = msg.subject.partition(f"{PROBE_SUBJECT}.")
        number, _, token = rest.partition(".")
        if token in tokens and number.isdigit():
            seen[token] = int(number)
            if len(seen) == len(tokens):
                done.set()

    sub = await nc.subscribe(f"{PROBE_SUBJECT}.*.*", cb=on_probe)
    try:
        await nc.flush()
        await nc.flush()
        for token in tokens:
            await nc.publish(f"{PROBE_SUBJECT}.{token}", b"")
        await nc.flush()
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except TimeoutError:
            raise MappingError(
                f"cluster.mapped_prefix is set but the broker does not map {PROBE_SUBJECT}.* onto partitions "
                "(add the mappings block from the README's 'Splitting the traffic' to its config)"
            ) from None
    finally:
        await sub.unsubscribe()
    wrong = {t: p for t, p in seen.items() if p != partition_of(t, partitions)}
    if wrong:
        token, got = next(iter(wrong.items()))
        raise MappingError(
            f"the broker maps {PROBE_SUBJECT}.{token} to partition {got}, esperd computes "
            f"{partition_of(token, partitions)} of {partitions}: the mapping's partition count must equal "
            "cluster.partitions"
        )
