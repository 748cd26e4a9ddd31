"""The simulator's model of each optional lever (issue 16): one test varies one lever.

Every arm starts from the same hosts and draws the same noise (the simulator draws in fixed
shapes whatever the policy does), so differences between arms are the lever's alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from esperd.analyzer.observation import BLUEPRINTS, STAGE_INDEX
from esperd.sim import SimConfig, catalog as C
from esperd.sim.dynamics import Command, HostBatch
from esperd_contracts import (
    AlphaCurve,
    AlphaSpeed,
    BlendAlgorithm,
    Blueprint,
    IsolationMode,
    Op,
    SeedStage,
    Tempo,
)

ENVS = 300
QUIET = SimConfig(onset_fraction=0.0, transient_rate=0.0)
BLENDING, PROBATIONARY = STAGE_INDEX[SeedStage.BLENDING], STAGE_INDEX[SeedStage.PROBATIONARY]


def hosts(config: SimConfig = QUIET, envs: int = ENVS, seed: int = 5) -> HostBatch:
    batch = HostBatch(envs, config, np.random.default_rng(seed))
    batch.reset(np.arange(envs))
    return batch


def deficit_layers(batch: HostBatch) -> np.ndarray:
    return batch.deficit.argmax(1)


def best_blueprint(batch: HostBatch, e: int, layer: int) -> Blueprint:
    quality = C.AFFINITY[batch.kind[e, layer]] + batch.quality_noise[e, layer]
    fits = bool(C.KIND_FAMILY_CNN[batch.kind[e, layer]]) == C.BLUEPRINT_FAMILY_CNN
    return BLUEPRINTS[int(np.argmax(np.where(fits, quality, -np.inf)))]


def germinate_everywhere(batch: HostBatch, layers: np.ndarray, **levers: object) -> None:
    for e in range(batch.num_envs):
        layer = int(layers[e])
        command = Command(layer, Op.GERMINATE, best_blueprint(batch, e, layer), **levers)  # type: ignore[arg-type]
        applied, reason = batch.apply(e, command)
        assert applied, reason


def advance_all(batch: HostBatch, layers: np.ndarray) -> None:
    """ADVANCE every seed still in TRAINING (the policy's move when no dwell is set)."""
    for e in range(batch.num_envs):
        if batch.stage[e, layers[e]] == STAGE_INDEX[SeedStage.TRAINING]:
            assert batch.apply(e, Command(int(layers[e]), Op.ADVANCE))[0]


def test_neutral_levers_change_nothing() -> None:
    """The host's defaults sent explicitly (the family's isolation, LR 1, steepness 1) give the very
    same runs as a command without levers: a calibration from default-lever runs stays valid."""
    plain, explicit = hosts(), hosts()
    layers = deficit_layers(plain)
    germinate_everywhere(plain, layers, blend=BlendAlgorithm.SIGMOID)
    for e in range(ENVS):
        layer = int(layers[e])
        mode = IsolationMode.ISOLATED if C.KIND_FAMILY_CNN[explicit.kind[e, layer]] else IsolationMode.SHARED
        command = Command(
            layer,
            Op.GERMINATE,
            best_blueprint(explicit, e, layer),
            BlendAlgorithm.SIGMOID,
            isolation=mode,
            lr_multiplier=1.0,
            steepness=1.0,
        )
        assert explicit.apply(e, command)[0]
    for epoch in range(15):
        if epoch == 3:
            advance_all(plain, layers), advance_all(explicit, layers)
        plain.advance(), explicit.advance()
        assert np.array_equal(plain.accuracy, explicit.accuracy)
    assert np.array_equal(plain.counts["spikes"], explicit.counts["spikes"])


def _dwell_arm(dwell: int) -> tuple[float, float, float]:
    """(mean maturity when the blend starts, mean epoch it starts, spikes) with that dwell."""
    batch = hosts(SimConfig(onset_fraction=0.0, transient_rate=0.0, spike_scale=3.0))
    layers = deficit_layers(batch)
    germinate_everywhere(batch, layers, tempo=Tempo.FAST, dwell_epochs=dwell)
    rows = np.arange(ENVS)
    start_maturity = np.full(ENVS, np.nan)
    start_epoch = np.full(ENVS, np.nan)
    for epoch in range(dwell + 8):
        batch.advance()
        started = np.isnan(start_epoch) & (batch.stage[rows, layers] == BLENDING)
        start_epoch[started] = epoch
        start_maturity[started] = batch.maturity[rows, layers][started]
    assert not np.isnan(start_epoch).any(), "every seed blends by itself after its dwell"
    return float(start_maturity.mean()), float(start_epoch.mean()), float(batch.counts["spikes"].sum())


def test_dwell_trades_time_for_a_readier_seed() -> None:
    short, long = _dwell_arm(1), _dwell_arm(5)
    assert long[1] == short[1] + 4  # the blend starts four epochs later ...
    assert long[0] > short[0] + 0.2  # ... with a more mature seed ...
    assert long[2] < short[2]  # ... that destabilizes the blend less


def _isolation_arm(mode: IsolationMode, *, on_deficit: bool, spikes: float = 3.0) -> tuple[float, float]:
    """(mean realized contribution after the blend, spikes) of seeds on CNN layers."""
    config = SimConfig(architectures=("cnn",), onset_fraction=0.0, transient_rate=0.0, spike_scale=spikes)
    batch = hosts(config)
    if on_deficit:
        layers = deficit_layers(batch)
    else:  # a conv layer without a deficit: the seed can only interfere
        conv = batch.kind == C.CONV
        layers = np.argmax(conv & (batch.deficit == 0) & batch.valid, axis=1)
        assert (conv & (batch.deficit == 0))[np.arange(ENVS), layers].all()
    germinate_everywhere(batch, layers, tempo=Tempo.FAST, isolation=mode, dwell_epochs=2)
    for _ in range(12):
        batch.advance()
    contribution = batch.contrib[np.arange(ENVS), layers]
    return float(contribution.mean()), float(batch.counts["spikes"].sum())


def test_isolation_changes_repair_interference_and_stability() -> None:
    # CNN layers default to isolation: co-adaptation repairs more where a seed can help (without
    # instabilities, which cost a seed quality) ...
    modes = (IsolationMode.ISOLATED, IsolationMode.SHARED)
    isolated, shared = (_isolation_arm(m, on_deficit=True, spikes=0.0) for m in modes)
    assert shared[0] > isolated[0] * 1.1
    isolated, shared = (_isolation_arm(m, on_deficit=True) for m in modes)
    assert shared[1] > isolated[1]  # ... destabilizes the blend more ...
    # ... and interferes more where it cannot.
    isolated_i, shared_i = (
        _isolation_arm(m, on_deficit=False) for m in (IsolationMode.ISOLATED, IsolationMode.SHARED)
    )
    assert shared_i[0] < isolated_i[0] < 0.0


def _lr_arm(multiplier: float) -> tuple[float, float]:
    """(mean maturity after two epochs of training, spikes over the blend)."""
    batch = hosts(SimConfig(onset_fraction=0.0, transient_rate=0.0, spike_scale=3.0))
    layers = deficit_layers(batch)
    germinate_everywhere(batch, layers, tempo=Tempo.FAST, lr_multiplier=multiplier, dwell_epochs=2)
    batch.advance(), batch.advance(), batch.advance()  # germinated, then two epochs training
    maturity = float(batch.maturity[np.arange(ENVS), layers].mean())
    for _ in range(8):
        batch.advance()
    return maturity, float(batch.counts["spikes"].sum())


def test_lr_multiplier_speeds_maturing_and_costs_stability() -> None:
    slow, normal, fast = _lr_arm(0.5), _lr_arm(1.0), _lr_arm(2.0)
    assert slow[0] < normal[0] < fast[0]
    assert fast[1] > normal[1] > slow[1]


def _steepness_arm(steepness: float) -> tuple[list[float], float]:
    """(alpha over the blend of env 0, spikes) for sigmoid blends of that steepness."""
    batch = hosts(SimConfig(onset_fraction=0.0, transient_rate=0.0, spike_scale=3.0))
    layers = deficit_layers(batch)
    germinate_everywhere(
        batch, layers, blend=BlendAlgorithm.SIGMOID, tempo=Tempo.SLOW, steepness=steepness, dwell_epochs=2
    )
    alphas = []
    for _ in range(14):
        batch.advance()
        alphas.append(float(batch.alpha[0, layers[0]]))
    return alphas, float(batch.counts["spikes"].sum())


def test_steepness_shapes_the_blend_and_its_shock() -> None:
    gentle, normal, sharp = _steepness_arm(0.5), _steepness_arm(1.0), _steepness_arm(2.0)
    # Early in the blend a steeper S has moved less; all end at 1.
    first = next(i for i, a in enumerate(normal[0]) if a > 0)
    assert sharp[0][first] < normal[0][first] < gentle[0][first]
    assert gentle[0][-1] == normal[0][-1] == sharp[0][-1] == 1.0
    assert sharp[1] > normal[1] > gentle[1]  # a steeper middle shocks the host more


def _alpha_arm(speed: AlphaSpeed | None) -> tuple[list[float], float, np.ndarray]:
    """(alpha of env 0 per epoch after SET_ALPHA_TARGET 1.0 early in a glacial blend, spikes,
    stage of every seed at the end)."""
    batch = hosts(SimConfig(onset_fraction=0.0, transient_rate=0.0, spike_scale=3.0))
    layers = deficit_layers(batch)
    germinate_everywhere(batch, layers, blend=BlendAlgorithm.LINEAR, tempo=Tempo.GLACIAL, dwell_epochs=1)
    for _ in range(4):  # germinated, training, two epochs of blending
        batch.advance()
    assert (batch.stage[np.arange(ENVS), layers] == BLENDING).all()
    for e in range(ENVS):
        command = Command(int(layers[e]), Op.SET_ALPHA_TARGET, alpha_target=1.0, alpha_speed=speed)
        assert batch.apply(e, command)[0]
    alphas = []
    for _ in range(12):
        batch.advance()
        alphas.append(float(batch.alpha[0, layers[0]]))
    return alphas, float(batch.counts["spikes"].sum()), batch.stage[np.arange(ENVS), layers]


def test_alpha_speed_trades_blend_shock_for_time() -> None:
    instant, fast, slow = (_alpha_arm(s) for s in (AlphaSpeed.INSTANT, AlphaSpeed.FAST, AlphaSpeed.SLOW))
    assert instant[0][0] == 1.0 and fast[0][0] == 1.0  # at once, or within its one epoch
    assert slow[0][0] < slow[0][3] < slow[0][4] == 1.0  # five epochs to get there
    assert instant[1] > slow[1]  # a sudden jump destabilizes more than a gradual move
    assert (slow[2] == PROBATIONARY).all()  # each blend ends at its target, on probation


@pytest.mark.parametrize("curve", list(AlphaCurve), ids=lambda c: c.value)
def test_alpha_curve_sets_the_path_to_the_target(curve: AlphaCurve) -> None:
    batch = hosts(envs=1)
    layer = int(deficit_layers(batch)[0])
    assert batch.apply(0, Command(layer, Op.GERMINATE, best_blueprint(batch, 0, layer), dwell_epochs=1))[0]
    batch.advance(), batch.advance(), batch.advance()
    start = float(batch.alpha[0, layer])
    command = Command(
        layer, Op.SET_ALPHA_TARGET, alpha_target=0.25, alpha_speed=AlphaSpeed.SLOW, alpha_curve=curve
    )
    assert batch.apply(0, command)[0]
    path = []
    for _ in range(5):
        batch.advance()
        path.append(float(batch.alpha[0, layer]))
    expected = start + (0.25 - start) * C.alpha_curve(
        np.array(list(AlphaCurve).index(curve)), np.arange(1, 6) / 5
    )
    np.testing.assert_allclose(path, expected, atol=1e-12)
