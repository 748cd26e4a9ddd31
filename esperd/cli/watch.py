"""`esperd watch`: the live lifecycle, decoded, one line per event.

Subscribes to every run's commands and acks, to `esperd.rejected` and to `esperd.blocked`,
whatever their encoding, and prints each as a person reads it: a command as the quick-start
demo prints it, an ack with the command it answers, a rejection with its reason, a decision
a rail kept from its host with the rail and why.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Callable
from typing import TextIO

from nats.aio.msg import Msg

from esperd.cli.cliconn import connect_for_cli
from esperd_contracts import (
    BLOCKED_SUBJECT,
    DEFAULT_PREFIX,
    REJECTED_SUBJECT,
    AckStatus,
    AdaptationCommand,
    Channel,
    Codec,
    CodecError,
    CommandAck,
    SubjectError,
    kind_of,
    parse_subject,
)
from esperd_contracts.codec import CONTENT_TYPE_HEADER

#: Commands remembered so that an ack can say what it answers.
REMEMBERED_COMMANDS = 4096


def command_line(run_id: str, command: AdaptationCommand) -> str:
    """One command, as the demo prints it (without the host's outcome, which comes as an ack)."""
    levers = ""
    if command.blueprint is not None:
        blend = command.blend.value if command.blend else "-"
        tempo = command.tempo.value if command.tempo else "-"
        levers = f" {command.blueprint.value} ({blend}, {tempo})"
    return (
        f"{run_id}: {command.op.value:<16} layer {command.layer_id:<3}{levers}  "
        f"[{command.policy} v{command.policy_version}, confidence {command.confidence:.2f}] "
        f"id {command.command_id[:8]}"
    )


def ack_line(run_id: str, ack: CommandAck, command: AdaptationCommand | None) -> str:
    """One ack, naming the command it answers when this watcher saw it go out."""
    what = (
        f"{command.op.value} layer {command.layer_id}"
        if command is not None
        else f"command {ack.command_id[:8]} (not seen)"
    )
    outcome = ack.status.value if ack.status is AckStatus.APPLIED else ack.status.value.upper()
    reason = f": {ack.reason}" if ack.reason else ""
    return f"{run_id}: {'ack':<16} {what} -> {outcome}{reason}"


def rejection_line(report: dict[str, object]) -> str:
    """One `esperd.rejected` report."""
    suppressed = report.get("suppressed") or 0
    more = f" (+{suppressed} more not reported)" if suppressed else ""
    where = f"{report.get('reason', '?')} on {report.get('subject', '?')}"
    return f"REJECTED {where}: {report.get('detail', '')}{more}"


def blocked_line(report: dict[str, object]) -> str:
    """One `esperd.blocked` report: a decision a rail kept from its host (it became a WAIT)."""
    return (
        f"{report.get('run_id', '?')}: {'BLOCKED':<16} {report.get('op', '?')} layer "
        f"{report.get('layer_id', '?')} by rail {report.get('rail', '?')}: {report.get('detail', '')} "
        f"[{report.get('policy', '?')} v{report.get('policy_version', '?')}]"
    )


class Watcher:
    """Turns raw messages into lines; remembers recent commands to describe their acks."""

    def __init__(self, out: TextIO, prefix: str = DEFAULT_PREFIX, run: str = "") -> None:
        self.out = out
        self.prefix = prefix
        self.run = run
        self.lines = 0
        self._codec = Codec()
        self._commands: collections.OrderedDict[str, AdaptationCommand] = collections.OrderedDict()

    def subjects(self) -> list[str]:
        run = self.run or "*"
        return [
            f"{self.prefix}.{run}.{Channel.COMMAND.value}",
            f"{self.prefix}.{run}.{Channel.ACK.value}",
            REJECTED_SUBJECT,
            BLOCKED_SUBJECT,
        ]

    async def on_msg(self, msg: Msg) -> None:
        content_type = msg.headers.get(CONTENT_TYPE_HEADER) if msg.headers else None
        line = self.describe(msg.subject, msg.data, content_type)
        if line:
            self.emit(line)

    def describe(self, subject: str, data: bytes, content_type: str | None) -> str:
        """The line for one message ("" for one this watcher does not show)."""
        if subject == REJECTED_SUBJECT:
            return self._rejection(data)
        if subject == BLOCKED_SUBJECT:
            return self._blocked(data)
        try:
            run_id, channel = parse_subject(subject, self.prefix)
        except SubjectError:
            return ""
        try:
            if channel is Channel.COMMAND:
                command = self._codec.decode_command(data, content_type)
                self._remember(command)
                return command_line(run_id, command)
            message = self._codec.decode(data, content_type)
        except CodecError as exc:
            return f"{run_id}: undecodable {channel.value} ({exc.reason}: {exc.detail[:120]})"
        if not isinstance(message, CommandAck):
            return f"{run_id}: a {kind_of(message)} message on the ack subject"
        return ack_line(run_id, message, self._commands.get(message.command_id))

    def emit(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime())
        self.out.write(f"{stamp}  {line}\n")
        self.out.flush()
        self.lines += 1

    def _rejection(self, data: bytes) -> str:
        try:
            report = json.loads(data)
        except ValueError:
            return f"REJECTED (unreadable report: {data[:80]!r})"
        if not isinstance(report, dict):
            return f"REJECTED (unreadable report: {data[:80]!r})"
        if self.run and report.get("run_id") != self.run:
            return ""
        return rejection_line(report)

    def _blocked(self, data: bytes) -> str:
        try:
            report = json.loads(data)
        except ValueError:
            return f"BLOCKED (unreadable report: {data[:80]!r})"
        if not isinstance(report, dict):
            return f"BLOCKED (unreadable report: {data[:80]!r})"
        if self.run and report.get("run_id") != self.run:
            return ""
        return blocked_line(report)

    def _remember(self, command: AdaptationCommand) -> None:
        self._commands[command.command_id] = command
        if len(self._commands) > REMEMBERED_COMMANDS:
            self._commands.popitem(last=False)


async def watch(
    server: str,
    out: TextIO,
    stop: asyncio.Event,
    *,
    prefix: str = DEFAULT_PREFIX,
    run: str = "",
    on_ready: Callable[[list[str]], None] | None = None,
) -> int:
    """Print the lifecycle until `stop` is set; returns how many lines were printed.

    `on_ready(subjects)` is called once the subscriptions are live.
    """
    watcher = Watcher(out, prefix, run)
    nc = await connect_for_cli(server, "esperd watch")
    try:
        for subject in watcher.subjects():
            await nc.subscribe(subject, cb=watcher.on_msg)
        await nc.flush()
        if on_ready is not None:
            on_ready(watcher.subjects())
        await stop.wait()
    finally:
        await nc.close()
    return watcher.lines
