"""The operator views' text: `esperd watch` lines and `esperd status` rendering (pure logic)."""

from __future__ import annotations

import io
import json

import pytest

from esperd.cli import main
from esperd.cli.statusview import headline, render_status
from esperd.cli.watch import Watcher
from esperd_contracts import AckStatus, AdaptationCommand, Blueprint, Codec, CommandAck, Op

CODEC = Codec()
COMMAND = AdaptationCommand(
    command_id="0123456789abcdef",
    run_id="r1",
    layer_id=3,
    op=Op.GERMINATE,
    confidence=0.9123,
    policy="heuristic",
    policy_version=2,
    blueprint=Blueprint.CONV_LIGHT,
)


def test_a_command_reads_the_same_in_either_encoding() -> None:
    watcher = Watcher(io.StringIO())
    as_msgpack = watcher.describe("esper.r1.command", CODEC.encode(COMMAND), "application/msgpack")
    as_json = watcher.describe("esper.r1.command", CODEC.encode_json(COMMAND), None)
    assert as_msgpack == as_json
    assert as_json.startswith("r1: germinate        layer 3   conv_light (-, -)")
    assert as_json.endswith("[heuristic v2, confidence 0.91] id 01234567")


def test_an_ack_names_the_command_it_answers_when_seen() -> None:
    watcher = Watcher(io.StringIO())
    watcher.describe("esper.r1.command", CODEC.encode(COMMAND), None)
    applied = CommandAck(command_id=COMMAND.command_id, status=AckStatus.APPLIED)
    refused = CommandAck(command_id="feedface", status=AckStatus.REJECTED, reason="busy")
    assert watcher.describe("esper.r1.ack", CODEC.encode(applied), None).endswith(
        "germinate layer 3 -> applied"
    )
    assert watcher.describe("esper.r1.ack", CODEC.encode_json(refused), None).endswith(
        "command feedface (not seen) -> REJECTED: busy"
    )


def test_undecodable_messages_and_rejections_get_a_line_too() -> None:
    watcher = Watcher(io.StringIO(), run="r1")
    assert watcher.describe("esper.r1.command", b"\xc1", None).startswith(
        "r1: undecodable command (malformed"
    )
    report = {"reason": "invalid", "detail": "out of range", "subject": "esper.r1.health", "run_id": "r1"}
    assert watcher.describe("esperd.rejected", json.dumps(report).encode(), None) == (
        "REJECTED invalid on esper.r1.health: out of range"
    )
    other = {**report, "run_id": "r2", "subject": "esper.r2.health"}
    assert watcher.describe("esperd.rejected", json.dumps(other).encode(), None) == ""  # --run r1
    assert watcher.subjects() == ["esper.r1.command", "esper.r1.ack", "esperd.rejected", "esperd.blocked"]


def test_a_decision_a_rail_blocked_gets_a_line() -> None:
    watcher = Watcher(io.StringIO(), run="r1")
    report = {
        "run_id": "r1",
        "layer_id": 3,
        "op": "germinate",
        "rail": "active_seeds",
        "detail": "4 live seeds (cap 4)",
        "policy": "gnn",
        "policy_version": 2,
    }
    assert watcher.describe("esperd.blocked", json.dumps(report).encode(), None) == (
        "r1: BLOCKED          germinate layer 3 by rail active_seeds: 4 live seeds (cap 4) [gnn v2]"
    )
    other = {**report, "run_id": "r2"}
    assert watcher.describe("esperd.blocked", json.dumps(other).encode(), None) == ""  # --run r1
    assert watcher.describe("esperd.blocked", b"[1]", None).startswith("BLOCKED (unreadable report")


def test_emit_stamps_and_counts_lines() -> None:
    out = io.StringIO()
    watcher = Watcher(out)
    watcher.emit("hello")
    assert watcher.lines == 1 and out.getvalue().endswith("  hello\n") and out.getvalue()[2] == ":"


STATUS = {
    "version": "0.1.0",
    "uptime_s": 3723.5,
    "runs": 2,
    "rejected_by_reason": {"invalid": 1, "malformed": 2},
    "accepted_by_kind": {},
    "policy": {"name": "gnn", "version": 7, "fallback_reason": ""},
    "nats": {"connected": False, "max_payload": 1048576},
    "learner": None,
    "cluster": {"instance": "a", "members": ["a", "b"]},
    "fencing": {"epoch": 3},  # a field this module has never heard of
}


def test_status_renders_every_field_aligned() -> None:
    text = render_status(STATUS)
    lines = text.splitlines()
    assert lines[0] == "esperd 0.1.0: up 1h02m03s, 2 runs, policy gnn v7, NATS DISCONNECTED"
    assert headline(STATUS) == lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line.strip()}
    assert rows["rejected_by_reason"] == ["invalid=1", "malformed=2"]
    assert rows["accepted_by_kind"] == ["-"] and rows["learner"] == ["-"]
    assert rows["connected"] == ["no"] and rows["members"] == ["a,", "b"]
    assert rows["epoch"] == ["3"] and "fencing" in lines
    assert "  name                  gnn" in lines  # a section's fields are indented under it


def test_watch_refuses_a_run_that_is_not_a_run_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "--run", "a.b", "--server", "nats://127.0.0.1:1"]) == 2
    assert "is not a run id" in capsys.readouterr().err
