"""Ownership of runs across instances (pure logic, injected clock)."""

from __future__ import annotations

from collections import Counter

from esperd.cluster import Membership
from tests.support.timing import FakeClock

RUNS = [f"run-{i}" for i in range(400)]


def cluster(names: list[str], clock: FakeClock) -> dict[str, Membership]:
    views = {name: Membership(name, dead_after_s=3.0, clock=clock) for name in names}
    for view in views.values():
        for other in names:
            if other != view.me:
                view.heard(other)
    return views


def test_alone_owns_everything() -> None:
    solo = Membership("a", 3.0)
    assert all(solo.owns(r) for r in RUNS)


def test_every_run_has_exactly_one_owner_and_all_agree() -> None:
    views = cluster(["a", "b", "c"], FakeClock())
    for run in RUNS:
        owners = [name for name, view in views.items() if view.owns(run)]
        assert len(owners) == 1
        assert {view.owner(run) for view in views.values()} == {owners[0]}
    share = Counter(views["a"].owner(r) for r in RUNS)
    assert min(share.values()) > len(RUNS) / 3 * 0.7  # roughly balanced


def test_a_dead_member_loses_only_its_own_runs() -> None:
    clock = FakeClock()
    views = cluster(["a", "b", "c"], clock)
    before = {r: views["a"].owner(r) for r in RUNS}
    clock.now += 2.0
    views["a"].heard("b")  # c falls silent
    clock.now += 2.0
    assert views["a"].expire() is True
    assert views["a"].members == ("a", "b")
    after = {r: views["a"].owner(r) for r in RUNS}
    moved = [r for r in RUNS if before[r] != after[r]]
    assert moved and all(before[r] == "c" for r in moved)
    assert all(after[r] in ("a", "b") for r in RUNS)


def test_leaving_is_immediate_and_rejoining_restores_ownership() -> None:
    views = cluster(["a", "b"], FakeClock())
    original = {r: views["a"].owner(r) for r in RUNS}
    assert views["a"].heard("b", leaving=True) is True
    assert all(views["a"].owns(r) for r in RUNS)
    views["a"].heard("b")
    assert {r: views["a"].owner(r) for r in RUNS} == original


def test_heartbeat_from_known_member_is_not_a_change() -> None:
    views = cluster(["a", "b"], FakeClock())
    assert views["a"].heard("b") is False
