"""Fuzz campaign: bad input at scale against a real nats-server and a real esperd process.

    .venv/bin/python scripts/fuzz_campaign.py [--payloads 100000] [--seed 1] [--baseline-s 20]
        [--good-runs 3] [--out benchmarks/results/fuzz_campaign.md] [--in-process]

What it does, in order (every loop bounded in count and in time; all traffic on 127.0.0.1):

1. starts a private nats-server on a free loopback port and `esperd --config FILE` as a child
   process (tight `[limits]`, small `[analyzer]` bounds, the heuristic policy tuned so a run whose
   seed sits in TRAINING gets an ADVANCE for every state packet);
2. baseline: `--good-runs` well-behaved hosts publish topology once, then health and state every
   0.1 s for `--baseline-s`, and ack every command; their commands per state packet and
   state-to-command latency are the clean reference;
3. campaign: fresh good runs do the same while a seeded generator publishes `--payloads` bad (and
   some odd-but-valid) payloads in 15 families -- random bytes, truncated and mutated msgpack,
   wrong types, extreme numbers, over-limit batches/topologies/payloads, invalid topologies,
   unknown runs, unknown layers, acks for unknown commands, bad subjects, wrong channels, JSON
   variants, msgpack structure attacks, a flood on one run. The publisher keeps at most
   `--max-lag` messages in flight (it asks status), so NATS never drops and every payload can be
   accounted for;
4. throughout, `esperd.status` is polled every 0.5 s (response time, failures) and the daemon's RSS
   is sampled from /proc/<pid>/status;
5. checks: the process is alive; every rejection counted by reason (the daemon's per-reason counts
   equal an oracle's -- the same intake and topology validation run locally on every payload --
   and sum to rejected_total; accepted_total plus the state-dependent refusals equals the oracle's,
   each message counted once); unknown acks counted; no
   internal_error, no decision failures; good runs keep getting their commands (ratio and rate
   within 20% of the baseline); SIGTERM exits 0.

Prints a summary and writes a Markdown report (`--out`). Exit status 0 only if every check passed.
The generator, oracle, good-run host and status poller are importable (tests/integration/test_fuzz.py
runs a bounded campaign against an in-process daemon with them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.analyzer import AnalyzerError
from esperd.analyzer.graph import Graph
from esperd.config import LimitsConfig
from esperd.intake import Accepted, Intake
from esperd_contracts import (
    AckStatus,
    Codec,
    CommandAck,
    HardwareContext,
    HealthBatch,
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)

ROOT = Path(__file__).resolve().parents[1]

PREFIX = "esper"
CHANNELS = ("topology", "health", "state", "ack")

# ---------------------------------------------------------------- daemon settings for the campaign

#: Tight per-message limits, all well under nats-server's 1 MiB max_payload, so "over the limit"
#: payloads reach the daemon instead of being refused by the client.
LIMITS: dict[str, Any] = {
    "max_payload_bytes": 128 * 1024,
    "max_batch_signals": 256,
    "max_nodes": 256,
    "max_edges": 1024,
    "max_metrics": 32,
    "max_seeds": 64,
}
ANALYZER: dict[str, Any] = {
    "max_runs": 256,
    "max_nodes_per_run": 256,
    "max_edges_per_run": 1024,
    "idle_ttl_s": 5.0,
}
#: cooldown 0: a layer may be commanded again at once, so a TRAINING seed gets an ADVANCE per state.
SCHEDULER: dict[str, Any] = {
    "min_interval_s": 0.05,
    "cooldown_s": 0.0,
    "max_wait_ms": 2.0,
    "ack_timeout_s": 30.0,
}
POLICY: dict[str, Any] = {"name": "heuristic", "heuristic": {"min_epoch": 0, "train_dwell_epochs": 3}}

#: Rejection reasons decided by intake (subject, codec, channel, limits): fully determined by the payload.
INTAKE_REASONS = {
    "bad_subject",
    "wrong_channel",
    "too_large",
    "malformed",
    "unknown_kind",
    "invalid",
    "over_limit",
}
#: Analyzer reasons a topology gets from validation alone (also determined by the payload).
TOPOLOGY_REASONS = {
    "empty_topology",
    "too_many_nodes",
    "too_many_edges",
    "duplicate_node",
    "bad_edge",
    "cycle",
}
#: Reasons that depend on the daemon's state (how many runs it tracks, a run's inferred layers).
STATEFUL_REASONS = {"too_many_runs", "too_many_nodes", "memory_budget"}

FAMILIES: dict[str, int] = {  # name -> weight
    "random_bytes": 10,
    "truncated_msgpack": 10,
    "mutated_msgpack": 8,
    "wrong_types": 8,
    "extreme_numbers": 10,
    "over_limit": 2,
    "bad_topology": 3,
    "unknown_runs": 6,
    "unknown_layers": 5,
    "unknown_acks": 6,
    "bad_subjects": 6,
    "wrong_channel": 4,
    "json_variants": 10,
    "msgpack_structure": 4,
    "flood_one_run": 8,
}

EXTREME_FLOATS = [
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    1e300,
    -1e300,
    1.7976931348623157e308,
    5e-324,
    -0.0,
    -1.0,
    1.0000001,
    2.0,
    1e-300,
]
EXTREME_INTS = [-1, -(2**31), 2**31 - 1, 2**31, 2**62, 2**62 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 0]
WRONG_VALUES: list[Any] = [
    "x",
    "",
    "9" * 40,
    [],
    [1, 2],
    {},
    {"a": 1},
    None,
    True,
    False,
    1.5,
    -7,
    b"\x00\xff",
]
BAD_RUN_CHARS = "!@#$%^&()+=,;:'\"<?/\\|~`[]{}"
CONTENT_TYPES = [
    "application/json",
    "application/msgpack",
    "text/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/x-msgpack",
    "application/vnd.msgpack",
    "text/plain",
    "garbage/type",
    "application/json;;;",
    "image/png",
]


#: A JSON variant's (payload bytes, expectation, content type).
_JsonVariant = tuple[bytes, str, str | None]


@dataclass(slots=True)
class Payload:
    """One message to publish. `expect`: "reject", "accept", "ignored" (a command subject, which esperd
    skips) or "any" (mutations may land either way)."""

    family: str
    subject: str
    data: bytes
    content_type: str | None = None
    expect: str = "any"

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Content-Type": self.content_type} if self.content_type is not None else None


# ------------------------------------------------------------------------------------ the generator


class FuzzGenerator:
    """Seeded payloads of every family; `next()` returns one, `bootstrap()` the fuzz runs' topologies."""

    def __init__(
        self,
        seed: int,
        *,
        limits: dict[str, Any] | None = None,
        fuzz_runs: int = 16,
        good_runs: tuple[str, ...] = (),
        flood_run: str = "flood",
    ) -> None:
        self.rng = random.Random(seed)
        self.limits = {**LIMITS, **(limits or {})}
        self.codec = Codec(max_payload_bytes=1 << 30)
        self.runs = [f"fz-{i:02d}" for i in range(fuzz_runs)]
        self.good_runs = tuple(good_runs)
        self.flood_run = flood_run
        self.layers = {run: 8 + (i % 5) * 4 for i, run in enumerate(self.runs)}  # declared layers per run
        self._names, self._weights = zip(*FAMILIES.items(), strict=True)
        self._makers: dict[str, Callable[[], Payload]] = {
            name: getattr(self, f"_f_{name}") for name in FAMILIES
        }
        self._unknown = 0

    # -------------------------------------------------------------- api

    def bootstrap(self) -> list[Payload]:
        """A valid topology for every fuzz run (so unknown-layer and seed traffic has something to hit)."""
        return [
            Payload(
                "bootstrap",
                self._subj(run, "topology"),
                self.codec.encode(self._topology(self.layers[run])),
                expect="accept",
            )
            for run in self.runs
        ]

    def next(self) -> Payload:
        family = self.rng.choices(self._names, self._weights)[0]
        return self._makers[family]()

    def stream(self, count: int) -> Iterator[Payload]:
        for _ in range(count):
            yield self.next()

    # -------------------------------------------------------------- helpers

    def _subj(self, run: str, channel: str) -> str:
        return f"{PREFIX}.{run}.{channel}"

    def _run(self) -> str:
        return self.rng.choice(self.runs)

    def _topology(
        self, n: int, kinds: tuple[str, ...] = ("conv", "linear", "attention", "mlp")
    ) -> TopologyPacket:
        nodes = [
            TopologyNode(layer_id=i, name=f"l{i}", layer_type=kinds[i % len(kinds)], params=1000 * (i + 1))
            for i in range(n)
        ]
        edges = [(i, i + 1) for i in range(n - 1)] + [(i, i + 2) for i in range(0, n - 2, 3)]
        return TopologyPacket(nodes=nodes, edges=edges, topology_version=1, timestamp=time.time())

    def _health(self, run: str | None = None, layer: int | None = None) -> HealthSignal:
        r = self.rng
        layers = self.layers.get(run or "", 8)
        return HealthSignal(
            layer_id=r.randrange(layers) if layer is None else layer,
            health_score=r.random(),
            error_count=r.randrange(10),
            activation_variance=r.random() * 3,
            gradient_norm=r.random() * 10,
            seed_stage=r.choice(list(SeedStage)),
            alpha=r.random(),
            epochs_in_stage=r.randrange(12),
        )

    def _batch(self, run: str | None = None, n: int | None = None) -> HealthBatch:
        n = self.rng.randrange(1, 24) if n is None else n
        return HealthBatch(signals=[self._health(run) for _ in range(n)], timestamp=time.time())

    def _state(self, run: str | None = None) -> SystemStatePacket:
        r = self.rng
        layers = self.layers.get(run or "", 8)
        seeds = [
            SeedSlotState(
                layer_id=r.randrange(layers),
                stage=r.choice(list(SeedStage)),
                alpha=r.random(),
                epochs_in_stage=r.randrange(12),
                counterfactual=r.uniform(-1, 1),
                total_improvement=r.uniform(-1, 1),
            )
            for _ in range(r.randrange(4))
        ]
        return SystemStatePacket(
            epoch=r.randrange(100),
            global_step=r.randrange(10**6),
            train_loss=r.random() * 3,
            val_loss=r.random() * 3,
            val_accuracy=r.random(),
            train_accuracy=r.random(),
            metrics={f"m{i}": r.random() for i in range(r.randrange(5))},
            hardware=HardwareContext(device="cuda:0", gpu_utilization=r.random()),
            seeds=seeds,
            host_params=10**6,
            total_params=10**6 + r.randrange(10**5),
            timestamp=time.time(),
        )

    def _ack(self) -> CommandAck:
        return CommandAck(
            command_id=self._command_id(),
            status=self.rng.choice(list(AckStatus)),
            reason="fuzz",
            layer_id=self.rng.randrange(8),
            timestamp=time.time(),
        )

    def _command_id(self) -> str:
        return "".join(
            self.rng.choices(string.ascii_letters + string.digits + "-_:", k=self.rng.randrange(1, 65))
        )

    def _valid(self, run: str) -> tuple[str, Any]:
        """(channel, message) of a random valid message for `run`."""
        channel = self.rng.choice(CHANNELS)
        if channel == "topology":
            return channel, self._topology(self.rng.randrange(1, 24))
        if channel == "health":
            return channel, self._health(run) if self.rng.random() < 0.5 else self._batch(run)
        if channel == "state":
            return channel, self._state(run)
        return channel, self._ack()

    def _positional(self, msg: Any) -> list[Any]:
        return [msg.__struct_config__.tag, *msgspec.structs.astuple(msg)]

    def _keyed(self, msg: Any) -> dict[str, Any]:
        return msgspec.to_builtins(msg)

    def _rand_bytes(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randrange(lo, hi))

    # -------------------------------------------------------------- families

    def _f_random_bytes(self) -> Payload:
        data = self._rand_bytes(0, 512)
        if self.rng.random() < 0.1:
            data = b"{" + data  # sniffed as JSON
        return Payload("random_bytes", self._subj(self._run(), self.rng.choice(CHANNELS)), data)

    def _f_truncated_msgpack(self) -> Payload:
        run = self._run()
        channel, msg = self._valid(run)
        full = self.codec.encode(msg)
        cut = self.rng.randrange(1, len(full)) if len(full) > 1 else 0
        return Payload("truncated_msgpack", self._subj(run, channel), full[:cut], expect="reject")

    def _f_mutated_msgpack(self) -> Payload:
        run = self._run()
        channel, msg = self._valid(run)
        data = bytearray(self.codec.encode(msg))
        for _ in range(self.rng.randrange(1, 5)):
            op, i = self.rng.random(), self.rng.randrange(len(data))
            if op < 0.6:
                data[i] ^= 1 << self.rng.randrange(8)
            elif op < 0.8:
                data.insert(i, self.rng.randrange(256))
            elif len(data) > 1:
                del data[i]
        return Payload("mutated_msgpack", self._subj(run, channel), bytes(data))

    def _f_wrong_types(self) -> Payload:
        run = self._run()
        channel, msg = self._valid(run)
        value = self.rng.choice(WRONG_VALUES)
        if self.rng.random() < 0.5:
            fields = self._positional(msg)
            i = self.rng.randrange(1, len(fields)) if len(fields) > 1 else 0
            fields[i] = value
            data = msgspec.msgpack.encode(fields)
            ctype = None
        else:
            keyed = self._keyed(msg)
            key = self.rng.choice(sorted(keyed))
            keyed[key] = value if not isinstance(value, bytes) else value.hex()
            data = msgspec.json.encode(keyed)
            ctype = "application/json" if self.rng.random() < 0.5 else None
        # `kind` replaced, or a value of the same JSON type (e.g. 1.5 for a float), may still pass.
        return Payload("wrong_types", self._subj(run, channel), data, ctype)

    def _f_extreme_numbers(self) -> Payload:
        run = self._run()
        r = self.rng
        channel = r.choice(("health", "health", "state", "topology", "ack"))
        if channel == "health":
            msg = self._keyed(self._health(run))
            numeric = [k for k, v in msg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        elif channel == "state":
            msg = self._keyed(self._state(run))
            numeric = [k for k, v in msg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            numeric.append("metrics")
        elif channel == "topology":
            msg = self._keyed(self._topology(r.randrange(1, 6)))
            numeric = ["topology_version", "timestamp", "nodes"]
        else:
            msg = self._keyed(self._ack())
            numeric = ["layer_id", "timestamp"]
        for key in r.sample(numeric, k=min(len(numeric), r.randrange(1, 3))):
            value: Any = r.choice(EXTREME_FLOATS) if r.random() < 0.5 else r.choice(EXTREME_INTS)
            if key == "metrics":
                msg["metrics"] = {"loss": value}
            elif key == "nodes":
                msg["nodes"][0]["layer_id" if r.random() < 0.5 else "params"] = value
            else:
                msg[key] = value
        if r.random() < 0.6:  # msgpack, positional (the host's form)
            tag = msg.pop("kind")
            fields = {
                "health": HealthSignal,
                "state": SystemStatePacket,
                "topology": TopologyPacket,
                "ack": CommandAck,
            }[channel]
            data = self._positional_from_keyed(tag, fields, msg)
            return Payload("extreme_numbers", self._subj(run, channel), data, None)
        # JSON cannot carry NaN/inf: msgspec writes them as null; big ints go out as digits.
        return Payload(
            "extreme_numbers",
            self._subj(run, channel),
            json.dumps(msg, allow_nan=True).encode(),
            "application/json",
        )

    def _positional_from_keyed(self, tag: str, cls: type, keyed: dict[str, Any]) -> bytes:
        """The positional msgpack form (what Codec.encode writes) of a keyed dict; nested structs as
        builtins."""
        out: list[Any] = [tag]
        for name, default in zip(cls.__struct_fields__, _defaults(cls), strict=True):
            out.append(msgspec.to_builtins(keyed.get(name, default)))
        return msgspec.msgpack.encode(out)

    def _f_over_limit(self) -> Payload:
        r, lim = self.rng, self.limits
        run = self._run()
        kind = r.choice(
            (
                "batch",
                "nodes",
                "edges",
                "metrics",
                "seeds",
                "too_large",
                "at_limit_batch",
                "at_limit_topology",
            )
        )
        if kind == "batch":
            msg: Any = self._batch(run, lim["max_batch_signals"] + r.randrange(1, 64))
            return Payload("over_limit", self._subj(run, "health"), self.codec.encode(msg), expect="reject")
        if kind == "nodes":
            msg = self._topology(lim["max_nodes"] + r.randrange(1, 64))
            return Payload("over_limit", self._subj(run, "topology"), self.codec.encode(msg), expect="reject")
        if kind == "edges":
            msg = TopologyPacket(
                nodes=[TopologyNode(layer_id=i) for i in range(8)],
                edges=[(i % 7, i % 7 + 1) for i in range(lim["max_edges"] + r.randrange(1, 64))],
            )
            return Payload("over_limit", self._subj(run, "topology"), self.codec.encode(msg), expect="reject")
        if kind == "metrics":
            msg = SystemStatePacket(epoch=1, metrics={f"k{i}": 0.5 for i in range(lim["max_metrics"] + 1)})
            return Payload("over_limit", self._subj(run, "state"), self.codec.encode(msg), expect="reject")
        if kind == "seeds":
            msg = SystemStatePacket(
                epoch=1, seeds=[SeedSlotState(layer_id=i % 8) for i in range(lim["max_seeds"] + 1)]
            )
            return Payload("over_limit", self._subj(run, "state"), self.codec.encode(msg), expect="reject")
        if kind == "too_large":
            data = b"\x00" * (lim["max_payload_bytes"] + r.randrange(1, 4096))
            return Payload("over_limit", self._subj(run, r.choice(CHANNELS)), data, expect="reject")
        if kind == "at_limit_batch":  # exactly at the limit: valid, and the analyzer's worst case
            msg = self._batch(run, lim["max_batch_signals"])
            return Payload("over_limit", self._subj(run, "health"), self.codec.encode(msg), expect="accept")
        msg = self._topology(min(lim["max_nodes"], ANALYZER["max_nodes_per_run"]))
        return Payload("over_limit", self._subj(run, "topology"), self.codec.encode(msg), expect="accept")

    def _f_bad_topology(self) -> Payload:
        r = self.rng
        n = r.randrange(2, 30)
        nodes = [TopologyNode(layer_id=i, layer_type="conv") for i in range(n)]
        edges = [(i, i + 1) for i in range(n - 1)]
        kind = r.choice(("cycle", "self_loop", "duplicate", "bad_edge", "empty"))
        if kind == "cycle":
            edges.append((n - 1, 0))
        elif kind == "self_loop":
            k = r.randrange(n)
            edges.append((k, k))
        elif kind == "duplicate":
            nodes.append(TopologyNode(layer_id=r.randrange(n)))
        elif kind == "bad_edge":
            edges.append((r.randrange(n), n + r.randrange(1, 1000)))
        else:
            nodes, edges = [], []
        msg = TopologyPacket(nodes=nodes, edges=edges)
        data = self.codec.encode(msg) if r.random() < 0.7 else self.codec.encode_json(msg)
        return Payload("bad_topology", self._subj(self._run(), "topology"), data, expect="reject")

    def _f_unknown_runs(self) -> Payload:
        self._unknown += 1
        run = f"unk-{self.rng.randrange(10**9):09d}"
        channel = self.rng.choice(("health", "health", "state"))
        msg = self._batch() if channel == "health" else self._state()
        return Payload("unknown_runs", self._subj(run, channel), self.codec.encode(msg), expect="accept")

    def _f_unknown_layers(self) -> Payload:
        run = self._run()
        r = self.rng
        signals = [
            HealthSignal(
                layer_id=r.choice((r.randrange(1000, 2**31 - 1), self.layers[run] + r.randrange(5))),
                health_score=r.random(),
            )
            for _ in range(r.randrange(1, 8))
        ]
        return Payload(
            "unknown_layers",
            self._subj(run, "health"),
            self.codec.encode(HealthBatch(signals=signals)),
            expect="accept",
        )

    def _f_unknown_acks(self) -> Payload:
        # Half on good runs' own subjects: a stranger's acks for commands that were never issued.
        on_good_run = self.good_runs and self.rng.random() < 0.5
        run = self.rng.choice(self.good_runs) if on_good_run else self._run()
        data = (
            self.codec.encode(self._ack()) if self.rng.random() < 0.8 else self.codec.encode_json(self._ack())
        )
        return Payload("unknown_acks", self._subj(run, "ack"), data, expect="accept")

    def _f_bad_subjects(self) -> Payload:
        r = self.rng
        kind = r.random()
        if kind < 0.15:  # a valid run, a channel that does not exist
            channel, msg = self._valid(self._run())
            bad = r.choice(("healthz", "STATE", "status", "topology_", "acks", "cmd", "x" * 70, "%"))
            return Payload(
                "bad_subjects", self._subj(self._run(), bad), self.codec.encode(msg), expect="reject"
            )
        if kind < 0.2:  # a forged command on a fuzz run's command subject: esperd skips its own channel
            channel, msg = self._valid(self._run())
            return Payload(
                "bad_subjects", self._subj(self._run(), "command"), self.codec.encode(msg), expect="ignored"
            )
        if kind < 0.55:
            base = list(r.choices(string.ascii_letters + string.digits, k=r.randrange(0, 20)))
            base.insert(r.randrange(len(base) + 1), r.choice(BAD_RUN_CHARS))
            run = "".join(base)
        elif kind < 0.8:
            run = "".join(r.choices(string.ascii_letters + string.digits, k=r.randrange(65, 200)))
        else:
            run = r.choice(("rün", "运行", "run\u200b1", "r\u00e9sum\u00e9", "ok\x7f"))
        channel, msg = self._valid(self._run())
        return Payload("bad_subjects", self._subj(run, channel), self.codec.encode(msg), expect="reject")

    def _f_wrong_channel(self) -> Payload:
        run = self._run()
        channel, msg = self._valid(run)
        other = self.rng.choice([c for c in CHANNELS if c != channel])
        return Payload("wrong_channel", self._subj(run, other), self.codec.encode(msg), expect="reject")

    def _f_json_variants(self) -> Payload:
        run = self._run()
        channel, msg = self._valid(run)
        keyed = self._keyed(msg)
        variant = self.rng.randrange(len(self._JSON_VARIANTS))
        ctype = self.rng.choice((None, "application/json"))
        data, expect, ctype = self._JSON_VARIANTS[variant](self, keyed, msg, ctype)
        return Payload("json_variants", self._subj(run, channel), data, ctype, expect)

    # Each JSON variant: (keyed form, message, content type) -> (bytes, expectation, content type).

    def _jv_pretty(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        return json.dumps(keyed, indent=4).encode(), "accept", ctype  # pretty-printed: fine

    def _jv_extra_fields(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        data = json.dumps({**keyed, "extra": [1, {"x": None}], "zz": "y"}).encode()
        return data, "accept", ctype  # unknown extra fields: ignored

    def _jv_kind_case(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        return json.dumps({**keyed, "kind": keyed["kind"].upper()}).encode(), "reject", ctype

    def _jv_field_missing(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        # a required field missing (or kind missing)
        required = {"health": ("layer_id", "health_score"), "ack": ("command_id", "status")}.get(
            keyed["kind"], ()
        )
        key = self.rng.choice(["kind", *required])
        return json.dumps({k: v for k, v in keyed.items() if k != key}).encode(), "reject", ctype

    def _jv_positional(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        # the positional (array) form is msgpack's, not JSON's
        return json.dumps([keyed["kind"], *keyed.values()]).encode(), "reject", ctype

    def _jv_deep_nesting(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        depth = self.rng.randrange(100, 50_000)
        if self.rng.random() < 0.5:
            return b"[" * depth + b"]" * depth, "reject", ctype
        return b'{"a":' * depth + b"1" + b"}" * depth, "reject", ctype

    def _jv_bom(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        return b"\xef\xbb\xbf" + json.dumps(keyed).encode(), "reject", None  # BOM first: not sniffed as JSON

    def _jv_declared_msgpack(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        return json.dumps(keyed).encode(), "reject", "application/msgpack"

    def _jv_msgpack_declared_json(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        return self.codec.encode(msg), "reject", "application/json"

    def _jv_duplicate_keys(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        body = json.dumps(keyed)
        return (body[:-1] + ', "kind": "' + keyed["kind"] + '"}').encode(), "accept", ctype  # last one wins

    def _jv_huge_number(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        data = '{"kind":"health","layer_id":1' + "0" * 5000 + ',"health_score":0.5}'
        return data.encode(), "reject", ctype

    def _jv_non_finite(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        # NaN / Infinity literals are not JSON
        literal = self.rng.choice(("NaN", "Infinity", "-Infinity"))
        return ('{"kind":"health","layer_id":1,"health_score":' + literal + "}").encode(), "reject", ctype

    def _jv_not_an_object(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        data = self.rng.choice((b"null", b"true", b"123", b'"health"', b"[]", b"{}", b" ", b"\n{\n"))
        return data, "reject", ctype

    def _jv_truncated(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        raw = json.dumps(keyed).encode()
        return raw[: self.rng.randrange(1, len(raw))], "reject", ctype

    def _jv_oversized(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        # oversized strings, control characters
        data = json.dumps({"kind": "topology", "nodes": [{"layer_id": 0, "name": "n" * 300}]}).encode()
        if self.rng.random() < 0.5:
            data = (
                b'{"kind":"ack","command_id":"a\\u0000b","status":"applied","reason":"' + b"r" * 2000 + b'"}'
            )
        return data, "reject", ctype

    def _jv_garbage_content_type(self, keyed: dict[str, Any], msg: Any, ctype: str | None) -> _JsonVariant:
        # content type garbage on a valid body: sniffing still reads it
        return json.dumps(keyed).encode(), "accept", self.rng.choice(CONTENT_TYPES[6:])

    _JSON_VARIANTS: tuple[Callable[[FuzzGenerator, dict[str, Any], Any, str | None], _JsonVariant], ...] = (
        _jv_pretty,
        _jv_extra_fields,
        _jv_kind_case,
        _jv_field_missing,
        _jv_positional,
        _jv_deep_nesting,
        _jv_bom,
        _jv_declared_msgpack,
        _jv_msgpack_declared_json,
        _jv_duplicate_keys,
        _jv_huge_number,
        _jv_non_finite,
        _jv_not_an_object,
        _jv_truncated,
        _jv_oversized,
        _jv_garbage_content_type,
    )

    def _f_msgpack_structure(self) -> Payload:
        r = self.rng
        run = self._run()
        channel, msg = self._valid(run)
        variant = r.randrange(10)
        expect = "reject"
        if variant == 0:  # array32 header claiming 4G elements
            data = b"\xdd\xff\xff\xff\xff" + b"\xa6health" + self._rand_bytes(0, 16)
        elif variant == 1:  # map32 header claiming 4G pairs
            data = b"\xdf\xff\xff\xff\xff" + self._rand_bytes(0, 16)
        elif variant == 2:  # str32 / bin32 claiming 4 GiB
            data = b"\x92" + r.choice((b"\xdb", b"\xc6")) + b"\xff\xff\xff\xff" + b"x" * r.randrange(16)
        elif variant == 3:  # deep nesting
            depth = r.randrange(100, 50_000)
            data = b"\x91" * depth + b"\xc0"
        elif variant == 4:  # ext types where fields belong
            data = msgspec.msgpack.encode(["health", msgspec.msgpack.Ext(1, b"\x00" * 8), 3, 0.5])
        elif variant == 5:  # a map (keyed) where the positional array belongs
            data = msgspec.msgpack.encode(self._keyed(msg))
        elif variant == 6:  # more elements than the message has fields: a newer host's, ignored by design
            data, expect = (
                msgspec.msgpack.encode([*self._positional(msg), *([0] * r.randrange(1, 40))]),
                "any",
            )
        elif variant == 7:  # only the required fields: valid (defaults fill the rest)
            data, expect = msgspec.msgpack.encode(["health", 1, r.randrange(8), r.random()]), "accept"
            channel = "health"
        elif variant == 8:  # trailing bytes after a valid message
            data = self.codec.encode(msg) + self._rand_bytes(1, 8)
        else:  # empty payload, or the tag alone
            data = r.choice((b"", b"\x90", b"\x91\xa6health", b"\xc0"))
        return Payload("msgpack_structure", self._subj(run, channel), data, expect=expect)

    def _f_flood_one_run(self) -> Payload:
        r = self.rng
        if r.random() < 0.1:
            msg: Any = self._state(self.flood_run)
            return Payload(
                "flood_one_run", self._subj(self.flood_run, "state"), self.codec.encode(msg), expect="accept"
            )
        msg = self._batch(self.flood_run, r.randrange(1, 16))
        return Payload(
            "flood_one_run", self._subj(self.flood_run, "health"), self.codec.encode(msg), expect="accept"
        )


def _defaults(cls: type) -> list[Any]:
    """Each field's default (None where required), in declaration order."""
    info = msgspec.structs.fields(cls)
    return [
        None if f.required else (f.default if f.default is not msgspec.NODEFAULT else f.default_factory())
        for f in info
    ]


# ------------------------------------------------------------------------------------- the oracle


class Oracle:
    """What the daemon must count for each payload: its own intake and topology validation, run here.

    Both are pure functions of (subject, bytes, content type) and the limits, so the daemon's
    per-reason counts must equal these exactly; only `too_many_runs` (and `too_many_nodes` from
    signals growing an inferred graph) depend on the daemon's state.
    """

    def __init__(self, limits: dict[str, Any] | None = None, analyzer: dict[str, Any] | None = None) -> None:
        lim = {**LIMITS, **(limits or {}), "reject_log_interval_s": 1e9}
        self.intake = Intake(LimitsConfig(**lim), PREFIX)
        an = {**ANALYZER, **(analyzer or {})}
        self.max_nodes, self.max_edges = an["max_nodes_per_run"], an["max_edges_per_run"]
        self.accepted = 0
        self.ignored = 0
        self.rejected: Counter[str] = Counter()  # intake + topology reasons
        self.unknown_acks = 0  # accepted acks the daemon cannot know (every fuzz ack)
        self.by_family: dict[str, Counter[str]] = {}
        self.surprises: Counter[str] = Counter()  # family:expectation broken (generator bug or daemon change)

    def feed(self, p: Payload, *, ack_is_unknown: bool = True) -> str:
        """The outcome for one payload: "accepted", "ignored" (never counted) or the rejection reason."""
        if p.subject.endswith(".command"):  # esperd.bus skips command subjects (its own output)
            self.ignored += 1
            self.by_family.setdefault(p.family, Counter())["ignored"] += 1
            if p.expect != "ignored":
                self.surprises[f"{p.family}:{p.expect}->ignored"] += 1
            return "ignored"
        out = self.intake.check(p.subject, p.data, p.content_type)
        if isinstance(out, Accepted):
            outcome = "accepted"
            msg = out.message
            if isinstance(msg, TopologyPacket):
                try:
                    Graph.from_topology(msg, max_nodes=self.max_nodes, max_edges=self.max_edges)
                except AnalyzerError as exc:
                    outcome = exc.reason
                    self.rejected[exc.reason] += 1
            elif isinstance(msg, CommandAck) and ack_is_unknown:
                self.unknown_acks += 1
            if outcome == "accepted":
                self.accepted += 1
        else:
            outcome = out.reason
            self.rejected[out.reason] += 1
        self.by_family.setdefault(p.family, Counter())[outcome] += 1
        if (
            p.expect == "accept"
            and outcome != "accepted"
            or p.expect == "reject"
            and outcome == "accepted"
            or p.expect == "ignored"
        ):
            self.surprises[f"{p.family}:{p.expect}->{outcome}"] += 1
        return outcome

    @property
    def processed(self) -> int:
        """Messages the daemon will have counted (each one exactly once: accepted or rejected)."""
        return self.accepted + sum(self.rejected.values())


def daemon_processed(status: dict[str, Any]) -> int:
    """Messages the daemon has counted: each is accepted or rejected, never both."""
    return status["accepted_total"] + status["rejected_total"]


def check_counts(status: dict[str, Any], oracle: Oracle) -> list[str]:
    """Failures (empty = every payload accounted for, by reason) between a final status and the oracle."""
    problems: list[str] = []
    by_reason: dict[str, int] = status["rejected_by_reason"]
    if sum(by_reason.values()) != status["rejected_total"]:
        problems.append(
            f"sum(rejected_by_reason)={sum(by_reason.values())} != rejected_total={status['rejected_total']}"
        )
    # The oracle cannot know the state-dependent refusals; each of them is one message it counted accepted.
    stateful = sum(
        max(0, n - oracle.rejected.get(reason, 0))
        for reason, n in by_reason.items()
        if reason in STATEFUL_REASONS
    )
    if status["accepted_total"] + stateful != oracle.accepted:
        problems.append(
            f"accepted_total={status['accepted_total']} + state-dependent refusals {stateful} "
            f"!= oracle {oracle.accepted}"
        )
    for reason in sorted(set(by_reason) | set(oracle.rejected)):
        got, want = by_reason.get(reason, 0), oracle.rejected.get(reason, 0)
        if reason in STATEFUL_REASONS:
            if got < want:
                problems.append(f"{reason}: daemon {got} < oracle {want}")
        elif reason == "internal_error" or got != want:
            problems.append(f"{reason}: daemon {got} != oracle {want}")
    if status["scheduler"]["unknown_acks"] != oracle.unknown_acks:
        problems.append(f"unknown_acks={status['scheduler']['unknown_acks']} != oracle {oracle.unknown_acks}")
    if status["decisions"]["failures"]:
        problems.append(f"decision failures: {status['decisions']['failures']}")
    return problems


# ------------------------------------------------------------------------------------- good runs


@dataclass
class GoodRun:
    """A well-behaved host: topology once, then health + state every `interval_s`; acks every command.

    Its state packets keep a seed in TRAINING past the dwell, so the heuristic answers each one with
    an ADVANCE on `seed_layer` (cooldown 0). `ratio` = commands per state packet.
    """

    url: str
    run_id: str
    oracle: Oracle | None = None
    layers: int = 8
    seed_layer: int = 5
    interval_s: float = 0.1
    codec: Codec = field(default_factory=Codec)
    states: int = 0
    commands: int = 0
    wrong: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    published: int = 0
    _nc: Client | None = None
    _last_state_at: float = 0.0
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    stopped_at: float = 0.0

    async def start(self) -> None:
        self._nc = await nats.connect(self.url, name=f"good-{self.run_id}", max_reconnect_attempts=3)
        await self._nc.subscribe(f"{PREFIX}.{self.run_id}.command", cb=self._on_command)
        await self._nc.flush()
        nodes = [
            TopologyNode(layer_id=i, name=f"b{i}", layer_type="conv", params=1000) for i in range(self.layers)
        ]
        await self._publish(
            "topology", TopologyPacket(nodes=nodes, edges=[(i, i + 1) for i in range(self.layers - 1)])
        )
        await self._nc.flush()
        self._task = asyncio.create_task(self._loop(), name=f"good-{self.run_id}")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
        self.stopped_at = time.monotonic()
        await asyncio.sleep(0.3)  # commands for the last states
        if self._nc is not None:
            await self._nc.flush()
            await self._nc.close()

    async def _publish(self, channel: str, msg: Any) -> None:
        assert self._nc is not None
        subject, data = f"{PREFIX}.{self.run_id}.{channel}", self.codec.encode(msg)
        if self.oracle is not None:
            outcome = self.oracle.feed(
                Payload("good", subject, data, "application/msgpack", "accept"), ack_is_unknown=False
            )
            assert outcome == "accepted", (subject, outcome)
        await self._nc.publish(subject, data, headers={"Content-Type": "application/msgpack"})
        self.published += 1

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        self.started_at = time.monotonic()
        next_at, epoch = loop.time(), 0
        while not self._stop.is_set():
            epoch += 1
            signals = [
                HealthSignal(layer_id=i, health_score=0.9 - 0.01 * (epoch % 3)) for i in range(self.layers)
            ]
            await self._publish("health", HealthBatch(signals=signals))
            seeds = [SeedSlotState(layer_id=self.seed_layer, stage=SeedStage.TRAINING, epochs_in_stage=3)]
            self._last_state_at = time.monotonic()
            await self._publish("state", SystemStatePacket(epoch=epoch, val_accuracy=0.7, seeds=seeds))
            self.states += 1
            next_at += self.interval_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - loop.time()))

    async def _on_command(self, msg: Msg) -> None:
        ctype = msg.headers.get("Content-Type") if msg.headers else None
        try:
            command = self.codec.decode_command(msg.data, ctype)
        except Exception as exc:  # noqa: BLE001 - record it, never crash the host
            self.wrong.append(f"undecodable command: {exc}")
            return
        if (
            command.run_id != self.run_id
            or command.layer_id != self.seed_layer
            or command.op is not Op.ADVANCE
        ):
            self.wrong.append(f"{command.run_id}/{command.layer_id}/{command.op.value}")
        self.commands += 1
        self.latencies_ms.append((time.monotonic() - self._last_state_at) * 1000)
        await self._publish(
            "ack",
            CommandAck(
                command_id=command.command_id,
                status=AckStatus.APPLIED,
                layer_id=command.layer_id,
                timestamp=time.time(),
            ),
        )

    @property
    def ratio(self) -> float:
        return self.commands / self.states if self.states else 0.0

    @property
    def rate(self) -> float:
        span = (self.stopped_at or time.monotonic()) - self.started_at
        return self.commands / span if span > 0 else 0.0


def summarize_good(runs: list[GoodRun]) -> dict[str, float]:
    lat = sorted(x for r in runs for x in r.latencies_ms)
    return {
        "runs": len(runs),
        "states": sum(r.states for r in runs),
        "commands": sum(r.commands for r in runs),
        "ratio_min": min(r.ratio for r in runs) if runs else 0.0,
        "ratio_mean": sum(r.ratio for r in runs) / len(runs) if runs else 0.0,
        "rate_per_run": sum(r.rate for r in runs) / len(runs) if runs else 0.0,
        "latency_p50_ms": _pct(lat, 50),
        "latency_p99_ms": _pct(lat, 99),
        "latency_max_ms": lat[-1] if lat else 0.0,
        "wrong": sum(len(r.wrong) for r in runs),
    }


def _pct(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered) / 100) - 1))]


# ---------------------------------------------------------------------------------- status poller


class StatusPoller:
    """Asks `esperd.status` every `interval_s`; records response times, failures and the last answer."""

    def __init__(
        self,
        nc: Client,
        interval_s: float = 0.5,
        timeout_s: float = 2.0,
        rss: Callable[[], int] | None = None,
    ) -> None:
        self.nc, self.interval_s, self.timeout_s, self.rss = nc, interval_s, timeout_s, rss
        self.latencies_ms: list[float] = []
        self.failures = 0
        self.last: dict[str, Any] = {}
        self.rss_samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    async def ask(self) -> dict[str, Any]:
        t = time.perf_counter()
        reply = await self.nc.request("esperd.status", b"", timeout=self.timeout_s)
        self.latencies_ms.append((time.perf_counter() - t) * 1000)
        self.last = json.loads(reply.data)
        return self.last

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="status-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.ask()
            except Exception:  # noqa: BLE001 - a timeout or no responder is what we count
                self.failures += 1
            if self.rss is not None:
                with contextlib.suppress(OSError):
                    self.rss_samples.append((time.monotonic() - self._t0, self.rss()))
            await asyncio.sleep(self.interval_s)

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    @property
    def p99_ms(self) -> float:
        return _pct(sorted(self.latencies_ms), 99)


def rss_of(pid: int) -> int:
    """Resident set size of a process in bytes (VmRSS from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for {pid}")


# -------------------------------------------------------------------------------- the publisher


async def publish_payloads(
    nc: Client,
    payloads: Iterator[Payload],
    oracle: Oracle,
    *,
    status: Callable[[], Any],
    max_lag: int = 4000,
    deadline_s: float = 900.0,
    chunk: int = 250,
) -> dict[str, Any]:
    """Publish every payload (fed to the oracle first), keeping at most `max_lag` unprocessed.

    `status` is an async callable returning a status dict. Stops at `deadline_s` (reported).
    """
    start = time.monotonic()
    sent, sent_bytes, waits = 0, 0, 0
    families: Counter[str] = Counter()
    timed_out = False
    for p in payloads:
        oracle.feed(p)
        await nc.publish(p.subject, p.data, headers=p.headers)
        sent += 1
        sent_bytes += len(p.data)
        families[p.family] += 1
        if sent % chunk == 0:
            await nc.flush(timeout=10)
            while True:
                st = await status()
                if oracle.processed - daemon_processed(st) <= max_lag:
                    break
                waits += 1
                if time.monotonic() - start > deadline_s:
                    break
                await asyncio.sleep(0.02)
        if time.monotonic() - start > deadline_s:
            timed_out = True
            break
    await nc.flush(timeout=10)
    return {
        "sent": sent,
        "bytes": sent_bytes,
        "families": families,
        "seconds": time.monotonic() - start,
        "lag_waits": waits,
        "timed_out": timed_out,
    }


async def wait_caught_up(status: Callable[[], Any], oracle: Oracle, timeout: float = 60.0) -> dict[str, Any]:
    """Poll status until the daemon has processed everything the oracle saw (or the timeout)."""
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            st = await status()
            if daemon_processed(st) >= oracle.processed:
                return st
        await asyncio.sleep(0.1)
    return st


# ----------------------------------------------------------------------------- the campaign (main)


def config_toml(url: str, state_dir: Path, log_level: str = "warning") -> str:
    def table(name: str, values: dict[str, Any]) -> str:
        lines = [f"[{name}]"]
        nested = []
        for k, v in values.items():
            if isinstance(v, dict):
                nested.append(table(f"{name}.{k}", v))
            else:
                lines.append(f"{k} = {json.dumps(v)}")
        return "\n".join(lines + nested) + "\n"

    return (
        table("nats", {"servers": [url], "reconnect_wait_s": 0.2})
        + table(
            "service",
            {
                "state_dir": str(state_dir),
                "drain_timeout_s": 10.0,
                "log_level": log_level,
                "log_format": "json",
                "torch_threads": 1,
                "device": "cpu",
            },
        )
        + table("limits", LIMITS)
        + table("analyzer", ANALYZER)
        + table("scheduler", SCHEDULER)
        + table("policy", POLICY)
    )


async def _wait_status(nc: Client, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = await nc.request("esperd.status", b"", timeout=1.0)
            return json.loads(reply.data)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def good_phase(
    url: str, names: list[str], duration_s: float, oracle: Oracle, during: Callable[[], Any] | None = None
) -> tuple[list[GoodRun], Any]:
    """Run good hosts for `duration_s` (or for as long as `during()` takes, at least `duration_s`)."""
    runs = [GoodRun(url, name, oracle) for name in names]
    for run in runs:
        await run.start()
    result = None
    t0 = time.monotonic()
    if during is not None:
        result = await during()
    await asyncio.sleep(max(0.0, duration_s - (time.monotonic() - t0)))
    for run in runs:
        await run.stop()
    return runs, result


async def campaign(args: argparse.Namespace) -> int:
    from esperd.ops.natsserver import NatsServer

    work = Path(tempfile.mkdtemp(prefix="esperd-fuzz-"))
    server = NatsServer(work_dir=work / "nats")
    server.start()
    config = work / "esperd.toml"
    config.write_text(config_toml(server.url, work / "state"), encoding="utf-8")
    log_path = work / "esperd.log"
    cmd = [sys.executable, "-m", "esperd.cli", "--config", str(config)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)  # noqa: ASYNC220 - returns at once
    print(f"nats-server {server.url}; esperd pid {proc.pid}; work dir {work}", flush=True)
    checks: list[tuple[str, bool, str]] = []
    report: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "seed": args.seed}
    exit_code = None
    try:
        control = await nats.connect(server.url, name="fuzz-control")
        fuzz_nc = await nats.connect(server.url, name="fuzz-publisher", pending_size=64 * 1024 * 1024)
        await _wait_status(control)
        poller = StatusPoller(control, rss=lambda: rss_of(proc.pid))
        poller.start()
        oracle = Oracle()
        rss_start = rss_of(proc.pid)

        # ---- baseline: good runs alone
        print(f"baseline: {args.good_runs} good runs for {args.baseline_s:.0f} s", flush=True)
        base, _ = await good_phase(
            server.url, [f"base-{i}" for i in range(args.good_runs)], args.baseline_s, oracle
        )
        base_sum = summarize_good(base)
        rss_before = rss_of(proc.pid)

        # ---- campaign: fresh good runs while the fuzz publisher runs
        gen = FuzzGenerator(
            args.seed,
            good_runs=tuple(f"good-{i}" for i in range(args.good_runs)),
        )
        for p in gen.bootstrap():
            oracle.feed(p)
            await fuzz_nc.publish(p.subject, p.data, headers=p.headers)
        await fuzz_nc.flush()
        print(f"campaign: {args.payloads} payloads", flush=True)

        async def fuzz() -> dict[str, Any]:
            return await publish_payloads(
                fuzz_nc,
                gen.stream(args.payloads),
                oracle,
                status=poller.ask,
                max_lag=args.max_lag,
                deadline_s=args.deadline_s,
            )

        good, pub = await good_phase(
            server.url, [f"good-{i}" for i in range(args.good_runs)], args.baseline_s, oracle, during=fuzz
        )
        good_sum = summarize_good(good)
        final = await wait_caught_up(poller.ask, oracle)
        rss_after = rss_of(proc.pid)
        await asyncio.sleep(ANALYZER["idle_ttl_s"] + 2.5)  # every fuzz run idles out
        settled = await poller.ask()
        rss_settled = rss_of(proc.pid)
        await poller.stop()
        alive = proc.poll() is None
        await fuzz_nc.close()
        await control.close()

        problems = check_counts(final, oracle)
        checks += [
            (
                "payloads published",
                pub["sent"] >= args.payloads and not pub["timed_out"],
                f"{pub['sent']} in {pub['seconds']:.1f} s",
            ),
            ("esperd alive after the campaign", alive, f"pid {proc.pid}"),
            (
                "status answered every poll",
                poller.failures == 0,
                f"{len(poller.latencies_ms)} answers, {poller.failures} failures, max {poller.max_ms:.1f} ms",
            ),
            ("every payload counted, by reason (= oracle)", not problems, "; ".join(problems) or "exact"),
            (
                "no NATS errors, no slow-consumer drops",
                final["nats"]["errors"] == 0
                and not final["nats"].get("slow_consumer_drops")
                and not final["nats"]["disconnects"],
                (
                    f"errors={final['nats']['errors']}, "
                    f"slow_consumer_drops={final['nats'].get('slow_consumer_drops')}, "
                    f"disconnects={final['nats']['disconnects']}"
                ),
            ),
            ("no generator surprises", not oracle.surprises, str(dict(oracle.surprises)) or "none"),
            (
                "good runs: only their own ADVANCE commands",
                good_sum["wrong"] == 0 and base_sum["wrong"] == 0,
                f"wrong={good_sum['wrong']}",
            ),
            (
                "good runs: commands per state >= 80% of baseline",
                good_sum["ratio_min"] >= 0.8 * base_sum["ratio_mean"] and good_sum["commands"] > 0,
                f"{good_sum['ratio_min']:.3f} (min) vs baseline {base_sum['ratio_mean']:.3f}",
            ),
            (
                "good runs: command rate >= 80% of baseline",
                good_sum["rate_per_run"] >= 0.8 * base_sum["rate_per_run"],
                f"{good_sum['rate_per_run']:.2f}/s vs baseline {base_sum['rate_per_run']:.2f}/s",
            ),
            (
                "fuzz runs evicted afterwards",
                settled["runs"] <= 1 and settled["evicted_runs"] > 0,
                f"runs={settled['runs']}, evicted_runs={settled['evicted_runs']}",
            ),
        ]
        print("stopping esperd with SIGTERM", flush=True)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
        checks.append(("SIGTERM -> exit 0", exit_code == 0, f"exit {exit_code}"))
        report.update(
            pub=pub,
            final=final,
            settled=settled,
            oracle=oracle,
            base=base_sum,
            good=good_sum,
            poller=poller,
            rss=(rss_start, rss_before, rss_after, rss_settled),
            checks=checks,
            work=str(work),
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    log_lines = log_path.read_text(errors="replace").splitlines()
    report["log_lines"] = len(log_lines)
    report["log_errors"] = summarize_errors(log_lines)
    text = render(report)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")  # noqa: ASYNC240 - the campaign is over
        print(f"wrote {args.out}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def summarize_errors(lines: list[str]) -> dict[str, int]:
    """Error log lines counted by event and the exception's last line (e.g. "handler failed:
    OverflowError ...")."""
    found: Counter[str] = Counter()
    for line in lines:
        if '"level": "error"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            found[line[:120]] += 1
            continue
        last = (entry.get("exception") or "").strip().splitlines()[-1:] or [""]
        found[f"{entry.get('event')}: {last[0]}".strip(": ")] += 1
    return dict(found)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(r: dict[str, Any]) -> str:
    pub, final, oracle, base, good, poller = (
        r["pub"],
        r["final"],
        r["oracle"],
        r["base"],
        r["good"],
        r["poller"],
    )
    rss_start, rss_before, rss_after, rss_settled = r["rss"]
    peak = max((v for _, v in poller.rss_samples), default=0)
    out = ["# Fuzz campaign (esperd as a process, real nats-server)", ""]
    out += [
        f"Command: `{r['command']}`",
        "",
        (
            f"Machine: {platform.machine()} Linux, {os.cpu_count()} cores (shared), Python "
            f"{platform.python_version()}, msgspec {msgspec.__version__}; seed {r['seed']}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        ),
        "",
    ]
    out += ["## Checks", "", "| check | result | figure |", "|---|---|---|"]
    out += [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in r["checks"]]
    out += [
        "",
        "## Traffic",
        "",
        (
            f"- fuzz payloads published: **{pub['sent']}** ({pub['bytes'] / 2**20:.1f} MiB) in "
            f"{pub['seconds']:.1f} s "
            f"({pub['sent'] / max(pub['seconds'], 1e-9):.0f}/s); publisher paused {pub['lag_waits']} times "
            "to keep "
            f"<= the lag bound in flight"
        ),
        (
            f"- daemon totals: accepted {final['accepted_total']}, rejected {final['rejected_total']}, "
            f"commands {final['commands_total']}, unknown acks {final['scheduler']['unknown_acks']} "
            f"(oracle {oracle.unknown_acks}), evicted runs {r['settled']['evicted_runs']}, "
            f"decision failures {final['decisions']['failures']}, scheduler overflow "
            f"{final['scheduler']['overflow']}"
        ),
        (
            f"- status: {len(poller.latencies_ms)} polls every 0.5 s (plus the publisher's lag checks), "
            f"{poller.failures} failures, p99 {poller.p99_ms:.1f} ms, max {poller.max_ms:.1f} ms"
        ),
        (
            f"- esperd RSS: start {_mib(rss_start)}, after baseline {_mib(rss_before)}, after the campaign "
            f"{_mib(rss_after)}, peak sampled {_mib(peak)}, after eviction {_mib(rss_settled)}"
        ),
        f"- esperd log: {r['log_lines']} lines (level warning); error lines by kind: "
        f"{r['log_errors'] or 'none'}",
        "",
    ]
    out += ["## Rejections by reason", "", "| reason | daemon | oracle |", "|---|---:|---:|"]
    reasons = sorted(set(final["rejected_by_reason"]) | set(oracle.rejected))
    out += [
        f"| {k} | {final['rejected_by_reason'].get(k, 0)} | {oracle.rejected.get(k, 0)}"
        f"{' (min)' if k in STATEFUL_REASONS else ''} |"
        for k in reasons
    ]
    out += [f"| **total** | {final['rejected_total']} | {sum(oracle.rejected.values())} |", ""]
    out += [
        "## Payload families",
        "",
        "| family | sent | accepted | rejected (top reasons) |",
        "|---|---:|---:|---|",
    ]
    for fam in FAMILIES:
        c = oracle.by_family.get(fam, Counter())
        rej = ", ".join(f"{k} {v}" for k, v in c.most_common() if k != "accepted")[:120]
        out.append(f"| {fam} | {pub['families'].get(fam, 0)} | {c.get('accepted', 0)} | {rej} |")
    out += [
        "",
        "## Good runs (commands for a TRAINING seed, one expected per state packet)",
        "",
        "| phase | runs | states | commands | cmds/state (min) | cmds/s per run | latency p50 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("baseline (clean)", base), ("during the campaign", good)):
        out.append(
            f"| {name} | {s['runs']} | {s['states']} | {s['commands']} | {s['ratio_min']:.3f} | "
            f"{s['rate_per_run']:.2f} | {s['latency_p50_ms']:.1f} ms | {s['latency_p99_ms']:.1f} ms | "
            f"{s['latency_max_ms']:.1f} ms |"
        )
    out += ["", "Latency: from publishing a state packet to receiving its command, at the host.", ""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payloads", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--baseline-s", type=float, default=20.0, help="baseline length (also the campaign minimum)"
    )
    parser.add_argument("--good-runs", type=int, default=3)
    parser.add_argument("--max-lag", type=int, default=4000, help="payloads in flight at most")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="give up publishing after this")
    parser.add_argument("--out", default="", help="write the Markdown report here")
    args = parser.parse_args(argv)
    from esperd.logs import configure_logging

    configure_logging("error", "console")  # the oracle's intake would log each first rejection
    return asyncio.run(campaign(args))


if __name__ == "__main__":
    sys.exit(main())
