"""Synthetic host runs as [E, L] numpy arrays (E runs, L = max layers, padded), stepped together.

The model, per run (hidden from the policy unless the wire carries it):

  accuracy  = host part + sum of seeds' realized contributions - transient drops.
  host part   approaches `ceiling - sum(deficits)` at the run's learning `rate` per epoch.
  deficits    a few conv/attention/mlp layers degrade from an onset epoch on (health falls,
              dead units and correlation rise) and each caps accuracy by up to `d`.
  a seed      on a deficit layer recovers `alpha * quality * maturity` of it; quality depends on
              the blueprint and the layer (hidden); anywhere else it interferes (small loss).
              Its realized contribution follows its target at the host's rate (co-adaptation).
  blending    alpha ramps over the tempo's epochs; each blending epoch (and each alpha jump from
              ADVANCE / SET_ALPHA_TARGET) may destabilize: a loss spike, a temporary accuracy
              drop, and lasting damage to the seed's quality. Faster tempos, bigger and less
              mature seeds, and linear blends are riskier.
  lifecycle   GERMINATED -> TRAINING after an epoch; TRAINING -> BLENDING after the dwell when the
              GERMINATE set one (else on ADVANCE); BLENDING -> PROBATIONARY when the tempo's
              epochs (and any SET_ALPHA_TARGET move) are done; PROBATIONARY too long -> pruned;
              PRUNED -> DORMANT after a cooldown.
  distractors any layer may dip for a few epochs and recover by itself; a seed cannot help it.

The optional levers (issue 16; each neutral at the host's default, see SimConfig):
  dwell       time for readiness: a seed matures in TRAINING, so a longer dwell starts the blend
              later with a more mature seed (less unstable, and it repairs more at once).
  isolation   a co-adapting (shared) seed repairs more where it can (the host adapts around it),
              interferes more where it cannot, and destabilizes the blend more; isolated is the
              other way round. Effects are relative to the layer family's default (isolated for
              CNN layers, shared for transformer ones).
  LR mult. m  matures as if m epochs passed per epoch; blend instability x m ** lr_risk_exponent.
  steepness k a sigmoid blend follows the host's S-curve of steepness k; its instability scales
              with the curve's peak slope (blend shock in the middle).
  alpha       SET_ALPHA_TARGET moves alpha to its target over alpha_speed's epochs (the rest of
              the tempo without one; at once for instant), along alpha_curve; an epoch's step
              beyond the tempo's even pace is a jump (instant: the whole move), and jumps
              destabilize. The blend ends at the target (probation keeps that alpha).

Randomness is drawn in fixed shapes every epoch, so a run's host and noise do not depend on
what the policy does: two policies on the same seed face the same hosts.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from esperd.analyzer.observation import (
    ALPHA_CURVE_INDEX,
    BLEND_INDEX,
    BLUEPRINT_INDEX,
    BLUEPRINTS,
    STAGE_INDEX,
    STAGES,
    TEMPO_INDEX,
)
from esperd.sim import catalog as C
from esperd.sim.config import SimConfig
from esperd_contracts import (
    AlphaCurve,
    AlphaSpeed,
    BlendAlgorithm,
    Blueprint,
    BlueprintFamily,
    IsolationMode,
    Op,
    SeedStage,
    Tempo,
    is_legal,
    next_stage,
)

DORMANT, GERMINATED, TRAINING, BLENDING, PROBATIONARY, FOSSILIZED, PRUNED = (
    STAGE_INDEX[s]
    for s in (
        SeedStage.DORMANT,
        SeedStage.GERMINATED,
        SeedStage.TRAINING,
        SeedStage.BLENDING,
        SeedStage.PROBATIONARY,
        SeedStage.FOSSILIZED,
        SeedStage.PRUNED,
    )
)
NO_SEED = -1
#: A SET_ALPHA_TARGET without a curve follows the blend's own shape (gated's smoothstep: cosine).
_BLEND_CURVE = {
    BLEND_INDEX[BlendAlgorithm.LINEAR]: AlphaCurve.LINEAR,
    BLEND_INDEX[BlendAlgorithm.SIGMOID]: AlphaCurve.SIGMOID,
    BLEND_INDEX[BlendAlgorithm.GATED]: AlphaCurve.COSINE,
}
MATURING_RATE = 0.35  # a seed's maturity closes this fraction of its gap per TRAINING/BLENDING epoch
SPIKE_QUALITY_LOSS = 0.25  # lasting damage of one instability to the seed's quality
PRUNE_SHOCK = 0.3  # removing a contributing seed also costs this fraction of its contribution, briefly
DIP_ACCURACY_COST = 0.01  # accuracy per unit of transient health dip
TRANSIENT_DECAY = 0.5  # transient accuracy drops, loss spikes and a seed's harm halve every epoch
FALLBACK_RATE = 0.25  # above its (degraded) ceiling the host loses accuracy 4x slower than it gains


class Command(msgspec.Struct, frozen=True):
    """One command for one run, in wire terms (what an AdaptationCommand carries)."""

    layer_id: int
    op: Op
    blueprint: Blueprint | None = None
    blend: BlendAlgorithm | None = None
    tempo: Tempo | None = None
    alpha_target: float | None = None
    dwell_epochs: int | None = None
    isolation: IsolationMode | None = None
    lr_multiplier: float | None = None
    steepness: float | None = None
    alpha_speed: AlphaSpeed | None = None
    alpha_curve: AlphaCurve | None = None
    max_seed_params: int = 0  # the most parameters a GERMINATE's seed may add; 0 = no limit

    @classmethod
    def of(cls, wire: object) -> Command:
        """The command an AdaptationCommand (or a policy Decision) stands for."""
        return cls(**{name: getattr(wire, name) for name in cls.__struct_fields__ if hasattr(wire, name)})


def _lever_reject_reason(command: Command) -> str:
    """Why a GERMINATE's optional levers are out of the wire's ranges ("" when they are not)."""
    for name in ("lr_multiplier", "steepness"):
        value = getattr(command, name)
        if value is not None and not 0 < value <= 100:
            return f"{name} must be in (0, 100]"
    if command.dwell_epochs is not None and command.dwell_epochs < 0:
        return "dwell_epochs must be >= 0"
    return ""


class HostBatch:
    """E simulated hosts. `reset(envs)` draws new hosts, `apply` one command, `advance` one epoch."""

    def __init__(self, num_envs: int, config: SimConfig, rng: np.random.Generator) -> None:
        if num_envs < 1:
            raise ValueError("num_envs must be >= 1")
        self.config = config
        self.rng = rng
        E, L, B = num_envs, config.max_layers, len(BLUEPRINTS)
        self.num_envs = E
        self.max_layers = L
        self._tables(config)
        f = lambda: np.zeros((E, L))  # noqa: E731 - a local allocator keeps the list below short
        i = lambda fill=0: np.full((E, L), fill, dtype=np.int64)  # noqa: E731
        # Static per episode.
        self.n_layers = np.zeros(E, dtype=np.int64)
        self.valid = np.zeros((E, L), dtype=bool)
        self.kind, self.layer_params = i(), i()
        self.base_health, self.deficit, self.onset = f(), f(), f()
        self.quality_noise = np.zeros((E, L, B))
        self.reliance = f()  # per layer: how much its host will rely on a blended seed there (hidden)
        self.ceiling, self.rate = np.zeros(E), np.zeros(E)
        self.host_params = np.zeros(E, dtype=np.int64)
        self.edges: list[list[tuple[int, int]]] = [[] for _ in range(E)]
        self.arch: list[str] = [""] * E
        # Seeds (one slot per layer).
        self.stage, self.eis = i(DORMANT), i()  # eis: epochs in the current stage
        self.blueprint, self.blend, self.tempo = i(NO_SEED), i(), i()
        self.alpha, self.prev_alpha, self.hold = f(), f(), i(-1).astype(float)
        self.quality, self.maturity, self.interference = f(), f(), f()
        self.seed_params = i()
        # Levers of each seed (issue 16): dwell (-1: none, wait for ADVANCE), LR multiplier,
        # steepness, the isolation mode's factors (1 at the family's default), and the alpha move
        # a SET_ALPHA_TARGET started (from, to, epochs, epochs done, curve index).
        self.dwell = i(-1)
        self.lr, self.steep = f() + 1.0, f() + 1.0
        self.iso_repair, self.iso_interference, self.iso_risk = f() + 1.0, f() + 1.0, f() + 1.0
        self.move_from, self.move_to = f(), f()
        self.move_len, self.move_age, self.move_curve = i(), i(), i()
        self.contrib, self.harm, self.jump = f(), f(), f()  # harm: the seed's transient drops, decaying
        # Run-level.
        self.epoch = np.zeros(E, dtype=np.int64)
        self.host_acc, self.accuracy = np.zeros(E), np.zeros(E)
        self.temp_drop, self.loss_spike = np.zeros(E), np.zeros(E)
        self.severity, self.dip = f(), f()
        self.dip_age, self.dip_len, self.dip_amp = i(), i(), f()
        self.spiked = np.zeros((E, L), dtype=bool)  # which seeds destabilized in the latest epoch
        # Per-episode counters.
        self.episode = np.full(E, -1, dtype=np.int64)
        self.counts: dict[str, np.ndarray] = {
            name: np.zeros(E, dtype=np.int64)
            for name in ("germinated", "fossilized", "pruned", "timeouts", "spikes", "rejected", "commands")
        }
        # Noise for the telemetry of the latest epoch (drawn in `advance`, read by packets).
        self.noise = np.zeros((E, L, 6))
        self.run_noise = np.zeros((E, 4))

    def _tables(self, cfg: SimConfig) -> None:
        """The catalog's tables with the config's calibrated overrides applied."""
        self.affinity = C.AFFINITY.copy()
        for kind, row in cfg.affinity.items():
            for blueprint, quality in row.items():
                self.affinity[C.KIND_INDEX[kind], BLUEPRINT_INDEX[Blueprint(blueprint)]] = quality
        self.param_ratio = C.PARAM_RATIO.copy()
        for blueprint, ratio in cfg.param_ratio.items():
            self.param_ratio[BLUEPRINT_INDEX[Blueprint(blueprint)]] = ratio
        self.kind_params = dict(C.KIND_PARAMS)
        for kind, bounds in cfg.kind_params.items():
            self.kind_params[C.KIND_INDEX[kind]] = bounds
        self.deficit_prob = np.array([cfg.deficit_prob.get(kind, 0.0) for kind in C.KINDS])
        self.spike_rate = C.SPIKE_RATE * cfg.spike_scale

    # ------------------------------------------------------------ episodes

    def reset(self, envs: Sequence[int] | np.ndarray) -> None:
        """Draw a fresh host for each of `envs` (a new episode, epoch 0)."""
        for e in np.asarray(envs, dtype=np.int64).tolist():
            self._reset_one(e)

    def _reset_one(self, e: int) -> None:
        cfg, rng = self.config, self.rng
        arch = str(cfg.architectures[int(rng.integers(len(cfg.architectures)))])
        n = int(rng.integers(cfg.min_layers, cfg.max_layers + 1))
        kinds, edges = C.build_architecture(arch, n, rng)
        kind = np.asarray(kinds, dtype=np.int64)
        lo = np.array([self.kind_params[k][0] for k in kinds])
        hi = np.array([self.kind_params[k][1] for k in kinds])
        params = (lo + rng.random(n) * (hi - lo)).astype(np.int64)
        if cfg.deficit_prob:  # calibrated: each layer on its own, by its kind's chance
            chosen = np.flatnonzero(rng.random(n) < self.deficit_prob[kind])
            k = chosen.size
        else:
            helpable = np.flatnonzero(C.HELPABLE[kind])
            k = min(int(rng.integers(cfg.min_deficits, cfg.max_deficits + 1)), helpable.size)
            chosen = rng.choice(helpable, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)
        deficit = np.zeros(n)
        deficit[chosen] = rng.uniform(cfg.deficit_low, cfg.deficit_high, k)
        onset = rng.uniform(0.0, cfg.onset_fraction * cfg.epochs, n)

        self.arch[e], self.edges[e], self.n_layers[e] = arch, edges, n
        self.episode[e] += 1
        self.valid[e] = False
        self.valid[e, :n] = True
        for array in (self.kind, self.layer_params, self.base_health, self.deficit, self.onset):
            array[e] = 0
        self.kind[e, :n], self.layer_params[e, :n] = kind, params
        self.base_health[e, :n] = rng.uniform(0.78, 0.95, n)
        self.deficit[e, :n], self.onset[e, :n] = deficit, onset
        self.quality_noise[e] = 0.0
        self.quality_noise[e, :n] = rng.normal(0.0, cfg.quality_noise, (n, len(BLUEPRINTS)))
        self.reliance[e] = 0.0
        if cfg.dependence > 0:  # drawn only when used, so uncalibrated episodes keep their draws
            self.reliance[e, :n] = rng.uniform(0.0, 2.0 * cfg.dependence, n)
        self.host_params[e] = int(params.sum())
        self.ceiling[e] = rng.uniform(cfg.ceiling_low, cfg.ceiling_high)
        self.rate[e] = rng.uniform(cfg.rate_low, cfg.rate_high)
        self.host_acc[e] = self.accuracy[e] = rng.uniform(cfg.initial_low, cfg.initial_high)
        self.epoch[e] = 0
        self.temp_drop[e] = self.loss_spike[e] = 0.0
        self._clear_seeds(e, slice(None))
        self.stage[e], self.eis[e] = DORMANT, 0
        for array in (self.severity, self.dip, self.dip_amp, self.noise):
            array[e] = 0.0
        self.dip_age[e] = self.dip_len[e] = 0
        self.spiked[e] = False
        self.run_noise[e] = 0.0
        for counter in self.counts.values():
            counter[e] = 0

    def _clear_seeds(self, e: int | np.ndarray, layers: int | slice | np.ndarray) -> None:
        """Remove the seeds at (e, layers): no params, no contribution, no blueprint."""
        self.blueprint[e, layers] = NO_SEED
        self.blend[e, layers] = self.tempo[e, layers] = 0
        self.dwell[e, layers] = -1
        for array in (self.lr, self.steep, self.iso_repair, self.iso_interference, self.iso_risk):
            array[e, layers] = 1.0
        self.move_len[e, layers] = self.move_age[e, layers] = self.move_curve[e, layers] = 0
        self.move_from[e, layers] = self.move_to[e, layers] = 0.0
        for array in (
            self.alpha,
            self.prev_alpha,
            self.quality,
            self.maturity,
            self.interference,
            self.contrib,
            self.harm,
            self.jump,
        ):
            array[e, layers] = 0.0
        self.hold[e, layers] = -1.0
        self.seed_params[e, layers] = 0

    def done(self) -> np.ndarray:
        """Which runs have reached the end of their episode."""
        return self.epoch >= self.config.epochs

    # ------------------------------------------------------------ commands

    def apply(self, e: int, command: Command) -> tuple[bool, str]:
        """Apply one command to run `e` through the lifecycle table; (applied, reason if rejected)."""
        self.counts["commands"][e] += 1
        reason = self._reject_reason(e, command)
        if reason:
            self.counts["rejected"][e] += 1
            return False, reason
        layer, op = command.layer_id, command.op
        stage = STAGES[int(self.stage[e, layer])]
        self.stage[e, layer] = STAGE_INDEX[next_stage(stage, op)]
        if op is not Op.SET_ALPHA_TARGET:
            self.eis[e, layer] = 0
        if op is Op.GERMINATE:
            self._germinate(e, layer, command)
        elif op is Op.ADVANCE and stage is SeedStage.BLENDING:
            self._jump_alpha(e, layer, 1.0)
        elif op is Op.SET_ALPHA_TARGET:
            self._set_alpha_target(e, layer, command)
        elif op is Op.FOSSILIZE:
            self.counts["fossilized"][e] += 1
        elif op is Op.PRUNE:
            self._prune(np.array([e]), np.array([layer]))
        return True, ""

    def _reject_reason(self, e: int, command: Command) -> str:
        layer, op = command.layer_id, command.op
        if not 0 <= layer < self.n_layers[e]:
            return f"unknown layer {layer}"
        stage = STAGES[int(self.stage[e, layer])]
        if not is_legal(op, stage):
            return f"{op.value} is illegal from {stage.value}"
        if op is Op.GERMINATE:
            if command.blueprint is None:
                return "germinate needs a blueprint"
            fits_cnn = bool(C.KIND_FAMILY_CNN[self.kind[e, layer]])
            if (command.blueprint.family is BlueprintFamily.CNN) != fits_cnn:
                kind = C.KINDS[int(self.kind[e, layer])]
                return f"blueprint {command.blueprint.value} does not fit a {kind} layer"
        if (
            op is Op.SET_ALPHA_TARGET
            and command.alpha_target is not None
            and not 0 <= command.alpha_target <= 1
        ):
            return "alpha_target must be in [0, 1]"
        if op is not Op.GERMINATE:
            return ""
        return _lever_reject_reason(command) or self._size_reject_reason(e, layer, command)

    def _size_reject_reason(self, e: int, layer: int, command: Command) -> str:
        """Why the seed is over the command's max_seed_params ("" when it fits or there is no limit),
        as the reference host words it (examples/host/slot.py, SeedSlot._check_size)."""
        limit = command.max_seed_params
        if limit <= 0 or command.blueprint is None:
            return ""
        size = self._seed_size(e, layer, command)
        if size <= limit:
            return ""
        return (
            f"a {command.blueprint.value} seed here has {size} parameters, over the command's "
            f"max_seed_params {limit} (layer {layer})"
        )

    def _seed_size(self, e: int, layer: int, command: Command) -> int:
        """Parameters the GERMINATE's seed adds on the layer (a gated blend's gate included)."""
        assert command.blueprint is not None
        ratio = self.param_ratio[BLUEPRINT_INDEX[command.blueprint]]
        reference = max(int(self.layer_params[e, layer]), self.config.min_seed_reference)
        gate = C.GATE_PARAM_RATIO if command.blend is BlendAlgorithm.GATED else 0.0
        return int(round((ratio + gate) * reference))

    def _germinate(self, e: int, layer: int, command: Command) -> None:
        assert command.blueprint is not None
        bp = BLUEPRINT_INDEX[command.blueprint]
        blend = BLEND_INDEX[command.blend or BlendAlgorithm.SIGMOID]
        self._clear_seeds(e, layer)
        self.blueprint[e, layer] = bp
        self.blend[e, layer] = blend
        self.tempo[e, layer] = TEMPO_INDEX[command.tempo or Tempo.STANDARD]
        kind = int(self.kind[e, layer])
        self.quality[e, layer] = np.clip(
            self.affinity[kind, bp] + self.quality_noise[e, layer, bp], -0.3, 1.0
        )
        ratio = self.param_ratio[bp]
        cfg = self.config
        self.interference[e, layer] = cfg.interference + cfg.interference_per_ratio * ratio
        self.seed_params[e, layer] = self._seed_size(e, layer, command)
        self.counts["germinated"][e] += 1
        self._germinate_levers(e, layer, command)

    def _germinate_levers(self, e: int, layer: int, command: Command) -> None:
        """The optional levers a GERMINATE set, as the seed's own dynamics parameters."""
        cfg = self.config
        self.dwell[e, layer] = -1 if command.dwell_epochs is None else int(command.dwell_epochs)
        self.lr[e, layer] = 1.0 if command.lr_multiplier is None else float(command.lr_multiplier)
        self.steep[e, layer] = 1.0 if command.steepness is None else float(command.steepness)
        cnn = bool(C.KIND_FAMILY_CNN[self.kind[e, layer]])
        default = IsolationMode.ISOLATED if cnn else IsolationMode.SHARED
        mode = command.isolation or default
        if mode is not default:  # the factors are relative to the family's default
            sign = 1.0 if mode is IsolationMode.SHARED else -1.0
            for array, gain in (
                (self.iso_repair, cfg.coadapt_repair),
                (self.iso_interference, cfg.coadapt_interference),
                (self.iso_risk, cfg.coadapt_risk),
            ):
                array[e, layer] = (1.0 + gain) ** sign

    def _set_alpha_target(self, e: int, layer: int, command: Command) -> None:
        """Start moving alpha to the target: over alpha_speed's epochs (the rest of the tempo without
        one), along alpha_curve; an instant move (0 epochs) is a jump now. The blend then ends at
        the target."""
        target = 1.0 if command.alpha_target is None else float(command.alpha_target)
        if command.alpha_speed is None:
            epochs = max(int(C.TEMPO_EPOCHS[self.tempo[e, layer]]) - int(self.eis[e, layer]), 0)
        else:
            epochs = command.alpha_speed.epochs
        self.hold[e, layer] = target
        if epochs == 0:
            self._jump_alpha(e, layer, target)
            self.move_len[e, layer] = self.move_age[e, layer] = 0
            return
        self.move_from[e, layer], self.move_to[e, layer] = self.alpha[e, layer], target
        self.move_len[e, layer], self.move_age[e, layer] = epochs, 0
        curve = command.alpha_curve or _BLEND_CURVE[int(self.blend[e, layer])]
        self.move_curve[e, layer] = ALPHA_CURVE_INDEX[curve]

    def _jump_alpha(self, e: int, layer: int, target: float) -> None:
        self.jump[e, layer] += abs(target - self.alpha[e, layer])
        self.alpha[e, layer] = target

    def _prune(self, e: np.ndarray, layers: np.ndarray) -> None:
        """Remove seeds now: their contribution goes at once, plus a brief shock."""
        shock = PRUNE_SHOCK * np.maximum(self.contrib[e, layers], 0.0)
        np.add.at(self.temp_drop, e, shock)
        self._clear_seeds(e, layers)
        self.stage[e, layers] = PRUNED
        self.eis[e, layers] = 0
        np.add.at(self.counts["pruned"], e, 1)

    # ------------------------------------------------------------ dynamics

    def advance(self) -> None:
        """One epoch for every run (runs past their last epoch keep going until reset)."""
        cfg, rng = self.config, self.rng
        E, L = self.num_envs, self.max_layers
        # Fixed-shape draws, whatever the policy did (see module docstring).
        u_spike, spike_size, loss_jump = (
            rng.random((E, L)),
            rng.uniform(cfg.spike_drop_low, cfg.spike_drop_high, (E, L)),
            rng.uniform(0.3, 0.8, (E, L)),
        )
        u_dip, dip_depth, dip_len = (
            rng.random((E, L)),
            rng.uniform(0.3, 0.5, (E, L)),
            rng.integers(3, 7, (E, L)),
        )
        self.noise = rng.standard_normal((E, L, self.noise.shape[2]))
        self.run_noise = rng.standard_normal((E, self.run_noise.shape[1]))

        valid = self.valid
        self.temp_drop *= TRANSIENT_DECAY
        self.loss_spike *= TRANSIENT_DECAY
        self.harm *= TRANSIENT_DECAY
        self.prev_alpha[:] = self.alpha
        self._automatic_transitions()
        self.eis += valid
        stage = self.stage
        growing = (stage == TRAINING) | (stage == BLENDING)
        # An LR multiplier m matures the seed as m epochs would: the gap shrinks by (1 - rate) ** m.
        rate = 1.0 - (1.0 - MATURING_RATE) ** self.lr
        self.maturity = np.where(growing, self.maturity + (1.0 - self.maturity) * rate, self.maturity)
        blending = self._blend_step()
        self._instability(blending, u_spike, spike_size, loss_jump)
        self._probation_timeouts()
        self._transient_dips(u_dip, dip_depth, dip_len)

        epoch = self.epoch + 1
        ramp = np.clip((epoch[:, None] - self.onset) / cfg.degrade_epochs, 0.0, 1.0)
        self.severity = self.deficit * ramp
        target = self.seed_target()
        rate = self.rate[:, None]
        self.contrib += rate * (target - self.contrib)
        host_ceiling = self.ceiling - self.severity.sum(1)
        # Lost capacity shows as stagnation more than collapse: the host falls back slowly.
        gap = host_ceiling - self.host_acc
        self.host_acc += self.rate * np.where(gap < 0, FALLBACK_RATE * gap, gap)
        self.accuracy = np.clip(
            self.host_acc + self.contrib.sum(1) - self.temp_drop - DIP_ACCURACY_COST * self.dip.sum(1),
            0.01,
            0.99,
        )
        self.epoch = epoch

    def seed_target(self) -> np.ndarray:
        """Each seed's target accuracy contribution now: repair on deficit layers, else interference
        (both scaled by the seed's isolation mode)."""
        has_seed = self.blueprint != NO_SEED
        repair = self.quality * self.maturity * self.severity * self.iso_repair
        gain = np.where(self.deficit > 0, repair, -self.interference * self.iso_interference)
        return np.where(has_seed, self.alpha * gain, 0.0)

    def _automatic_transitions(self) -> None:
        stage, eis = self.stage, self.eis
        started = (stage == GERMINATED) & (eis >= 1)
        dwelt = (stage == TRAINING) & (self.dwell >= 0) & (eis >= self.dwell)
        recovered = (stage == PRUNED) & (eis >= self.config.prune_cooldown)
        stage[started] = TRAINING
        stage[dwelt] = BLENDING
        stage[recovered] = DORMANT
        eis[started | dwelt | recovered] = 0

    def _blend_step(self) -> np.ndarray:
        """Move alphas along their schedules (or a SET_ALPHA_TARGET move); finished blends go on
        probation at their target (1 unless one was set). Returns who blended."""
        blending = self.stage == BLENDING
        if not blending.any():
            return blending
        epochs = C.TEMPO_EPOCHS[self.tempo]
        scheduled = C.blend_alpha(self.blend, self.eis / epochs, self.steep)
        moving = blending & (self.move_age < self.move_len)
        self.move_age += moving
        done_part = C.alpha_curve(self.move_curve, self.move_age / np.maximum(self.move_len, 1), self.steep)
        moved = self.move_from + (self.move_to - self.move_from) * done_part
        # A move's step beyond the tempo's even pace shocks the host like a jump of that size.
        self.jump += np.where(moving, np.maximum(np.abs(moved - self.alpha) - 1.0 / epochs, 0.0), 0.0)
        held = np.where(moving, moved, np.where(self.hold >= 0, self.hold, scheduled))
        self.alpha = np.where(blending, held, self.alpha)
        finished = blending & (self.eis >= epochs) & (self.move_age >= self.move_len)
        if finished.any():
            final = np.where(self.hold >= 0, self.hold, 1.0)
            self.jump += np.where(finished, np.maximum(final - self.alpha, 0.0), 0.0)
            self.alpha = np.where(finished, final, self.alpha)
            self.stage[finished] = PROBATIONARY
            self.eis[finished] = 0
            self.hold[finished] = -1.0
        return blending

    def _instability(
        self, blending: np.ndarray, u: np.ndarray, size: np.ndarray, loss_jump: np.ndarray
    ) -> None:
        has_seed = self.blueprint != NO_SEED
        ratio = self.param_ratio[np.maximum(self.blueprint, 0)]
        cfg = self.config
        # The seed's levers: its LR multiplier, its isolation mode, a sigmoid's steepness.
        levers = self.lr**cfg.lr_risk_exponent * self.iso_risk
        shock = (C.peak_slope(self.steep) / C.peak_slope(1.0)) ** cfg.steepness_shock
        levers = levers * np.where(self.blend == C.SIGMOID_BLEND, shock, 1.0)
        risk = C.size_factor(ratio) * (1.5 - self.maturity) * levers
        p_blend = np.where(blending, self.spike_rate[self.tempo] * C.BLEND_RISK[self.blend] * risk, 0.0)
        p_jump = np.clip(C.JUMP_SPIKE_RATE * self.jump * risk, 0.0, 1.0)
        p = 1.0 - (1.0 - p_blend) * (1.0 - p_jump)
        spiked = has_seed & self.valid & (u < p)
        self.jump[:] = 0.0
        self.spiked = spiked
        if not spiked.any():
            return
        drop = np.where(spiked, size * np.clip(C.size_factor(ratio), 0.5, 2.0), 0.0)
        self.quality = np.where(spiked, self.quality - SPIKE_QUALITY_LOSS, self.quality)
        self.harm += drop
        self.temp_drop += drop.sum(1)
        self.loss_spike += np.where(spiked, loss_jump, 0.0).sum(1)
        self.counts["spikes"] += spiked.sum(1)

    def _probation_timeouts(self) -> None:
        timeout = self.config.probation_timeout
        if not timeout:
            return
        expired = (self.stage == PROBATIONARY) & (self.eis > timeout)
        if expired.any():
            e, layers = np.nonzero(expired)
            self._prune(e, layers)
            np.add.at(self.counts["timeouts"], e, 1)

    def _transient_dips(self, u: np.ndarray, depth: np.ndarray, length: np.ndarray) -> None:
        active = self.dip_len > 0
        self.dip_age = np.where(active, self.dip_age + 1, 0)
        ended = active & (self.dip_age >= self.dip_len)
        self.dip_len[ended] = 0
        start = self.valid & (self.dip_len == 0) & (u < self.config.transient_rate)
        self.dip_len = np.where(start, length, self.dip_len)
        self.dip_amp = np.where(start, depth, self.dip_amp)
        self.dip_age[start] = 0
        active = self.dip_len > 0
        # Sicken over two epochs, recover over the last two.
        shape = np.minimum(1.0, np.minimum((self.dip_age + 1) / 2.0, (self.dip_len - self.dip_age) / 2.0))
        self.dip = np.where(active, self.dip_amp * shape, 0.0)

    # ------------------------------------------------------------ reporting

    def added_params(self) -> np.ndarray:
        return self.seed_params.sum(1)

    def total_params(self) -> np.ndarray:
        return self.host_params + self.added_params()
