"""Rails (esperd.rails): each rail masks and blocks as configured, and through the decision loop a
blocked decision is never published and is recorded as a WAIT whose log-probability the policy
itself reproduces (no off-policy surprise for a learner)."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from esperd import pareto
from esperd.analyzer import Analyzer, Observation
from esperd.analyzer.observation import EPOCHS_REMAINING_SCALE, GLOBAL_FEATURE_INDEX, OP_INDEX
from esperd.config import RailsConfig, SchedulerConfig
from esperd.decisions import DecisionLoop
from esperd.learn.experience import Transition
from esperd.learn.recorder import Recorder
from esperd.policy import PolicyConfig, create_policy
from esperd.rails import Block, Rail, Rails, forced_wait, layer_params, pool_objectives
from esperd.scheduler import Scheduler
from esperd_contracts import AdaptationCommand, HealthSignal, Op, SeedStage, SystemStatePacket
from tests.support.badpolicy import AlwaysGerminate
from tests.support.observations import make_observation
from tests.support.packets import chain_topology
from tests.support.timing import FakeClock

GERMINATE = OP_INDEX[Op.GERMINATE]
WAIT = OP_INDEX[Op.WAIT]


def obs_with_params(
    params: list[int], *, growth: float = 0.0, stages: list[SeedStage] | None = None, epoch: int = 5
) -> Observation:
    """A dormant-layer observation whose layers have these parameter counts."""
    log_params = [float(np.log10(p + 1.0) / 10.0) for p in params]
    return make_observation(
        num_nodes=len(params),
        stages=stages,
        node={"log_params": log_params},
        globals_={"param_growth": growth},
        epoch=epoch,
    )


# ------------------------------------------------------------------ the rails alone


def test_layer_params_inverts_the_log_feature() -> None:
    obs = obs_with_params([0, 1_000, 123_456])
    assert layer_params(obs).tolist() == [0, 1_000, 123_456]


def test_a_threshold_reported_in_float32_meets_the_threshold() -> None:
    # Policies report confidences as float32 tensors: the heuristic's 0.7 arrives as 0.69999999.
    rails = Rails(RailsConfig())
    obs = obs_with_params([1000] * 4)
    confidence, urgency = torch.tensor([0.7, 0.5], dtype=torch.float32).tolist()
    assert confidence < 0.7  # the float32 rounding this test is about
    assert rails.check(obs, 0, Op.GERMINATE, confidence, urgency, 0.0) is None


def test_confidence_and_urgency_below_threshold_are_blocked() -> None:
    rails = Rails(RailsConfig())  # the seed documents' 0.7 and 0.5
    obs = obs_with_params([1000] * 4)
    assert rails.check(obs, 0, Op.GERMINATE, 0.7, 0.5, 0.0) is None
    low_conf = rails.check(obs, 0, Op.GERMINATE, 0.69, 0.9, 0.0)
    assert low_conf is not None and low_conf.rail is Rail.CONFIDENCE
    low_urg = rails.check(obs, 0, Op.ADVANCE, 0.9, 0.49, 0.0)
    assert low_urg is not None and low_urg.rail is Rail.URGENCY
    assert rails.check(obs, 0, Op.WAIT, 0.0, 0.0, 0.0) is None  # WAIT is never blocked


def test_the_command_rate_cap_masks_then_blocks_until_the_window_has_passed() -> None:
    rails = Rails(RailsConfig(max_commands_per_window=2, command_window_s=10.0))
    obs = obs_with_params([1000] * 4)
    for t in (0.0, 1.0):
        assert rails.check(obs, 0, Op.GERMINATE, 1.0, 1.0, t) is None
        rails.note_sent(obs, t and 1, Op.ADVANCE, t)
    masked = rails.mask(obs, 2.0)
    assert not np.delete(masked.op_mask, WAIT, axis=1).any() and masked.op_mask[:, WAIT].all()
    block = rails.check(obs, 0, Op.GERMINATE, 1.0, 1.0, 2.0)
    assert block is not None and block.rail is Rail.COMMAND_RATE
    assert rails.status().masked_by_rail == {"command_rate": 1}
    # The first command leaves the window at t=10: one more may go out, not two.
    assert rails.check(obs, 0, Op.GERMINATE, 1.0, 1.0, 10.5) is None
    rails.note_sent(obs, 0, Op.GERMINATE, 10.5)
    assert rails.check(obs, 1, Op.GERMINATE, 1.0, 1.0, 10.6) is not None
    # The cap is per run. (Parameters and growth set, not random: the param budget must not trip.)
    other = msgspec.structs.replace(obs_with_params([1000] * 3), run_id="run-1")
    assert rails.check(other, 0, Op.GERMINATE, 1.0, 1.0, 10.6) is None


def test_active_seeds_count_live_stages_and_germinations_in_flight() -> None:
    rails = Rails(RailsConfig(max_active_seeds=2, param_budget=1.0))
    stages = [SeedStage.TRAINING, SeedStage.DORMANT, SeedStage.DORMANT, SeedStage.DORMANT]
    obs = obs_with_params([1000] * 4, stages=stages, epoch=5)
    assert rails.mask(obs, 0.0) is obs  # one live seed: below the cap, nothing masked
    assert rails.check(obs, 1, Op.GERMINATE, 1.0, 1.0, 0.0) is None
    rails.note_sent(obs, 1, Op.GERMINATE, 0.0)  # in flight: not yet in the reported stages
    masked = rails.mask(obs, 1.0)
    assert not masked.op_mask[:, GERMINATE].any() and masked.op_mask[0, OP_INDEX[Op.ADVANCE]]
    block = rails.check(obs, 2, Op.GERMINATE, 1.0, 1.0, 1.0)
    assert block == Block(Rail.ACTIVE_SEEDS, "2 live seeds (cap 2)")
    # The host reports the germinated seed: counted once, by its stage.
    stages[1] = SeedStage.GERMINATED
    reported = obs_with_params([1000] * 4, stages=stages, epoch=5)
    assert rails.check(reported, 2, Op.GERMINATE, 1.0, 1.0, 2.0).rail is Rail.ACTIVE_SEEDS  # type: ignore[union-attr]
    # A germination the host never took (rejected) is forgotten two epochs later.
    rails.note_sent(obs, 2, Op.GERMINATE, 3.0)
    later = obs_with_params([1000] * 4, stages=[SeedStage.TRAINING] + [SeedStage.DORMANT] * 3, epoch=7)
    assert rails.check(later, 2, Op.GERMINATE, 1.0, 1.0, 4.0) is None


def test_the_param_budget_masks_the_layers_a_seed_would_take_past_it() -> None:
    # Host 100k params; a seed is estimated at 0.6 of its layer: 6% on the small layers, 42% on
    # the big one. 10% already added: the big layer would reach 52% > 50%.
    rails = Rails(RailsConfig(param_budget=0.5, max_active_seeds=10))
    obs = obs_with_params([10_000, 10_000, 70_000, 10_000], growth=0.10)
    masked = rails.mask(obs, 0.0)
    assert masked.op_mask[:, GERMINATE].tolist() == [True, True, False, True]
    assert rails.status().masked_by_rail == {"param_budget": 1}
    block = rails.check(obs, 2, Op.GERMINATE, 1.0, 1.0, 0.0)
    assert block is not None and block.rail is Rail.PARAM_BUDGET and "52.0%" in block.detail
    # A germination goes out with what is left of the budget (50% - 10% of 100k) as its
    # max_seed_params, and reserves all of it until the host reports the seed or rejects it.
    assert rails.check(obs, 0, Op.GERMINATE, 1.0, 1.0, 1.0) is None
    assert rails.note_sent(obs, 0, Op.GERMINATE, 1.0) == 40_000
    assert not rails.mask(obs, 2.0).op_mask[:, GERMINATE].any()
    assert rails.check(obs, 1, Op.GERMINATE, 1.0, 1.0, 2.0).rail is Rail.PARAM_BUDGET  # type: ignore[union-attr]
    # Rejected by the host (its seed was larger): the reservation is free again at once.
    rails.note_rejected(obs.run_id, int(obs.layer_ids[0]))
    assert rails.check(obs, 1, Op.GERMINATE, 1.0, 1.0, 3.0) is None
    # Applied and reported (the seed is live, 30k real parameters): the report replaces the
    # reservation, and the next seed may have what is left, 10k.
    assert rails.note_sent(obs, 1, Op.GERMINATE, 3.0) == 40_000
    stages = [SeedStage.DORMANT, SeedStage.TRAINING, SeedStage.DORMANT, SeedStage.DORMANT]
    reported = obs_with_params([10_000, 10_000, 70_000, 10_000], growth=0.40, stages=stages, epoch=6)
    assert rails.check(reported, 0, Op.GERMINATE, 1.0, 1.0, 4.0) is None
    assert rails.note_sent(reported, 0, Op.GERMINATE, 4.0) == 10_000
    # Non-GERMINATE commands carry no limit.
    assert rails.note_sent(reported, 1, Op.ADVANCE, 5.0) == 0


def test_no_germination_when_fewer_epochs_remain_than_a_lifecycle() -> None:
    rails = Rails(RailsConfig(min_epochs_left=10))
    params = [1000] * 3

    def at(remaining: float, known: float = 1.0) -> Observation:
        obs = obs_with_params(params)
        g = obs.global_features.copy()
        g[GLOBAL_FEATURE_INDEX["budget_known"]] = known
        g[GLOBAL_FEATURE_INDEX["epochs_remaining"]] = remaining / EPOCHS_REMAINING_SCALE
        return msgspec.structs.replace(obs, global_features=g)

    assert rails.mask(at(10), 0.0).op_mask[:, GERMINATE].all()  # exactly enough time
    assert rails.check(at(10), 0, Op.GERMINATE, 1.0, 1.0, 0.0) is None
    late = rails.mask(at(9), 0.0)
    assert not late.op_mask[:, GERMINATE].any() and late.op_mask[:, WAIT].all()
    assert rails.check(at(9), 0, Op.GERMINATE, 1.0, 1.0, 0.0) == Block(
        Rail.LATE_GERMINATION, "9 epochs left, a seed's lifecycle needs 10"
    )
    assert rails.check(at(9), 0, Op.ADVANCE, 1.0, 1.0, 0.0) is None  # only new seeds wait
    assert rails.check(at(2, known=0.0), 0, Op.GERMINATE, 1.0, 1.0, 0.0) is None  # no budget sent
    off = Rails(RailsConfig(min_epochs_left=0))
    assert off.check(at(1), 0, Op.GERMINATE, 1.0, 1.0, 0.0) is None
    assert rails.status().masked_by_rail == {"late_germination": 1}


def run_obs(run_id: str, *, losses: list[float], remaining: float, live: int = 0) -> Observation:
    """A four-layer run with `live` live seeds, these recent val losses (newest first) and this
    share of its training left."""
    stages = [SeedStage.TRAINING] * live + [SeedStage.DORMANT] * (4 - live)
    history = {f"loss_history_{k}": float(np.log1p(v)) for k, v in enumerate(losses)}  # as the analyzer
    obs = make_observation(
        run_id,
        num_nodes=4,
        stages=stages,
        node={"log_params": float(np.log10(1001) / 10)},
        globals_={"param_growth": 0.0, "epochs_remaining": remaining, **history},
        random_features=False,
    )
    return obs


def test_pool_objectives_by_hand() -> None:
    steady = run_obs("a", losses=[1.0] * 5, remaining=0.8)
    assert pool_objectives(steady, 0.9, 0.5) == pareto.Objectives(0.45, 0.0, pytest.approx(0.8))
    # Losses 0.9 and 1.1 (two packets so far): relative spread 0.1, twice the scale -> risk 2/3.
    swinging = run_obs("b", losses=[0.9, 1.1], remaining=1.0)
    objectives = pool_objectives(swinging, 1.0, 1.0)
    assert objectives.risk == pytest.approx(0.1 / (0.1 + 0.05), rel=1e-5)
    assert objectives.performance == 1.0 and objectives.adaptability == 1.0
    assert pool_objectives(run_obs("c", losses=[1.0], remaining=0.5), 1.0, 1.0).risk == 0.0


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_the_pool_s_risk_is_the_spread_of_the_losses_the_host_reported(scale: float) -> None:
    """The analyzer keeps log1p(val loss): the risk is of the losses themselves, whatever their
    level (on the log1p values, losses 1.8 and 2.2 would seem to swing 40% less than 0.9 and 1.1)."""
    analyzer = Analyzer()
    analyzer.ingest("run", chain_topology(("conv",) * 4, name_prefix="layer"))
    for epoch, loss in enumerate((0.9 * scale, 1.1 * scale)):
        analyzer.ingest("run", SystemStatePacket(epoch=epoch, val_loss=loss))
    risk = pool_objectives(analyzer.observe("run"), 1.0, 1.0).risk
    assert risk == pytest.approx(0.1 / (0.1 + 0.05), rel=1e-5)  # relative spread 0.1, scale 0.05


@pytest.mark.parametrize(("selection", "winner"), [("pareto", 1), ("argmax", 0)])
def test_the_seed_pool_gives_its_last_seed_by_the_configured_selection(selection: str, winner: int) -> None:
    rails = Rails(RailsConfig(max_seeds_total=2), selection=selection)
    # Run "old" holds one of the two seeds.
    holder = run_obs("old", losses=[1.0] * 5, remaining=0.5, live=1)
    assert rails.mask(holder, 0.0).op_mask[:, GERMINATE].any()  # one seed free: nothing masked
    assert rails.pool_live() == 1 and rails.pool_free() == 1
    # Two runs want the last one. "eager" claims more (0.9 x 1.0) but its loss swings and it is
    # nearly done; "steady" claims 0.8 and has most of its training ahead. Weighted 0.5 / 0.3 /
    # 0.2: eager 0.45 - 0.3 x 2/3 + 0.2 x 0.2 = 0.29, steady 0.40 + 0.2 x 0.9 = 0.58.
    eager = run_obs("eager", losses=[0.9, 1.1], remaining=0.2)
    steady = run_obs("steady", losses=[1.0] * 5, remaining=0.9)
    candidates = [(eager, 0.9, 1.0), (steady, 0.8, 1.0)]
    for obs, c, u in candidates:
        assert rails.check(obs, 1, Op.GERMINATE, c, u, 0.0) is None  # each alone would fit
    blocked = rails.allot_pool(candidates)
    assert blocked == [1 - winner]  # the other one waits
    # What `esperd watch` shows for it: the pool is not full yet, its last seed went elsewhere.
    assert rails.pool_block() == Block(
        Rail.SEED_POOL, f"1 live seeds across runs (pool of 2): its 1 free went to other runs ({selection})"
    )
    # The winner's germination fills the pool: every run is masked and blocked now.
    rails.note_sent(candidates[winner][0], 1, Op.GERMINATE, 0.0)
    assert rails.pool_live() == 2 and rails.pool_free() == 0
    loser = candidates[1 - winner][0]
    masked = rails.mask(loser, 1.0)
    assert not masked.op_mask[:, GERMINATE].any() and masked.op_mask[:, WAIT].all()
    assert rails.check(loser, 1, Op.GERMINATE, 1.0, 1.0, 1.0) == Block(
        Rail.SEED_POOL, "2 live seeds across runs (pool of 2)"
    )
    assert rails.check(loser, 1, Op.ADVANCE, 1.0, 1.0, 1.0) is None  # only new seeds wait
    status = rails.status()
    assert (status.seed_pool, status.seed_pool_live) == (2, 2)
    assert status.masked_by_rail == {"seed_pool": 1}
    # The holder's seed ends (its next report shows none live): a seed is free again.
    rails.mask(run_obs("old", losses=[1.0] * 5, remaining=0.4), 2.0)
    assert rails.pool_free() == 1
    rails.forget(candidates[winner][0].run_id)  # a dropped run gives its seeds back
    assert rails.pool_live() == 0


def test_a_pool_with_room_for_every_germination_blocks_none() -> None:
    rails = Rails(RailsConfig(max_seeds_total=3))
    runs = [(run_obs(f"r{i}", losses=[1.0], remaining=0.5), 0.9, 0.9) for i in range(3)]
    assert rails.allot_pool(runs) == []
    assert Rails(RailsConfig()).allot_pool(runs) == []  # no pool at all (the default)
    assert Rails(RailsConfig()).pool_free() is None


def test_disabled_rails_let_everything_through() -> None:
    config = RailsConfig(enabled=False, max_commands_per_window=1, max_active_seeds=1, max_seeds_total=1)
    rails = Rails(config)
    obs = obs_with_params([1000] * 3, growth=1.0)
    assert rails.mask(obs, 0.0) is obs
    for t in range(3):
        assert rails.check(obs, 0, Op.GERMINATE, 0.0, 0.0, float(t)) is None
        assert rails.note_sent(obs, 0, Op.GERMINATE, float(t)) == 0  # no limit on the wire
    assert rails.status().blocked_total == 0 and not rails.status().enabled
    # Nor is there a pool: status (and so the metrics) must not show one the rails do not keep.
    assert rails.pool_free() is None and rails.status().seed_pool == 0


def test_forced_wait_leaves_only_wait_and_the_rest_untouched() -> None:
    obs = make_observation(num_nodes=5)
    forced = forced_wait(obs)
    assert forced.op_mask[:, WAIT].all() and not np.delete(forced.op_mask, WAIT, axis=1).any()
    assert forced.node_features is obs.node_features and obs.op_mask[:, GERMINATE].any()


# ------------------------------------------------------------------ through the decision loop


def sick_run(analyzer: Analyzer, run_id: str, epoch: int = 5) -> None:
    analyzer.ingest(run_id, chain_topology(("conv",) * 6, name_prefix="layer"))
    for health in (0.5, 0.4, 0.3, 0.2):
        analyzer.ingest(run_id, HealthSignal(layer_id=1, health_score=health))
    analyzer.ingest(run_id, SystemStatePacket(epoch=epoch, val_accuracy=0.6))


class Loop:
    """Analyzer + Scheduler + DecisionLoop with rails; commands and transitions collected."""

    def __init__(self, policy: Any, rails: RailsConfig) -> None:
        self.clock = FakeClock()
        self.analyzer = Analyzer()
        self.scheduler = Scheduler(SchedulerConfig(min_interval_s=0.0, cooldown_s=0.0), clock=self.clock)
        self.recorder = Recorder()
        self.transitions: list[Transition] = []
        self.recorder.add_sink(self.transitions.append)
        self.published: list[AdaptationCommand] = []
        self.blocked: list[tuple[str, Rail]] = []
        self.rails = Rails(rails)
        self.loop = DecisionLoop(
            self.scheduler,
            policy,
            observe=lambda ids: [self.analyzer.observe(i) if i in self.analyzer else None for i in ids],
            publish=self._publish,
            on_decided=self.recorder.decision_hook,
            clock=self.clock,
            rails=self.rails,
            on_blocked=self._on_blocked,
        )

    async def _publish(self, command: AdaptationCommand) -> None:
        self.published.append(command)

    async def _on_blocked(self, decision: Any, block: Block) -> None:
        self.blocked.append((decision.run_id, block.rail))

    async def decide(self, *run_ids: str) -> int:
        for run_id in run_ids:
            self.scheduler.mark_due(run_id)
        self.clock.advance(0.01)
        return await self.loop.decide_once()


async def test_a_policy_that_always_germinates_is_held_to_the_rails() -> None:
    loop = Loop(AlwaysGerminate(), RailsConfig(max_commands_per_window=3, command_window_s=60.0))
    sick_run(loop.analyzer, "r1")
    sent = [await loop.decide("r1") for _ in range(10)]
    assert sent == [1, 1, 1] + [0] * 7
    assert {c.op for c in loop.published} == {Op.GERMINATE}
    status = loop.rails.status()
    assert status.blocked_by_rail == {"command_rate": 7} and status.blocked_total == 7
    assert loop.blocked == [("r1", Rail.COMMAND_RATE)] * 7
    assert loop.loop.stats.waits == 7 and loop.loop.stats.commands == 3
    # Recorded: 3 germinations, then forced WAITs (the last decision's step is still open).
    recorded = [(OPS_NAME[int(t.action[1])], t.log_prob) for t in loop.transitions]
    assert recorded == [("germinate", 0.0)] * 3 + [("wait", 0.0)] * 6
    assert all(not np.delete(t.obs.op_mask, WAIT, axis=1).any() for t in loop.transitions[3:])


OPS_NAME = {i: op.value for op, i in OP_INDEX.items()}


async def test_runs_share_the_seed_pool_through_the_decision_loop() -> None:
    loop = Loop(AlwaysGerminate(), RailsConfig(max_seeds_total=1))
    for run_id in ("r1", "r2", "r3"):
        sick_run(loop.analyzer, run_id)
    assert await loop.decide("r1", "r2", "r3") == 1  # one seed in the pool: one germination
    assert [c.op for c in loop.published] == [Op.GERMINATE]
    assert sorted(r for r, _ in loop.blocked) == sorted({"r1", "r2", "r3"} - {loop.published[0].run_id})
    assert {rail for _, rail in loop.blocked} == {Rail.SEED_POOL}
    # The pool is full: the next batch is masked before the policy acts, and this policy, which
    # ignores masks, is blocked on every run.
    assert await loop.decide("r1", "r2", "r3") == 0
    status = loop.rails.status()
    assert status.blocked_by_rail == {"seed_pool": 2 + 3} and status.seed_pool_live == 1
    assert status.masked_by_rail == {"seed_pool": 3}


@pytest.mark.parametrize("name", ["gnn", "lstm"])
async def test_a_blocked_decision_is_recorded_as_a_wait_the_policy_itself_scores(name: str) -> None:
    """The recorded behaviour log-prob is what the policy's own evaluate gives the recorded step:
    exactly 0 (probability 1), under these weights or any others."""
    torch.manual_seed(0)
    policy = create_policy(name, PolicyConfig(name=name), "cpu")
    loop = Loop(policy, RailsConfig(confidence_threshold=1.0, urgency_threshold=1.0))
    for run_id in ("r1", "r2"):
        sick_run(loop.analyzer, run_id)
    for _ in range(3):
        assert await loop.decide("r1", "r2") == 0
    assert loop.published == [] and len(loop.transitions) == 4
    status = loop.rails.status()
    assert status.blocked_total == len(loop.blocked) > 0
    assert set(status.blocked_by_rail) <= {"confidence", "urgency"}
    steps = loop.transitions
    actions = torch.tensor(np.stack([t.action for t in steps]))
    hidden = None
    if policy.is_recurrent:
        hidden = torch.tensor(np.stack([t.hidden for t in steps]))
    evaluated = policy.evaluate([t.obs for t in steps], actions, hidden=hidden)
    recorded = torch.tensor([t.log_prob for t in steps])
    torch.testing.assert_close(evaluated.log_probs.detach(), recorded, atol=1e-6, rtol=0)
    # Blocked steps: forced WAITs; steps the policy chose WAIT itself keep their own log-prob.
    blocked_rows = [i for i, t in enumerate(steps) if not np.delete(t.obs.op_mask, WAIT, axis=1).any()]
    assert blocked_rows and all(steps[i].log_prob == 0.0 and steps[i].action[1] == WAIT for i in blocked_rows)
    with torch.no_grad():  # new weights: still probability 1
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    again = policy.evaluate(
        [steps[i].obs for i in blocked_rows],
        actions[blocked_rows],
        hidden=None if hidden is None else hidden[blocked_rows],
    )
    assert torch.allclose(again.log_probs.detach(), torch.zeros(len(blocked_rows)), atol=1e-6)


async def test_a_run_dropped_while_its_batch_is_published_gets_no_command_and_holds_no_seed() -> None:
    """Publishing awaits the bus, so a run can be dropped (evicted, its partition lost) between
    two commands of one batch. Its command must not go out, nor be noted: the rails would hold
    its seed in the pool after `forget`, for good (no later drop forgets it again)."""
    loop = Loop(AlwaysGerminate(), RailsConfig(max_seeds_total=4))
    dropped: set[str] = set()
    loop.loop.tracked = lambda run_id: run_id not in dropped
    for run_id in ("r1", "r2"):
        sick_run(loop.analyzer, run_id)

    async def publish_then_drop_r2(command: AdaptationCommand) -> None:
        loop.published.append(command)
        if "r2" not in dropped:  # what RunTable.drop does, while r1's command goes out
            dropped.add("r2")
            loop.rails.forget("r2")
            loop.scheduler.forget_run("r2")
            loop.analyzer.remove_run("r2")

    loop.loop.publish = publish_then_drop_r2
    assert await loop.decide("r1", "r2") == 1
    assert [c.run_id for c in loop.published] == ["r1"]
    assert loop.loop.stats.dropped == 1
    assert loop.rails.pool_live() == 1 and loop.rails.tracked_runs == 1  # r1's seed alone
    assert {p.run_id for p in loop.scheduler.pending.values()} == {"r1"}  # nothing awaits r2's ack


async def test_a_seed_pruned_before_its_germination_settles_gives_its_pool_slot_back() -> None:
    """A germination counts as a live seed until the run's stages show the seed; from then on the
    stages alone count it. A seed pruned at once (GERMINATED -> PRUNED, legal) is not counted
    again by its germination, which still waits for a later epoch's report to settle."""
    loop = Loop(AlwaysGerminate(), RailsConfig(max_seeds_total=1, param_budget=5.0))
    for run_id in ("r1", "r2"):
        sick_run(loop.analyzer, run_id)
    assert await loop.decide("r1") == 1
    command = loop.published[0]
    loop.analyzer.note_ack("r1", command.layer_id, Op.GERMINATE, True, blueprint=command.blueprint)
    assert await loop.decide("r1", "r2") == 0  # the seed is live: the pool is full
    loop.analyzer.note_ack("r1", command.layer_id, Op.PRUNE, True)
    loop.analyzer.ingest("r1", SystemStatePacket(epoch=6, val_accuracy=0.6))  # 1 epoch on: unsettled
    assert await loop.decide("r1", "r2") == 1  # the slot is free: one of them gets it
    assert loop.rails.pool_live() == 1
