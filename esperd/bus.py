"""The NATS side of esperd: connect, subscribe to the wire subjects, publish.

Knows `contracts` and its own config section only; it hands raw messages to a
callback and never interprets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from esperd.config import NatsConfig
from esperd.logs import RateLimiter
from esperd_contracts import JSON, MSGPACK, AdaptationCommand, Channel, Codec, run_subject
from esperd_contracts.status import NatsStatus
from esperd_contracts.subjects import partition_wildcard, unmapped_subject

log = structlog.get_logger("esperd.bus")

RawHandler = Callable[[str, bytes, str | None], Awaitable[None]]
INBOX_PREFIX = "_INBOX_esperd"


def tls_context(config: NatsConfig) -> ssl.SSLContext | None:
    """An SSL context that verifies the server (with `ca_file` when given) and presents our cert."""
    tls = config.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file or None)
    return context


def connect_options(config: NatsConfig) -> dict[str, Any]:
    """nats.connect keyword arguments for this config (callbacks excluded)."""
    # Any, not a TypedDict: nats-py annotates its timeouts `int`, and ours are floats (which it
    # hands to asyncio, where they work).
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": config.name,
        "connect_timeout": config.connect_timeout_s,
        "reconnect_time_wait": config.reconnect_wait_s,
        "max_reconnect_attempts": -1,  # forever: a broker restart must never end the daemon
        "allow_reconnect": True,
        "ping_interval": config.ping_interval_s,
        # Our own publishes (commands, status, rejections) would come back on the `<prefix>.*.*`
        # wildcard only to be skipped: at one command per state packet that is a quarter of the
        # inbound messages, parsed and dispatched for nothing.
        "no_echo": True,
        # esperd's own requests (JetStream calls for cluster leases) get their replies here, so a
        # locked-down broker can grant it `_INBOX_esperd.>` instead of every reply on `_INBOX.>`.
        "inbox_prefix": INBOX_PREFIX,
    }
    if config.user:
        options["user"] = config.user
        options["password"] = config.password
    if config.token:
        options["token"] = config.token
    if config.credentials_file:
        options["user_credentials"] = config.credentials_file
    if config.nkey_seed_file:
        options["nkeys_seed"] = config.nkey_seed_file
    context = tls_context(config)
    if context is not None:
        options["tls"] = context
    if config.tls.hostname:  # also for a tls:// URL verified against the system's CAs
        options["tls_hostname"] = config.tls.hostname
    return options


class HeaderCachingClient(Client):
    """nats-py's client, remembering the header blocks it has parsed.

    Hosts send the same header block (a Content-Type) with every message, and nats-py parses it
    anew each time, line by line in Python: for a small message that costs more than the rest of
    the client's work on it, and in a flood it is paid for the messages dropped as well. Equal
    blocks parse to equal dicts, so a known block's dict is copied instead (a copy: a handler may
    change its message's headers). At most HEADER_CACHE_SIZE distinct blocks are kept; others
    (a unique id per message, say) are parsed as before.
    """

    HEADER_CACHE_SIZE = 256

    def __init__(self) -> None:
        super().__init__()
        self._parsed_headers: dict[bytes, dict[str, str] | None] = {}

    async def _process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        if not headers:
            return None
        cached = self._parsed_headers.get(headers, _UNKNOWN)
        if cached is _UNKNOWN:
            parsed: dict[str, str] | None = await super()._process_headers(headers)
            if len(self._parsed_headers) < self.HEADER_CACHE_SIZE:
                self._parsed_headers[headers] = dict(parsed) if parsed else parsed
            return parsed
        return dict(cached) if cached else None


_UNKNOWN: dict[str, str] = {}


class Bus:
    """esperd's NATS connection."""

    def __init__(self, config: NatsConfig, payload_limit: int = 0) -> None:
        self.config = config
        self.payload_limit = payload_limit  # the largest payload esperd takes (limits.max_payload_bytes)
        self.server_max_payload = 0  # the connected broker's, from its INFO
        self.max_payload_warning = ""
        self.prefix = config.subject_prefix
        self.nc: Client | None = None
        self.codec = Codec()
        self.reconnects = 0
        self.disconnects = 0
        self.errors = 0
        self.slow_consumer_drops = (
            0  # inbound messages nats-py dropped: the subscription's pending limit was hit
        )
        self.dropped_publishes = 0
        self._subs: list[Subscription] = []
        self._partition_subs: dict[int, Subscription] = {}
        self._json_runs: set[str] = set()  # runs whose hosts last spoke JSON (command_encoding auto)
        self._drop_log = RateLimiter(10.0)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, stop: asyncio.Event | None = None) -> Client:
        """Connect, retrying until connected or `stop` is set.

        With `max_reconnect_attempts=-1` nats-py itself retries the first connect forever
        (every `reconnect_wait_s`, each failure reported to `_on_error`): a refused login or
        an unreachable broker never returns from it, so `stop` must interrupt the attempt.
        """
        delay = self.config.reconnect_wait_s
        while True:
            try:
                nc = await self._attempt(stop)
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                log.warning(
                    "NATS connect failed; retrying", error=str(exc) or type(exc).__name__, retry_in_s=delay
                )
            else:
                if nc is None:
                    raise ConnectionError("stopped before NATS was reachable")
                self.nc = nc
                log.info(
                    "connected to NATS",
                    server=str(nc.connected_url.netloc if nc.connected_url else ""),
                    max_payload=nc.max_payload,
                )
                self._check_max_payload()
                return nc
            if stop is not None and stop.is_set():
                raise ConnectionError("stopped before NATS was reachable")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay) if stop else await asyncio.sleep(delay)
            if stop is not None and stop.is_set():
                raise ConnectionError("stopped before NATS was reachable")
            delay = min(delay * 2, 30.0)

    async def _attempt(self, stop: asyncio.Event | None) -> Client | None:
        """One nats-py connect; None if `stop` was set first (the half-open client is closed).

        nats-py retries inside it and reports each failed try to error_cb. After a failed TLS
        handshake (say, an untrusted server certificate) nats-py 2.16 hangs for good closing
        the half-upgraded socket, so a connect that shows no progress for longer than one try
        can take (each step is bounded by connect_timeout) is abandoned with TimeoutError.
        """
        loop = asyncio.get_running_loop()
        last_progress = loop.time()

        async def on_error(exc: Exception) -> None:
            nonlocal last_progress
            last_progress = loop.time()
            await self._on_error(exc)

        nc = HeaderCachingClient()
        attempt = asyncio.ensure_future(
            nc.connect(
                **connect_options(self.config),
                error_cb=on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
            )
        )
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        waiters = [attempt] if stopped is None else [attempt, stopped]
        stall_s = 4 * self.config.connect_timeout_s + self.config.reconnect_wait_s
        finished = stalled = False
        try:
            while not (attempt.done() or (stop is not None and stop.is_set()) or stalled):
                await asyncio.wait(
                    waiters, timeout=min(1.0, stall_s / 4), return_when=asyncio.FIRST_COMPLETED
                )
                stalled = loop.time() - last_progress > stall_s
            finished = attempt.done()
        finally:  # also when we are cancelled
            if stopped is not None:
                stopped.cancel()
            if not attempt.done():
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), self.config.connect_timeout_s)
        if finished:
            attempt.result()
            return nc
        if stop is not None and stop.is_set():
            return None
        raise TimeoutError(f"no progress connecting for {stall_s:g}s; starting over")

    async def subscribe_inbound(self, handler: RawHandler) -> None:
        """Subscribe to every run's subjects; `handler(subject, data, content_type)`.

        One wildcard subscription, not one per channel: nats-py runs each subscription's
        callbacks in its own task, so separate ones could reorder a host's topology,
        health, state and acks. Commands (ours, or a peer instance's) are skipped.
        """
        nc = self._require()
        command_suffix = "." + Channel.COMMAND.value

        async def on_message(msg: Msg) -> None:
            if msg.subject.endswith(command_suffix):
                return
            content_type = msg.headers.get("Content-Type") if msg.headers else None
            await handler(msg.subject, msg.data, content_type)

        sub = await nc.subscribe(
            f"{self.prefix}.*.*", cb=on_message, pending_bytes_limit=self.config.max_pending_bytes
        )
        self._subs.append(sub)
        # Twice: nats-py can send the PING ahead of buffered SUBs, so one flush may return
        # before the server has them, and READY would come before the subscriptions are live.
        await nc.flush()
        await nc.flush()

    async def side_connection(self) -> Client:
        """A second, short-lived connection with the same credentials (its own publishes come back to it).

        The main connection is `no_echo`, so a message it publishes never reaches its own
        subscriptions; a check of the broker's subject mapping needs one that does.
        """
        options = {**connect_options(self.config), "no_echo": False, "name": f"{self.config.name}-probe"}
        options["max_reconnect_attempts"] = 0
        options["allow_reconnect"] = False
        return await nats.connect(**options)

    async def subscribe_partition(
        self, partition: int, mapped_prefix: str, partitions: int, handler: RawHandler
    ) -> None:
        """Subscribe to one partition of a broker-side partition mapping (see `esperd.ops.subjectmap`).

        The handler sees each subject as its host published it. A run's messages all land in
        one partition, so one subscription per partition keeps each run's messages in order.
        Each takes an equal share of `max_pending_bytes`, so the bound on buffered input holds
        however many partitions this instance holds.
        """
        if partition in self._partition_subs:
            return
        nc = self._require()

        async def on_message(msg: Msg) -> None:
            content_type = msg.headers.get("Content-Type") if msg.headers else None
            await handler(unmapped_subject(msg.subject, mapped_prefix, self.prefix), msg.data, content_type)

        share = max(64 * 1024, self.config.max_pending_bytes // partitions)
        subject = partition_wildcard(mapped_prefix, partition)
        self._partition_subs[partition] = await nc.subscribe(
            subject, cb=on_message, pending_bytes_limit=share
        )

    async def unsubscribe_partitions(self, partitions: Iterable[int]) -> None:
        """Stop the deliveries of these partitions (messages already delivered are still handled)."""
        for partition in partitions:
            sub = self._partition_subs.pop(partition, None)
            if sub is not None and self.connected:
                try:
                    await sub.unsubscribe()
                except nats.errors.Error as exc:
                    log.warning("unsubscribe failed", subject=sub.subject, error=str(exc))

    @property
    def partition_subscriptions(self) -> list[int]:
        return sorted(self._partition_subs)

    async def unsubscribe_inbound(self) -> None:
        """Stop taking new messages; those already delivered are still handled."""
        subs, self._subs = [*self._subs, *self._partition_subs.values()], []
        self._partition_subs = {}
        for sub in subs:
            try:
                # Draining needs the broker; without it, just stop the delivery.
                await (sub.drain() if self.connected else sub.unsubscribe())
            except nats.errors.Error as exc:
                log.warning("drain of subscription failed", subject=sub.subject, error=str(exc))

    def status(self) -> NatsStatus:
        """The `nats` section of `esperd.status`."""
        return NatsStatus(
            connected=self.connected,
            reconnects=self.reconnects,
            disconnects=self.disconnects,
            errors=self.errors,
            dropped_publishes=self.dropped_publishes,
            slow_consumer_drops=self.slow_consumer_drops,
            max_payload=self.server_max_payload,
            max_payload_warning=self.max_payload_warning,
        )

    def inbound_pending(self) -> int:
        """Inbound messages received and waiting for the handler."""
        return sum(sub.pending_msgs for sub in self._subs)

    def note_encoding(self, run_id: str, json: bool) -> None:
        """Remember how a run's hosts speak (from an accepted message), for its commands."""
        if json:
            self._json_runs.add(run_id)
        else:
            self._json_runs.discard(run_id)

    def forget_run(self, run_id: str) -> None:
        self._json_runs.discard(run_id)

    def commands_as_json(self, run_id: str) -> bool:
        """Whether the run's commands go out as JSON (else msgpack)."""
        mode = self.config.command_encoding
        return mode == "json" or (mode == "auto" and run_id in self._json_runs)

    async def publish_command(self, command: AdaptationCommand) -> None:
        """Publish a command to its run's command subject, in the run's encoding."""
        subject = run_subject(command.run_id, Channel.COMMAND, self.prefix)
        if self.commands_as_json(command.run_id):
            await self.publish(subject, self.codec.encode_json(command), JSON)
        else:
            await self.publish(subject, self.codec.encode(command), MSGPACK)

    async def publish_json(self, subject: str, payload: bytes) -> None:
        await self.publish(subject, payload, JSON)

    async def publish(self, subject: str, payload: bytes, content_type: str) -> None:
        """Publish, counting (not raising) a failure while the broker is away."""
        nc = self._require()
        try:
            await nc.publish(subject, payload, headers={"Content-Type": content_type})
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            self.dropped_publishes += 1
            log.warning("publish dropped", subject=subject, error=type(exc).__name__)

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - the drain's own bound, public API
        """Drain (flush what is pending, then close), bounded by `timeout`."""
        nc, self.nc = self.nc, None
        if nc is None or nc.is_closed:
            return
        try:
            if not nc.is_connected:
                raise nats.errors.ConnectionReconnectingError
            await asyncio.wait_for(nc.drain(), timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("NATS drain did not finish; closing", error=type(exc).__name__)
            try:
                await nc.close()
            except (RuntimeError, OSError) as close_exc:  # transport already gone
                log.debug("close after failed drain", error=str(close_exc))

    def _require(self) -> Client:
        if self.nc is None:
            raise RuntimeError("bus is not connected")
        return self.nc

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # nats-py reports each dropped message: count every one, log one line per 10 s at most.
            self.slow_consumer_drops += 1
            allowed, suppressed = self._drop_log.allow("slow_consumer")
            if allowed:
                log.warning(
                    "NATS slow consumer: inbound messages dropped",
                    subject=exc.subject,
                    dropped_total=self.slow_consumer_drops,
                    suppressed_since_last=suppressed,
                    max_pending_bytes=self.config.max_pending_bytes,
                )
            return
        self.errors += 1
        log.warning("NATS error", error=str(exc) or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self.nc is None:  # our own close(), not a lost broker
            return
        self.disconnects += 1
        log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        url = self.nc.connected_url if self.nc else None
        log.info("reconnected to NATS", server=url.netloc if url else "")
        self._check_max_payload()  # another server of the cluster may allow less

    def _check_max_payload(self) -> None:
        """Note the broker's max_payload; warn when it refuses packets esperd would take."""
        if self.nc is None:
            return
        self.server_max_payload = int(self.nc.max_payload)
        if self.payload_limit and self.server_max_payload < self.payload_limit:
            self.max_payload_warning = (
                f"the broker's max_payload ({self.server_max_payload} bytes, headers included) is below "
                f"limits.max_payload_bytes ({self.payload_limit}): the broker refuses larger messages "
                "before esperd sees them, so they are neither counted nor reported"
            )
            log.warning(
                "broker max_payload below limits.max_payload_bytes",
                max_payload=self.server_max_payload,
                max_payload_bytes=self.payload_limit,
                detail=self.max_payload_warning,
            )
        else:
            self.max_payload_warning = ""

    async def _on_closed(self) -> None:
        log.info("NATS connection closed")
