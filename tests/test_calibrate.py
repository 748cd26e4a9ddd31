"""Simulator calibration: trace summaries, the fit, the TOML it writes, and `esperd train --sim-config`."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import numpy as np
import pytest

from esperd.cli import build_parser, main as cli_main
from esperd.ops.traces import TraceWriter
from esperd.sim.calibrate import (
    RunSummary,
    SeedEpisode,
    curve_fit,
    discrepancy,
    fit,
    fit_levers,
    lever_effects,
    load_sim_config,
    read_summaries,
    simulate,
    simulate_lever_runs,
    summarize,
    to_toml,
)
from esperd.sim.config import SimConfig
from esperd.sim.dynamics import HostBatch
from esperd.train import spec_from_args
from esperd_contracts import (
    AckStatus,
    AdaptationCommand,
    Blueprint,
    CommandAck,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)

S = SeedStage


def state(
    epoch: int, acc: float, stage: SeedStage = S.DORMANT, cf: float = 0.0, params: int = 0
) -> SystemStatePacket:
    seed = SeedSlotState(layer_id=1, stage=stage, counterfactual=cf, params=params)
    return SystemStatePacket(epoch=epoch, val_accuracy=acc, seeds=[seed], total_epochs=10, val_samples=400)


def seed_messages() -> list[tuple[str, object]]:
    """A run whose MLP seed on a linear layer blends with one bad epoch, helps by 0.03, is fossilized."""
    topology = TopologyPacket(
        nodes=[
            TopologyNode(layer_id=i, layer_type=t, params=p)
            for i, (t, p) in enumerate([("conv", 90), ("linear", 200)])
        ]
    )
    germinate = AdaptationCommand(
        command_id="g", run_id="r", layer_id=1, op=Op.GERMINATE, blueprint=Blueprint.MLP, policy="heuristic"
    )
    fossilize = AdaptationCommand(command_id="f", run_id="r", layer_id=1, op=Op.FOSSILIZE, policy="heuristic")
    accs = [0.5, 0.6, 0.65, 0.66, 0.62, 0.7, 0.72, 0.73]
    stages = [
        S.DORMANT,
        S.DORMANT,
        S.TRAINING,
        S.BLENDING,
        S.BLENDING,
        S.BLENDING,
        S.PROBATIONARY,
        S.FOSSILIZED,
    ]
    out: list[tuple[str, object]] = [
        ("topology", topology),
        ("state", state(0, accs[0])),
        ("state", state(1, accs[1])),
    ]
    out += [("command", germinate), ("ack", CommandAck(command_id="g", status=AckStatus.APPLIED))]
    for epoch in range(2, 8):
        cf = 0.03 if stages[epoch] is S.PROBATIONARY else 0.0
        out.append(("state", state(epoch, accs[epoch], stages[epoch], cf, params=120)))
        if stages[epoch] is S.PROBATIONARY:
            out += [("command", fossilize), ("ack", CommandAck(command_id="f", status=AckStatus.APPLIED))]
    return out


def test_summarize_follows_a_seed_from_germination_to_its_fate() -> None:
    summary = summarize("r", seed_messages())
    assert summary is not None
    assert summary.controller == "heuristic" and summary.kinds == ["conv", "linear"]
    assert summary.accuracy[0] == 0.5 and len(summary.accuracy) == 8
    assert summary.total_epochs == 10 and summary.val_samples == 400
    (seed,) = summary.seeds
    assert (seed.kind, seed.blueprint, seed.germinated_epoch, seed.fate) == ("linear", "mlp", 1, "fossilized")
    assert seed.gain == pytest.approx(0.03) and seed.seed_params == 120 and seed.layer_params == 200
    assert seed.blend_drop == pytest.approx(0.04)  # 0.66 -> 0.62 while blending


def test_summaries_read_back_from_trace_files(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path)
    for channel, message in seed_messages():
        writer.write("r", channel, message)  # type: ignore[arg-type]
    writer.close()
    (summary,) = read_summaries(tmp_path)
    assert summary == summarize("r", seed_messages())
    # Gzipped traces (as committed under benchmarks/traces) read the same.
    import gzip

    path = tmp_path / "r.jsonl"
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "r.jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
    assert read_summaries(tmp_path / "gz") == [summary]


def test_curve_fit_recovers_a_known_learning_curve() -> None:
    e = np.arange(20)
    acc = 0.9 - (0.9 - 0.2) * (1 - 0.3) ** e
    a0, c, r, sd = curve_fit(acc.tolist())
    assert (a0, c, r) == pytest.approx((0.2, 0.9, 0.3), abs=0.01) and sd < 1e-3


def test_a_calibrated_config_loads_and_drives_the_simulator(tmp_path: Path) -> None:
    config = SimConfig(
        epochs=8,
        architectures=("mlp",),
        deficit_prob={"linear": 0.5},
        affinity={"linear": {"mlp": 0.9, "attention": 0.1}},
        param_ratio={"mlp": 1.5},
        kind_params={"linear": (100, 300)},
        min_seed_reference=50,
        spike_scale=0.5,
    )
    path = tmp_path / "sim.toml"
    path.write_text(to_toml(config, ["a header"]))
    loaded = load_sim_config(path)
    assert loaded == config
    hosts = HostBatch(4, loaded, np.random.default_rng(0))
    hosts.reset(np.arange(4))
    assert set(hosts.kind[hosts.valid].tolist()) == {5}  # linear only
    assert ((hosts.layer_params[hosts.valid] >= 100) & (hosts.layer_params[hosts.valid] <= 300)).all()
    assert hosts.deficit[hosts.valid].any()  # linear layers can now have deficits
    with pytest.raises(ValueError, match="unknown layer kinds"):
        SimConfig(deficit_prob={"lstm": 0.1})
    (tmp_path / "bad.toml").write_text("epochs = 1\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_sim_config(tmp_path / "bad.toml")


@pytest.mark.slow
def test_calibration_moves_the_simulator_toward_the_runs_it_was_fitted_to() -> None:
    # "Real" runs from a simulator with other dynamics than the default; fit on some, judge on others.
    truth = SimConfig(
        epochs=16,
        architectures=("mlp",),
        min_layers=4,
        max_layers=5,
        deficit_prob={"linear": 0.6},
        affinity={"linear": {bp.value: 0.8 for bp in Blueprint if bp.family.value == "transformer"}},
        deficit_low=0.04,
        deficit_high=0.08,
        ceiling_low=0.6,
        ceiling_high=0.7,
        rate_low=0.3,
        rate_high=0.4,
        initial_low=0.3,
        initial_high=0.4,
        onset_fraction=0.0,
        degrade_epochs=1,
        val_samples=500,
        dependence=0.1,  # the counterfactual says 0.1 more than a seed adds, as on real hosts
    )

    def runs(seed: int) -> list:  # static and manual on the same hosts: paired by run
        return [*simulate(truth, "static", 24, seed=seed), *simulate(truth, "manual", 24, seed=seed)]

    fitted, report = fit(runs(0), search=False)
    assert report.static_runs == 24 and report.seeds_with_gain > 10
    assert 0.05 < fitted.dependence < 0.2
    assert fitted.architectures == ("mlp",) and fitted.epochs == 16
    held = runs(100)
    before = discrepancy(held, runs_like(SimConfig(), seed=7))
    after = discrepancy(held, runs_like(fitted, seed=7))
    assert after.gain_w1 is not None and before.gain_w1 is not None
    assert after.gain_w1 < before.gain_w1
    assert after.curve_mae is not None and before.curve_mae is not None and after.curve_mae < before.curve_mae
    assert after.final_accuracy_w1 < before.final_accuracy_w1  # type: ignore[operator]
    assert not math.isnan(after.helped_share[1])
    # What the manual seeds added to final accuracy over their static twins: closer after the fit.
    (real_effect, before_effect), (_, after_effect) = (
        before.effect_vs_static["manual"],
        after.effect_vs_static["manual"],
    )
    assert abs(after_effect[0] - real_effect[0]) < abs(before_effect[0] - real_effect[0])


def runs_like(config: SimConfig, seed: int) -> list:
    return [*simulate(config, "static", 24, seed=seed), *simulate(config, "manual", 24, seed=seed)]


def test_cli_calibrates_traces_into_a_toml_that_train_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traces = tmp_path / "traces"
    writer = TraceWriter(traces)
    config = SimConfig(epochs=14, val_samples=300)
    for summary_seed, controller in ((0, "static"), (1, "manual")):
        from esperd.sim.env import SimEnv
        from esperd.sim.policies import FixedPlanPolicy, WaitPolicy

        policy = WaitPolicy() if controller == "static" else FixedPlanPolicy(seed=summary_seed)
        env = SimEnv(
            4,
            config,
            seed=summary_seed,
            observer=lambda run, ch, m, c=controller: writer.write(f"{c}-{run}", ch, m),
        )
        obs = env.reset()
        for _ in range(config.epochs):
            obs, *_ = env.step(policy.act(obs))
    writer.close()
    out = tmp_path / "sim.toml"
    assert cli_main(["sim", "calibrate", "--traces", str(traces), "--out", str(out), "--no-search"]) == 0
    calibrated = load_sim_config(out)
    assert calibrated.epochs == 14 and calibrated.val_samples == 300
    printed = capsys.readouterr().out
    assert "8 runs" in printed and "0 seeds judged" not in printed
    # Bad input: a clear error and exit 2.
    assert cli_main(["sim", "calibrate", "--traces", str(tmp_path / "none"), "--out", str(out)]) == 2
    args = build_parser().parse_args(
        ["train", "--algo", "ppo", "--sim", "--sim-config", str(out), "--out", str(tmp_path / "t")]
    )
    spec = spec_from_args(args, None)
    assert spec.sim_config is not None and spec.sim_config.epochs == 14
    assert spec.sim_config.deficit_prob == calibrated.deficit_prob


# ---------------------------------------------------------------- lever parameters (issue 16)


def lever_run(controller: str, pair: str, final: float, seeds: list) -> RunSummary:
    return RunSummary(
        run=f"{pair}-{controller}", controller=controller, pair=pair, accuracy=[0.5, final], seeds=seeds
    )


def episode(layer: int, blueprint: str, gain: float, drop: float, **levers: object) -> SeedEpisode:
    return SeedEpisode(
        layer_id=layer,
        kind="conv",
        blueprint=blueprint,
        germinated_epoch=3,
        gain=gain,
        blend_drop=drop,
        levers={"dwell_epochs": 2, "lr_multiplier": 1.0, **levers},
    )


def test_lever_effects_pair_each_variant_with_its_default_lever_twin() -> None:
    runs = []
    for i, (gain, drop, final) in enumerate([(0.1, 0.02, 0.7), (0.2, 0.04, 0.8), (0.0, 0.01, 0.6)]):
        pair = f"digits-w2-s{i}"
        runs.append(lever_run("manual", pair, final, [episode(1, "conv_light", gain, drop)]))
        doubled = episode(1, "conv_light", gain + 0.05, drop + 0.03, lr_multiplier=2.0)
        runs.append(lever_run("lever-lr2", pair, final - 0.01, [doubled]))
    runs.append(
        lever_run("lever-lr2", "no-twin", 0.1, [episode(1, "conv_light", 0.5, 0.5, lr_multiplier=2.0)])
    )
    # "shared" on a transformer-family blueprint is what the host does anyway: not a pair.
    runs.append(lever_run("manual", "t", 0.7, [episode(1, "mlp", 0.1, 0.02)]))
    runs.append(lever_run("lever-shared", "t", 0.9, [episode(1, "mlp", 0.9, 0.5, isolation="shared")]))
    effects = lever_effects(runs)
    assert set(effects) == {"lr2"}
    lr2 = effects["lr2"]
    assert lr2.lever == "lr_multiplier" and lr2.final.n == lr2.gain.n == lr2.drop.n == 3
    assert lr2.gain.mean == pytest.approx(0.05) and lr2.drop.mean == pytest.approx(0.03)
    assert lr2.final.mean == pytest.approx(-0.01) and lr2.final.se == pytest.approx(0.0, abs=1e-12)


def test_read_summaries_names_lever_runs_and_pairs_them_with_their_manual_twin(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path)
    for run in ("digits-w2-manual-s3", "digits-w2-lever-steep0p5-s3"):
        for channel, message in seed_messages():
            writer.write(run, channel, message)
    writer.close()
    summaries = {s.controller: s for s in read_summaries(tmp_path)}
    assert set(summaries) == {"manual", "lever-steep0p5"}
    assert summaries["manual"].pair == summaries["lever-steep0p5"].pair == "digits-w2-s3"


#: A simulated host whose blends destabilize often, so the levers' instability parameters show.
LEVER_TRUTH = SimConfig(
    epochs=14,
    architectures=("cnn",),
    min_layers=5,
    max_layers=6,
    spike_scale=4.0,
    spike_drop_low=0.05,
    spike_drop_high=0.1,
    val_samples=500,
)


@pytest.mark.slow
def test_fit_levers_recovers_a_known_lr_risk_exponent() -> None:
    truth = msgspec.structs.replace(LEVER_TRUTH, lr_risk_exponent=3.0)
    real = simulate_lever_runs(truth, ["manual", "lr0p5", "lr2"], seed=13)  # other hosts than the fit's
    prior = msgspec.structs.replace(truth, lr_risk_exponent=1.0)
    grid = [("lr_risk_exponent", "lr_multiplier", (0.0, 1.0, 3.0, 8.0))]
    fitted, fits, notes = fit_levers(prior, real, seed=0, parameters=grid)
    (lr,) = fits
    assert lr.verdict == "identified" and lr.prior_ruled_out and lr.accepted[0] > 1.0
    assert lr.best == lr.value == 3.0 and fitted.lr_risk_exponent == 3.0
    assert lr.objective[3.0] < lr.objective[1.0] < lr.objective[0.0]
    assert fitted.steepness_shock == prior.steepness_shock  # only what was searched moves
    assert any(
        n.startswith("lr_risk_exponent from lr0p5, lr2: identified") and "fitted 3" in n for n in notes
    )


@pytest.mark.slow
def test_fit_levers_keeps_the_prior_of_a_parameter_the_runs_cannot_inform() -> None:
    # Without interference, coadapt_interference scales nothing: every value simulates the same.
    truth = msgspec.structs.replace(LEVER_TRUTH, interference=0.0, interference_per_ratio=0.0)
    real = simulate_lever_runs(truth, ["manual", "shared", "lr2"], episodes=32, seed=5)
    grid = [
        ("coadapt_interference", "isolation", (0.0, 1.0, 4.0)),
        ("steepness_shock", "steepness", (0.0, 2.0)),  # no steepness runs at all
    ]
    fitted, fits, notes = fit_levers(truth, real, seed=0, episodes=32, parameters=grid)
    (interference,) = fits
    assert interference.verdict == "not identified" and not interference.prior_ruled_out
    assert interference.value == truth.coadapt_interference
    assert len(set(interference.objective.values())) == 1
    assert fitted.coadapt_interference == truth.coadapt_interference
    assert any("coadapt_interference" in n and "not identified" in n for n in notes)
    assert any(n.startswith("steepness_shock: no paired runs vary steepness") for n in notes)


def test_fit_leaves_lever_runs_out_of_the_host_fit_and_notes_the_lever_parameters() -> None:
    manual = simulate(LEVER_TRUTH, "manual", 8, seed=1)
    levers = simulate_lever_runs(LEVER_TRUTH, ["manual", "lr2"], episodes=8, seed=2)
    config, report = fit([*manual, *levers], search=False)
    assert report.runs == 16  # the 8 manual runs here and the 8 manual twins; not the lr2 runs
    assert any("Levers not fitted (no search)" in n for n in report.notes)
    assert config.lr_risk_exponent == SimConfig().lr_risk_exponent
    _, alone = fit(manual, search=False)
    assert any("no paired lever runs" in n for n in alone.notes)


def write_sim_traces(directory: Path, config: SimConfig, policies: dict[str, object], seed: int) -> None:
    """Simulated runs as `record_traces.py` names them: <task>-<controller>-s<n>, paired by n."""
    from esperd.sim.env import SimEnv

    writer = TraceWriter(directory)
    for controller, policy in policies.items():
        env = SimEnv(
            4,
            config,
            seed=seed,
            observer=lambda run, ch, m, c=controller: writer.write(
                f"sim-{c}-s{run.rsplit('-', 1)[-1]}", ch, m
            ),
        )
        obs = env.reset()
        for _ in range(config.epochs):
            obs, *_ = env.step(policy.act(obs))  # type: ignore[attr-defined]
    writer.close()


def test_cli_takes_lever_traces_and_measures_the_lever_fit_on_held_out_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from esperd.sim.policies import lever_plan_policy

    config = SimConfig(epochs=12, val_samples=300)
    for split, seed in (("fit", 0), ("holdout", 1)):
        variants = {
            "manual": lever_plan_policy("manual", seed=seed),
            "lever-lr2": lever_plan_policy("lr2", seed=seed),
        }
        write_sim_traces(tmp_path / "levers" / split, config, variants, seed)
    write_sim_traces(tmp_path / "traces", config, {"manual": lever_plan_policy("manual", seed=2)}, 2)
    out = tmp_path / "sim.toml"
    argv = ["sim", "calibrate", "--traces", str(tmp_path / "traces"), "--out", str(out), "--no-search"]
    levers = [
        "--lever-traces",
        str(tmp_path / "levers" / "fit"),
        "--lever-holdout",
        str(tmp_path / "levers" / "holdout"),
    ]
    assert cli_main(argv + levers) == 0
    printed = capsys.readouterr().out
    assert "levers priors: sum z^2" in printed and "levers fitted: sum z^2" in printed
    assert "lr2 drop" in printed
    assert "Levers not fitted (no search)" in out.read_text()
    # Lever traces without a single paired run cannot be measured on: a clear error.
    bad = ["--lever-holdout", str(tmp_path / "traces")]
    assert cli_main(argv + bad) == 2
    assert "no paired lever runs" in capsys.readouterr().err
