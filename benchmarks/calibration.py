"""Calibrate the simulator on recorded real traces and report the sim-vs-real discrepancy on held-out runs.

    python benchmarks/record_traces.py --out benchmarks/traces      # the real runs (about an hour)
    python benchmarks/calibration.py --traces benchmarks/traces     # fit + report (minutes)

Fits `esperd sim calibrate` on `<traces>/fit`, writes the parameters to
`benchmarks/results/sim_calibrated.toml`, then simulates runs under the same controllers as the
held-out real runs (`<traces>/holdout`, never used by the fit) with the default simulator and
with the calibrated one, and writes `benchmarks/results/calibration.md`: how far each is from the
held-out real runs (distributions of accuracy gain per germination by layer kind and blueprint,
blend drops, the learning curve of runs without seeds, final accuracy).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from esperd.sim.calibrate import (  # noqa: E402
    Discrepancy,
    RunSummary,
    discrepancy,
    fit,
    read_summaries,
    simulate_like,
    to_toml,
)
from esperd.sim.config import SimConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def cell(stats: tuple[float, float, int]) -> str:
    mean, sd, n = stats
    return "-" if n == 0 else f"{mean:+.4f} ± {sd:.4f} (n={n})"


def ratio(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return "-"
    return f"{after / before:.2f}x"


def report(
    args: argparse.Namespace,
    fitted: SimConfig,
    notes: list[str],
    fit_runs: list[RunSummary],
    held: list[RunSummary],
    before: Discrepancy,
    after: Discrepancy,
    seconds: float,
) -> str:
    def counts(runs: list[RunSummary]) -> str:
        return ", ".join(f"{c} {n}" for c, n in sorted(Counter(r.controller for r in runs).items()))

    def seeds(runs: list[RunSummary]) -> int:
        return sum(len(r.seeds) for r in runs)

    def judged(runs: list[RunSummary]) -> int:
        return sum(s.gain is not None for r in runs for s in r.seeds)

    lines = [
        "# Simulator calibration: sim vs real on held-out runs",
        "",
        "Reproduce (the traces are committed, gzipped; re-recording them took about 75 minutes here):",
        "",
        "```",
        "python benchmarks/record_traces.py --out benchmarks/traces",
        f"python benchmarks/calibration.py --traces {args.traces} --seed {args.seed}",
        "```",
        "",
        f"- fitted on `{args.traces}/fit`: {len(fit_runs)} real runs ({counts(fit_runs)}), "
        f"{seeds(fit_runs)} seeds germinated, {judged(fit_runs)} judged on probation;",
        f"- measured on `{args.traces}/holdout` (other seeds, never fitted): {len(held)} real runs "
        f"({counts(held)}), {seeds(held)} seeds, {judged(held)} judged;",
        "- each simulator plays the held-out runs' controllers (at least 16 episodes each, seed "
        f"{args.seed + 7}); {seconds:.0f} s in all. Parameters: `benchmarks/results/sim_calibrated.toml`.",
        *(f"- note: {n}" for n in notes),
        "",
        "## Distances from the held-out real runs (lower is closer)",
        "",
        "| statistic | default simulator | calibrated | calibrated / default |",
        "|---|---|---|---|",
        f"| accuracy gain per judged germination, Wasserstein-1 | {fmt(before.gain_w1)} "
        f"| {fmt(after.gain_w1)} | {ratio(before.gain_w1, after.gain_w1)} |",
        f"| blend drop per blended seed, Wasserstein-1 | {fmt(before.blend_drop_w1)} "
        f"| {fmt(after.blend_drop_w1)} | {ratio(before.blend_drop_w1, after.blend_drop_w1)} |",
        f"| learning curve of runs without seeds, mean abs. difference (11 points) | {fmt(before.curve_mae)} "
        f"| {fmt(after.curve_mae)} | {ratio(before.curve_mae, after.curve_mae)} |",
        f"| final validation accuracy, Wasserstein-1 | {fmt(before.final_accuracy_w1)} "
        f"| {fmt(after.final_accuracy_w1)} | {ratio(before.final_accuracy_w1, after.final_accuracy_w1)} |",
        f"| share of judged seeds that helped (gain > 2 s.e.), real {fmt(before.helped_share[0], 2)} "
        f"| {fmt(before.helped_share[1], 2)} | {fmt(after.helped_share[1], 2)} | |",
        "",
        "## What growth did to final accuracy: each controller's runs minus their static twins",
        "",
        "Real: the same task and seed without seeds; simulated: the same simulated host with the "
        "wait policy. Mean ± sd of the paired difference.",
        "",
        "| controller | real (held out) | default simulator | calibrated |",
        "|---|---|---|---|",
        *(
            f"| {c} | {cell(real)} | {cell(before.effect_vs_static[c][1])} | {cell(sim)} |"
            for c, (real, sim) in after.effect_vs_static.items()
        ),
        "",
        "## Accuracy gain per germination by layer kind (mean ± sd of the counterfactual on probation)",
        "",
        "The counterfactual is what the host reports (and what a policy sees): accuracy with the seed "
        "minus with its alpha forced to 0. On real hosts it includes the host's reliance on a blended "
        f"seed; the fit puts that in `dependence` ({fitted.dependence:.3f} here).",
        "",
        "| layer kind | real (held out) | default simulator | calibrated |",
        "|---|---|---|---|",
        *(
            f"| {kind} | {cell(real)} | {cell(before.gain_by_kind[kind][1])} | {cell(sim)} |"
            for kind, (real, sim) in after.gain_by_kind.items()
        ),
        "",
        "## By blueprint",
        "",
        "| blueprint | real (held out) | default simulator | calibrated |",
        "|---|---|---|---|",
        *(
            f"| {bp} | {cell(real)} | {cell(before.gain_by_blueprint[bp][1])} | {cell(sim)} |"
            for bp, (real, sim) in after.gain_by_blueprint.items()
        ),
        "",
        "## Blend drops (largest one-epoch fall of validation accuracy while a seed blends)",
        "",
        "| | real (held out) | default simulator | calibrated |",
        "|---|---|---|---|",
        f"| blend drop | {cell(after.blend_drop[0])} | {cell(before.blend_drop[1])} "
        f"| {cell(after.blend_drop[1])} |",
        "",
        "## What the fit chose",
        "",
        f"- episode {fitted.epochs} epochs, {fitted.min_layers}-{fitted.max_layers} layers, architectures "
        f"{', '.join(fitted.architectures)}; validation size {fitted.val_samples};",
        f"- host: initial accuracy {fitted.initial_low:.3f}-{fitted.initial_high:.3f}, learning rate "
        f"{fitted.rate_low:.3f}-{fitted.rate_high:.3f} per epoch, ceiling {fitted.ceiling_low:.3f}-"
        f"{fitted.ceiling_high:.3f}, accuracy noise {fitted.accuracy_noise:.4f};",
        f"- deficits: chance per layer kind {dict(sorted(fitted.deficit_prob.items()))}, size "
        f"{fitted.deficit_low:.3f}-{fitted.deficit_high:.3f}; interference {fitted.interference:+.4f};",
        f"- reliance on a blended seed (counterfactual beyond its contribution) {fitted.dependence:.3f};",
        f"- blend instability x{fitted.spike_scale} the catalog's rate, drops {fitted.spike_drop_low:.3f}-"
        f"{fitted.spike_drop_high:.3f}; counterfactual noise {fitted.counterfactual_noise:.4f}.",
        "",
        "## Reading it",
        "",
        "- The counterfactual a host reports is not what a seed added. Switching a blended seed off "
        "costs the reference host far more accuracy than the seed added over never having had it "
        "(compare the counterfactuals above with the controllers' effect over their static twins): "
        "the host co-adapts. The fit models that as `dependence`; a policy (the heuristic's "
        "fossilize rule included) that reads the counterfactual as the seed's value overrates seeds.",
        "- What remains off: the simulator draws each host trait (initial accuracy, rate, ceiling, "
        "architecture) independently from ranges that span all recorded tasks, while real tasks "
        "tie them together; every blended simulated seed shows some reliance, while on a saturated "
        "real task (the sequence task at 100 %) none does, so the simulated share of seeds that "
        "'helped' is too high; and per-blueprint qualities rest on 1-5 judged seeds each.",
        "- The simulator is a training tool, never the judge (`../../shared/EVIDENCE.md`): claims "
        "about controllers are made on real hosts (`benchmarks/real_hosts.py`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", default="benchmarks/traces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-search", action="store_true", help="skip the blend grid search")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    fit_runs = read_summaries(Path(args.traces) / "fit")
    held = read_summaries(Path(args.traces) / "holdout")
    if not fit_runs or not held:
        print(f"no runs under {args.traces}/fit or {args.traces}/holdout", file=sys.stderr)
        return 2
    fitted, fit_report = fit(fit_runs, seed=args.seed, search=not args.no_search)
    RESULTS.mkdir(exist_ok=True)
    header = [
        "Simulator parameters fitted to real reference-host traces (benchmarks/calibration.py).",
        f"From {fit_report.runs} runs in {args.traces}/fit; see benchmarks/results/calibration.md.",
        "Use: esperd train --sim --sim-config benchmarks/results/sim_calibrated.toml ...",
    ]
    (RESULTS / "sim_calibrated.toml").write_text(to_toml(fitted, header), encoding="utf-8")
    before = discrepancy(held, simulate_like(SimConfig(), held, seed=args.seed + 7))
    after = discrepancy(held, simulate_like(fitted, held, seed=args.seed + 7))
    text = report(
        args, fitted, fit_report.notes, fit_runs, held, before, after, time.perf_counter() - started
    )
    (RESULTS / "calibration.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
