"""NATS subject names: `<prefix>.<run>.<channel>`."""

from __future__ import annotations

import re

from esperd_contracts.enums import Channel

DEFAULT_PREFIX = "esper"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REJECTED_SUBJECT = "esperd.rejected"
BLOCKED_SUBJECT = "esperd.blocked"  # a decision a rail kept from its host (esperd.rails), as JSON
STATUS_SUBJECT = "esperd.status"


class SubjectError(ValueError):
    """A subject that is not `<prefix>.<run>.<channel>` with a valid run id."""


def run_subject(run_id: str, channel: Channel, prefix: str = DEFAULT_PREFIX) -> str:
    """The subject one run uses for one channel."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise SubjectError(f"invalid run id {run_id!r}")
    return f"{prefix}.{run_id}.{channel.value}"


def wildcard_subject(channel: Channel, prefix: str = DEFAULT_PREFIX) -> str:
    """The subject matching one channel of every run."""
    return f"{prefix}.*.{channel.value}"


def parse_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, Channel]:
    """(run id, channel) of a run subject; raises SubjectError otherwise."""
    # The prefix may itself contain dots: strip it as a whole.
    if not subject.startswith(prefix + "."):
        raise SubjectError(f"subject {subject!r} lacks prefix {prefix!r}")
    rest = subject[len(prefix) + 1 :]
    run_id, sep, channel = rest.partition(".")
    if not sep or not RUN_ID_PATTERN.fullmatch(run_id):
        raise SubjectError(f"subject {subject!r} has no valid run id")
    try:
        return run_id, Channel(channel)
    except ValueError:
        raise SubjectError(f"subject {subject!r} has unknown channel {channel!r}") from None


def partition_wildcard(mapped_prefix: str, partition: int) -> str:
    """The subject matching every run of one partition, as a broker partition mapping publishes it."""
    return f"{mapped_prefix}.{partition}.*.*"


def unmapped_subject(subject: str, mapped_prefix: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`<mapped_prefix>.<partition>.<run>.<channel>` as the host published it, `<prefix>.<run>.<channel>`."""
    rest = subject[len(mapped_prefix) + 1 :]
    _, _, run_and_channel = rest.partition(".")
    return f"{prefix}.{run_and_channel}"
