"""`esperd status`: ask a running esperd for its status and print it for a person.

Fetching and rendering are separate so that other views (several instances, say) can
reuse both: `fetch_status` returns the decoded answer, `render_status` turns any
status mapping into aligned text, new fields included without code changes here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import nats
from nats.aio.client import Client

from esperd_contracts import STATUS_SUBJECT

_KEY_WIDTH = 24


class NoAnswerError(RuntimeError):
    """Nothing answered on the status subject (no esperd running there)."""


async def fetch_status(nc: Client, subject: str = STATUS_SUBJECT, timeout_s: float = 3.0) -> dict[str, Any]:
    """esperd's answer on `subject`, decoded."""
    try:
        reply = await nc.request(subject, b"", timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise NoAnswerError(f"no esperd answers on {subject}") from None
    except nats.errors.TimeoutError:
        raise NoAnswerError(f"no answer on {subject} within {timeout_s:g}s") from None
    status = json.loads(reply.data)
    if not isinstance(status, dict):
        raise NoAnswerError(f"{subject} answered something that is not a status: {reply.data[:80]!r}")
    return status


def headline(status: Mapping[str, Any]) -> str:
    """One line: version, uptime, runs, serving policy, broker connection."""
    policy = status.get("policy") or {}
    nats_status = status.get("nats") or {}
    connected = "connected" if nats_status.get("connected") else "DISCONNECTED"
    stopping = ", STOPPING" if status.get("stopping") else ""
    return (
        f"esperd {status.get('version', '?')}: up {_duration(status.get('uptime_s', 0.0))}, "
        f"{status.get('runs', 0)} runs, policy {policy.get('name', '?')} v{policy.get('version', '?')}, "
        f"NATS {connected}{stopping}"
    )


def render_status(status: Mapping[str, Any]) -> str:
    """The whole status as aligned text: the headline, then every field."""
    return "\n".join([headline(status), "", *_rows(status, indent=0)]) + "\n"


def _rows(mapping: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    width = max(8, _KEY_WIDTH - len(pad))
    rows: list[str] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping) and "_by_" not in key:
            rows.append(f"{pad}{key}")
            rows += _rows(value, indent + 1) if value else [f"{pad}  -"]
        else:
            rows.append(f"{pad}{key:<{width}}{_scalar(value)}")
    return rows


def _scalar(value: Any) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):  # a counter map such as rejected_by_reason
        return "  ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_scalar(v) for v in value)
    return str(value)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
