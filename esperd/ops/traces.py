"""Run traces: every message of a run, as the contracts' JSON, one JSONL file per run.

A trace is what a host and esperd said to each other, in order of arrival at the tap:
topology, health, state, command and ack messages, each decoded to its contract and
stored keyed (the JSON form), with the wall-clock time it was received. Traces are the
raw material of simulator calibration (`esperd sim calibrate`) and of offline analysis.

    async with TraceTap(nc, "traces/") as tap:   # in process: e.g. a benchmark harness
        ...                                      # runs talk to esperd meanwhile
    print(tap.writer.stats)

`esperd record --out DIR` runs the same tap from the command line until SIGINT/SIGTERM.
Undecodable payloads are written too (with an `error` and no `msg`) and counted, so a
trace never silently loses what was said.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Self

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd_contracts import DEFAULT_PREFIX, Codec, CodecError, SubjectError, parse_subject
from esperd_contracts.codec import CONTENT_TYPE_HEADER

TRACE_SUFFIX = ".jsonl"


class TraceRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of a trace file."""

    t: float  # wall-clock receive time (seconds since the epoch)
    run: str
    channel: str  # topology | health | state | command | ack
    msg: dict[str, Any] | None = None  # the message in the contracts' keyed JSON form
    error: str = ""  # why `msg` is missing: the payload did not decode


class TraceStats(msgspec.Struct, kw_only=True):
    """What a writer has written."""

    messages: int = 0
    runs: int = 0
    undecodable: int = 0
    foreign: int = 0  # not written: subjects that are not `<prefix>.<run>.<channel>`, or routed nowhere
    by_channel: dict[str, int] = msgspec.field(default_factory=dict)


class TraceWriter:
    """Appends records to `<out>/<run>.jsonl` (or `<out>/<route(run)>/<run>.jsonl`; a route of None
    drops the run). Keeps at most `max_open` files open (LRU).

    Not thread-safe; call it from one thread (the event loop, for the tap).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_open: int = 64,
        route: Callable[[str], str | None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_open = max_open
        self.route = route
        self.stats = TraceStats()
        self._codec = Codec()
        self._json = msgspec.json.Encoder()
        self._files: collections.OrderedDict[str, IO[bytes]] = collections.OrderedDict()
        self._runs: set[str] = set()

    def path(self, run_id: str) -> Path | None:
        """The trace file of one run (None: its route drops it)."""
        if self.route is None:
            return self.out_dir / f"{run_id}{TRACE_SUFFIX}"
        sub = self.route(run_id)
        return None if sub is None else self.out_dir / sub / f"{run_id}{TRACE_SUFFIX}"

    def write_raw(
        self, subject: str, data: bytes, content_type: str | None = None, t: float | None = None
    ) -> bool:
        """Decode one wire payload and append it to its run's trace; False if the subject is foreign."""
        try:
            run_id, channel = parse_subject(subject, self.prefix)
        except SubjectError:
            self.stats.foreign += 1
            return False
        if self.path(run_id) is None:
            self.stats.foreign += 1
            return False
        received = time.time() if t is None else t
        try:
            message = self._codec.decode(data, content_type, inbound_only=False)
        except CodecError as exc:
            self.stats.undecodable += 1
            record = TraceRecord(t=received, run=run_id, channel=channel.value, error=str(exc)[:500])
        else:
            keyed = msgspec.json.decode(self._codec.encode_json(message))
            record = TraceRecord(t=received, run=run_id, channel=channel.value, msg=keyed)
        self._append(record)
        return True

    def write(self, run_id: str, channel: str, message: msgspec.Struct, t: float | None = None) -> None:
        """Append an already-decoded contract message (for in-process producers)."""
        keyed = msgspec.json.decode(self._codec.encode_json(message))  # type: ignore[arg-type]
        self._append(TraceRecord(t=time.time() if t is None else t, run=run_id, channel=channel, msg=keyed))

    def flush(self) -> None:
        for handle in self._files.values():
            handle.flush()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def _append(self, record: TraceRecord) -> None:
        handle = self._handle(record.run)
        if handle is None:
            return
        handle.write(self._json.encode(record) + b"\n")
        stats = self.stats
        stats.messages += 1
        stats.by_channel[record.channel] = stats.by_channel.get(record.channel, 0) + 1

    def _handle(self, run_id: str) -> IO[bytes] | None:
        handle = self._files.get(run_id)
        if handle is not None:
            self._files.move_to_end(run_id)
            return handle
        path = self.path(run_id)
        if path is None:
            return None
        if len(self._files) >= self.max_open:
            _, oldest = self._files.popitem(last=False)
            oldest.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = self._files[run_id] = open(path, "ab")  # noqa: SIM115 - kept open on purpose
        if run_id not in self._runs:
            self._runs.add(run_id)
            self.stats.runs += 1
        return handle


class TraceTap:
    """Subscribes to `<prefix>.*.*` on a NATS connection and writes every message to a TraceWriter."""

    def __init__(
        self,
        nc: Client,
        out_dir: str | Path,
        *,
        prefix: str = DEFAULT_PREFIX,
        route: Callable[[str], str | None] | None = None,
    ) -> None:
        self.nc = nc
        self.writer = TraceWriter(out_dir, prefix=prefix, route=route)
        self._sub: Any = None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self.writer.prefix}.*.*", cb=self._receive)
        await self.nc.flush()  # the subscription is live at the server before start returns
        self._flusher = asyncio.create_task(self._flush_every(1.0), name="trace-flush")

    async def stop(self) -> None:
        """Unsubscribe (after the messages already delivered are written) and close the files."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self.nc.flush()
                await self._sub.drain()
            self._sub = None
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        self.writer.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _receive(self, msg: Msg) -> None:
        content_type = msg.headers.get(CONTENT_TYPE_HEADER) if msg.headers else None
        self.writer.write_raw(msg.subject, msg.data, content_type)

    async def _flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.writer.flush()


async def record(
    url: str, out_dir: str | Path, *, prefix: str = DEFAULT_PREFIX, stop: asyncio.Event
) -> TraceStats:
    """Connect to `url` and record every run's messages into `out_dir` until `stop` is set."""
    import nats

    nc = await nats.connect(url, max_reconnect_attempts=-1, name="esperd-record")
    tap = TraceTap(nc, out_dir, prefix=prefix)
    try:
        await tap.start()
        await stop.wait()
    finally:
        await tap.stop()
        await nc.close()
    return tap.writer.stats


# ---------------------------------------------------------------- reading


def read_trace(path: str | Path) -> list[TraceRecord]:
    """All records of one trace file (`.jsonl`, or gzipped `.jsonl.gz`), in file order. A truncated
    last line (a killed tap) is skipped."""
    decoder = msgspec.json.Decoder(TraceRecord)
    records = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                records.append(decoder.decode(line))
            except msgspec.DecodeError:
                continue
    return records


def trace_files(directory: str | Path) -> Iterator[Path]:
    """The trace files in a directory (recursively; `.jsonl` and `.jsonl.gz`), sorted by name."""
    root = Path(directory)
    yield from sorted([*root.rglob(f"*{TRACE_SUFFIX}"), *root.rglob(f"*{TRACE_SUFFIX}.gz")])


def run_of(path: Path) -> str:
    """The run id a trace file is named after."""
    name = path.name
    return name[: -len(TRACE_SUFFIX + ".gz")] if name.endswith(".gz") else name[: -len(TRACE_SUFFIX)]
