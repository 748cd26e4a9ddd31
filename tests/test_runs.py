"""The run table's pure logic: admission within max_runs, done and its grace, reuse, idle, drops."""

from __future__ import annotations

import pytest

from esperd.runs import RUN_BASE_BYTES, DropReason, RunTable, Verdict, estimated_bytes, starts_new_episode
from esperd_contracts import HealthSignal, SystemStatePacket, TopologyNode, TopologyPacket
from tests.support.packets import state
from tests.support.timing import FakeClock

HEALTH = HealthSignal(layer_id=0, health_score=0.5)
TOPOLOGY = TopologyPacket(nodes=[TopologyNode(layer_id=0)])


class Table:
    """A RunTable on a hand-moved clock that records what it was told to forget."""

    def __init__(self, max_runs: int = 3, idle_ttl_s: float = 100.0, done_grace_s: float = 5.0) -> None:
        self.clock = FakeClock(0.0)
        self.forgotten: list[tuple[str, DropReason]] = []
        self.table = RunTable(
            max_runs=max_runs,
            idle_ttl_s=idle_ttl_s,
            done_grace_s=done_grace_s,
            forget=lambda run_id, reason: self.forgotten.append((run_id, reason)),
            clock=self.clock,
        )


def test_admits_within_max_runs_and_refuses_beyond() -> None:
    t = Table(max_runs=2)
    first = t.table.admit("a", HEALTH)
    assert first.verdict is Verdict.TRACK and first.new
    again = t.table.admit("a", HEALTH)
    assert again.verdict is Verdict.TRACK and not again.new
    assert t.table.admit("b", TOPOLOGY).new
    refused = t.table.admit("c", HEALTH)
    assert refused.verdict is Verdict.REFUSE and refused.reason == "too_many_runs"
    assert "2 runs" in refused.detail
    assert len(t.table) == 2 and "c" not in t.table
    assert t.table.admitted == 2 and t.forgotten == []


def test_idle_runs_are_dropped_after_the_ttl_least_recent_first() -> None:
    t = Table(idle_ttl_s=100.0)
    t.table.admit("a", HEALTH)
    t.clock.now = 10.0
    t.table.admit("b", HEALTH)
    t.clock.now = 20.0
    t.table.admit("c", HEALTH)
    t.clock.now = 50.0
    t.table.admit("a", HEALTH)  # a is active again: b is now the least recent
    assert t.table.expire(109.0) == []
    assert t.table.expire(110.0) == [("b", DropReason.IDLE)]
    assert t.table.expire(149.0) == [("c", DropReason.IDLE)]
    assert t.table.expire(150.0) == [("a", DropReason.IDLE)]
    assert t.forgotten == [("b", DropReason.IDLE), ("c", DropReason.IDLE), ("a", DropReason.IDLE)]
    assert t.table.status().dropped_by_reason == {"idle": 3}
    assert t.table.dropped_total == 3 and len(t.table) == 0


def test_a_done_run_keeps_its_slot_for_the_grace_only() -> None:
    t = Table(idle_ttl_s=600.0, done_grace_s=5.0)
    t.table.admit("a", state(3))
    t.table.finish("a", epoch=3)
    assert "a" in t.table and not t.table.is_active("a")
    assert t.table.status().finishing == 1
    t.clock.now = 4.9
    assert t.table.expire() == []
    t.clock.now = 5.0
    assert t.table.expire() == [("a", DropReason.DONE)]
    assert t.forgotten == [("a", DropReason.DONE)] and len(t.table) == 0
    t.table.finish("a", epoch=3)  # not tracked any more: nothing happens
    assert len(t.table) == 0


def test_a_full_table_releases_finished_runs_early_for_a_new_run() -> None:
    t = Table(max_runs=2, done_grace_s=60.0)
    t.table.admit("a", state(1))
    t.table.admit("b", state(1))
    t.table.finish("b", epoch=1)
    assert t.table.admit("c", HEALTH).new  # b's grace is cut short: its slot is needed now
    assert t.forgotten == [("b", DropReason.DONE)]
    refused = t.table.admit("d", HEALTH)  # a and c are active: no room
    assert refused.verdict is Verdict.REFUSE and refused.reason == "too_many_runs"


def test_late_messages_for_a_finished_run_are_not_tracked() -> None:
    t = Table()
    t.table.admit("a", state(7))
    t.table.finish("a", epoch=7)
    for late in (HEALTH, state(7, done=True), state(8, done=True)):
        assert t.table.admit("a", late).verdict is Verdict.LATE
    assert t.forgotten == [] and t.table.reused == 0


@pytest.mark.parametrize(
    "restart",
    [TOPOLOGY, state(0), state(9), state(2, done=True)],
    ids=["topology", "epoch0", "not-done", "back"],
)
def test_a_restart_after_done_starts_a_new_episode(restart: TopologyPacket | SystemStatePacket) -> None:
    t = Table(done_grace_s=60.0)
    t.table.admit("a", state(7))
    t.table.finish("a", epoch=7)
    admission = t.table.admit("a", restart)
    assert admission.verdict is Verdict.TRACK and admission.new
    assert t.table.is_active("a")
    assert t.forgotten == [("a", DropReason.REUSED)]  # the finished episode's state goes first
    assert t.table.reused == 1 and t.table.admitted == 2
    assert t.table.status().dropped_by_reason == {"reused": 1}
    assert t.table.status().finishing == 0


def test_a_reuse_after_the_grace_is_counted_too() -> None:
    t = Table(done_grace_s=1.0)
    t.table.admit("a", state(7))
    t.table.finish("a", epoch=7)
    t.clock.now = 2.0
    t.table.expire()
    assert "a" not in t.table
    assert t.table.admit("a", TOPOLOGY).new
    assert t.table.reused == 1
    # A straggler from a finished job (a health signal) is a plain new run, not a reuse.
    t.table.admit("b", state(1))
    t.table.finish("b", epoch=1)
    t.clock.now = 4.0
    t.table.expire()
    assert t.table.admit("b", HEALTH).new
    assert t.table.reused == 1


def test_remembered_finished_ids_are_bounded_by_max_runs() -> None:
    t = Table(max_runs=2, done_grace_s=0.0)
    for run_id in ("a", "b", "c"):
        t.table.admit(run_id, state(5))
        t.table.finish(run_id, epoch=5)
        t.table.expire()
    t.table.admit("a", TOPOLOGY)  # forgotten: the oldest of three finished ids, beyond max_runs 2
    t.table.admit("c", TOPOLOGY)
    assert t.table.reused == 1


def test_cancel_undoes_an_admission_without_counting_a_drop() -> None:
    t = Table()
    assert t.table.admit("a", TOPOLOGY).new
    t.table.cancel("a")
    assert "a" not in t.table and t.table.admitted == 0
    assert t.table.dropped_total == 0
    assert t.forgotten == [("a", DropReason.REFUSED)]  # whatever the owners built is forgotten too


def test_drop_where_and_drop_tell_the_owners_once() -> None:
    t = Table()
    for run_id in ("a", "b", "c"):
        t.table.admit(run_id, HEALTH)
    assert t.table.drop_where(lambda run_id: run_id != "b", DropReason.HANDOVER) == ["a", "c"]
    assert t.table.drop("b", DropReason.IDLE) is True
    assert t.table.drop("b", DropReason.IDLE) is False
    assert t.forgotten == [("a", DropReason.HANDOVER), ("c", DropReason.HANDOVER), ("b", DropReason.IDLE)]
    assert t.table.status().dropped_by_reason == {"handover": 2, "idle": 1}


def test_which_messages_restart_a_finished_run() -> None:
    assert starts_new_episode(TOPOLOGY, 5)
    assert starts_new_episode(state(6), 5)  # not done: the job is training again
    assert starts_new_episode(state(3, done=True), 5)  # the epoch went backwards
    assert not starts_new_episode(state(5, done=True), 5)  # a repeated final packet
    assert not starts_new_episode(HEALTH, 5)


# ------------------------------------------------------------------ memory budget


def budget_table(budget: int, max_runs: int = 100) -> Table:
    t = Table(max_runs=max_runs)
    t.table.memory_budget_bytes = budget
    return t


def test_admission_needs_room_for_a_runs_base_cost() -> None:
    t = budget_table(2 * RUN_BASE_BYTES)
    assert t.table.admit("a", HEALTH).new and t.table.admit("b", HEALTH).new
    refused = t.table.admit("c", HEALTH)
    assert refused.verdict is Verdict.REFUSE and refused.reason == "memory_budget"
    assert "memory budget" in refused.detail
    assert t.table.status().memory_used_bytes == 2 * RUN_BASE_BYTES
    t.table.drop("a", DropReason.IDLE)
    assert t.table.admit("c", HEALTH).new  # the dropped run's memory is free again


def test_a_graph_grows_within_the_budget_and_no_further() -> None:
    t = budget_table(estimated_bytes(100, 99) + RUN_BASE_BYTES)
    t.table.admit("a", TOPOLOGY)
    t.table.admit("b", TOPOLOGY)
    assert t.table.resize("a", 100, 99) == ""
    status = t.table.status()
    assert (status.nodes, status.edges) == (100, 99)
    assert status.memory_used_bytes == estimated_bytes(100, 99) + RUN_BASE_BYTES == status.memory_budget_bytes
    refusal = t.table.resize("b", 1, 0)
    assert "run b at 1 layers and 0 edges" in refusal and "memory budget" in refusal
    assert t.table.status().nodes == 100  # a refused growth changes nothing
    assert t.table.resize("a", 50, 10) == ""  # shrinking always fits ...
    assert t.table.resize("b", 50, 89) == ""  # ... and frees room for others
    assert t.table.status().memory_used_bytes == estimated_bytes(50, 10) + estimated_bytes(50, 89)
    t.table.drop("a", DropReason.IDLE)
    status = t.table.status()
    assert (status.nodes, status.edges, status.memory_used_bytes) == (50, 89, estimated_bytes(50, 89))
    assert t.table.resize("unknown", 10**9, 0) == ""  # not the table's run: not accounted


def test_growth_releases_finished_runs_before_it_is_refused() -> None:
    t = budget_table(estimated_bytes(100, 0) + estimated_bytes(10, 0), max_runs=10)
    t.table.admit("old", TOPOLOGY)
    t.table.resize("old", 100, 0)
    t.table.finish("old", epoch=3)
    t.table.admit("new", TOPOLOGY)
    assert t.table.resize("new", 100, 0) == ""  # old's grace is cut short for it
    assert t.forgotten == [("old", DropReason.DONE)]
    assert "memory budget" in t.table.resize("new", 200, 0)
