"""Rails: the bounds every policy's commands stay within, whatever the policy.

Applied in one place, the decision loop (esperd.decisions), for every policy alike:

  * before the policy acts, `mask` removes what a rail forbids in this run now (GERMINATE
    at the seed or parameter limit or too late in the run, every op but WAIT at the
    command-rate cap) from the
    observation's op mask, so a policy that honours masks chooses among what is allowed,
    and its log-probability is that of the observation it saw;
  * after it acts, `check` blocks whatever still breaks a rail (a policy that ignores masks,
    or a decision below the confidence or urgency threshold);
  * with a seed pool shared by every run (`max_seeds_total`), `allot_pool` decides which of
    a batch's germinations get its last free seeds when there are fewer than they want: seed
    document 002's multi-objective choice over the runs (`pool_objectives`), or the most
    confident and urgent with `[policy] selection = "argmax"`.

A blocked decision is never sent. It becomes the WAIT that was actually done, and is recorded
for learning as a forced WAIT (`forced_wait`): WAIT on node 0 of the observation with every
op but WAIT masked on every node. Under any weights the factored distribution then puts all
its mass on that one action (see esperd.policy.heads: no node with a legal op means node 0,
and WAIT is its only op), so the behaviour log-probability is exactly 0 and a learner that
re-evaluates the step gets 0 as well: a blocked action is no off-policy surprise, and the
step still teaches the critic its value. Hosts never see it.

Per-run state (recent command times, germinations in flight) lives here; the event loop owns
the object (not thread-safe). Torch-free.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

import msgspec
import numpy as np

from esperd import pareto
from esperd.analyzer.masks import LIVE_STAGE
from esperd.analyzer.observation import (
    GLOBAL_FEATURE_INDEX,
    NODE_FEATURE_INDEX,
    OP_INDEX,
    Observation,
    epochs_left,
)
from esperd.config import RailsConfig
from esperd_contracts import Op
from esperd_contracts.status import RailsStatus


class Rail(enum.StrEnum):
    """The rails, by the name status and metrics count them under."""

    CONFIDENCE = "confidence"
    URGENCY = "urgency"
    COMMAND_RATE = "command_rate"
    PARAM_BUDGET = "param_budget"
    ACTIVE_SEEDS = "active_seeds"
    LATE_GERMINATION = "late_germination"
    SEED_POOL = "seed_pool"


_WAIT = OP_INDEX[Op.WAIT]
_GERMINATE = OP_INDEX[Op.GERMINATE]
_GROWTH = GLOBAL_FEATURE_INDEX["param_growth"]
_LOG_PARAMS = NODE_FEATURE_INDEX["log_params"]
_LOSS_HISTORY = [GLOBAL_FEATURE_INDEX[f"loss_history_{k}"] for k in range(5)]
_EPOCHS_REMAINING = GLOBAL_FEATURE_INDEX["epochs_remaining"]
#: The relative spread of a run's recent validation losses at which its risk is one half.
_SWING_SCALE = 0.05
#: A germination not yet visible in the run's reports is forgotten after this many epochs (a
#: rejected one never shows; an applied one shows in the next state packet).
_IN_FLIGHT_EPOCHS = 2


def _live_layers(obs: Observation) -> set[int]:
    return {int(obs.layer_ids[i]) for i in np.flatnonzero(LIVE_STAGE[obs.stages])}


@dataclass(slots=True)
class _InFlight:
    layer_id: int
    epoch: int  # the run's epoch when the command went out
    fraction: float  # estimated added parameters, as a fraction of the host's
    seen_live: bool = False  # its seed has shown in the run's stages, which count it from then on


@dataclass(slots=True)
class _RunRails:
    sent_at: collections.deque[float] = field(default_factory=collections.deque)
    germinating: list[_InFlight] = field(default_factory=list)
    live_seeds: int = 0  # live seeds and germinations in flight, as of the run's latest observation


class Block(msgspec.Struct, frozen=True):
    """Why a decision was not sent."""

    rail: Rail
    detail: str


def layer_params(obs: Observation) -> np.ndarray:
    """Each node's parameter count, from the observation's log10(params + 1) / 10 feature."""
    return np.rint(np.power(10.0, obs.node_features[:, _LOG_PARAMS].astype(np.float64) * 10.0) - 1.0)


def pool_objectives(obs: Observation, confidence: float, urgency: float) -> pareto.Objectives:
    """002's objectives for giving this run a seed from the shared pool:
    performance  what the policy claims for its germination: confidence x urgency;
    risk         how much the run's validation loss swings (the relative spread of its last
                 five packets' losses, squashed to [0, 1)): there a blend shock is hardest to
                 tell from noise, and a seed the likeliest to be pruned unproven;
    adaptability its epochs still ahead, over 50 and at most 1 (the observation's
                 epochs_remaining; 1 when the host does not say): the epochs a seed has to pay
                 back."""
    g = obs.global_features
    history = g[_LOSS_HISTORY].astype(np.float64)
    losses = np.expm1(history[history > 0])  # the features are log1p(val loss), 0 before a packet
    swing = float(losses.std() / losses.mean()) if losses.size >= 2 else 0.0
    return pareto.Objectives(
        performance=float(confidence) * float(urgency),
        risk=swing / (swing + _SWING_SCALE),
        adaptability=float(g[_EPOCHS_REMAINING]),
    )


def forced_wait(obs: Observation) -> Observation:
    """`obs` with every op but WAIT masked on every node: the step as a rail left it."""
    ops = np.zeros_like(obs.op_mask)
    ops[:, _WAIT] = True
    return msgspec.structs.replace(obs, op_mask=ops)


class Rails:
    """Per-run bounds on what any policy may send (see the module docstring)."""

    def __init__(self, config: RailsConfig, selection: str = "pareto") -> None:
        self.config = config
        self.selection = selection  # how the seed pool's last free seeds are shared out
        self._runs: dict[str, _RunRails] = {}
        self.blocked_by_rail: collections.Counter[str] = collections.Counter()
        self.masked_by_rail: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------ before the policy acts

    def mask(self, obs: Observation, now: float) -> Observation:
        """The observation with what a rail forbids in this run now masked out (counted by rail)."""
        if not self.config.enabled or obs.num_nodes == 0:
            return obs
        run = self._run(obs, now)
        if len(run.sent_at) >= self.config.max_commands_per_window:
            if np.delete(obs.op_mask, _WAIT, axis=1).any():  # something besides WAIT was allowed
                self.masked_by_rail[Rail.COMMAND_RATE] += 1
            return forced_wait(obs)
        germinable = obs.op_mask[:, _GERMINATE]
        if not germinable.any():
            return obs
        rail = None
        if self._too_late(obs) is not None:
            rail = Rail.LATE_GERMINATION
            allowed = np.zeros_like(germinable)
        elif run.live_seeds >= self.config.max_active_seeds:  # counted by _run for this obs
            rail = Rail.ACTIVE_SEEDS
            allowed = np.zeros_like(germinable)
        elif self.pool_free() == 0:
            rail = Rail.SEED_POOL
            allowed = np.zeros_like(germinable)
        else:
            allowed = self._within_budget(obs, run)
            if not allowed.all():
                rail = Rail.PARAM_BUDGET
        if rail is None or not (germinable & ~allowed).any():
            return obs
        self.masked_by_rail[rail] += 1
        ops = obs.op_mask.copy()
        ops[:, _GERMINATE] &= allowed
        return msgspec.structs.replace(obs, op_mask=ops)

    # ------------------------------------------------------------ after it acts

    def check(
        self, obs: Observation, node: int, op: Op, confidence: float, urgency: float, now: float
    ) -> Block | None:
        """The rail that blocks this decision (None: it may go out). `obs` is what the policy saw."""
        config = self.config
        if not config.enabled or op is Op.WAIT:
            return None
        run = self._run(obs, now)
        if len(run.sent_at) >= config.max_commands_per_window:
            return Block(
                Rail.COMMAND_RATE,
                f"{len(run.sent_at)} commands in the last {config.command_window_s:g}s "
                f"(cap {config.max_commands_per_window})",
            )
        if op is Op.GERMINATE:
            left = self._too_late(obs)
            if left is not None:
                return Block(
                    Rail.LATE_GERMINATION,
                    f"{left} epochs left, a seed's lifecycle needs {config.min_epochs_left}",
                )
            active = run.live_seeds  # counted by _run for this obs
            if active >= config.max_active_seeds:
                return Block(Rail.ACTIVE_SEEDS, f"{active} live seeds (cap {config.max_active_seeds})")
            if self.pool_free() == 0:
                return Block(Rail.SEED_POOL, self._pool_detail())
            projected = self._committed(obs, run) + self._seed_fraction(obs)[node]
            if projected > config.param_budget:
                return Block(
                    Rail.PARAM_BUDGET,
                    f"added parameters would reach {projected:.1%} of the host "
                    f"(budget {config.param_budget:.0%})",
                )
        # Compared in float32, the precision policies report them in: a policy's 0.7 arrives as
        # 0.69999999, which must still meet a threshold of 0.7.
        if np.float32(confidence) < np.float32(config.confidence_threshold):
            return Block(Rail.CONFIDENCE, f"confidence {confidence:.2f} < {config.confidence_threshold:.2f}")
        if np.float32(urgency) < np.float32(config.urgency_threshold):
            return Block(Rail.URGENCY, f"urgency {urgency:.2f} < {config.urgency_threshold:.2f}")
        return None

    def pool_free(self) -> int | None:
        """Seeds left in the shared pool (None: no pool, or rails off)."""
        cap = self.config.max_seeds_total
        if not cap or not self.config.enabled:
            return None
        return max(cap - self.pool_live(), 0)

    def pool_live(self) -> int:
        """Live seeds and germinations in flight across every run, as last observed."""
        return sum(run.live_seeds for run in self._runs.values())

    def allot_pool(self, candidates: list[tuple[Observation, float, float]]) -> list[int]:
        """Which of a batch's germinations (observation, confidence, urgency), each already let
        through by `check`, the pool cannot serve: the indices to block, none while it has room
        for all. The free seeds go one at a time to the best of those left (`pareto.select`
        over `pool_objectives`, or performance alone with selection "argmax")."""
        free = self.pool_free()
        if free is None or free >= len(candidates):
            return []
        scored = [pool_objectives(obs, c, u) for obs, c, u in candidates]
        choose = pareto.select if self.selection == "pareto" else pareto.argmax
        left = list(range(len(candidates)))
        for _ in range(free):
            left.pop(choose([scored[i] for i in left]))
        return left

    def pool_block(self) -> Block:
        """The block for a germination `allot_pool` gave no seed (called before the batch's winners
        are sent: the pool still has the seeds they take, which the detail says went elsewhere)."""
        free = self.pool_free() or 0
        return Block(
            Rail.SEED_POOL, f"{self._pool_detail()}: its {free} free went to other runs ({self.selection})"
        )

    def _pool_detail(self) -> str:
        return f"{self.pool_live()} live seeds across runs (pool of {self.config.max_seeds_total})"

    def count_block(self, block: Block) -> None:
        self.blocked_by_rail[block.rail] += 1

    def note_sent(self, obs: Observation, node: int, op: Op, now: float) -> int:
        """A command goes out for this run (after `check` let it). For a GERMINATE, returns its
        `max_seed_params`: what is left of the budget, in parameters (0: rails off, no limit).

        Only the host knows how large a blueprint is on its layer (a seed can be many times its
        layer on a narrow one), so the host enforces the limit, and until it reports the seed's
        real size (or rejects it) the germination reserves all of it: a run under a budget
        germinates once per report, and never past the budget.
        """
        run = self._run(obs, now)
        run.sent_at.append(now)
        if op is not Op.GERMINATE or not self.config.enabled:
            return 0
        host = float(layer_params(obs).sum())
        left = self.config.param_budget - self._committed(obs, run)
        limit = max(round(left * host), 1)  # to the nearest parameter: growth arrives in float32
        fraction = limit / host if host > 0 else float(self._seed_fraction(obs)[node])
        run.germinating.append(_InFlight(int(obs.layer_ids[node]), obs.epoch, fraction))
        run.live_seeds += 1
        return limit if host > 0 else 0

    def note_rejected(self, run_id: str, layer_id: int) -> None:
        """The host refused a GERMINATE on this layer: its reservation is free again."""
        run = self._runs.get(run_id)
        if run is not None:
            kept = [g for g in run.germinating if g.layer_id != layer_id]
            run.live_seeds -= len(run.germinating) - len(kept)
            run.germinating = kept

    def forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    @property
    def tracked_runs(self) -> int:
        """Runs with per-run state here (every one is forgotten when esperd drops its run)."""
        return len(self._runs)

    def status(self) -> RailsStatus:
        return RailsStatus(
            enabled=self.config.enabled,
            blocked_total=sum(self.blocked_by_rail.values()),
            blocked_by_rail=dict(self.blocked_by_rail),
            masked_by_rail=dict(self.masked_by_rail),
            seed_pool=self.config.max_seeds_total if self.config.enabled else 0,  # no rails, no pool
            seed_pool_live=self.pool_live(),
        )

    # ------------------------------------------------------------ internals

    def _run(self, obs: Observation, now: float) -> _RunRails:
        """The run's state, with command times older than the window and settled germinations dropped."""
        run = self._runs.get(obs.run_id)
        if run is None:
            run = self._runs[obs.run_id] = _RunRails()
        horizon = now - self.config.command_window_s
        while run.sent_at and run.sent_at[0] <= horizon:
            run.sent_at.popleft()
        if run.germinating:
            # Settled once a later epoch's report has the seed in it: esperd marks a slot live
            # on the applied ack, but the seed's parameters show only in the next state packet.
            live = _live_layers(obs)
            run.germinating = [
                g
                for g in run.germinating
                if not (g.layer_id in live and obs.epoch > g.epoch)
                and obs.epoch < g.epoch + _IN_FLIGHT_EPOCHS
            ]
        self._active_seeds(obs, run)
        return run

    def _too_late(self, obs: Observation) -> int | None:
        """The epochs left when too few remain for a new seed's lifecycle; None when there is time
        (or the host does not say how long it trains)."""
        left = epochs_left(obs) if self.config.min_epochs_left else None
        return left if left is not None and left < self.config.min_epochs_left else None

    def _active_seeds(self, obs: Observation, run: _RunRails) -> int:
        """The run's live seeds, germinations in flight included (kept for the pool's count)."""
        if not run.germinating:  # the common case: a count, no set of layer ids
            run.live_seeds = int(np.count_nonzero(LIVE_STAGE[obs.stages]))
            return run.live_seeds
        live = _live_layers(obs)
        for g in run.germinating:
            # A seed pruned before the report that settles its germination is no longer live: the
            # germination keeps its parameter reservation until then, not a seed.
            g.seen_live = g.seen_live or g.layer_id in live
        run.live_seeds = len(live) + sum(not g.seen_live for g in run.germinating)
        return run.live_seeds

    def _committed(self, obs: Observation, run: _RunRails) -> float:
        """Added parameters as a fraction of the host's: reported, plus germinations in flight."""
        reported = float(obs.global_features[_GROWTH]) if obs.global_features.size > _GROWTH else 0.0
        return reported + sum(g.fraction for g in run.germinating)

    def _seed_fraction(self, obs: Observation) -> np.ndarray:
        """Per node: a new seed's estimated parameters as a fraction of the host's."""
        params = layer_params(obs)
        host = params.sum()
        if host <= 0:
            return np.zeros(obs.num_nodes)
        fractions: np.ndarray = params * self.config.seed_size_estimate / host
        return fractions

    def _within_budget(self, obs: Observation, run: _RunRails) -> np.ndarray:
        """Per node: whether a new seed there stays within the parameter budget."""
        ok: np.ndarray = self._committed(obs, run) + self._seed_fraction(obs) <= self.config.param_budget
        return ok
