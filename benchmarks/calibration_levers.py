"""Fit the simulator's lever parameters to real one-lever-at-a-time runs; report sim vs real on held-out ones.

    python benchmarks/record_traces.py --out benchmarks/traces/levers --controllers lever-sweep \\
        --tasks digits:2:16 --seeds 0-31 --holdout-seeds 20-31 --concurrency 1    # the real runs
    python benchmarks/calibration_levers.py                                       # fit + report

Fits `esperd sim calibrate` on `<traces>/fit` (the host and blueprint dynamics, as
benchmarks/calibration.py does) with the lever parameters fitted on `<levers>/fit`
(`esperd.sim.calibrate.fit_levers`: per parameter a grid search matching the simulated paired
effects of each lever variant -- blend drop, counterfactual, final accuracy against the
default-lever twin -- to the real ones). Then, on `<levers>/holdout` (other seeds, never fitted),
compares the real paired effects with the simulator's under the lever priors (SimConfig's
defaults) and under the fitted values. Writes `benchmarks/results/calibration_levers.md` and the
config with the fitted lever parameters, `benchmarks/results/sim_calibrated_levers.toml`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402

from esperd.sim.calibrate import (  # noqa: E402
    LEVER_PARAMETERS,
    LEVER_STATS,
    Effect,
    LeverEffect,
    LeverFit,
    RunSummary,
    fit,
    lever_discrepancy,
    lever_effects,
    read_summaries,
    to_toml,
)
from esperd.sim.config import SimConfig  # noqa: E402
from esperd.sim.policies import LEVER_VARIANTS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAT_NAMES = {
    "drop": "blend drop per run",
    "gain": "counterfactual per seed",
    "final": "final accuracy per run",
}


def cell(e: Effect | None) -> str:
    if e is None or e.n == 0:
        return "-"
    se = "" if math.isnan(e.se) else f" ± {e.se:.4f}"
    return f"{e.mean:+.4f}{se} (n={e.n})"


def z(real: Effect, sim: Effect | None) -> str:
    if sim is None or real.n < 2 or sim.n < 2:
        return "-"
    var = real.se**2 + sim.se**2
    return "-" if var <= 0 else f"{(sim.mean - real.mean) / math.sqrt(var):+.1f}"


def counts(runs: list[RunSummary]) -> str:
    return ", ".join(f"{c} {n}" for c, n in sorted(Counter(r.controller for r in runs).items()))


def effects_table(
    fit_effects: Mapping[str, LeverEffect], held_effects: Mapping[str, LeverEffect]
) -> list[str]:
    lines = [
        "| variant | lever value | statistic | real, fit seeds | real, held-out seeds |",
        "|---|---|---|---|---|",
    ]
    for variant in sorted(set(fit_effects) | set(held_effects)):
        lever = LEVER_VARIANTS[variant][0]
        for stat in LEVER_STATS:
            a, b = fit_effects.get(variant), held_effects.get(variant)
            lines.append(
                f"| {variant} | {lever} | {STAT_NAMES[stat]} | {cell(getattr(a, stat, None))} | "
                f"{cell(getattr(b, stat, None))} |"
            )
    return lines


def holdout_table(
    real: Mapping[str, LeverEffect], before: Mapping[str, LeverEffect], after: Mapping[str, LeverEffect]
) -> list[str]:
    lines = [
        "| variant | statistic | real (held out) | sim, priors | z | sim, fitted | z |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, effect in real.items():
        for stat in LEVER_STATS:
            r = getattr(effect, stat)
            b = getattr(before.get(variant), stat, None)
            a = getattr(after.get(variant), stat, None)
            row = [variant, STAT_NAMES[stat], cell(r), cell(b), z(r, b), cell(a), z(r, a)]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def fits_table(fits: list[LeverFit], fitted: SimConfig) -> list[str]:
    lines = [
        "| parameter | prior | value now | verdict | 95 % range on the grid | best | from "
        "| objective (sum z²) over the grid |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_name = {f.name: f for f in fits}
    for name, lever, _ in LEVER_PARAMETERS:
        f = by_name.get(name)
        if f is None:
            prior = getattr(SimConfig(), name)
            lines.append(
                f"| {name} | {prior:g} | {getattr(fitted, name):g} | no runs | - | - | ({lever}) | - |"
            )
            continue
        profile = ", ".join(f"{v:g}: {s:.1f}" for v, s in f.objective.items())
        verdict = f.verdict + (", prior ruled out" if f.prior_ruled_out else ", prior within")
        lines.append(
            f"| {name} | {f.prior:g} | {f.value:g} | {verdict} | {f.accepted[0]:g} to {f.accepted[1]:g} | "
            f"{f.best:g} | {', '.join(f.variants)} | {profile} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", default="benchmarks/traces", help="the host fit's traces (fit/)")
    parser.add_argument("--levers", default="benchmarks/traces/levers", help="lever runs (fit/, holdout/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    fit_runs = read_summaries(Path(args.traces) / "fit")
    lever_fit = read_summaries(Path(args.levers) / "fit")
    lever_held = read_summaries(Path(args.levers) / "holdout")
    if not fit_runs or not lever_fit or not lever_held:
        print(f"no runs under {args.traces}/fit, {args.levers}/fit or {args.levers}/holdout", file=sys.stderr)
        return 2
    fitted, report = fit(fit_runs, seed=args.seed, levers=lever_fit)
    priors = msgspec.structs.replace(fitted, **{n: getattr(SimConfig(), n) for n, _, _ in LEVER_PARAMETERS})
    real, before, score_before, terms = lever_discrepancy(priors, lever_held, seed=args.seed + 7)
    _, after, score_after, _ = lever_discrepancy(fitted, lever_held, seed=args.seed + 7)
    _, _, in_before, in_terms = lever_discrepancy(priors, lever_fit, seed=args.seed + 7)
    _, _, in_after, _ = lever_discrepancy(fitted, lever_fit, seed=args.seed + 7)
    seconds = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    header = [
        "Simulator parameters fitted to real reference-host traces, lever parameters included",
        f"(benchmarks/calibration_levers.py): hosts from {args.traces}/fit, levers from {args.levers}/fit.",
        "See benchmarks/results/calibration_levers.md.",
    ]
    (RESULTS / "sim_calibrated_levers.toml").write_text(to_toml(fitted, header), encoding="utf-8")
    lines = [
        "# Simulator calibration: the optional levers' parameters from real one-lever runs",
        "",
        "Reproduce (the traces are committed, gzipped):",
        "",
        "```",
        "python benchmarks/record_traces.py --out benchmarks/traces/levers --controllers lever-sweep \\",
        "    --tasks digits:2:16 --seeds 0-31 --holdout-seeds 20-31 --concurrency 1",
        f"python benchmarks/calibration_levers.py --seed {args.seed}",
        "```",
        "",
        "The real runs: the reference host (`examples/host`, digits CNN at width 2, 16 epochs) "
        "driven by a real esperd serving the manual plan (two planned seeds at epoch 3, sigmoid "
        "blend, standard tempo), once with every optional lever at its default (`manual`, the "
        "twin) and once per variant with ONE lever of every GERMINATE changed (`lever-<variant>`), "
        "on the same seed and plan. A variant's effect is its run minus its twin: the blend drop "
        "(per run, the mean over its blended seeds), the counterfactual on probation (per seed "
        "judged in both, same layer) and the final validation accuracy (per run). A pair counts "
        "only where the lever changed what the host did (isolation `shared` on the fc layer, "
        "which shares by default, does not).",
        "",
        f"- lever fit: `{args.levers}/fit`, {len(lever_fit)} runs ({counts(lever_fit)});",
        f"- held out: `{args.levers}/holdout`, {len(lever_held)} runs ({counts(lever_held)}), never fitted;",
        f"- host dynamics fitted on `{args.traces}/fit` as in `calibration.md` "
        f"({report.runs} runs); the simulated lever runs play hosts of the lever runs' shape "
        "(`lever_sim_config`), 64 episodes per variant (seed "
        f"{args.seed} for the fit, {args.seed + 7} for the comparisons); {seconds:.0f} s in all.",
        "",
        "## Fitted lever parameters",
        "",
        "Per parameter a grid search (the others held), matching every statistic of the variants "
        "of its lever; objective: the sum over variants and statistics of z² = (sim - real)² / "
        "(se_real² + se_sim²). The 95 % range: the grid values within 3.84 (widened by the best "
        "fit's sum z² per term where that exceeds 1) of the best. Identified: the range excludes "
        "both ends of the grid; bounded: one end; not identified: neither. A parameter takes the "
        "best grid value only where the range rules its prior out, else it keeps the prior. The "
        "statistics of one variant are correlated, so the bound is approximate.",
        "",
        *fits_table(report.levers, fitted),
        "",
        *[f"- {n}" for n in report.notes],
        "",
        "## Sim vs real on the held-out lever runs",
        "",
        f"Sum of z² over {terms} effects (lower is closer; about {terms} if the simulator matched "
        f"within noise): priors {score_before:.1f}, fitted {score_after:.1f}. On the fit seeds "
        f"(in sample, {in_terms} effects): priors {in_before:.1f}, fitted {in_after:.1f}.",
        "",
        *holdout_table(real, before, after),
        "",
        "Dwell has no simulator parameter (its effect follows from the maturing rate and the blend "
        "instability); its rows show how far the simulator's built-in dwell effect is from the real one.",
        "",
        "## The real effects on both splits",
        "",
        "The same statistics on the fit seeds and on the held-out seeds: an effect that changes "
        "sign between them is noise at this sample size.",
        "",
        *effects_table(lever_effects(lever_fit), real),
        "",
    ]
    text = "\n".join(lines)
    (RESULTS / "calibration_levers.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
