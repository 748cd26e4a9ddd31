"""Where growth matters: manual germinations by layer and blueprint on the real benchmark hosts.

    .venv/bin/python benchmarks/germination_sweep.py [--tasks digits,sort,teacher] [--seeds 0-4]
        [--blueprints all|a,b,...] [--epoch 2] [--jobs 2] [--out benchmarks/results] [--quick]

For each task of `examples/host/tasks.py` and each run seed: the static small host, and the
same host with one seed germinated by hand -- every slotted layer x every blueprint of its
family (or --blueprints) -- at epoch --epoch, trained 2 epochs, blended over the standard
tempo (sigmoid), fossilized at probation (`esperd_examples.host.schedule`, no esperd, no telemetry
decisions). Each germination is compared with the static host on the same seed: the paired
mean difference in final validation accuracy and its bootstrap 95% interval. Per task the
best layer is then compared, paired, with the best germination anywhere else: the claim
"seeds at the bottleneck help more than seeds elsewhere".

Runs go to --jobs worker processes of one torch thread each. Writes
<out>/germination_sweep.md and .json (raw per-run results); a rerun with the same --out
reuses the runs already in the .json (delete it to start over).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.hoststats import Interval, paired, parse_seeds  # noqa: E402
from esperd_contracts import Blueprint, blueprints_for  # noqa: E402
from esperd_examples.host.data import load_task  # noqa: E402
from esperd_examples.host.models import build_model  # noqa: E402
from esperd_examples.host.tasks import BENCHMARK_TASKS, TaskSpec, benchmark_task  # noqa: E402

NONE = "none"


def sweep_arms(spec: TaskSpec, blueprints: str) -> list[tuple[str, str]]:
    """(layer, blueprint) pairs to try on `spec`'s host: every slotted layer x its family's blueprints."""
    model = build_model(spec.task, load_task(spec.task).classes, width=spec.width, depth=spec.depth)
    wanted = None if blueprints == "all" else {Blueprint(b.strip()) for b in blueprints.split(",")}
    arms = []
    for layer in model.layers:
        if layer.slot is None:
            continue
        for bp in blueprints_for(layer.slot.family):
            if wanted is None or bp in wanted:
                arms.append((layer.name, bp.value))
    return arms


def run_one(task: str, seed: int, layer: str, blueprint: str, epoch: int) -> dict[str, Any]:
    """One run (in a worker process): the static host, or one manual germination."""
    import torch

    from esperd_examples.host.schedule import FixedSchedule, Germination, run_scheduled
    from esperd_examples.host.train import HostRun

    torch.set_num_threads(1)
    spec = benchmark_task(task)
    plan = [] if layer == NONE else [Germination(layer, Blueprint(blueprint), epoch=epoch)]
    started = time.perf_counter()
    run = HostRun(spec.config(seed, telemetry=False))
    report = asyncio.run(run_scheduled(run, FixedSchedule(plan)))
    final = report.final
    return {
        "task": task,
        "seed": seed,
        "layer": layer,
        "blueprint": blueprint,
        "epoch": epoch,
        "val_accuracy": final.val_accuracy,
        "val_loss": final.val_loss,
        "train_accuracy": final.train_accuracy,
        "total_params": final.total_params,
        "host_params": final.host_params,
        "rejected": report.rejected,
        "wall_s": time.perf_counter() - started,
    }


def key(row: dict[str, Any]) -> tuple[str, int, str, str, int]:
    return (row["task"], row["seed"], row["layer"], row["blueprint"], row["epoch"])


def run_all(
    jobs: list[tuple[str, int, str, str, int]], workers: int, done: list[dict[str, Any]], out: Path
) -> None:
    """Run the jobs not yet in `done`, saving after each so that an interrupted sweep resumes."""
    have = {key(row) for row in done}
    todo = [job for job in jobs if job not in have]
    print(
        f"{len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to go on {workers} workers",
        flush=True,
    )
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_one, *job) for job in todo]
        for i, future in enumerate(as_completed(futures), 1):
            row = future.result()
            done.append(row)
            if i % 10 == 0 or i == len(todo):
                elapsed = time.perf_counter() - started
                print(f"  {i}/{len(todo)} runs, {elapsed:.0f} s", flush=True)
                save_json(done, out)


def save_json(rows: list[dict[str, Any]], out: Path) -> None:
    path = out / "germination_sweep.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(rows, key=key), indent=1))
    tmp.replace(path)


def accuracy_by_seed(rows: list[dict[str, Any]], task: str, layer: str, blueprint: str) -> dict[int, float]:
    return {
        r["seed"]: r["val_accuracy"]
        for r in rows
        if r["task"] == task and r["layer"] == layer and r["blueprint"] == blueprint
    }


def task_report(spec: TaskSpec, rows: list[dict[str, Any]], seeds: list[int], epoch: int) -> list[str]:
    rows = [r for r in rows if r["task"] == spec.name and r["seed"] in seeds and r["epoch"] == epoch]
    base = accuracy_by_seed(rows, spec.name, NONE, NONE)
    base_params = spec.params()
    arms = sorted({(r["layer"], r["blueprint"]) for r in rows if r["layer"] != NONE})
    effects: dict[tuple[str, str], Interval] = {}
    added: dict[tuple[str, str], int] = {}
    for arm in arms:
        effects[arm] = paired(accuracy_by_seed(rows, spec.name, *arm), base)
        added[arm] = max(r["total_params"] for r in rows if (r["layer"], r["blueprint"]) == arm) - base_params
    lines = [
        f"### {spec.name}: {spec.summary}",
        "",
        (
            f"Static host: {base_params} parameters, val accuracy {_mean(base.values()):.4f} "
            f"over seeds {_seed_text(seeds)} ({spec.epochs} epochs, lr {spec.lr}, batch {spec.batch_size})."
        ),
        "",
        "| layer | blueprint | added params | Δ val acc vs static, points [95% CI] |",
        "|---|---|---|---|",
    ]
    for arm in sorted(arms, key=lambda a: -effects[a].mean):
        lines.append(f"| {arm[0]} | {arm[1]} | +{added[arm]} | {effects[arm].format()} |")
    lines += ["", *bottleneck_lines(spec, rows, effects)]
    return lines


def bottleneck_lines(
    spec: TaskSpec, rows: list[dict[str, Any]], effects: dict[tuple[str, str], Interval]
) -> list[str]:
    """Per layer its best blueprint; then the best layer against the best germination elsewhere, paired."""
    best: dict[str, tuple[str, str]] = {}
    for arm, interval in effects.items():
        if arm[0] not in best or interval.mean > effects[best[arm[0]]].mean:
            best[arm[0]] = arm
    if len(best) < 2:
        return []
    ranked = sorted(best.values(), key=lambda a: -effects[a].mean)
    top, runner_up = ranked[0], ranked[1]
    layer_means = {layer: _mean([effects[a].mean for a in effects if a[0] == layer]) for layer in best}
    diff = paired(accuracy_by_seed(rows, spec.name, *top), accuracy_by_seed(rows, spec.name, *runner_up))
    lines = [
        "| layer | best blueprint | its Δ (points) | mean Δ over the layer's blueprints |",
        "|---|---|---|---|",
    ]
    for arm in ranked:
        lines.append(f"| {arm[0]} | {arm[1]} | {effects[arm].format()} | {layer_means[arm[0]] * 100:+.2f} |")
    verdict = "holds" if diff.excludes_zero and diff.mean > 0 else "is not shown (the interval includes 0)"
    lines += [
        "",
        f"Best germination: {top[1]} at {top[0]}; best elsewhere: {runner_up[1]} at {runner_up[0]}. "
        f"Paired difference {diff.format()} points: "
        f'"a seed at {top[0]} helps more than anywhere else" {verdict}.'
        + (f" (The task's declared bottleneck is {spec.bottleneck}.)" if spec.bottleneck else ""),
        "",
    ]
    return lines


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _seed_text(seeds: list[int]) -> str:
    return (
        f"{min(seeds)}-{max(seeds)}"
        if seeds == list(range(min(seeds), max(seeds) + 1))
        else ",".join(map(str, seeds))
    )


def write_report(
    specs: list[TaskSpec], rows: list[dict[str, Any]], seeds: list[int], args: argparse.Namespace
) -> Path:
    lines = [
        "# Germination sweep: where growth matters on the real benchmark hosts",
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/germination_sweep.py', *sys.argv[1:]])}`",
        "",
        (
            f"One seed germinated by hand at epoch {args.epoch} on one layer, trained 2 epochs, blended over "
            "the standard tempo (5 epochs, sigmoid), fossilized at probation, whatever it did "
            "(`examples/host/schedule.py`); compared with the static host on the same run seed. "
            f"Run seeds {_seed_text(seeds)} (the task recipes were tuned on seeds 100 and up). "
            "Differences are in accuracy points (100 x), mean over seeds with a bootstrap 95% interval."
        ),
        "",
    ]
    for spec in specs:
        lines += task_report(spec, rows, seeds, args.epoch)
    path = args.out / "germination_sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(BENCHMARK_TASKS))
    p.add_argument("--seeds", default="0-4")
    p.add_argument("--blueprints", default="all", help="all, or a comma-separated subset")
    p.add_argument("--epoch", type=int, default=2, help="germinate before this epoch")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--quick", action="store_true", help="one task, 2 seeds, 2 blueprints: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.blueprints = "teacher", "0-1", "mlp,lora"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    specs = [benchmark_task(name.strip()) for name in args.tasks.split(",")]
    seeds = parse_seeds(args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    existing = args.out / "germination_sweep.json"
    done: list[dict[str, Any]] = json.loads(existing.read_text()) if existing.exists() else []
    jobs = []
    for spec in specs:
        arms = [(NONE, NONE), *sweep_arms(spec, args.blueprints)]
        jobs += [(spec.name, seed, layer, bp, args.epoch) for layer, bp in arms for seed in seeds]
    run_all(jobs, args.jobs, done, args.out)
    save_json(done, args.out)
    path = write_report(specs, done, seeds, args)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
