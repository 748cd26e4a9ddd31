"""Ownership across instances: partitions, their assignment, and leases with a local deadline (pure logic)."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest

from esperd.config import ClusterConfig, ConfigError, config_from_dict
from esperd.ops.cluster import default_instance_id
from esperd.ops.ownership import Leases, assign, fnv1a_32, partition_of, targets
from tests.support.timing import FakeClock

RUNS = [f"run-{i}" for i in range(400)]
P = 32


def test_fnv1a_matches_the_reference_vectors() -> None:
    # The FNV reference values (Go's hash/fnv New32a gives the same): nats-server's partition() uses it.
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968
    assert all(0 <= partition_of(r, P) < P for r in RUNS)
    assert len({partition_of(r, P) for r in RUNS}) == P  # 400 runs reach every partition


def test_every_partition_has_exactly_one_owner_and_all_agree() -> None:
    members = ["a", "b", "c"]
    owners = assign(members, P)
    assert sorted(owners) == list(range(P))
    assert assign(reversed(members), P) == owners  # order does not matter
    mine = {m: targets(m, members, P) for m in members}
    assert set().union(*mine.values()) == set(range(P))
    assert sum(len(t) for t in mine.values()) == P  # disjoint
    share = Counter(owners.values())
    assert min(share.values()) >= P / 3 * 0.5  # roughly balanced


def test_a_member_leaving_moves_only_its_own_partitions() -> None:
    before = assign(["a", "b", "c"], P)
    after = assign(["a", "b"], P)
    moved = [p for p in range(P) if before[p] != after[p]]
    assert moved and all(before[p] == "c" for p in moved)
    back = assign(["a", "b", "c"], P)
    assert back == before  # rejoining restores the same assignment


def test_alone_a_member_targets_everything() -> None:
    assert targets("solo", [], P) == set(range(P))
    assert targets("solo", ["solo"], P) == set(range(P))


class Lost:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], str]] = []

    def __call__(self, partitions: list[int], reason: str) -> None:
        self.calls.append((partitions, reason))


def leases(clock: FakeClock, lost: Lost) -> Leases:
    return Leases(P, ttl_s=2.0, margin_s=0.5, on_lost=lost, clock=clock)


def test_a_lease_is_used_until_its_local_deadline_and_lapses_on_the_first_read_after() -> None:
    clock, lost = FakeClock(), Lost()
    table = leases(clock, lost)
    run = RUNS[0]
    p = partition_of(run, P)
    sent = clock.now
    clock.now += 0.1  # the create's round trip
    assert table.acquired(p, revision=41, sent_at=sent)
    assert table.epoch_for(run) == 41
    clock.now = sent + 1.49  # deadline = sent + ttl - margin = sent + 1.5
    assert table.epoch_for(run) == 41 and lost.calls == []
    clock.now = sent + 1.5  # a freeze ran past it: the very next read notices
    assert table.epoch_for(run) is None
    assert lost.calls == [([p], "lease lapsed")] and table.lapses == 1
    assert table.epoch_for(run) is None and len(lost.calls) == 1  # reported once


def test_renewal_moves_the_deadline_but_not_the_epoch() -> None:
    clock, lost = FakeClock(), Lost()
    table = leases(clock, lost)
    p = partition_of(RUNS[0], P)
    assert table.acquired(p, 7, clock.now)
    clock.now += 1.0
    assert table.renewed(p, 9, clock.now)
    clock.now += 1.2  # past the first deadline, within the renewed one
    assert table.epoch_for(RUNS[0]) == 7
    assert table.held[p].revision == 9


def test_a_renewal_that_comes_back_after_the_deadline_does_not_revive_the_lease() -> None:
    clock, lost = FakeClock(), Lost()
    table = leases(clock, lost)
    p = partition_of(RUNS[0], P)
    assert table.acquired(p, 7, clock.now)
    sent = clock.now + 1.0
    clock.now += 3.0  # frozen while the renewal was in flight
    assert not table.renewed(p, 9, sent)
    assert p not in table.held and lost.calls == [([p], "lease lapsed")]


def test_an_acquisition_that_comes_back_too_late_is_not_used() -> None:
    clock, lost = FakeClock(), Lost()
    table = leases(clock, lost)
    sent = clock.now
    clock.now += 1.6
    assert not table.acquired(3, 12, sent)
    assert table.held == {} and lost.calls == []


def test_check_and_release_report_what_was_given_up() -> None:
    clock, lost = FakeClock(), Lost()
    table = leases(clock, lost)
    for p, rev in ((1, 10), (2, 11), (3, 12)):
        assert table.acquired(p, rev, clock.now)
    released = table.release([2, 5], "handed over")
    assert [lease.partition for lease in released] == [2]
    clock.now += 2.0
    assert table.check() == [1, 3]
    assert lost.calls == [([2], "handed over"), ([1, 3], "lease lapsed")]


def test_cluster_config_needs_two_renewals_per_lease() -> None:
    with pytest.raises(ConfigError, match="heartbeat_s"):
        config_from_dict({"cluster": {"heartbeat_s": 1.0, "dead_after_s": 2.0}})
    ok = config_from_dict({"cluster": {"heartbeat_s": 0.5, "dead_after_s": 1.5}})
    assert ok.cluster.heartbeat_s == 0.5
    with pytest.raises(ConfigError, match="instance_id"):
        config_from_dict({"cluster": {"instance_id": "has.dots"}})  # it names a subject token


def test_the_default_instance_id_is_a_subject_token() -> None:
    name = default_instance_id()
    msgspec.convert({"instance_id": name}, ClusterConfig)  # passes the configured pattern
    assert "." not in name and " " not in name


def test_a_mapped_prefix_needs_cluster_mode() -> None:
    with pytest.raises(ConfigError, match="mapped_prefix needs cluster.enabled"):
        config_from_dict({"cluster": {"mapped_prefix": "esperd.in"}})
    ok = config_from_dict({"cluster": {"enabled": True, "mapped_prefix": "esperd.in"}})
    assert ok.cluster.mapped_prefix == "esperd.in"
