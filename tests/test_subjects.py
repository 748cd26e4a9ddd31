"""Subjects: `<prefix>.<run>.<channel>` building and parsing."""

from __future__ import annotations

import pytest

from esperd_contracts import (
    DEFAULT_PREFIX,
    REJECTED_SUBJECT,
    STATUS_SUBJECT,
    Channel,
    SubjectError,
    parse_subject,
    run_subject,
    wildcard_subject,
)

RUN_IDS = ["r1", "R", "a-b_c", "0", "x" * 64, "run_2024-11-25"]
PREFIXES = [DEFAULT_PREFIX, "p", "acme.esper", "a.b.c.d", "esper-dev"]


@pytest.mark.parametrize("channel", list(Channel), ids=lambda c: c.value)
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("run_id", RUN_IDS)
def test_round_trip(run_id: str, prefix: str, channel: Channel) -> None:
    subject = run_subject(run_id, channel, prefix)
    assert subject == f"{prefix}.{run_id}.{channel.value}"
    assert parse_subject(subject, prefix) == (run_id, channel)


def test_default_prefix() -> None:
    assert DEFAULT_PREFIX == "esper"
    assert run_subject("r1", Channel.HEALTH) == "esper.r1.health"
    assert parse_subject("esper.r1.command") == ("r1", Channel.COMMAND)


def test_design_subjects() -> None:
    assert [run_subject("r1", c) for c in Channel] == [
        "esper.r1.topology",
        "esper.r1.health",
        "esper.r1.state",
        "esper.r1.command",
        "esper.r1.ack",
    ]
    assert REJECTED_SUBJECT == "esperd.rejected"
    assert STATUS_SUBJECT == "esperd.status"


@pytest.mark.parametrize(
    "run_id",
    ["", "a.b", "a b", "*", ">", "x" * 65, "é", "r1/x", "r1\t", "$SYS"],
    ids=repr,
)
def test_invalid_run_ids(run_id: str) -> None:
    with pytest.raises(SubjectError):
        run_subject(run_id, Channel.HEALTH)
    with pytest.raises(SubjectError):
        parse_subject(f"esper.{run_id}.health")


# `$` matches before a final "\n": the pattern must match the whole run id.
def test_run_id_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(SubjectError):
        run_subject("r1\n", Channel.HEALTH)


def test_subject_error_is_value_error() -> None:
    assert issubclass(SubjectError, ValueError)


@pytest.mark.parametrize(
    ("subject", "prefix"),
    [
        ("other.r1.health", "esper"),
        ("esperx.r1.health", "esper"),  # prefix must end at a token boundary
        ("esper", "esper"),
        ("esper.", "esper"),
        ("esper.r1", "esper"),  # no channel
        ("esper..health", "esper"),  # empty run id
        ("acme.r1.health", "acme.esper"),
        ("acme.esper.r1", "acme.esper"),
        ("esper.r1.health", "acme.esper"),
        ("", "esper"),
    ],
)
def test_malformed_subjects(subject: str, prefix: str) -> None:
    with pytest.raises(SubjectError):
        parse_subject(subject, prefix)


@pytest.mark.parametrize(
    "subject",
    ["esper.r1.bogus", "esper.r1.", "esper.r1.HEALTH", "esper.r1.health.extra", "esper.r1.rejected"],
)
def test_unknown_channel(subject: str) -> None:
    with pytest.raises(SubjectError, match="unknown channel"):
        parse_subject(subject)


def test_dotted_prefix_is_stripped_whole() -> None:
    # With prefix "a.b", "a.b.c.health" is run "c"; it must not be read as run "b".
    assert parse_subject("a.b.c.health", "a.b") == ("c", Channel.HEALTH)
    with pytest.raises(SubjectError):
        parse_subject("a.b.c.health", "a")


@pytest.mark.parametrize("channel", list(Channel), ids=lambda c: c.value)
def test_wildcard_subject(channel: Channel) -> None:
    assert wildcard_subject(channel) == f"esper.*.{channel.value}"
    assert wildcard_subject(channel, "acme.esper") == f"acme.esper.*.{channel.value}"
    # The wildcard has the same token count as the subjects it should match.
    assert wildcard_subject(channel).count(".") == run_subject("r1", channel).count(".")


def test_partition_subjects_round_trip() -> None:
    from esperd_contracts.subjects import partition_wildcard, unmapped_subject

    assert partition_wildcard("esperd.in", 7) == "esperd.in.7.*.*"
    assert unmapped_subject("esperd.in.7.run-1.health", "esperd.in") == "esper.run-1.health"
    assert unmapped_subject("m.31.r.ack", "m", prefix="my.prefix") == "my.prefix.r.ack"
