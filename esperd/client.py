"""The host side: what a training loop uses to talk to esperd.

Light on purpose (contracts + nats-py, no torch-geometric): a training job imports
it cheaply. Publishing never blocks the training step: messages go into a bounded
buffer that a background task drains; when it is full the oldest is dropped and
counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd_contracts import (
    DEFAULT_PREFIX,
    MSGPACK,
    AckStatus,
    AdaptationCommand,
    Channel,
    Codec,
    CodecError,
    CommandAck,
    HealthBatch,
    HealthSignal,
    SystemStatePacket,
    TopologyPacket,
    run_subject,
)

CommandHandler = Callable[[AdaptationCommand], Awaitable[None] | None]


class HostClient:
    """One training run's connection to esperd.

    `total_epochs` (the planned training length) and `val_samples` (the validation set's size),
    when given, fill the state packets that leave those fields at 0: esperd uses the first to
    start no seed that cannot finish before the run ends, the second to tell a seed's measured
    contribution from noise.
    """

    def __init__(
        self,
        nc: Client,
        run_id: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        buffer: int = 1024,
        total_epochs: int = 0,
        val_samples: int = 0,
    ) -> None:
        self.nc = nc
        self.run_id = run_id
        self.prefix = prefix
        self.total_epochs = total_epochs
        self.val_samples = val_samples
        self.codec = Codec()
        self.dropped = 0  # outgoing messages lost (buffer full, broker away)
        self.dropped_commands = 0  # incoming commands that found the queue full
        self.published = 0
        self.bad_commands = 0
        self.stale_commands = 0  # commands ignored: older than the newest ownership epoch seen
        self.newest_epoch = 0  # of the commands received for this run (fencing, see AdaptationCommand.epoch)
        self.commands: asyncio.Queue[AdaptationCommand] = asyncio.Queue(maxsize=buffer)
        self._outbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._buffer = buffer
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()  # set while the outbox is empty and nothing is mid-publish
        self._drained.set()
        self._pump: asyncio.Task[None] | None = None
        self._sub = None
        self._on_command: CommandHandler | None = None

    @classmethod
    async def connect(
        cls,
        url: str | list[str],
        run_id: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        buffer: int = 1024,
        total_epochs: int = 0,
        val_samples: int = 0,
        **nats_options: object,
    ) -> HostClient:
        """Connect and start listening for this run's commands.

        `nats_options` go to `nats.connect` as they are: `user`/`password`, `token`,
        `user_credentials` (a .creds file), `nkeys_seed`, `tls` (an ssl.SSLContext), ...
        """
        nats_options.setdefault("max_reconnect_attempts", -1)
        nc = await nats.connect(url, **nats_options)  # type: ignore[arg-type]
        client = cls(
            nc, run_id, prefix=prefix, buffer=buffer, total_epochs=total_epochs, val_samples=val_samples
        )
        await client.start()
        return client

    async def start(self, on_command: CommandHandler | None = None) -> None:
        """Subscribe to commands; without a handler they queue on `self.commands`."""
        self._on_command = on_command
        self._sub = await self.nc.subscribe(self._subject(Channel.COMMAND), cb=self._receive)
        self._pump = asyncio.create_task(self._drain_outbox(), name=f"host-{self.run_id}-pump")
        # Twice: nats-py writes the PING straight to the socket while the SUB may still sit
        # in its buffer, so one flush can return before the server knows the subscription.
        await self.nc.flush()
        await self.nc.flush()

    # ------------------------------------------------------------- publishing

    def send_topology(self, packet: TopologyPacket) -> None:
        self._enqueue(Channel.TOPOLOGY, packet)

    def send_health(self, signals: list[HealthSignal] | HealthBatch) -> None:
        batch = (
            signals
            if isinstance(signals, HealthBatch)
            else HealthBatch(signals=signals, timestamp=time.time())
        )
        self._enqueue(Channel.HEALTH, batch)

    def send_state(self, packet: SystemStatePacket) -> None:
        """Send one state packet (once per epoch), the client's budget and validation size filled in."""
        if (self.total_epochs and not packet.total_epochs) or (self.val_samples and not packet.val_samples):
            packet = msgspec.structs.replace(
                packet,
                total_epochs=packet.total_epochs or self.total_epochs,
                val_samples=packet.val_samples or self.val_samples,
            )
        self._enqueue(Channel.STATE, packet)

    def ack(self, command: AdaptationCommand, applied: bool, reason: str = "") -> None:
        status = AckStatus.APPLIED if applied else AckStatus.REJECTED
        ack = CommandAck(
            command_id=command.command_id,
            status=status,
            reason=reason[:1024],
            layer_id=command.layer_id,
            timestamp=time.time(),
        )
        self._enqueue(Channel.ACK, ack)

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - mirrors nats' flush(timeout)
        """Wait until the buffer is empty and the broker has everything."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)
        await self.nc.flush(timeout)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush(2.0)
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self.nc.close()

    def accept_epoch(self, command: AdaptationCommand) -> bool:
        """Whether `command` is as new as any seen, by ownership epoch; counts it if not.

        An esperd instance that lost this run (frozen past its lease, say) may still send commands
        under its old epoch; the instance that took over sends newer ones. Only the newest counts.
        """
        if command.epoch < self.newest_epoch:
            self.stale_commands += 1
            return False
        self.newest_epoch = command.epoch
        return True

    def _subject(self, channel: Channel) -> str:
        return run_subject(self.run_id, channel, self.prefix)

    def _enqueue(self, channel: Channel, message: object) -> None:
        if len(self._outbox) >= self._buffer:
            self._outbox.popleft()  # the newest state matters most: drop the oldest
            self.dropped += 1
        self._outbox.append((self._subject(channel), self.codec.encode(message)))  # type: ignore[arg-type]
        self._drained.clear()
        self._wakeup.set()

    async def _drain_outbox(self) -> None:
        headers = {"Content-Type": MSGPACK}
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._outbox:
                subject, payload = self._outbox.popleft()
                try:
                    await self.nc.publish(subject, payload, headers=headers)
                    self.published += 1
                except nats.errors.Error:
                    self.dropped += 1
            self._drained.set()

    async def _receive(self, msg: Msg) -> None:
        try:
            command = self.codec.decode_command(
                msg.data, msg.headers.get("Content-Type") if msg.headers else None
            )
        except CodecError:
            self.bad_commands += 1
            return
        if not self.accept_epoch(command):
            return
        if self._on_command is not None:
            result = self._on_command(command)
            if asyncio.iscoroutine(result):
                await result
        elif not self.commands.full():
            self.commands.put_nowait(command)
        else:
            self.dropped_commands += 1
