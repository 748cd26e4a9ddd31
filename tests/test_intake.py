"""Intake: decoding, channel checks, configured limits, counters and rejection reports (no broker)."""

from __future__ import annotations

import ast
import time
from collections import Counter

import msgspec
import pytest
from structlog.testing import capture_logs

from esperd.config import LimitsConfig
from esperd.intake import FIRST_BYTES, Accepted, Intake, Rejection
from esperd_contracts import (
    AckStatus,
    AdaptationCommand,
    Channel,
    Codec,
    CommandAck,
    HealthBatch,
    HealthSignal,
    Op,
    SeedSlotState,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)

CODEC = Codec()

MESSAGES = {
    "topology": TopologyPacket(
        nodes=[TopologyNode(layer_id=0, name="stem"), TopologyNode(layer_id=1)], edges=[(0, 1)]
    ),
    "health": HealthSignal(layer_id=1, health_score=0.5),
    "health_batch": HealthBatch(signals=[HealthSignal(layer_id=0, health_score=0.9)]),
    "state": SystemStatePacket(epoch=3, val_accuracy=0.6),
    "ack": CommandAck(command_id="c-1", status=AckStatus.APPLIED),
}
ALLOWED = {
    Channel.TOPOLOGY: {"topology"},
    Channel.HEALTH: {"health", "health_batch"},
    Channel.STATE: {"state"},
    Channel.ACK: {"ack"},
}
PAIRS = [(channel, kind) for channel in ALLOWED for kind in MESSAGES]


def intake(limits: LimitsConfig | None = None, **kwargs: object) -> Intake:
    return Intake(limits or LimitsConfig(), "esper", **kwargs)  # type: ignore[arg-type]


def health(layer: int = 1) -> bytes:
    return CODEC.encode(HealthSignal(layer_id=layer, health_score=0.5))


# ------------------------------------------------------------------ channels and kinds


@pytest.mark.parametrize(("channel", "kind"), PAIRS, ids=[f"{c.value}-{k}" for c, k in PAIRS])
@pytest.mark.parametrize("form", ["msgpack", "json"])
def test_each_kind_on_each_channel(channel: Channel, kind: str, form: str) -> None:
    it = intake()
    message = MESSAGES[kind]
    data = CODEC.encode(message) if form == "msgpack" else CODEC.encode_json(message)
    subject = f"esper.run-1.{channel.value}"
    outcome = it.accept(subject, data)
    if kind in ALLOWED[channel]:
        assert isinstance(outcome, Accepted)
        assert outcome.run_id == "run-1"
        assert outcome.channel is channel
        assert type(outcome.message).__struct_config__.tag == kind
        # msgpack decodes to a positional twin of the class: compare field by field.
        assert isinstance(outcome.message, type(message))
        assert msgspec.structs.asdict(outcome.message) == msgspec.structs.asdict(message)
        assert (it.accepted_total, it.rejected_total) == (1, 0)
        assert it.accepted_by_kind == Counter({kind: 1})
    else:
        assert isinstance(outcome, Rejection)
        assert outcome.reason == "wrong_channel"
        assert kind in outcome.detail and channel.value in outcome.detail
        assert outcome.run_id == "run-1"
        assert outcome.subject == subject
        assert (it.accepted_total, it.rejected_total) == (0, 1)
        assert it.rejected_by_reason == Counter({"wrong_channel": 1})


def test_command_channel_is_not_taken() -> None:
    it = intake()
    outcome = it.accept("esper.r1.command", health())
    assert isinstance(outcome, Rejection)
    assert outcome.reason == "wrong_channel"
    assert "command" in outcome.detail
    assert outcome.run_id == "r1"


def test_command_kind_sent_inbound_is_refused() -> None:
    it = intake()
    command = AdaptationCommand(command_id="c", run_id="r1", layer_id=0, op=Op.PRUNE)
    outcome = it.accept("esper.r1.health", CODEC.encode(command))
    assert isinstance(outcome, Rejection)
    assert outcome.reason == "unknown_kind"
    assert it.accepted_total == 0


def test_content_type_header_chooses_the_decoder() -> None:
    it = intake()
    json_bytes = b'{"kind":"health","layer_id":1,"health_score":0.2}'
    assert isinstance(it.accept("esper.r1.health", json_bytes, "application/json"), Accepted)
    # The same bytes declared as msgpack are not a valid msgpack message.
    outcome = it.accept("esper.r1.health", json_bytes, "application/msgpack")
    assert isinstance(outcome, Rejection)
    assert outcome.reason != "wrong_channel"


def test_custom_prefix_with_dots() -> None:
    it = Intake(LimitsConfig(), "org.esper")
    outcome = it.accept("org.esper.r9.health", health())
    assert isinstance(outcome, Accepted) and outcome.run_id == "r9"
    bad = it.accept("esper.r9.health", health())
    assert isinstance(bad, Rejection) and bad.reason == "bad_subject"


# ------------------------------------------------------------------ bad subjects


@pytest.mark.parametrize(
    "subject",
    [
        "esper.bad!run.health",  # run id with a forbidden character
        "esper." + "r" * 65 + ".health",  # run id too long
        "esper..health",  # empty run id
        "esper.r1",  # no channel
        "esper.r1.",  # empty channel
        "esper.r1.teleport",  # unknown channel
        "other.r1.health",  # wrong prefix
        "esperx.r1.health",  # prefix must end at a dot
        "esper",
        "",
    ],
)
def test_bad_subject(subject: str) -> None:
    it = intake()
    outcome = it.accept(subject, health())
    assert isinstance(outcome, Rejection)
    assert outcome.reason == "bad_subject"
    assert outcome.run_id == ""
    assert outcome.subject == subject
    assert it.rejected_by_reason == Counter({"bad_subject": 1})
    assert it.accepted_total == 0


# ------------------------------------------------------------------ codec reasons


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\xffgarbage", "malformed"),
        (b"{not json", "malformed"),
        (b"", "malformed"),
        (b'{"kind":"health","layer_id":1,"health_score":1.5}', "invalid"),
        (b'{"kind":"health","layer_id":-3,"health_score":0.5}', "invalid"),
        (b'{"kind":"health","layer_id":1,"health_score":NaN}', "malformed"),
        (b'{"kind":"teleport","layer_id":1}', "unknown_kind"),
        (b'{"layer_id":1,"health_score":0.5}', "unknown_kind"),
    ],
)
def test_codec_reasons_propagate(data: bytes, reason: str) -> None:
    it = intake()
    outcome = it.accept("esper.r1.health", data)
    assert isinstance(outcome, Rejection)
    assert outcome.reason == reason
    assert outcome.detail  # the codec's explanation travels with it
    assert outcome.run_id == "r1"
    assert outcome.size == len(data)
    assert it.rejected_by_reason == Counter({reason: 1})


def test_payload_over_max_payload_bytes_is_too_large() -> None:
    it = intake(LimitsConfig(max_payload_bytes=200))
    small = health()
    assert len(small) <= 200
    assert isinstance(it.accept("esper.r1.health", small), Accepted)
    big = CODEC.encode(HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.5) for i in range(40)]))
    outcome = it.accept("esper.r1.health", big)
    assert isinstance(outcome, Rejection)
    assert outcome.reason == "too_large"
    assert str(len(big)) in outcome.detail


# ------------------------------------------------------------------ configured limits

SMALL = LimitsConfig(max_batch_signals=3, max_nodes=3, max_edges=2, max_metrics=2, max_seeds=2)


def _topology(nodes: int, edges: int) -> TopologyPacket:
    return TopologyPacket(nodes=[TopologyNode(layer_id=i) for i in range(nodes)], edges=[(0, 1)] * edges)


@pytest.mark.parametrize(
    ("channel", "at_limit", "over_limit", "limit_name"),
    [
        (
            "health",
            HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.5) for i in range(3)]),
            HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.5) for i in range(4)]),
            "max_batch_signals",
        ),
        ("topology", _topology(3, 1), _topology(4, 1), "max_nodes"),
        ("topology", _topology(3, 2), _topology(3, 3), "max_edges"),
        (
            "state",
            SystemStatePacket(metrics={"a": 1.0, "b": 2.0}),
            SystemStatePacket(metrics={"a": 1.0, "b": 2.0, "c": 3.0}),
            "max_metrics",
        ),
        (
            "state",
            SystemStatePacket(seeds=[SeedSlotState(layer_id=i) for i in range(2)]),
            SystemStatePacket(seeds=[SeedSlotState(layer_id=i) for i in range(3)]),
            "max_seeds",
        ),
    ],
    ids=["signals", "nodes", "edges", "metrics", "seeds"],
)
def test_over_limit(channel: str, at_limit: object, over_limit: object, limit_name: str) -> None:
    it = intake(SMALL)
    subject = f"esper.r1.{channel}"
    assert isinstance(it.accept(subject, CODEC.encode(at_limit)), Accepted)  # type: ignore[arg-type]
    outcome = it.accept(subject, CODEC.encode(over_limit))  # type: ignore[arg-type]
    assert isinstance(outcome, Rejection)
    assert outcome.reason == "over_limit"
    assert limit_name in outcome.detail
    assert str(getattr(SMALL, limit_name)) in outcome.detail
    assert (it.accepted_total, it.rejected_total) == (1, 1)
    assert it.rejected_by_reason == Counter({"over_limit": 1})


def test_over_limit_applies_to_json_too() -> None:
    it = intake(SMALL)
    data = (
        b'{"kind":"health_batch","signals":['
        + b",".join(b'{"layer_id":%d,"health_score":0.5}' % i for i in range(4))
        + b"]}"
    )
    outcome = it.accept("esper.r1.health", data)
    assert isinstance(outcome, Rejection) and outcome.reason == "over_limit"


# ------------------------------------------------------------------ counters


def test_counters_are_exact() -> None:
    it = intake()
    good = [
        ("esper.a.health", CODEC.encode(MESSAGES["health"])),
        ("esper.a.health", CODEC.encode(MESSAGES["health"])),
        ("esper.a.health", CODEC.encode(MESSAGES["health_batch"])),
        ("esper.a.topology", CODEC.encode(MESSAGES["topology"])),
        ("esper.b.state", CODEC.encode(MESSAGES["state"])),
        ("esper.b.ack", CODEC.encode_json(MESSAGES["ack"])),
    ]
    bad = [
        ("esper.a.health", b"\x00\xff"),
        ("esper.a.health", b"\x00\xff"),
        ("esper.b.state", CODEC.encode(MESSAGES["health"])),
        ("nope.b.state", CODEC.encode(MESSAGES["state"])),
    ]
    for subject, data in good + bad:
        it.accept(subject, data)
    it.reject("cycle", "topology has a cycle", "esper.a.topology", "a", b"{}")
    assert it.accepted_total == 6
    assert it.rejected_total == 5
    assert it.accepted_by_kind == Counter(
        {"health": 2, "health_batch": 1, "topology": 1, "state": 1, "ack": 1}
    )
    assert it.rejected_by_reason == Counter(
        {"malformed": 2, "wrong_channel": 1, "bad_subject": 1, "cycle": 1}
    )


# ------------------------------------------------------------------ the rejection record


def test_rejection_first_bytes_are_truncated() -> None:
    it = intake()
    data = bytes(range(256)) * 4
    outcome = it.accept("esper.r1.health", data)
    assert isinstance(outcome, Rejection)
    assert FIRST_BYTES == 64
    assert ast.literal_eval(outcome.first_bytes) == data[:64]
    assert outcome.size == len(data) == 1024
    assert outcome.timestamp == pytest.approx(time.time(), abs=60)


def test_rejection_first_bytes_of_a_short_payload_are_whole() -> None:
    outcome = intake().accept("esper.r1.health", b"\x00\xff")
    assert isinstance(outcome, Rejection)
    assert ast.literal_eval(outcome.first_bytes) == b"\x00\xff"


def test_rejection_detail_and_subject_are_bounded() -> None:
    it = intake()
    subject = "esper." + "x" * 5000 + ".health"
    outcome = it.accept(subject, health())
    assert isinstance(outcome, Rejection) and outcome.reason == "bad_subject"
    assert 0 < len(outcome.detail) <= 512
    assert 0 < len(outcome.subject) <= 256
    downstream = it.reject("internal_error", "d" * 100_000, "esper.r1.health", "r1", b"z" * 10_000)
    assert len(downstream.detail) == 512
    assert ast.literal_eval(downstream.first_bytes) == b"z" * 64
    assert downstream.size == 10_000
    assert it.rejected_by_reason == Counter({"bad_subject": 1, "internal_error": 1})


def test_rejection_of_a_long_invalid_payload_has_bounded_detail() -> None:
    it = intake()
    data = b'{"kind":"health","layer_id":1,"health_score":2.0,"pad":"' + b"k" * 4000 + b'"}'
    outcome = it.accept("esper.r1.health", data)
    assert isinstance(outcome, Rejection) and outcome.reason == "invalid"
    assert outcome.size == len(data)
    assert len(outcome.detail) <= 512
    assert len(outcome.first_bytes) < 4 * FIRST_BYTES + 3


# ------------------------------------------------------------------ rate-limited reports and logs


def test_should_report_once_per_reason_per_window() -> None:
    it = intake(report_window_s=3600.0)
    first = it.accept("esper.r1.health", b"\x00\xff")
    second = it.accept("esper.r1.health", b"\x00\xfe")
    other = it.accept("esper.r1.state", CODEC.encode(MESSAGES["health"]))
    assert isinstance(first, Rejection) and isinstance(second, Rejection) and isinstance(other, Rejection)
    assert it.should_report(first) is True
    assert it.should_report(second) is False
    assert it.should_report(other) is True  # another reason has its own window
    assert first.suppressed == second.suppressed == other.suppressed == 0


def test_should_report_counts_the_suppressed() -> None:
    it = intake(report_window_s=0.3)
    rejections = [it.accept("esper.r1.health", b"\x00\xff") for _ in range(4)]
    assert all(isinstance(r, Rejection) for r in rejections)
    verdicts = [it.should_report(r) for r in rejections]  # type: ignore[arg-type]
    assert verdicts == [True, False, False, False]
    time.sleep(0.35)
    later = it.accept("esper.r1.health", b"\x00\xff")
    assert isinstance(later, Rejection)
    assert it.should_report(later) is True
    assert later.suppressed == 3
    again = it.accept("esper.r1.health", b"\x00\xff")
    assert it.should_report(again) is False  # type: ignore[arg-type]


def test_rejections_are_logged_once_per_reason_per_interval() -> None:
    it = intake(LimitsConfig(reject_log_interval_s=3600.0))
    with capture_logs() as logs:
        for _ in range(5):
            it.accept("esper.r1.health", b"\x00\xff")
        it.accept("esper.bad!.health", health())
    rejected = [entry for entry in logs if entry["event"] == "message rejected"]
    assert [entry["reason"] for entry in rejected] == ["malformed", "bad_subject"]
    assert rejected[0]["log_level"] == "warning"
    assert it.rejected_total == 6
