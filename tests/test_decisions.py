"""DecisionLoop: real Analyzer + real heuristic policy, commands collected in a list (no broker).

Batching (many due runs, one `act`, off the event loop thread), WAIT publishes nothing, the
command's fields, a slow or failing policy, policy swaps mid-batch, stats, cooldown masking;
plus `percentile`, `describe` and `to_command`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from esperd.analyzer import Analyzer, Observation
from esperd.config import SchedulerConfig
from esperd.decisions import DecisionLoop, describe, percentile, to_command
from esperd.policy import (
    Action,
    ActResult,
    Decision,
    HeuristicConfig,
    PolicyBundle,
    PolicyConfig,
    create_policy,
)
from esperd.scheduler import Scheduler
from esperd_contracts import (
    AdaptationCommand,
    BlendAlgorithm,
    Blueprint,
    BlueprintFamily,
    Codec,
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    Tempo,
)
from tests.support.packets import chain_topology
from tests.support.timing import FakeClock, until

CNN_KINDS = ("conv", "conv", "conv", "conv")
TF_KINDS = ("linear", "attention", "mlp", "linear")


# ------------------------------------------------------------------ scenarios through the real Analyzer


def topology(analyzer: Analyzer, run_id: str, kinds: Sequence[str]) -> None:
    analyzer.ingest(run_id, chain_topology(kinds, name_prefix="layer"))


def sick_run(
    analyzer: Analyzer, run_id: str, *, sick: int = 1, kinds: Sequence[str] = CNN_KINDS, epoch: int = 5
) -> None:
    """Layer `sick` unhealthy and declining (0.5 -> 0.2), the host stabilized at `epoch`: GERMINATE there."""
    topology(analyzer, run_id, kinds)
    for health in (0.5, 0.4, 0.3, 0.2):
        analyzer.ingest(run_id, HealthSignal(layer_id=sick, health_score=health))
    analyzer.ingest(run_id, SystemStatePacket(epoch=epoch, val_accuracy=0.6))


def training_run(analyzer: Analyzer, run_id: str, *, layer: int = 2, epochs_in_stage: int = 3) -> None:
    """A seed in TRAINING past the dwell time: ADVANCE it."""
    topology(analyzer, run_id, CNN_KINDS)
    seeds = [SeedSlotState(layer_id=layer, stage=SeedStage.TRAINING, epochs_in_stage=epochs_in_stage)]
    analyzer.ingest(run_id, SystemStatePacket(epoch=8, val_accuracy=0.6, seeds=seeds))


def healthy_run(analyzer: Analyzer, run_id: str) -> None:
    """Nothing wrong anywhere: WAIT."""
    topology(analyzer, run_id, CNN_KINDS)
    analyzer.ingest(run_id, SystemStatePacket(epoch=5, val_accuracy=0.6))


# ------------------------------------------------------------------ a policy wrapper that watches act


class Spy:
    """Wraps a PolicyBundle: records each act call (thread, batch size), optionally slow or failing."""

    def __init__(
        self,
        inner: PolicyBundle,
        *,
        delay: float = 0.0,
        fail_times: int = 0,
        on_act: Any = None,
        inline: bool = False,
    ) -> None:
        self.inner = inner
        # Off the loop by default, whatever `inner` says: a Spy may be made slow or blocking.
        self.runs_inline = inline
        self.delay = delay
        self.fail_times = fail_times
        self.on_act = on_act
        self.calls: list[tuple[str, int, int]] = []  # (thread name, thread ident, batch size)
        self.started = threading.Event()
        self.finished = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def act(
        self, observations: Sequence[Observation], deterministic: bool = False, hidden: Any = None
    ) -> ActResult:
        thread = threading.current_thread()
        self.calls.append((thread.name, thread.ident or 0, len(observations)))
        self.started.set()
        try:
            if self.on_act is not None:
                self.on_act()
            if self.delay:
                time.sleep(self.delay)
            if self.fail_times > 0:
                self.fail_times -= 1
                raise RuntimeError("policy exploded")
            return self.inner.act(observations, deterministic)
        finally:
            self.finished.set()


def heuristic(version: int = 1, **rules: Any) -> PolicyBundle:
    policy = create_policy("heuristic", PolicyConfig(heuristic=HeuristicConfig(**rules)), "cpu")
    policy.version = version
    return policy


class Harness:
    """Analyzer + Scheduler + DecisionLoop with publish collected into a list."""

    def __init__(self, policy: Any, *, clock: Any = time.monotonic, **scheduler: Any) -> None:
        values: dict[str, Any] = {"min_interval_s": 0.0, "cooldown_s": 30.0, "max_wait_ms": 5.0}
        values.update(scheduler)
        self.analyzer = Analyzer()
        self.scheduler = Scheduler(SchedulerConfig(**values), clock=clock)
        self.published: list[AdaptationCommand] = []
        self.loop = DecisionLoop(
            self.scheduler, policy, observe=self.observe, publish=self.publish, clock=clock
        )

    def observe(self, run_ids: Sequence[str]) -> list[Observation | None]:
        known = [run_id for run_id in run_ids if run_id in self.analyzer]
        built = dict(zip(known, self.analyzer.observe_many(known), strict=True))
        return [built.get(run_id) for run_id in run_ids]

    async def publish(self, command: AdaptationCommand) -> None:
        self.published.append(command)

    def due(self, *run_ids: str) -> None:
        for run_id in run_ids:
            assert self.scheduler.mark_due(run_id)
        self.loop.wake()

    def by_run(self) -> dict[str, AdaptationCommand]:
        return {c.run_id: c for c in self.published}


# ------------------------------------------------------------------ fencing


async def test_a_run_whose_ownership_lapses_during_the_forward_pass_gets_no_command() -> None:
    """A freeze (or a lost lease) while the policy runs must not let a command out afterwards."""
    owned = {"kept": 41, "lost": 42, "never": None}

    def lapse_during_act() -> None:
        owned["lost"] = None  # the lease lapsed while the batch was being decided

    spy = Spy(heuristic(), on_act=lapse_during_act)
    h = Harness(spy)
    h.loop.epoch_of = owned.get
    for run_id in owned:
        sick_run(h.analyzer, run_id)
    h.due(*owned)
    sent = await h.loop.decide_once()
    assert sent == 1
    assert [(c.run_id, c.epoch) for c in h.published] == [("kept", 41)]
    assert spy.calls[0][2] == 2  # "never" was not even observed
    assert h.loop.stats.fenced == 1 and h.loop.stats.commands == 1
    assert {pending.run_id for pending in h.scheduler.pending.values()} == {"kept"}


async def test_a_run_dropped_during_the_forward_pass_is_neither_sent_nor_recorded() -> None:
    """Evicted (or finished) while its batch was decided: a recorded step would outlive the run."""
    tracked = {"kept", "dropped"}
    spy = Spy(heuristic(), on_act=lambda: tracked.discard("dropped"))
    h = Harness(spy)
    h.loop.tracked = tracked.__contains__
    recorded: list[str] = []
    h.loop.on_decided = lambda observations, result, policy: recorded.extend(o.run_id for o in observations)
    for run_id in ("kept", "dropped"):
        sick_run(h.analyzer, run_id)
    h.due("kept", "dropped")
    assert await h.loop.decide_once() == 1
    assert spy.calls[0][2] == 2  # both were decided ...
    assert [c.run_id for c in h.published] == ["kept"] and recorded == ["kept"]  # ... one went on
    assert h.loop.stats.dropped == 1 and h.loop.stats.decisions == 1


# ------------------------------------------------------------------ batching


async def test_many_due_runs_are_decided_in_one_act_call_off_the_loop_thread() -> None:
    spy = Spy(heuristic())
    h = Harness(spy)
    runs = [f"run-{i}" for i in range(12)]
    for i, run_id in enumerate(runs):
        sick_run(h.analyzer, run_id, sick=i % 4)
    h.due(*runs)
    sent = await h.loop.decide_once()

    assert sent == 12
    assert len(spy.calls) == 1
    name, ident, size = spy.calls[0]
    assert size == 12
    assert ident != threading.get_ident()  # never the event loop's thread
    assert name.startswith("esperd-policy")
    assert {c.run_id for c in h.published} == set(runs)
    for i, run_id in enumerate(runs):
        command = h.by_run()[run_id]
        assert (command.op, command.layer_id) == (Op.GERMINATE, i % 4)
    assert h.loop.stats.batches == 1 and h.loop.stats.last_batch_size == 12


async def test_a_policy_that_runs_inline_is_called_on_the_loop_thread_in_one_batch() -> None:
    """Rule-based policies (`runs_inline`) skip the hop to the policy thread, which costs more
    than their whole batch; the batch and its commands are the same."""
    assert heuristic().runs_inline and create_policy("random").runs_inline
    spy = Spy(heuristic(), inline=True)
    h = Harness(spy)
    runs = [f"run-{i}" for i in range(12)]
    for i, run_id in enumerate(runs):
        sick_run(h.analyzer, run_id, sick=i % 4)
    h.due(*runs)
    assert await h.loop.decide_once() == 12
    assert [(ident, size) for _, ident, size in spy.calls] == [(threading.get_ident(), 12)]
    assert [(h.by_run()[run_id].op, h.by_run()[run_id].layer_id) for run_id in runs] == [
        (Op.GERMINATE, i % 4) for i in range(12)
    ]


async def test_run_loop_micro_batches_runs_that_become_due_together() -> None:
    spy = Spy(heuristic())
    h = Harness(spy, max_wait_ms=50.0, max_batch=64)
    runs = [f"run-{i}" for i in range(8)]
    for run_id in runs:
        sick_run(h.analyzer, run_id)
    task = asyncio.create_task(h.loop.run())
    try:
        h.due(*runs[:3])
        await asyncio.sleep(0.01)  # within max_wait_ms: the rest join the same batch
        h.due(*runs[3:])
        await until(lambda: len(h.published) == 8)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [size for _, _, size in spy.calls] == [8]
    assert h.loop.stats.batches == 1


async def test_max_batch_splits_a_large_due_set() -> None:
    spy = Spy(heuristic())
    h = Harness(spy, max_batch=4)
    runs = [f"run-{i}" for i in range(10)]
    for run_id in runs:
        sick_run(h.analyzer, run_id)
    h.due(*runs)
    assert await h.loop.decide_once() == 4
    assert await h.loop.decide_once() == 4
    assert await h.loop.decide_once() == 2
    assert [size for _, _, size in spy.calls] == [4, 4, 2]
    assert [c.run_id for c in h.published] == runs  # oldest due first
    assert h.loop.stats.batch_size_max == 4
    assert h.loop.stats.batch_size_mean == pytest.approx(10 / 3, abs=0.01)


# ------------------------------------------------------------------ commands


async def test_wait_publishes_nothing() -> None:
    h = Harness(heuristic())
    runs = ["calm-a", "calm-b", "calm-c"]
    for run_id in runs:
        healthy_run(h.analyzer, run_id)
    h.due(*runs)
    assert await h.loop.decide_once() == 0
    assert h.published == []
    stats = h.loop.stats
    assert (stats.decisions, stats.waits, stats.commands, stats.batches) == (3, 3, 0, 1)
    assert stats.commands_by_op == {}
    assert h.scheduler.pending == {}  # nothing awaits an ack
    assert h.scheduler.cooling_layers("calm-a") == set()


async def test_unknown_and_layerless_runs_are_not_sent_to_the_policy() -> None:
    spy = Spy(heuristic())
    h = Harness(spy)
    h.analyzer.ingest("only-state", SystemStatePacket(epoch=4))  # no layers yet
    h.due("only-state", "never-seen")
    assert await h.loop.decide_once() == 0
    assert spy.calls == []
    assert h.loop.stats.batches == 0


async def test_commands_carry_the_required_fields_and_fitting_blueprints() -> None:
    h = Harness(heuristic(version=7, blend=BlendAlgorithm.GATED, tempo=Tempo.SLOW))
    sick_run(h.analyzer, "cnn", sick=2, kinds=CNN_KINDS)
    sick_run(h.analyzer, "tf", sick=1, kinds=TF_KINDS)
    training_run(h.analyzer, "adv", layer=3)
    before = time.time()
    h.due("cnn", "tf", "adv")
    assert await h.loop.decide_once() == 3
    after = time.time()

    codec = Codec()
    for command in h.published:
        assert command.command_id and len(command.command_id) <= 64
        assert command.policy == "heuristic" and command.policy_version == 7
        assert 0.0 < command.confidence <= 1.0 and 0.0 < command.urgency <= 1.0
        assert before <= command.issued_at <= after
        assert command.reason and command.op.value in command.reason
        decoded = codec.decode_command(codec.encode(command))  # valid on the wire
        assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(command)
    assert len({c.command_id for c in h.published}) == 3

    cnn, tf, adv = h.by_run()["cnn"], h.by_run()["tf"], h.by_run()["adv"]
    assert (cnn.run_id, cnn.layer_id, cnn.op) == ("cnn", 2, Op.GERMINATE)
    assert cnn.blueprint is not None and cnn.blueprint.family is BlueprintFamily.CNN
    assert (cnn.blend, cnn.tempo) == (BlendAlgorithm.GATED, Tempo.SLOW)
    assert (tf.run_id, tf.layer_id, tf.op) == ("tf", 1, Op.GERMINATE)
    assert tf.blueprint is not None and tf.blueprint.family is BlueprintFamily.TRANSFORMER
    assert (tf.blend, tf.tempo) == (BlendAlgorithm.GATED, Tempo.SLOW)
    assert (adv.layer_id, adv.op) == (3, Op.ADVANCE)
    assert (adv.blueprint, adv.blend, adv.tempo) == (None, None, None)
    # Each command went to the scheduler: its layer cools down and it awaits an ack.
    assert {(p.run_id, p.layer_id, p.op) for p in h.scheduler.pending.values()} == {
        ("cnn", 2, "germinate"),
        ("tf", 1, "germinate"),
        ("adv", 3, "advance"),
    }
    assert h.scheduler.cooling_layers("adv") == {3}


async def test_applied_command_keeps_its_layer_cooling() -> None:
    h = Harness(heuristic(), cooldown_s=60.0)
    training_run(h.analyzer, "r", layer=2)
    h.due("r")
    assert await h.loop.decide_once() == 1
    first = h.published[-1]
    assert (first.layer_id, first.op) == (2, Op.ADVANCE)
    # Applied: the layer stays cooled, so the same scenario now yields WAIT.
    assert h.scheduler.note_ack("r", first.command_id, applied=True) is not None
    h.due("r")
    assert await h.loop.decide_once() == 0
    assert len(h.published) == 1
    assert h.scheduler.cooling_layers("r") == {2}
    assert h.loop.stats.waits == 1


async def test_rejected_command_frees_its_layer_for_the_next_batch() -> None:
    h = Harness(heuristic(), cooldown_s=60.0)
    training_run(h.analyzer, "r", layer=1)
    h.due("r")
    await h.loop.decide_once()
    first = h.published[-1]
    h.due("r")
    assert await h.loop.decide_once() == 0  # cooling, no ack yet
    assert h.scheduler.note_ack("r", first.command_id, applied=False) is not None
    h.due("r")
    assert await h.loop.decide_once() == 1
    second = h.published[-1]
    assert (second.layer_id, second.op) == (1, Op.ADVANCE)
    assert second.command_id != first.command_id


# ------------------------------------------------------------------ the event loop stays free


async def test_slow_policy_does_not_block_the_event_loop() -> None:
    spy = Spy(heuristic(), delay=0.3)
    h = Harness(spy)
    sick_run(h.analyzer, "slow")
    h.due("slow")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    deciding = asyncio.create_task(h.loop.decide_once())
    try:
        await until(spy.started.is_set)
        # Ingestion from the loop goes on while the forward runs on the worker thread.
        ingested_during_act = 0
        for i in range(20):
            h.analyzer.ingest("other", HealthSignal(layer_id=i % 4, health_score=0.9))
            ingested_during_act += 1
            await asyncio.sleep(0.005)
        assert not spy.finished.is_set(), "ingestion should have overlapped the slow act"
        assert not deciding.done()
        ticks_during_act = ticks
        assert await deciding == 1
    finally:
        ticking.cancel()
        await asyncio.gather(ticking, return_exceptions=True)
    assert ticks_during_act >= 5  # a blocked loop would show 0 ticks here
    assert ingested_during_act == 20 and "other" in h.analyzer
    assert h.published[0].run_id == "slow"


@pytest.mark.parametrize("inline", [False, True], ids=["policy-thread", "inline"])
async def test_failing_policy_counts_a_failure_and_the_loop_goes_on(inline: bool) -> None:
    spy = Spy(heuristic(), fail_times=1, inline=inline)
    h = Harness(spy, max_wait_ms=1.0)
    sick_run(h.analyzer, "a")
    sick_run(h.analyzer, "b")
    task = asyncio.create_task(h.loop.run())
    try:
        h.due("a")
        await until(lambda: h.loop.stats.failures == 1)
        assert h.published == []
        h.due("b")
        await until(lambda: len(h.published) == 1)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert h.published[0].run_id == "b"
    assert h.loop.stats.failures == 1
    assert h.loop.stats.batches == 1  # only successful forwards count as batches
    assert len(spy.calls) == 2


async def test_swap_during_an_in_flight_batch_keeps_the_old_version_for_that_batch() -> None:
    old = Spy(heuristic(version=1), delay=0.2)
    new = heuristic(version=2)
    h = Harness(old)
    sick_run(h.analyzer, "first")
    sick_run(h.analyzer, "second")
    h.due("first")
    deciding = asyncio.create_task(h.loop.decide_once())
    await until(old.started.is_set)
    h.loop.swap_policy(new)
    assert h.loop.policy is new
    assert await deciding == 1
    assert (h.published[0].run_id, h.published[0].policy_version) == ("first", 1)
    h.due("second")
    assert await h.loop.decide_once() == 1
    assert (h.published[1].run_id, h.published[1].policy_version) == ("second", 2)
    assert len(old.calls) == 1  # the old bundle was not asked again


# ------------------------------------------------------------------ stats


async def test_stats_update_with_deterministic_latency() -> None:
    clock = FakeClock(100.0)

    def forward_takes_4ms() -> None:
        clock.now += 0.004

    spy = Spy(heuristic(), on_act=forward_takes_4ms)
    h = Harness(spy, clock=clock, decision_deadline_ms=3.0)
    sick_run(h.analyzer, "g1")
    sick_run(h.analyzer, "g2")
    training_run(h.analyzer, "a1")
    healthy_run(h.analyzer, "w1")
    h.due("g1", "g2", "a1", "w1")
    assert await h.loop.decide_once() == 3
    stats = h.loop.stats
    assert stats.commands_by_op == {"germinate": 2, "advance": 1}
    assert (stats.decisions, stats.waits, stats.commands) == (4, 1, 3)
    assert (stats.batches, stats.last_batch_size, stats.batch_size_max) == (1, 4, 4)
    assert stats.batch_size_mean == 4.0
    assert stats.latency_ms_p50 == pytest.approx(4.0) and stats.latency_ms_p99 == pytest.approx(4.0)
    assert stats.late == 3  # 4 ms > the 3 ms deadline
    assert stats.forward_ms_p50 > 0.0 and stats.forward_ms_p99 >= stats.forward_ms_p50

    healthy_run(h.analyzer, "w2")
    h.due("w2")
    clock.now += 1.0
    assert await h.loop.decide_once() == 0
    stats = h.loop.stats  # percentiles and the mean are brought up to date on read
    assert (stats.batches, stats.last_batch_size, stats.batch_size_max) == (2, 1, 4)
    assert stats.batch_size_mean == 2.5
    assert stats.commands == 3 and stats.waits == 2


# ------------------------------------------------------------------ percentile, describe, to_command


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 1) == 7.0 and percentile([7.0], 99) == 7.0
    ten = [float(x) for x in range(10, 0, -1)]  # unsorted input
    assert percentile(ten, 50) == 5.0
    assert percentile(ten, 90) == 9.0
    assert percentile(ten, 95) == 10.0
    assert percentile(ten, 0) == 1.0
    assert percentile(ten, 100) == 10.0
    hundred = [float(x) for x in range(1, 101)]
    assert percentile(hundred, 50) == 50.0
    assert percentile(hundred, 99) == 99.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0


def make_decision(op: Op, **fields: Any) -> Decision:
    values: dict[str, Any] = {
        "run_id": "r-1",
        "layer_id": 7,
        "op": op,
        "action": Action(0, 0),
        "confidence": 0.8,
        "urgency": 0.6,
        "policy": "heuristic",
        "policy_version": 3,
    }
    values.update(fields)
    return Decision(**values)


def test_describe_says_what_and_why() -> None:
    germinate = make_decision(
        Op.GERMINATE, blueprint=Blueprint.CONV_HEAVY, blend=BlendAlgorithm.GATED, tempo=Tempo.SLOW
    )
    text = describe(germinate)
    assert text.startswith("germinate layer 7 with conv_heavy (gated, slow)")
    assert "heuristic v3" in text and "confidence 0.80" in text and "urgency 0.60" in text
    assert describe(make_decision(Op.PRUNE)).startswith("prune layer 7: heuristic v3")


def test_to_command_germinate_carries_levers_and_a_reason() -> None:
    decision = make_decision(
        Op.GERMINATE,
        blueprint=Blueprint.LORA,
        blend=BlendAlgorithm.LINEAR,
        tempo=Tempo.FAST,
        confidence=1.7,
        urgency=-0.2,
    )
    before = time.time()
    command = to_command(decision)
    assert (command.run_id, command.layer_id, command.op) == ("r-1", 7, Op.GERMINATE)
    assert (command.blueprint, command.blend, command.tempo) == (
        Blueprint.LORA,
        BlendAlgorithm.LINEAR,
        Tempo.FAST,
    )
    assert (command.policy, command.policy_version) == ("heuristic", 3)
    assert command.confidence == 1.0 and command.urgency == 0.0  # clamped into [0, 1]
    assert command.reason == describe(decision)
    assert command.alpha_target is None
    assert before <= command.issued_at <= time.time()
    assert to_command(decision).command_id != command.command_id
    decoded = Codec().decode_command(Codec().encode_json(command))
    assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(command)


def test_to_command_other_ops_drop_levers_and_keep_a_given_reason() -> None:
    advance = to_command(
        make_decision(
            Op.ADVANCE,
            blueprint=Blueprint.LORA,
            blend=BlendAlgorithm.LINEAR,
            tempo=Tempo.FAST,
            reason="dwell over",
        )
    )
    assert (advance.blueprint, advance.blend, advance.tempo) == (None, None, None)
    assert advance.reason == "dwell over"
    alpha = to_command(make_decision(Op.SET_ALPHA_TARGET))
    assert alpha.alpha_target == 1.0 and alpha.reason


def test_to_command_publishes_scores_rounded_to_4_decimals() -> None:
    import numpy as np

    # A policy's float32 0.7 is 0.699999988079071 as a double: published, it must read 0.7.
    decision = make_decision(Op.ADVANCE, confidence=float(np.float32(0.7)), urgency=np.float32(0.123456))
    command = to_command(decision)
    assert (command.confidence, command.urgency) == (0.7, 0.1235)
    assert type(command.confidence) is float and type(command.urgency) is float
    text = Codec().encode_json(command)
    assert b'"confidence":0.7,' in text and b'"urgency":0.1235' in text
