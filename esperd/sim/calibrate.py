"""Fit the simulator to real host traces, and measure how far it still is from them.

    esperd sim calibrate --traces DIR --out sim.toml
    esperd train --sim --sim-config sim.toml ...

Traces are what `esperd record` writes (one JSONL file per run). Each run is summarized the
same way whether it is real or simulated (`summarize`): its validation-accuracy curve, and per
germinated seed its layer kind, blueprint, size, fate, its *gain* (the counterfactual on its
last epoch of probation: validation accuracy with the seed minus without it) and its *blend
drop* (the largest one-epoch fall of validation accuracy while it blended).

`fit` estimates the simulator's parameters from those summaries by matching moments:

  host curve     per run that germinated nothing, acc(e) = c - (c - a0) (1 - r)^e by least
                 squares: the ranges of r, a0, c (the ceiling less the deficits seeds can
                 repair), and the epoch-to-epoch jitter late in training (accuracy noise);
  reliance       runs paired with a static twin (same task and seed, no seeds) show what the
                 fossilized seeds really added to final accuracy; the counterfactuals' excess
                 over that is the host's reliance on any blended seed (`dependence`), and is
                 taken off every gain below;
  deficits       a seed "helped" when its gain is more than two standard errors above 0 (the
                 analyzer's rule); per layer kind, the share that helped is the chance a layer
                 of that kind has a deficit; the deficits' size is the range of what fossilized
                 seeds added over their static twins, when they added anything (else of the
                 helped gains);
  affinity       per (kind, blueprint), E[max(gain, 0)] = P(deficit) * quality * maturity *
                 E[deficit], solved for quality and shrunk toward the kind's mean;
  interference   what a seed costs where no deficit is: set so that a fossilized seed adds, on
                 average, what real ones added to final accuracy over their static twins (else
                 the median loss of the seeds that did not help);
  sizes          seed / layer parameter ratios per blueprint, layer sizes per kind, run length,
                 layer counts and architecture families, validation size;
  blends         instability rate and drop size by a small grid search that matches the
                 simulated blend drops to the real ones;
  levers         from paired lever runs (`record_traces.py --controllers lever-sweep`: the
                 manual plan with one optional lever changed, against its default-lever twin),
                 the simulator's lever parameters (coadapt_*, lr_risk_exponent, steepness_shock)
                 by a grid search per parameter matching the simulated paired effects on blend
                 drop, counterfactual and final accuracy to the real ones (`fit_levers`); a
                 parameter moves only where the data rule its prior out.

`discrepancy` compares two sets of summaries (e.g. held-out real runs and simulated runs with
the same controllers): Wasserstein-1 distances of the gain and blend-drop distributions,
per-kind gains, the mean learning curve of runs without seeds, and each controller's final
accuracy over its static twin's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from esperd.analyzer.observation import layer_kind
from esperd.analyzer.run import counterfactual_se
from esperd.ops.traces import read_trace, run_of, trace_files
from esperd.sim import catalog as C
from esperd.sim.config import SimConfig
from esperd_contracts import (
    AckStatus,
    AdaptationCommand,
    Blueprint,
    CommandAck,
    Op,
    SeedStage,
    SystemStatePacket,
    TopologyPacket,
)

#: Epochs a seed grows (TRAINING + BLENDING) before it is judged, for the maturity factor.
_GROWTH_EPOCHS = 7
#: Quality the sim gives the best blueprint on a kind (sets the scale of the deficits).
_BEST_QUALITY = 0.85
_SHRINK = 2.0  # pseudo-seeds pulling a (kind, blueprint) quality toward its kind's mean
_MESSAGE_TYPES: dict[str, type] = {
    "topology": TopologyPacket,
    "state": SystemStatePacket,
    "command": AdaptationCommand,
    "ack": CommandAck,
}


class CalibrationError(ValueError):
    """Traces that cannot calibrate anything (none, or none with the needed content)."""


# ---------------------------------------------------------------- summaries


class SeedEpisode(msgspec.Struct, kw_only=True):
    """One germinated seed, from its GERMINATE to its end (or the run's)."""

    layer_id: int
    kind: str
    blueprint: str
    germinated_epoch: int
    layer_params: int = 0
    seed_params: int = 0
    gain: float | None = None  # counterfactual on its last epoch of probation (None: never got there)
    blend_drop: float | None = None  # largest one-epoch validation-accuracy fall while blending
    fate: str = "live"  # fossilized | pruned | live
    # The optional levers its GERMINATE set (wire names and values), e.g. {"lr_multiplier": 2.0}.
    levers: dict[str, Any] = {}


#: The GERMINATE levers whose effect the simulator models with parameters no trace fitted yet.
_LEVER_FIELDS = ("dwell_epochs", "isolation", "lr_multiplier", "steepness")
_LEVER_PARAMETERS = "coadapt_repair, coadapt_interference, coadapt_risk, lr_risk_exponent, steepness_shock"


class RunSummary(msgspec.Struct, kw_only=True):
    """What calibration needs of one run."""

    run: str
    controller: str
    accuracy: list[float]  # validation accuracy per state packet, in epoch order
    pair: str = ""  # runs of different controllers on the same host and seed share this
    total_epochs: int = 0
    val_samples: int = 0
    kinds: list[str] = []  # per layer, in layer-id order
    layer_params: list[int] = []
    seeds: list[SeedEpisode] = []


def summarize(
    run: str, messages: Iterable[tuple[str, Any]], controller: str = "", pair: str = ""
) -> RunSummary | None:
    """Summarize one run's messages (channel, contract Struct) in arrival order; None with fewer than
    two state packets (nothing to learn from)."""
    topology: TopologyPacket | None = None
    states: list[tuple[int, SystemStatePacket]] = []
    commands: dict[str, AdaptationCommand] = {}
    applied: list[tuple[int, AdaptationCommand]] = []
    policies: list[str] = []
    for index, (channel, message) in enumerate(messages):
        if channel == "topology":
            topology = message
        elif channel == "state":
            states.append((index, message))
        elif channel == "command":
            commands[message.command_id] = message
            if message.policy:
                policies.append(message.policy)
        elif channel == "ack" and message.status is AckStatus.APPLIED:
            command = commands.get(message.command_id)
            if command is not None:
                applied.append((index, command))
    if len(states) < 2:
        return None
    by_epoch: dict[int, tuple[int, SystemStatePacket]] = {}
    for index, state in states:
        by_epoch[state.epoch] = (index, state)  # a repeated epoch: the latest packet wins
    ordered = [by_epoch[e] for e in sorted(by_epoch)]
    layers = sorted(topology.nodes, key=lambda n: n.layer_id) if topology is not None else []
    kind_of = {n.layer_id: layer_kind(n.layer_type) for n in layers}
    params_of = {n.layer_id: n.params for n in layers}
    last = ordered[-1][1]
    return RunSummary(
        run=run,
        pair=pair or run,
        controller=controller or (policies[0] if policies else "static"),
        accuracy=[s.val_accuracy for _, s in ordered],
        total_epochs=last.total_epochs or len(ordered),
        val_samples=last.val_samples,
        kinds=[kind_of[n.layer_id] for n in layers],
        layer_params=[params_of[n.layer_id] for n in layers],
        seeds=[
            _seed_episode(command, index, ordered, kind_of, params_of)
            for index, command in applied
            if command.op is Op.GERMINATE and command.blueprint is not None
        ],
    )


def _seed_episode(
    command: AdaptationCommand,
    applied_at: int,
    ordered: Sequence[tuple[int, SystemStatePacket]],
    kind_of: Mapping[int, str],
    params_of: Mapping[int, int],
) -> SeedEpisode:
    assert command.blueprint is not None
    layer = command.layer_id
    after = [(i, s) for i, s in ordered if i > applied_at]
    before = [s for i, s in ordered if i < applied_at]
    episode = SeedEpisode(
        layer_id=layer,
        kind=kind_of.get(layer, "other"),
        blueprint=command.blueprint.value,
        germinated_epoch=before[-1].epoch if before else 0,
        layer_params=params_of.get(layer, 0),
        levers={
            name: getattr(value, "value", value)
            for name in _LEVER_FIELDS
            if (value := getattr(command, name)) is not None
        },
    )
    accuracy = {s.epoch: s.val_accuracy for _, s in ordered}
    drops = []
    started = False
    for _, state in after:
        slot = next((x for x in state.seeds if x.layer_id == layer and x.seed_id == 0), None)
        if slot is None:
            continue
        stage = slot.stage
        if stage is SeedStage.DORMANT and started:
            episode.fate = "pruned"  # back to dormant: its PRUNED epochs were not seen
            break
        started |= stage is not SeedStage.DORMANT
        episode.seed_params = max(episode.seed_params, slot.params)
        if stage is SeedStage.BLENDING and state.epoch - 1 in accuracy:
            drops.append(accuracy[state.epoch - 1] - state.val_accuracy)
        if stage is SeedStage.PROBATIONARY:
            episode.gain = slot.counterfactual
        if stage in (SeedStage.FOSSILIZED, SeedStage.PRUNED):
            episode.fate = stage.value
            break
    if drops:
        episode.blend_drop = max(0.0, max(drops))
    return episode


#: `benchmarks/record_traces.py` names runs <task>-w<width>-<controller>-s<seed>.
_RECORDED_RUN = re.compile(r"-(static|heuristic|random|manual|lever-[A-Za-z0-9_]+)-s\d+$")


def read_summaries(directory: str | Path) -> list[RunSummary]:
    """Summaries of every trace file under `directory` (runs with fewer than two state packets are
    skipped). The controller is the one the run id names (the trace recorder's convention), else
    the policy named by the run's commands ("static" when it got none)."""
    summaries = []
    for path in trace_files(directory):
        messages = []
        for record in read_trace(path):
            kind = _MESSAGE_TYPES.get(record.channel)
            if kind is None or record.msg is None:
                continue
            try:
                messages.append((record.channel, msgspec.convert(record.msg, kind)))
            except msgspec.ValidationError:
                continue
        run = run_of(path)
        named = _RECORDED_RUN.search(run)
        controller = named.group(1) if named else ""
        pair = run.replace(f"-{controller}-", "-") if named else run
        summary = summarize(run, messages, controller=controller, pair=pair)
        if summary is not None:
            summaries.append(summary)
    return summaries


# ---------------------------------------------------------------- simulated summaries


def simulate(
    config: SimConfig,
    controller: str,
    episodes: int,
    seed: int = 0,
    envs: int = 8,
    *,
    random_levers: bool = True,
) -> list[RunSummary]:
    """Run `episodes` simulated runs under a controller (static | heuristic | random | manual | a
    PolicyBundle-like object) and summarize them exactly like real traces. `random_levers`: the
    random controller draws the optional levers too (off: it leaves them to the host, as the
    random controller of traces recorded before issue 16 did)."""
    from esperd.sim.env import SimEnv

    policy = _controller(controller, seed, random_levers)
    logs: dict[str, list[tuple[str, Any]]] = {}
    env = SimEnv(
        envs,
        config,
        seed=seed,
        observer=lambda run, channel, m: logs.setdefault(run, []).append((channel, m)),
    )
    observations = env.reset()
    finished: list[str] = []
    while len(finished) < episodes:
        _, _, _, infos = env.step(policy.act(observations))
        observations = env.observations
        for info in infos:
            if info.episode is not None:
                finished.append(info.run_id)
                if hasattr(policy, "forget"):
                    policy.forget([info.run_id])
    env.close()
    name = controller if isinstance(controller, str) else getattr(controller, "name", "policy")
    summaries = [summarize(run, logs[run], controller=name) for run in finished[:episodes]]
    return [s for s in summaries if s is not None]


def _controller(controller: Any, seed: int, random_levers: bool = True) -> Any:
    if not isinstance(controller, str):
        return controller
    from esperd.sim import policies as P

    if controller == "static":
        return P.WaitPolicy()
    if controller == "random":
        return P.RandomPolicy(seed, levers=random_levers)
    if controller == "manual":
        return P.FixedPlanPolicy(seed=seed)
    if controller == "heuristic":
        from esperd.policy import create_policy

        return create_policy("heuristic")
    raise CalibrationError(f"unknown controller {controller!r} (static | heuristic | random | manual)")


def simulate_like(
    config: SimConfig, real: Sequence[RunSummary], seed: int = 0, min_episodes: int = 16
) -> list[RunSummary]:
    """Simulated runs with the same controllers as `real` on the same simulated hosts, at least
    `min_episodes` (or twice the most runs of any real controller) each."""
    counts: dict[str, int] = {}
    for summary in real:
        counts[summary.controller] = counts.get(summary.controller, 0) + 1
    episodes = max(min_episodes, 2 * max(counts.values(), default=0))
    out: list[RunSummary] = []
    # The random controller drew the optional levers only if the real one did.
    random_levers = any(s.levers for r in real if r.controller == "random" for s in r.seeds)
    # One seed for every controller: the same simulated hosts, so runs pair up as real ones do.
    for controller in sorted(counts):
        if controller in ("static", "heuristic", "random", "manual"):
            out += simulate(config, controller, episodes, seed=seed, random_levers=random_levers)
    return out


# ---------------------------------------------------------------- statistics


def curve_fit(accuracy: Sequence[float]) -> tuple[float, float, float, float]:
    """(a0, c, r, residual sd) of acc(e) = c - (c - a0)(1 - r)^e, by least squares over a grid of r.

    The plateau c is capped at the best accuracy seen + 0.05: a run stopped while still climbing
    (or slowed by its learning-rate decay) says little about how high it would have gone.
    """
    y = np.asarray(accuracy, dtype=np.float64)
    e = np.arange(y.size, dtype=np.float64)
    cap = min(1.0, float(y.max()) + 0.05)
    best = (float(y[0]), float(y[-1]), 0.0, float("inf"))
    for r in np.linspace(0.02, 0.95, 94):
        decay = (1.0 - r) ** e
        basis = np.stack([np.ones_like(e), -decay], axis=1)
        coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
        c, b = float(coef[0]), float(coef[1])
        if c > cap:  # refit b with the plateau held at the cap
            c = cap
            b = float(((c - y) @ decay) / (decay @ decay))
        residual = y - (c - b * decay)
        sse = float(residual @ residual)
        if sse < best[3]:
            best = (c - b, c, float(r), sse)
    a0, c, r, sse = best
    sd = math.sqrt(sse / max(y.size - 3, 1))
    return a0, c, r, sd


def paired_effects(runs: Sequence[RunSummary], controller: str) -> list[tuple[RunSummary, float]]:
    """(run, final accuracy minus its static twin's) for each run of `controller` with a static twin."""
    static = {r.pair: r for r in runs if r.controller == "static"}
    return [
        (r, r.accuracy[-1] - static[r.pair].accuracy[-1])
        for r in runs
        if r.controller == controller and r.pair in static
    ]


def dependence(runs: Sequence[RunSummary]) -> float | None:
    """How much more a seed's counterfactual says than it adds: over runs with a static twin whose
    fossilized seeds were all judged, (sum of their counterfactuals - the runs' accuracy over their
    twins) / number of such seeds. None without such runs."""
    total_cf, total_effect, seeds = 0.0, 0.0, 0
    for controller in {r.controller for r in runs} - {"static"}:
        for run, effect in paired_effects(runs, controller):
            kept = [s for s in run.seeds if s.fate == "fossilized"]
            if not kept or any(s.gain is None for s in kept):
                continue
            total_cf += sum(s.gain for s in kept if s.gain is not None)
            total_effect += effect
            seeds += len(kept)
    return None if seeds == 0 else max(0.0, (total_cf - total_effect) / seeds)


def helped(episode: SeedEpisode, val_samples: int, default_se: float = 0.005, reliance: float = 0.0) -> bool:
    """Whether a seed's gain, less the host's `reliance` on any seed, is more than two standard errors
    above 0 (the heuristic's rule)."""
    if episode.gain is None:
        return False
    gain = episode.gain - reliance
    return gain > 2.0 * counterfactual_se(gain, 0.0, 1, val_samples, default_se)


def _gains(summaries: Iterable[RunSummary]) -> list[tuple[SeedEpisode, int]]:
    return [(s, run.val_samples) for run in summaries for s in run.seeds if s.gain is not None]


def wasserstein(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Wasserstein-1 distance between two samples (None if either is empty)."""
    if len(a) == 0 or len(b) == 0:
        return None
    grid = np.linspace(0.0, 1.0, 201)
    return float(np.mean(np.abs(np.quantile(a, grid) - np.quantile(b, grid))))


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    if not values:
        return float("nan"), float("nan"), 0
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


class Discrepancy(msgspec.Struct, kw_only=True):
    """How far one set of runs (e.g. simulated) is from another (real)."""

    gain_w1: float | None
    blend_drop_w1: float | None
    curve_mae: float | None  # mean |difference| of the static runs' mean curves at 11 points in time
    final_accuracy_w1: float | None
    helped_share: tuple[float, float]  # (real, other)
    gain_by_kind: dict[str, tuple[tuple[float, float, int], tuple[float, float, int]]]
    gain_by_blueprint: dict[str, tuple[tuple[float, float, int], tuple[float, float, int]]]
    blend_drop: tuple[tuple[float, float, int], tuple[float, float, int]]
    # Per controller: its runs' final accuracy minus their static twins' (real, other).
    effect_vs_static: dict[str, tuple[tuple[float, float, int], tuple[float, float, int]]] = {}


def discrepancy(real: Sequence[RunSummary], other: Sequence[RunSummary]) -> Discrepancy:
    """Compare `other` (simulated) with `real` on the statistics calibration matches."""
    real_gains, other_gains = _gains(real), _gains(other)
    drops = lambda runs: [s.blend_drop for r in runs for s in r.seeds if s.blend_drop is not None]  # noqa: E731
    share = lambda gains: float(np.mean([helped(s, n) for s, n in gains])) if gains else float("nan")  # noqa: E731

    def grouped(key: str) -> dict[str, tuple[tuple[float, float, int], tuple[float, float, int]]]:
        groups = sorted({getattr(s, key) for s, _ in real_gains})
        return {
            g: (
                _mean_sd([s.gain for s, _ in real_gains if getattr(s, key) == g]),  # type: ignore[misc]
                _mean_sd([s.gain for s, _ in other_gains if getattr(s, key) == g]),  # type: ignore[misc]
            )
            for g in groups
        }

    return Discrepancy(
        gain_w1=wasserstein([s.gain for s, _ in real_gains], [s.gain for s, _ in other_gains]),  # type: ignore[misc]
        blend_drop_w1=wasserstein(drops(real), drops(other)),
        curve_mae=_curve_mae(real, other),
        final_accuracy_w1=wasserstein([r.accuracy[-1] for r in real], [r.accuracy[-1] for r in other]),
        helped_share=(share(real_gains), share(other_gains)),
        gain_by_kind=grouped("kind"),
        gain_by_blueprint=grouped("blueprint"),
        blend_drop=(_mean_sd(drops(real)), _mean_sd(drops(other))),
        effect_vs_static={
            c: (
                _mean_sd([e for _, e in paired_effects(real, c)]),
                _mean_sd([e for _, e in paired_effects(other, c)]),
            )
            for c in sorted({r.controller for r in real} - {"static"})
        },
    )


def _mean_curve(runs: Sequence[RunSummary]) -> np.ndarray | None:
    static = [r.accuracy for r in runs if r.controller == "static" and len(r.accuracy) >= 2]
    if not static:
        return None
    grid = np.linspace(0.0, 1.0, 11)
    return np.mean([np.interp(grid, np.linspace(0.0, 1.0, len(a)), a) for a in static], axis=0)


def _curve_mae(real: Sequence[RunSummary], other: Sequence[RunSummary]) -> float | None:
    a, b = _mean_curve(real), _mean_curve(other)
    return None if a is None or b is None else float(np.mean(np.abs(a - b)))


# ---------------------------------------------------------------- fitting


class FitReport(msgspec.Struct, kw_only=True):
    """What the fit saw and estimated (written as comments into the TOML)."""

    runs: int
    static_runs: int
    seeds: int
    seeds_with_gain: int
    notes: list[str] = []
    levers: list[LeverFit] = []  # the lever parameters' fits (none without paired lever runs)


def fit(
    real: Sequence[RunSummary],
    base: SimConfig | None = None,
    *,
    seed: int = 0,
    search: bool = True,
    levers: Sequence[RunSummary] | None = None,
) -> tuple[SimConfig, FitReport]:
    """A SimConfig whose dynamics match `real` (see the module docstring). The lever parameters
    come from the paired lever runs in `levers` (default: those in `real`; `fit_levers`), which
    the rest of the fit leaves out. Raises CalibrationError."""
    from esperd.sim.policies import LEVER_PREFIX

    lever_runs = list(real if levers is None else levers)
    real = [r for r in real if not r.controller.startswith(LEVER_PREFIX)]
    if not real:
        raise CalibrationError("no runs with a state packet in the traces")
    base = base or SimConfig()
    paired = lever_effects(lever_runs)
    notes: list[str] = [] if paired else [_lever_note(real)]
    values: dict[str, Any] = _fit_shape(real, base)
    plateau = _fit_curve(real, values, notes)
    gains = _gains(real)
    values["param_ratio"] = _param_ratios(real)
    if gains:
        lift = _fit_seeds(real, gains, base, values)
    else:
        notes.append("no seed reached probation: deficits, affinity and interference keep the base values")
        lift = 0.5 * (base.min_deficits + base.max_deficits) * 0.5 * (base.deficit_low + base.deficit_high)
    # The sim's host converges to its ceiling less its deficits: the real plateau plus what seeds repair.
    values["ceiling_low"] = float(np.clip(plateau[0] + lift, 0.0, 1.0))
    values["ceiling_high"] = float(np.clip(max(plateau[1] + lift, values["ceiling_low"]), 0.0, 1.0))
    noise = _counterfactual_noise(real)
    if noise is not None:
        values["counterfactual_noise"] = noise
    config = msgspec.structs.replace(base, **values)
    if search:
        config = _fit_blends(config, real, seed)
    lever_fits: list[LeverFit] = []
    if paired and search:
        config, lever_fits, lever_notes = fit_levers(config, lever_runs, seed=seed)
        notes += lever_notes
    elif paired:
        notes.append(f"Levers not fitted (no search): {_LEVER_PARAMETERS} keep their priors")
    report = FitReport(
        runs=len(real),
        static_runs=sum(r.controller == "static" for r in real),
        seeds=sum(len(r.seeds) for r in real),
        seeds_with_gain=len(gains),
        notes=notes,
        levers=lever_fits,
    )
    return config, report


def _fit_shape(real: Sequence[RunSummary], base: SimConfig) -> dict[str, Any]:
    """Run length, layer counts, architecture families, layer sizes, validation size."""
    values: dict[str, Any] = {}
    lengths = [r.total_epochs for r in real if r.total_epochs >= 2]
    # The sim's first packet comes before training and its last is `epochs`: epochs + 1 packets.
    values["epochs"] = max(int(np.median(lengths)) - 1, 2) if lengths else base.epochs
    counts = [len(r.kinds) for r in real if r.kinds]
    if counts:
        values["min_layers"] = max(4, min(counts))
        values["max_layers"] = max(values["min_layers"], max(counts))
    archs = sorted({_architecture(r.kinds) for r in real if r.kinds})
    if archs:
        values["architectures"] = tuple(archs)
    sizes: dict[str, list[int]] = {}
    for r in real:
        for kind, params in zip(r.kinds, r.layer_params, strict=False):
            if kind in C.KIND_INDEX:
                sizes.setdefault(kind, []).append(params)
    values["kind_params"] = {k: (int(min(v)), int(max(v))) for k, v in sizes.items()}
    nonzero = [p for v in sizes.values() for p in v if p > 0]
    if nonzero:
        values["min_seed_reference"] = int(np.percentile(nonzero, 10))
    val_sizes = [r.val_samples for r in real if r.val_samples > 0]
    values["val_samples"] = int(np.median(val_sizes)) if val_sizes else 0
    values["onset_fraction"] = 0.0  # a model too small is too small from the start
    values["degrade_epochs"] = 1
    return values


def _fit_curve(real: Sequence[RunSummary], values: dict[str, Any], notes: list[str]) -> tuple[float, float]:
    """Host learning curve from runs that germinated nothing (else the epochs before each run's first seed);
    sets the initial accuracy, rate and noise, and returns the plateau's (low, high) range."""
    curves = [r.accuracy for r in real if not r.seeds and len(r.accuracy) >= 4]
    if not curves:
        early = [
            r.accuracy[: min(s.germinated_epoch for s in r.seeds) + 1] if r.seeds else r.accuracy
            for r in real
        ]
        curves = [c for c in early if len(c) >= 4]
        notes.append(
            "no run without seeds: the host curve comes from the epochs before each run's first seed"
        )
    if not curves:
        raise CalibrationError("no run has 4 or more epochs without a seed to fit the host's learning curve")
    fits = np.array([curve_fit(c) for c in curves])
    values["initial_low"], values["initial_high"] = _range(np.array([c[0] for c in curves]), 0.0, 1.0)
    values["rate_low"], values["rate_high"] = _range(fits[:, 2], 0.01, 1.0)
    # Epoch-to-epoch jitter late in training (differences of the second half, / sqrt 2), which the
    # curve's shape does not inflate the way the fit's residuals can.
    jitter = [float(np.std(np.diff(c[len(c) // 2 :]))) / math.sqrt(2.0) for c in curves if len(c) >= 6]
    values["accuracy_noise"] = float(
        np.clip(np.median(jitter) if jitter else np.median(fits[:, 3]), 0.0, 0.2)
    )
    return _range(fits[:, 1], 0.0, 1.0)


def _param_ratios(real: Sequence[RunSummary]) -> dict[str, float]:
    """Median seed / layer parameter ratio per blueprint."""
    ratios: dict[str, list[float]] = {}
    for r in real:
        for s in r.seeds:
            if s.layer_params > 0 and s.seed_params > 0:
                ratios.setdefault(s.blueprint, []).append(s.seed_params / s.layer_params)
    return {bp: float(np.clip(np.median(v), 0.0, 100.0)) for bp, v in ratios.items()}


def _fit_seeds(
    real: Sequence[RunSummary],
    gains: Sequence[tuple[SeedEpisode, int]],
    base: SimConfig,
    values: dict[str, Any],
) -> float:
    """Deficits per kind, their size, blueprint qualities and interference; returns the accuracy a
    typical real host's deficits hold back (what the sim's ceiling adds to the real plateau)."""
    maturity = 1.0 - (1.0 - 0.35) ** _GROWTH_EPOCHS
    # The counterfactual = what the seed adds + how much the host has come to rely on it; the
    # reliance comes from runs paired with a static twin, and the rest is the seed's contribution.
    reliance = dependence(real) or 0.0
    values["dependence"] = float(np.clip(reliance / maturity, 0.0, 1.0))
    gains = [(msgspec.structs.replace(s, gain=(s.gain or 0.0) - reliance), n) for s, n in gains]
    good = [s.gain for s, n in gains if helped(s, n)]
    bad = [s.gain for s, n in gains if not helped(s, n)]
    by_kind: dict[str, list[tuple[SeedEpisode, int]]] = {}
    for s, n in gains:
        by_kind.setdefault(s.kind, []).append((s, n))
    overall = len(good) / len(gains)
    prob = {  # shrunk toward the overall share by one pseudo-seed
        kind: (sum(helped(s, n) for s, n in group) + overall) / (len(group) + 1.0)
        for kind, group in by_kind.items()
        if kind in C.KIND_INDEX
    }
    # The deficits' size: what fossilized seeds added over static twins when they added anything
    # (the ground truth of a contribution), else the helped seeds' gains.
    added = [e for e in _effects_per_kept_seed(real) if e > 0]
    sizes = added if len(added) >= 3 else good
    if sizes:
        low, high = np.percentile(sizes, [10, 90])
        scale = _BEST_QUALITY * maturity
        values["deficit_low"] = float(np.clip(low / scale, 0.0, 1.0))
        values["deficit_high"] = float(np.clip(max(high, low) / scale, 0.0, 1.0))
    mean_deficit = 0.5 * (
        values.get("deficit_low", base.deficit_low) + values.get("deficit_high", base.deficit_high)
    )
    affinity = _affinity(by_kind, prob, maturity * mean_deficit)
    values["affinity"] = affinity
    # A kind where no seed ever helped gets no deficits (none a seed could repair).
    values["deficit_prob"] = {
        k: float(np.clip(p, 0.0, 1.0)) if max(affinity.get(k, {}).values(), default=0.0) > 0 else 0.0
        for k, p in prob.items()
    }
    values["interference"] = _interference(real, values, prob, maturity * mean_deficit, bad, base)
    values["interference_per_ratio"] = 0.0
    typical = [
        sum(values["deficit_prob"].get(k, 0.0) for k in r.kinds) * mean_deficit for r in real if r.kinds
    ]
    return float(np.mean(typical)) if typical else 0.0


def _effects_per_kept_seed(real: Sequence[RunSummary]) -> list[float]:
    """Per fossilized seed of a run paired with a static twin: the run's final accuracy over the
    twin's, shared evenly among its fossilized seeds."""
    effects: list[float] = []
    for controller in {r.controller for r in real} - {"static"}:
        for run, effect in paired_effects(real, controller):
            kept = [s for s in run.seeds if s.fate == "fossilized"]
            if kept:
                effects += [effect / len(kept)] * len(kept)
    return effects


def _interference(
    real: Sequence[RunSummary],
    values: Mapping[str, Any],
    prob: Mapping[str, float],
    unit: float,
    bad: Sequence[float],
    base: SimConfig,
) -> float:
    """What a seed costs where there is no deficit. With runs paired to a static twin: chosen so that
    a fossilized seed adds, on average, what the real ones added to final accuracy (deficit repairs
    minus interference elsewhere); without: the median gain of the seeds that did not help."""
    effects = _effects_per_kept_seed(real)
    kept = [s for r in real for s in r.seeds if s.fate == "fossilized" and s.kind in prob]
    if not effects or not kept:
        return float(np.clip(-np.median(bad), -0.2, 0.2)) if bad else base.interference
    affinity = values["affinity"]
    p = np.mean([prob[s.kind] for s in kept])
    repair = np.mean([prob[s.kind] * affinity.get(s.kind, {}).get(s.blueprint, 0.0) * unit for s in kept])
    if p >= 1.0:
        return base.interference
    return float(np.clip((repair - float(np.mean(effects))) / (1.0 - p), -0.2, 0.2))


def _range(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The 10th-90th percentile range, clipped to [lo, hi]."""
    a, b = np.percentile(values, [10, 90])
    return float(np.clip(a, lo, hi)), float(np.clip(max(a, b), lo, hi))


def _architecture(kinds: Sequence[str]) -> str:
    present = set(kinds)
    if "conv" in present and present & {"attention", "mlp"}:
        return "hybrid"
    if "conv" in present:
        return "cnn"
    if present & {"attention", "embedding"}:
        return "transformer"
    return "mlp"


def _affinity(
    by_kind: Mapping[str, Sequence[tuple[SeedEpisode, int]]], prob: Mapping[str, float], unit: float
) -> dict[str, dict[str, float]]:
    """Quality per (kind, blueprint): E[gain+] / (P(deficit) * maturity * E[deficit]), shrunk to the kind."""
    table: dict[str, dict[str, float]] = {}
    for kind, group in by_kind.items():
        if kind not in C.KIND_INDEX or prob.get(kind, 0.0) <= 0.0 or unit <= 0.0:
            continue
        scale = prob[kind] * unit
        kind_mean = float(np.mean([max(s.gain or 0.0, 0.0) for s, _ in group])) / scale
        row = {}
        for bp in sorted({s.blueprint for s, _ in group}):
            own = [max(s.gain or 0.0, 0.0) / scale for s, _ in group if s.blueprint == bp]
            quality = (sum(own) + _SHRINK * kind_mean) / (len(own) + _SHRINK)
            row[bp] = float(np.clip(quality, 0.0, 1.0))
        # Blueprints of the kind's family never tried keep the kind's mean (not the catalog's).
        cnn = C.KIND_FAMILY_CNN[C.KIND_INDEX[kind]]
        for bp in Blueprint:
            if (bp.family.value == "cnn") == bool(cnn) and bp.value not in row:
                row[bp.value] = float(np.clip(kind_mean, 0.0, 1.0))
        table[kind] = row
    return table


def _counterfactual_noise(real: Sequence[RunSummary]) -> float | None:
    """Typical measurement noise of a counterfactual: the validation-size error at the seeds' gains."""
    gains = _gains(real)
    if not gains:
        return None
    errors = [counterfactual_se(s.gain or 0.0, 0.0, 1, n, 0.005) for s, n in gains]
    return float(np.clip(np.median(errors), 0.0, 1.0))


def _fit_blends(config: SimConfig, real: Sequence[RunSummary], seed: int) -> SimConfig:
    """Instability rate and size that make simulated blend drops match the real ones (grid search)."""
    real_drops = [s.blend_drop for r in real for s in r.seeds if s.blend_drop is not None]
    if len(real_drops) < 5:
        return config
    best, best_score = config, float("inf")
    for scale in (0.0, 0.5, 1.0, 2.0, 4.0):
        for size in (0.5, 1.0, 2.0):
            candidate = msgspec.structs.replace(
                config,
                spike_scale=scale,
                spike_drop_low=min(0.02 * size, 1.0),
                spike_drop_high=min(0.04 * size, 1.0),
            )
            sim = simulate(candidate, "manual", 24, seed=seed) + simulate(
                candidate, "random", 16, seed=seed + 1
            )
            drops = [s.blend_drop for r in sim for s in r.seeds if s.blend_drop is not None]
            score = wasserstein(real_drops, drops)
            if score is not None and score < best_score:
                best, best_score = candidate, score
    return best


# ---------------------------------------------------------------- lever parameters


class Effect(msgspec.Struct, frozen=True):
    """A paired difference's mean, its standard error and how many pairs it rests on."""

    mean: float
    se: float
    n: int


class LeverEffect(msgspec.Struct, frozen=True, kw_only=True):
    """What one lever variant did against its default-lever twins (same host and seed, same plan):
    the variant's runs minus their twins'."""

    variant: str
    lever: str  # observation.LEVERS name: isolation | lr_multiplier | steepness | dwell
    drop: Effect  # blend drop per run (the mean over its blended seeds)
    gain: Effect  # counterfactual on probation per seed judged in both twins (same layer)
    final: Effect  # final validation accuracy per run


#: The statistics a lever's effect is measured by (LeverEffect fields).
LEVER_STATS: tuple[str, ...] = ("drop", "gain", "final")
#: The simulator's lever parameters, each with the lever whose variants inform it and its grid
#: (SimConfig's prior is in every grid). Dwell, alpha speed and alpha curve have none: their
#: effects follow from constants (maturing rate, jump instability) and the blend parameters.
LEVER_PARAMETERS: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("coadapt_repair", "isolation", (-0.75, -0.5, 0.0, 0.15, 0.5, 1.0, 2.0, 4.0, 9.0)),
    ("coadapt_interference", "isolation", (-0.75, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 9.0)),
    ("coadapt_risk", "isolation", (-0.75, -0.5, 0.0, 0.3, 1.0, 2.0, 4.0, 9.0)),
    ("lr_risk_exponent", "lr_multiplier", (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)),
    ("steepness_shock", "steepness", (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)),
)
_CHI2_95 = 3.84  # one parameter's 95 % bound on the objective (a sum of squared z-scores)


class LeverFit(msgspec.Struct, frozen=True, kw_only=True):
    """One lever parameter: what the paired runs said about it."""

    name: str
    prior: float
    value: float  # the best grid value where the data rule the prior out, else the prior
    # identified: both ends of the grid ruled out; bounded: one end; not identified: neither.
    verdict: str
    prior_ruled_out: bool  # the prior lies outside the accepted range
    accepted: tuple[float, float]  # the range of grid values within the 95 % bound of the best
    best: float  # the grid value nearest the real effects
    variants: tuple[str, ...]  # the lever variants (real) it was fitted to
    objective: dict[float, float] = {}  # grid value -> sum of squared z (sim vs real, every stat)


def _effect(diffs: Sequence[float]) -> Effect:
    if not diffs:
        return Effect(float("nan"), float("nan"), 0)
    arr = np.asarray(diffs, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return Effect(float(arr.mean()), se, int(arr.size))


def _set_levers(seed: SeedEpisode) -> dict[str, Any]:
    """The seed's levers as the host applied them: isolation filled in with its family's default."""
    family = Blueprint(seed.blueprint).family.value
    default = "isolated" if family == "cnn" else "shared"
    return {**seed.levers, "isolation": seed.levers.get("isolation", default)}


def _run_drop(run: RunSummary) -> float | None:
    drops = [s.blend_drop for s in run.seeds if s.blend_drop is not None]
    return float(np.mean(drops)) if drops else None


def lever_effects(runs: Sequence[RunSummary]) -> dict[str, LeverEffect]:
    """Per lever variant (controller lever-<variant>), its paired effects against the default-lever
    twins (controller manual, the same `pair`). A pair counts only where the lever changed what the
    host did for at least one seed (e.g. isolation "shared" on a layer whose family shares anyway
    does not)."""
    from esperd.sim.policies import LEVER_PREFIX, LEVER_VARIANTS

    twins = {r.pair: r for r in runs if r.controller == "manual"}
    diffs: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        variant = run.controller.removeprefix(LEVER_PREFIX)
        twin = twins.get(run.pair)
        if not run.controller.startswith(LEVER_PREFIX) or variant not in LEVER_VARIANTS or twin is None:
            continue
        twin_seeds = {s.layer_id: s for s in twin.seeds}
        pairs = [(s, twin_seeds[s.layer_id]) for s in run.seeds if s.layer_id in twin_seeds]
        changed = [(s, t) for s, t in pairs if _set_levers(s) != _set_levers(t)]
        if not changed:
            continue
        out = diffs.setdefault(variant, {k: [] for k in LEVER_STATS})
        out["final"].append(run.accuracy[-1] - twin.accuracy[-1])
        drop, twin_drop = _run_drop(run), _run_drop(twin)
        if drop is not None and twin_drop is not None:
            out["drop"].append(drop - twin_drop)
        out["gain"] += [s.gain - t.gain for s, t in changed if s.gain is not None and t.gain is not None]
    return {
        v: LeverEffect(variant=v, lever=LEVER_VARIANTS[v][0], **{k: _effect(d[k]) for k in LEVER_STATS})
        for v, d in sorted(diffs.items())
    }


def lever_sim_config(config: SimConfig, lever_runs: Sequence[RunSummary]) -> SimConfig:
    """`config` with the shape of the lever runs' hosts (run length, layers, architecture, sizes), so
    simulated lever runs play hosts like the real ones."""
    twins = [r for r in lever_runs if r.controller == "manual"]
    return msgspec.structs.replace(config, **_fit_shape(twins, config)) if twins else config


def simulate_lever_runs(
    config: SimConfig, variants: Iterable[str], episodes: int = 64, seed: int = 0
) -> list[RunSummary]:
    """Simulated lever runs: each variant ("manual": the default-lever twin) of the manual plan on
    the same simulated hosts and plans, so they pair up by run as real ones do."""
    from esperd.sim.policies import lever_plan_policy

    runs: list[RunSummary] = []
    for variant in variants:
        runs += simulate(config, lever_plan_policy(variant, seed=seed), episodes, seed=seed, envs=32)
    return runs


def lever_objective(real: Mapping[str, LeverEffect], sim: Mapping[str, LeverEffect]) -> tuple[float, int]:
    """Sum of squared z-scores of sim minus real over every variant and statistic both measured
    (each z over both standard errors), and how many terms it has."""
    total, terms = 0.0, 0
    for variant, effect in real.items():
        other = sim.get(variant)
        if other is None:
            continue
        for stat in LEVER_STATS:
            a, b = getattr(effect, stat), getattr(other, stat)
            if a.n < 2 or b.n < 2:
                continue
            var = a.se**2 + b.se**2
            if var > 0:
                total += (b.mean - a.mean) ** 2 / var
                terms += 1
    return total, terms


def fit_levers(
    config: SimConfig,
    lever_runs: Sequence[RunSummary],
    *,
    seed: int = 0,
    episodes: int = 64,
    parameters: Sequence[tuple[str, str, tuple[float, ...]]] = LEVER_PARAMETERS,
) -> tuple[SimConfig, list[LeverFit], list[str]]:
    """Fit the lever parameters to paired lever runs (`lever_effects`): for each parameter in turn,
    a grid search over its values (the others held at their current ones) for the simulated paired
    effects nearest the real ones (`lever_objective`). The grid values within the 95 % bound of the
    best are what the data allow: identified when that excludes both ends of the grid, bounded when
    one, not identified when neither. A parameter takes the best value only where the data rule its
    prior out, else it keeps the prior. Returns the config (the lever parameters changed only), the
    fits and notes."""
    real = lever_effects(lever_runs)
    notes: list[str] = []
    fits: list[LeverFit] = []
    sim_config = lever_sim_config(config, lever_runs)
    # The default-lever twins do not depend on the lever parameters (neutral at the defaults).
    twins = simulate_lever_runs(sim_config, ["manual"], episodes=episodes, seed=seed)
    values = {name: float(getattr(config, name)) for name, _, _ in parameters}
    for name, lever, grid in parameters:
        variants = tuple(v for v, e in real.items() if e.lever == lever)
        prior = values[name]
        if not variants:
            notes.append(f"{name}: no paired runs vary {lever}; kept its prior {prior:g}")
            continue
        scores: dict[float, float] = {}
        terms = 0
        for value in grid:
            candidate = msgspec.structs.replace(sim_config, **{**values, name: value})
            runs = simulate_lever_runs(candidate, variants, episodes=episodes, seed=seed)
            score, count = lever_objective({v: real[v] for v in variants}, lever_effects(twins + runs))
            if count:
                scores[value], terms = score, max(terms, count)
        if not scores:
            notes.append(f"{name}: {lever} runs measured nothing twice; kept its prior {prior:g}")
            continue
        best = min(scores, key=lambda v: scores[v])
        # The bound widens by the best fit's excess over its terms (Birge ratio): where even the
        # best value misses the real effects by more than their noise, the model, not the data,
        # limits what can be told apart.
        bound = _CHI2_95 * max(1.0, scores[best] / terms)
        accepted = [v for v in scores if scores[v] <= scores[best] + bound]
        lo, hi = min(accepted), max(accepted)
        ends = (min(scores) in accepted) + (max(scores) in accepted)
        verdict = ("identified", "bounded", "not identified")[ends]
        ruled_out = not lo <= prior <= hi
        # A prior the data do not contradict stays: a best grid value inside the noise is no finding.
        values[name] = best if ruled_out else prior
        fits.append(
            LeverFit(
                name=name,
                prior=prior,
                value=values[name],
                verdict=verdict,
                prior_ruled_out=ruled_out,
                accepted=(lo, hi),
                best=best,
                variants=variants,
                objective=scores,
            )
        )
        outcome = (
            f"prior {prior:g} ruled out, fitted {best:g}"
            if ruled_out
            else f"prior {prior:g} kept (within the range; best grid value {best:g})"
        )
        notes.append(
            f"{name} from {', '.join(variants)}: {verdict}, 95 % range {lo:g} to {hi:g} of the grid "
            f"{min(scores):g}-{max(scores):g}; {outcome}"
        )
    return msgspec.structs.replace(config, **values), fits, notes


def lever_discrepancy(
    config: SimConfig, lever_runs: Sequence[RunSummary], *, seed: int = 0, episodes: int = 64
) -> tuple[dict[str, LeverEffect], dict[str, LeverEffect], float, int]:
    """(real effects, simulated effects, sum of squared z, terms) of the lever runs' variants."""
    real = lever_effects(lever_runs)
    sim_config = lever_sim_config(config, lever_runs)
    sim = lever_effects(simulate_lever_runs(sim_config, ["manual", *real], episodes=episodes, seed=seed))
    return (real, sim, *lever_objective(real, sim))


def _lever_note(real: Sequence[RunSummary]) -> str:
    """Without paired lever runs, the lever parameters stay at their priors (SimConfig), neutral at
    the default levers, so the fit above holds for runs that used the defaults."""
    seeds = [s for r in real for s in r.seeds]
    varied = {
        name: sorted({str(s.levers[name]) for s in seeds if name in s.levers}) for name in _LEVER_FIELDS
    }
    seen = ", ".join(f"{name} {'/'.join(v)}" for name, v in varied.items() if v) or "none"
    return (
        f"Levers not fitted ({_LEVER_PARAMETERS} keep their priors): no paired lever runs (lever-<variant> "
        f"with a manual twin, benchmarks/record_traces.py --controllers lever-sweep); of {len(seeds)} seeds, "
        f"the optional levers set were: {seen}."
    )


# ---------------------------------------------------------------- TOML


def to_toml(config: SimConfig, header: Sequence[str] = ()) -> str:
    """The config as TOML that `load_sim_config` reads (everything but the reward, which training sets)."""
    data = msgspec.to_builtins(config)
    data.pop("reward", None)
    lines = [f"# {line}" for line in header]
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml(value)}")
    for key, value in tables.items():
        nested = {k: v for k, v in value.items() if isinstance(v, dict)}
        lines += ["", f"[{key}]"]
        lines += [f"{k} = {_toml(v)}" for k, v in value.items() if not isinstance(v, dict)]
        for sub, row in nested.items():
            lines += ["", f"[{key}.{sub}]"]
            lines += [f"{k} = {_toml(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def load_sim_config(path: str | Path) -> SimConfig:
    """Read a simulator config (what `esperd sim calibrate` writes); raises ValueError with the reason."""
    try:
        return msgspec.toml.decode(Path(path).read_bytes(), type=SimConfig)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"sim config {path}: {exc}") from None


# ---------------------------------------------------------------- command line


def calibrate_main(
    traces: str | Path,
    out: str | Path,
    *,
    holdout: str | Path | None = None,
    seed: int = 0,
    search: bool = True,
    lever_traces: str | Path | None = None,
    lever_holdout: str | Path | None = None,
) -> int:
    """Fit `traces` (the lever parameters on `lever_traces`' paired lever runs, when given), write
    `out`; with `holdout` / `lever_holdout`, print the discrepancy before and after."""
    for directory in (traces, lever_traces):
        if directory is not None and not Path(directory).is_dir():
            raise CalibrationError(f"{directory} is not a directory")
    real = read_summaries(traces)
    levers = read_summaries(lever_traces) if lever_traces is not None else None
    config, report = fit(real, seed=seed, search=search, levers=levers)
    header = [
        "Simulator parameters fitted by `esperd sim calibrate` (esperd.sim.calibrate).",
        f"From {report.runs} runs in {traces} ({report.static_runs} without seeds, {report.seeds} seeds, "
        f"{report.seeds_with_gain} judged on probation).",
        *report.notes,
        "Use: esperd train --sim --sim-config THIS_FILE ...",
    ]
    Path(out).write_text(to_toml(config, header), encoding="utf-8")
    print(f"esperd sim calibrate: {report.runs} runs, {report.seeds_with_gain} seeds judged -> {out}")
    if holdout is not None:
        held = read_summaries(holdout)
        if not held:
            raise CalibrationError(f"no runs in {holdout}")
        for label, candidate in (("default", SimConfig()), ("calibrated", config)):
            d = discrepancy(held, simulate_like(candidate, held, seed=seed + 7))
            print(f"  {label:>10}: {format_discrepancy(d)}")
    if lever_holdout is not None:
        held = read_summaries(lever_holdout)
        priors = {name: getattr(SimConfig(), name) for name, _, _ in LEVER_PARAMETERS}
        for label, candidate in (
            ("priors", msgspec.structs.replace(config, **priors)),
            ("fitted", config),
        ):
            real_effects, sim, score, terms = lever_discrepancy(candidate, held, seed=seed + 7)
            if not real_effects:
                raise CalibrationError(f"no paired lever runs in {lever_holdout}")
            print(f"  levers {label:>6}: {format_lever_discrepancy(real_effects, sim, score, terms)}")
    return 0


def format_lever_discrepancy(
    real: Mapping[str, LeverEffect], sim: Mapping[str, LeverEffect], score: float, terms: int
) -> str:
    """One line: the lever effects' summed squared z (sim vs real) and each variant's drop effect."""
    parts = []
    for variant, effect in real.items():
        other = sim.get(variant)
        mean = "-" if other is None else f"{other.drop.mean:+.3f}"
        parts.append(f"{variant} drop {effect.drop.mean:+.3f} real vs {mean}")
    return f"sum z^2 {score:.1f} over {terms} effects; " + ", ".join(parts)


def format_discrepancy(d: Discrepancy) -> str:
    """One line: the headline distances."""
    show = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    return (
        f"gain W1 {show(d.gain_w1)}, blend drop W1 {show(d.blend_drop_w1)}, "
        f"static curve MAE {show(d.curve_mae)}, final accuracy W1 {show(d.final_accuracy_w1)}, "
        f"helped {d.helped_share[0]:.2f} real vs {d.helped_share[1]:.2f}"
    )
