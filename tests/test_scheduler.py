"""Scheduler: due runs (dedup, per-run interval, oldest first, max_batch, overflow), cooldowns and acks.

Pure bookkeeping with an injected clock; observations for `mask_cooling` come from the real
Analyzer fed with contracts packets.
"""

from __future__ import annotations

import numpy as np
import pytest

from esperd.analyzer import Analyzer, Observation
from esperd.analyzer.masks import mask_cooling
from esperd.analyzer.observation import OP_INDEX, OPS
from esperd.config import SchedulerConfig
from esperd.scheduler import PendingCommand, Scheduler
from esperd_contracts import (
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)
from esperd_contracts.status import SchedulerStatus
from tests.support.timing import FakeClock


def make(clock: FakeClock | None = None, **overrides: float) -> tuple[Scheduler, FakeClock]:
    clock = clock or FakeClock()
    values = {
        "min_interval_s": 1.0,
        "cooldown_s": 30.0,
        "ack_timeout_s": 60.0,
        "max_batch": 64,
        "max_pending": 4096,
    }
    values.update(overrides)
    return Scheduler(SchedulerConfig(**values), clock=clock), clock  # type: ignore[arg-type]


# ------------------------------------------------------------------ due runs


def test_mark_due_dedups_one_decision_covers_every_trigger() -> None:
    sched, clock = make()
    assert sched.mark_due("a")
    clock.advance(0.1)
    assert sched.mark_due("a")  # second trigger while queued: no second entry
    assert sched.mark_due("a")
    assert sched.queued == 1
    assert sched.ready_count() == 1
    batch = sched.take_batch()
    assert [run for run, _ in batch] == ["a"]
    assert batch[0][1] == pytest.approx(1000.0)  # due since the *first* trigger
    assert sched.take_batch() == []
    assert sched.queued == 0


def test_min_interval_defers_a_run_decided_recently() -> None:
    sched, clock = make(min_interval_s=1.0)
    sched.mark_due("a")
    assert [r for r, _ in sched.take_batch()] == ["a"]  # decided at t=1000
    clock.advance(0.3)
    sched.mark_due("a")  # due again at t=1000.3, but not before 1001.0
    assert sched.queued == 1
    assert sched.next_due_at() == pytest.approx(1001.0)
    assert sched.ready_count() == 0
    assert sched.take_batch() == []
    clock.advance(0.69)
    assert sched.take_batch() == []
    clock.advance(0.02)  # t = 1001.01
    batch = sched.take_batch()
    assert [r for r, _ in batch] == ["a"]
    assert batch[0][1] == pytest.approx(1001.0)


def test_min_interval_zero_never_defers() -> None:
    sched, _ = make(min_interval_s=0.0)
    for _ in range(3):
        sched.mark_due("a")
        assert [r for r, _ in sched.take_batch()] == ["a"]


def test_other_runs_are_not_deferred_by_one_runs_interval() -> None:
    sched, clock = make(min_interval_s=5.0)
    sched.mark_due("a")
    sched.take_batch()
    clock.advance(0.1)
    sched.mark_due("a")
    sched.mark_due("b")
    assert [r for r, _ in sched.take_batch()] == ["b"]
    assert sched.queued == 1  # a still waits for its interval


def test_take_batch_is_oldest_due_first_and_bounded_by_max_batch() -> None:
    sched, clock = make(max_batch=3)
    order = ["e", "c", "a", "d", "b"]
    for run in order:
        sched.mark_due(run)
        clock.advance(0.01)
    first = sched.take_batch()
    assert [r for r, _ in first] == order[:3]
    assert [at for _, at in first] == sorted(at for _, at in first)
    assert sched.queued == 2
    second = sched.take_batch()
    assert [r for r, _ in second] == order[3:]
    assert sched.take_batch() == []


def test_deferred_run_does_not_block_ready_runs_behind_it() -> None:
    sched, clock = make(min_interval_s=10.0)
    sched.mark_due("slow")
    sched.take_batch()
    clock.advance(1.0)
    sched.mark_due("slow")  # deferred to t=1010
    clock.advance(1.0)
    sched.mark_due("fresh")  # due now, t=1002
    assert sched.next_due_at() == pytest.approx(1002.0)
    assert [r for r, _ in sched.take_batch()] == ["fresh"]
    assert sched.next_due_at() == pytest.approx(1010.0)


def test_overflow_is_counted_at_max_pending() -> None:
    sched, _ = make(max_pending=3)
    assert all(sched.mark_due(run) for run in ("a", "b", "c"))
    assert sched.overflow == 0
    assert not sched.mark_due("d")
    assert not sched.mark_due("e")
    assert sched.overflow == 2
    assert sched.mark_due("a")  # an already queued run is no overflow
    assert sched.overflow == 2
    assert sched.queued == 3
    assert [r for r, _ in sched.take_batch()] == ["a", "b", "c"]  # the oldest kept, newcomers dropped
    assert sched.mark_due("d")  # room again


# ------------------------------------------------------------------ cooldowns and acks


def test_note_command_cools_the_layer_for_cooldown_s() -> None:
    sched, clock = make(cooldown_s=30.0)
    sched.note_command("c1", "a", 3, "germinate")
    assert sched.cooling_layers("a") == {3}
    assert sched.cooling_layers("b") == set()  # per run
    assert sched.pending["c1"] == PendingCommand("a", 3, 1000.0, "germinate")
    sched.note_ack("a", "c1", applied=True)
    clock.advance(29.9)
    assert sched.cooling_layers("a") == {3}
    clock.advance(0.2)
    assert sched.cooling_layers("a") == set()


def test_a_layer_waits_for_its_commands_ack_whatever_the_cooldown() -> None:
    # A second command sent before the host answered the first could be applied twice (two
    # ADVANCEs: TRAINING -> BLENDING -> PROBATIONARY at once): the layer waits for the ack.
    sched, clock = make(cooldown_s=0.0, ack_timeout_s=60.0)
    sched.note_command("c1", "a", 3, "advance")
    sched.note_command("c2", "a", 4, "advance")
    clock.advance(5.0)
    assert sched.cooling_layers("a") == {3, 4}
    sched.note_ack("a", "c1", applied=True)
    assert sched.cooling_layers("a") == {4}
    sched.note_ack("b", "c2", applied=True)  # another run's ack frees nothing
    assert sched.cooling_layers("a") == {4}
    clock.advance(60.0)
    assert [cid for cid, _ in sched.expire_pending()] == ["c2"]
    assert sched.cooling_layers("a") == set()
    sched.note_command("c3", "a", 4, "prune")
    sched.forget_run("a")
    assert sched.cooling_layers("a") == set()


def test_rejected_ack_frees_the_layer_at_once() -> None:
    sched, clock = make(cooldown_s=30.0)
    sched.note_command("c1", "a", 3, "germinate")
    sched.note_command("c2", "a", 4, "advance")
    clock.advance(1.0)
    command = sched.note_ack("a", "c1", applied=False)
    assert command is not None and (command.run_id, command.layer_id, command.op) == ("a", 3, "germinate")
    assert sched.cooling_layers("a") == {4}
    assert "c1" not in sched.pending and "c2" in sched.pending


def test_applied_ack_keeps_the_cooldown_until_it_expires() -> None:
    sched, clock = make(cooldown_s=30.0)
    sched.note_command("c1", "a", 3, "germinate")
    clock.advance(1.0)
    command = sched.note_ack("a", "c1", applied=True)
    assert command is not None and command.layer_id == 3
    assert sched.pending == {}
    assert sched.cooling_layers("a") == {3}
    clock.advance(28.5)
    assert sched.cooling_layers("a") == {3}
    clock.advance(1.0)
    assert sched.cooling_layers("a") == set()
    # A late duplicate ack for the same command is unknown and changes nothing.
    assert sched.note_ack("a", "c1", applied=False) is None


def test_unknown_ack_returns_none() -> None:
    sched, _ = make()
    sched.note_command("c1", "a", 3, "germinate")
    assert sched.note_ack("a", "nope", applied=False) is None
    assert sched.cooling_layers("a") == {3}
    assert set(sched.pending) == {"c1"}


def test_an_ack_from_another_run_settles_nothing() -> None:
    sched, _ = make(cooldown_s=30.0)
    sched.note_command("c1", "victim", 3, "germinate")
    assert sched.note_ack("intruder", "c1", applied=False) is None
    assert sched.is_pending("c1") and sched.cooling_layers("victim") == {3}  # still waiting, still cooling
    command = sched.note_ack("victim", "c1", applied=True)  # its own run's ack still settles it
    assert command is not None and command.run_id == "victim"
    assert not sched.is_pending("c1")


def test_expire_pending_after_ack_timeout_frees_the_layer_and_returns_it() -> None:
    sched, clock = make(cooldown_s=120.0, ack_timeout_s=60.0)
    sched.note_command("old", "a", 1, "germinate")
    clock.advance(10.0)
    sched.note_command("new", "a", 2, "advance")
    clock.advance(49.0)
    assert sched.expire_pending() == []  # 59 s: not yet
    clock.advance(1.0)
    expired = sched.expire_pending()
    assert [cid for cid, _ in expired] == ["old"]
    assert expired[0][1] == PendingCommand("a", 1, 1000.0, "germinate")
    assert sched.cooling_layers("a") == {2}  # freed although its 120 s cooldown had not run out
    assert set(sched.pending) == {"new"}
    assert sched.note_ack("a", "old", applied=True) is None  # an ack after the timeout is unknown
    clock.advance(10.0)
    assert [cid for cid, _ in sched.expire_pending()] == ["new"]
    assert sched.pending == {}


def test_an_older_commands_timeout_or_rejection_does_not_free_a_newer_commands_cooldown() -> None:
    sched, clock = make(cooldown_s=30.0, ack_timeout_s=60.0)
    sched.note_command("old", "a", 1, "germinate")  # never acked
    clock.advance(31.0)
    assert sched.cooling_layers("a") == {1}  # its cooldown ran out, but it still awaits its ack
    sched.note_command("new", "a", 1, "advance")  # (a policy that ignored the mask) cools until t=1061
    clock.advance(29.5)  # t=1060.5: "old" times out
    assert [cid for cid, _ in sched.expire_pending()] == ["old"]
    assert sched.cooling_layers("a") == {1}  # still "new"'s cooldown
    sched.note_command("other", "a", 2, "germinate")
    clock.advance(0.1)
    sched.note_ack("a", "new", applied=False)  # the newer command's own rejection frees it
    assert sched.cooling_layers("a") == {2}


def test_an_answer_that_frees_a_layer_held_back_only_for_it_makes_the_run_due_again() -> None:
    sched, clock = make(cooldown_s=0.0, min_interval_s=0.0)
    sched.mark_due("a")
    assert sched.take_batch() == [("a", clock.now)]
    sched.note_command("c1", "a", 5, "advance")
    sched.mark_due("a")  # the next state packet arrives before the ack
    sched.take_batch()
    assert sched.cooling_layers("a") == {5}  # held back by the unanswered command alone
    assert not sched.is_queued("a")
    assert sched.note_ack("a", "c1", applied=True) is not None
    assert sched.is_queued("a")  # decided again now, not at the next state packet
    assert sched.cooling_layers("a") == set()


def test_an_answer_does_not_make_the_run_due_when_nothing_was_held_back_for_it() -> None:
    sched, clock = make(cooldown_s=30.0, min_interval_s=0.0)
    sched.note_command("c1", "a", 5, "advance")
    assert sched.cooling_layers("a") == {5}  # cooling down anyway: the ack frees nothing
    sched.note_ack("a", "c1", applied=True)
    assert not sched.is_queued("a")
    sched.note_command("c2", "b", 1, "advance")  # no decision was made while it was pending
    sched.note_ack("b", "c2", applied=True)
    assert not sched.is_queued("b")


def test_forget_run_clears_everything_about_it() -> None:
    sched, clock = make(min_interval_s=10.0)
    sched.mark_due("a")
    sched.take_batch()  # a decided at t=1000: next decision deferred by 10 s
    sched.note_command("c1", "a", 1, "germinate")
    sched.note_command("c2", "b", 1, "germinate")
    clock.advance(1.0)
    sched.mark_due("a")
    assert sched.queued == 1
    sched.forget_run("a")
    assert sched.queued == 0
    assert sched.next_due_at() is None
    assert sched.take_batch() == []
    assert sched.cooling_layers("a") == set()
    assert set(sched.pending) == {"c2"}
    assert sched.cooling_layers("b") == {1}
    # A returning run starts fresh: no leftover interval defers it.
    sched.mark_due("a")
    assert [r for r, _ in sched.take_batch()] == ["a"]


# ------------------------------------------------------------------ mask_cooling


def observation() -> Observation:
    """A real Analyzer observation: 4 layers (conv, conv, attention, linear), one seed in TRAINING."""
    analyzer = Analyzer()
    kinds = ["conv", "conv", "attention", "linear"]
    nodes = [TopologyNode(layer_id=10 + i, name=f"l{i}", layer_type=k) for i, k in enumerate(kinds)]
    analyzer.ingest("r", TopologyPacket(nodes=nodes, edges=[(10, 11), (11, 12), (12, 13), (10, 12)]))
    analyzer.ingest("r", HealthSignal(layer_id=11, health_score=0.2))
    seeds = [SeedSlotState(layer_id=12, stage=SeedStage.TRAINING, epochs_in_stage=4)]
    analyzer.ingest("r", SystemStatePacket(epoch=5, val_accuracy=0.5, seeds=seeds))
    return analyzer.observe("r")


def test_mask_cooling_masks_every_op_but_wait_on_cooled_layers_only() -> None:
    obs = observation()
    original = obs.op_mask.copy()
    germinate, advance, wait = OP_INDEX[Op.GERMINATE], OP_INDEX[Op.ADVANCE], OP_INDEX[Op.WAIT]
    # Sanity: the uncooled observation has something to mask on both cooled layers.
    assert original[1, germinate] and original[2, advance]

    masked = mask_cooling(obs, {11, 12, 999})  # 999: a layer the run does not have
    assert masked is not obs
    for node in (1, 2):  # layers 11 and 12
        assert masked.op_mask[node, wait]
        assert masked.op_mask[node].sum() == 1
    np.testing.assert_array_equal(masked.op_mask[[0, 3]], original[[0, 3]])
    # The original observation (and its arrays) are untouched.
    np.testing.assert_array_equal(obs.op_mask, original)
    np.testing.assert_array_equal(masked.node_features, obs.node_features)
    assert masked.run_id == obs.run_id and masked.epoch == obs.epoch


def test_mask_cooling_without_matching_layers_returns_the_observation() -> None:
    obs = observation()
    assert mask_cooling(obs, set()) is obs
    assert mask_cooling(obs, [999]) is obs
    assert len(OPS) == obs.op_mask.shape[1]


def test_the_scheduler_counts_what_became_of_its_commands_and_reports_its_section() -> None:
    sched, clock = make(ack_timeout_s=60.0)
    for command_id, layer in (("c1", 1), ("c2", 2), ("c3", 3)):
        sched.note_command(command_id, "a", layer, "germinate")
    sched.note_ack("a", "c1", applied=True)
    sched.note_ack("a", "c2", applied=False)
    sched.note_ack("a", "c1", applied=True)  # a duplicate: unknown now
    sched.note_ack("b", "c3", applied=True)  # another run's: refused by the caller, not counted here
    clock.advance(61.0)
    sched.expire_pending()
    assert sched.acks_by_status == {"applied": 1, "rejected": 1, "timed_out": 1}
    assert sched.status() == SchedulerStatus(
        queued=0, overflow=0, pending_commands=0, expired_commands=1, unknown_acks=1
    )
