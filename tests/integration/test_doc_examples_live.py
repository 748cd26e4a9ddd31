"""The docs' `nats pub` examples, sent as written to a real daemon over a real nats-server.

What the docs call valid is accepted (counted by kind, nothing rejected); the "See a
rejection" examples are refused with exactly the reasons the docs promise.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from nats.aio.client import Client

from esperd.ops.natsserver import NatsServer
from esperd_contracts import Channel
from tests.doc_examples import doc_examples, documented_rejections
from tests.integration.helpers import daemon_config, running_daemon, status, wait_for_status


async def publish(nc: Client, subject: str, payload: bytes, content_type: str | None) -> None:
    await nc.publish(subject, payload, headers={"Content-Type": content_type} if content_type else None)


async def test_documented_examples_get_the_documented_verdicts(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    examples = [e for e in doc_examples() if e.channel is not Channel.COMMAND]  # esperd sends those
    valid = [e for e in examples if e.meant_valid]
    invalid = [e for e in examples if not e.meant_valid]
    promised = documented_rejections()
    assert valid and invalid and sum(promised.values()) == len(invalid)
    async with running_daemon(daemon_config(nats_server.url, tmp_path)):
        for example in valid:
            await publish(nats_client, example.subject, example.payload, example.content_type)
        after_valid = await wait_for_status(nats_client, lambda s: s["accepted_total"] >= len(valid))
        for example in invalid:
            await publish(nats_client, example.subject, example.payload, example.content_type)
        await wait_for_status(nats_client, lambda s: s["rejected_total"] >= len(invalid))
        final = await status(nats_client)
    assert after_valid["rejected_total"] == 0, after_valid["rejected_by_reason"]
    assert after_valid["accepted_total"] == len(valid)
    kinds = Counter(e.payload.split(b'"kind":"', 1)[1].split(b'"', 1)[0].decode() for e in valid)
    assert after_valid["accepted_by_kind"] == dict(kinds)
    assert final["rejected_by_reason"] == promised
    assert final["accepted_total"] == len(valid)  # the rejections cost nothing else
