"""Turns raw bus messages into validated wire messages, counting what it accepts and refuses.

Knows the contracts and esperd's limits, nothing else: no NATS, no analyzer.
"""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import structlog

from esperd.config import LimitsConfig
from esperd.logs import RateLimiter
from esperd_contracts import (
    Channel,
    Codec,
    CodecError,
    CommandAck,
    HealthBatch,
    HealthSignal,
    Inbound,
    SubjectError,
    SystemStatePacket,
    TopologyPacket,
    is_json,
    kind_of,
    parse_subject,
)

log = structlog.get_logger("esperd.intake")

_CHANNEL_KINDS: dict[Channel, tuple[type, ...]] = {
    Channel.TOPOLOGY: (TopologyPacket,),
    Channel.HEALTH: (HealthSignal, HealthBatch),
    Channel.STATE: (SystemStatePacket,),
    Channel.ACK: (CommandAck,),
}

FIRST_BYTES = 64


class Rejection(msgspec.Struct, kw_only=True):
    """One refused message, as reported on `esperd.rejected`."""

    reason: str
    detail: str
    subject: str
    run_id: str = ""
    size: int = 0
    first_bytes: str = ""  # repr of the first bytes: enough to recognise, never the whole payload
    suppressed: int = 0  # same-reason rejections not reported since the last report
    timestamp: float = 0.0


class Accepted(msgspec.Struct, frozen=True):
    """A message that passed every check."""

    run_id: str
    channel: Channel
    message: Inbound
    json: bool = False  # it came as JSON (else msgpack): the run's hosts speak JSON


class Intake:
    """Decode, validate and count inbound messages."""

    def __init__(self, limits: LimitsConfig, prefix: str, report_window_s: float = 1.0) -> None:
        self.limits = limits
        self.prefix = prefix
        self.codec = Codec(max_payload_bytes=limits.max_payload_bytes)
        self.accepted_total = 0
        self.rejected_total = 0
        self.accepted_by_kind: Counter[str] = Counter()
        self.rejected_by_reason: Counter[str] = Counter()
        self._log_limiter = RateLimiter(limits.reject_log_interval_s)
        self._report_limiter = RateLimiter(report_window_s)

    def set_limits(self, limits: LimitsConfig) -> None:
        """Judge the next message by new limits (a SIGHUP reload); counters stay."""
        self.limits = limits
        self.codec.max_payload_bytes = limits.max_payload_bytes
        self._log_limiter.window_s = limits.reject_log_interval_s

    def accept(self, subject: str, data: bytes, content_type: str | None = None) -> Accepted | Rejection:
        """Validate one message and count it either way (for callers that refuse nothing downstream)."""
        outcome = self.check(subject, data, content_type)
        if isinstance(outcome, Accepted):
            self.count_accepted(outcome)
        return outcome

    def check(self, subject: str, data: bytes, content_type: str | None = None) -> Accepted | Rejection:
        """Validate one message. A refusal is counted now; an Accepted only by `count_accepted`,
        once the daemon has taken it: a message refused downstream (the run table, the analyzer)
        is one rejection, never an acceptance as well."""
        try:
            run_id, channel = parse_subject(subject, self.prefix)
        except SubjectError as exc:
            return self._reject("bad_subject", str(exc), subject, "", data)
        if channel not in _CHANNEL_KINDS:
            return self._reject(
                "wrong_channel", f"esperd does not take {channel.value}", subject, run_id, data
            )
        try:
            message = self.codec.decode(data, content_type)
        except CodecError as exc:
            return self._reject(exc.reason, exc.detail, subject, run_id, data)
        if not isinstance(message, _CHANNEL_KINDS[channel]):
            kind = kind_of(message)
            return self._reject("wrong_channel", f"{kind} sent on {channel.value}", subject, run_id, data)
        problem = self._over_limit(message)
        if problem:
            return self._reject("over_limit", problem, subject, run_id, data)
        return Accepted(run_id, channel, message, is_json(data, content_type))

    def count_accepted(self, accepted: Accepted) -> None:
        """Count a checked message the daemon took."""
        self.accepted_total += 1
        self.accepted_by_kind[kind_of(accepted.message)] += 1

    def reject(
        self, reason: str, detail: str, subject: str, run_id: str = "", data: bytes = b""
    ) -> Rejection:
        """Count a refusal decided downstream (e.g. the analyzer refused a topology)."""
        return self._reject(reason, detail, subject, run_id, data)

    def should_report(self, rejection: Rejection) -> bool:
        """Whether this rejection is due a report on `esperd.rejected` (rate-limited per reason)."""
        allowed, suppressed = self._report_limiter.allow(rejection.reason)
        rejection.suppressed = suppressed
        return allowed

    def _over_limit(self, message: Inbound) -> str:
        lim = self.limits
        if isinstance(message, HealthBatch) and len(message.signals) > lim.max_batch_signals:
            return f"{len(message.signals)} signals > max_batch_signals {lim.max_batch_signals}"
        if isinstance(message, TopologyPacket):
            if len(message.nodes) > lim.max_nodes:
                return f"{len(message.nodes)} nodes > max_nodes {lim.max_nodes}"
            if len(message.edges) > lim.max_edges:
                return f"{len(message.edges)} edges > max_edges {lim.max_edges}"
        if isinstance(message, SystemStatePacket):
            if len(message.metrics) > lim.max_metrics:
                return f"{len(message.metrics)} metrics > max_metrics {lim.max_metrics}"
            if len(message.seeds) > lim.max_seeds:
                return f"{len(message.seeds)} seeds > max_seeds {lim.max_seeds}"
        return ""

    def _reject(self, reason: str, detail: str, subject: str, run_id: str, data: bytes) -> Rejection:
        self.rejected_total += 1
        self.rejected_by_reason[reason] += 1
        rejection = Rejection(
            reason=reason,
            detail=detail[:512],
            subject=subject[:256],
            run_id=run_id,
            size=len(data),
            first_bytes=repr(data[:FIRST_BYTES]),
            timestamp=time.time(),
        )
        allowed, suppressed = self._log_limiter.allow(reason)
        if allowed:
            log.warning(
                "message rejected",
                reason=reason,
                detail=rejection.detail,
                subject=rejection.subject,
                suppressed_since_last=suppressed,
            )
        return rejection
