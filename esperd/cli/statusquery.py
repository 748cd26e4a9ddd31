"""Ask every esperd instance on a NATS system for its status, without waiting on a hung one.

Discovery is NATS's own: a `$SRV.PING.esperd` request answered by every live instance of the
micro service (a frozen one simply does not answer). Each instance is then asked on its own subject,
`esperd.status.<instance>`, with a timeout; the cluster view in any answer names the members that
did not answer (stale, or gone: their lease expired) so they are listed too; members that stopped
cleanly are listed as such and are no failure. A lone esperd from before per-instance
subjects still answers on the shared `esperd.status`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client

from esperd.cli.statusview import headline
from esperd_contracts import STATUS_SUBJECT

PING_SUBJECT = "$SRV.PING.esperd"


class MemberReport(msgspec.Struct):
    """One instance: its own answer, or why there is none."""

    instance: str
    status: dict[str, Any] | None  # None: it did not answer within the timeout
    stale: bool = False  # the answering members' view says it has stopped renewing
    gone: bool = False  # its membership record expired: it died, froze or was cut off
    left: bool = False  # it stopped cleanly


class ClusterReport(msgspec.Struct):
    members: list[MemberReport]

    @property
    def answered(self) -> list[MemberReport]:
        return [m for m in self.members if m.status is not None]

    @property
    def missing(self) -> list[MemberReport]:
        """Members that should have answered and did not (a clean stop is not missing)."""
        return [m for m in self.members if m.status is None and not m.left]


def instance_subject(instance: str) -> str:
    return f"{STATUS_SUBJECT}.{instance}"


async def discover(nc: Client, window_s: float) -> list[str]:
    """Instance names of every esperd that answers a micro-service PING within `window_s`."""
    inbox = nc.new_inbox()
    replies: list[bytes] = []

    async def collect(msg: Any) -> None:
        replies.append(msg.data)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(PING_SUBJECT, b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(window_s)
    finally:
        await sub.unsubscribe()
    names = []
    for data in replies:
        try:
            name = (json.loads(data).get("metadata") or {}).get("instance")
        except (ValueError, AttributeError):
            continue
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return names


async def ask(nc: Client, subject: str, timeout_s: float) -> dict[str, Any] | None:
    """A status request; None if nobody answered in time."""
    try:
        reply = await nc.request(subject, b"", timeout=timeout_s)
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    try:
        answer = json.loads(reply.data)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


async def cluster_report(nc: Client, timeout_s: float = 2.0) -> ClusterReport:
    """Every instance's status: discovered ones, and the members any answer's cluster view lists."""
    found = await discover(nc, min(timeout_s, 0.5))
    if not found:
        single = await ask(nc, STATUS_SUBJECT, timeout_s)
        if single is None:
            return ClusterReport([])
        return ClusterReport([MemberReport(str(single.get("instance", "")), single)])
    answers = await asyncio.gather(*(ask(nc, instance_subject(n), timeout_s) for n in found))
    statuses = dict(zip(found, answers, strict=True))
    view = _first_view(statuses)
    stale = {m["instance"] for m in view.get("members", []) if m.get("stale")}
    gone = set(view.get("gone", []))
    left = set(view.get("left", []))
    listed = [m["instance"] for m in view.get("members", [])]
    missing = [n for n in listed if n not in statuses]
    statuses.update(
        zip(
            missing,
            await asyncio.gather(*(ask(nc, instance_subject(n), timeout_s) for n in missing)),
            strict=True,
        )
    )
    names = sorted(set(statuses) | gone | left)
    return ClusterReport(
        [
            MemberReport(
                n,
                statuses.get(n),
                stale=n in stale,
                gone=n in gone and n not in listed,
                left=n in left and n not in listed and n not in statuses,
            )
            for n in names
        ]
    )


def _first_view(statuses: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    for status in statuses.values():
        cluster = (status or {}).get("cluster") or {}
        if cluster.get("view"):
            return dict(cluster["view"])
    return {}


def render(report: ClusterReport) -> str:
    """One line per instance (its status headline, or why there is none), then unowned partitions."""
    if not report.members:
        return "no esperd instance answered"
    lines = [_member_line(member) for member in report.members]
    view = _first_view({m.instance: m.status for m in report.members})
    unowned = view.get("unowned_partitions") or []
    if unowned:
        lines.append(f"partitions nobody holds now: {len(unowned)} {unowned}")
    return "\n".join(lines)


def _member_line(member: MemberReport) -> str:
    name = member.instance or "(unnamed)"
    if member.status is None:
        if member.left:
            return f"{name}: left (stopped cleanly)"
        state = "GONE (its lease expired)" if member.gone else "NOT ANSWERING"
        return f"{name}: {state}" + (" (stale: stopped renewing its lease)" if member.stale else "")
    cluster = member.status.get("cluster") or {}
    partitions = cluster.get("partitions")
    owned = f", {len(partitions)} partitions" if isinstance(partitions, dict) else ""
    stale = " (stale in the cluster view)" if member.stale else ""
    return f"{name}: {headline(member.status)}{owned}{stale}"
