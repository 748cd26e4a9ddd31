"""Record real host traces for simulator calibration: reference hosts driven through a real esperd.

    python benchmarks/record_traces.py --out benchmarks/traces [--quick]

For each task and controller, one esperd serves in this process (over a private nats-server)
and the reference host (`examples/host`, real PyTorch training on CPU) runs each seed through
it over NATS; `esperd.ops.traces.TraceTap` writes every message of every run to
`<out>/<split>/<run>.jsonl`. Controllers:

  static     esperd connected but never acts (WAIT): the host's own learning curve;
  heuristic  the rule-based policy, as esperd serves it by default;
  random     uniform over the legal actions at each decision (levers uniform);
  manual     a fixed plan per seed: two seeds germinated at epoch 3 on two layers, blueprints
             cycling through the ones that fit each layer, advanced after 2 epochs of training,
             fossilized after one epoch of probation -- whatever they did (a sweep of where and
             what, so that every layer kind and blueprint gets measured);
  lever-sweep  the manual plan (the default-lever twin, named manual) and, for each variant of
             --lever-variants (esperd.sim.policies.LEVER_VARIANTS), the same plan with ONE
             optional lever of every GERMINATE at a non-default value (runs named
             lever-<variant>): paired by seed, they show what each lever does on a real host
             (what `esperd sim calibrate` fits the simulator's lever parameters from).

Seeds listed in --holdout-seeds go to `<out>/holdout/` (never used to fit), the rest to
`<out>/fit/`. A seed's manual plan depends only on --seeds, so a resumed recording keeps the
plans (and the lever variants their twins'). Each run is recorded once; an existing trace file
(`.jsonl`, or `.jsonl.gz` as committed: `gzip -9 <out>/*/*.jsonl`) is skipped, so an
interrupted recording resumes. The
default recording (96 runs) took about 75 minutes on this 2-core VM, shared. The lever traces:

    python benchmarks/record_traces.py --out benchmarks/traces/levers --controllers lever-sweep \
        --tasks digits:2:16 --seeds 0-19 --holdout-seeds 12-19 --concurrency 1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import nats
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esperd.analyzer.observation import (
    ACTION_WIDTH,
    LEVER_COLUMN,
    NODE_FEATURE_INDEX,
    OP_INDEX,
    OPTIONAL_LEVERS,
    Observation,
)
from esperd.client import HostClient
from esperd.config import config_from_dict
from esperd.logs import configure_logging
from esperd.ops.natsserver import NatsServer, free_port
from esperd.ops.traces import TraceTap
from esperd.policy.base import ActResult, build_decisions
from esperd.service import Service
from esperd.sim.policies import LEVER_PREFIX, LEVER_VARIANTS, RandomPolicy, lever_plan_policy
from esperd_contracts import Blueprint, Op
from esperd_examples.host.data import load_task
from esperd_examples.host.models import build_model
from esperd_examples.host.train import HostConfig, HostRun

CONTROLLERS = ("static", "heuristic", "random", "manual")
LEVER_SWEEP = "lever-sweep"  # manual + one lever-<variant> controller per variant
_EIS = NODE_FEATURE_INDEX["epochs_in_stage"]


# ------------------------------------------------------------------ controllers esperd serves


class _RowsBundle:
    """A non-learnable PolicyBundle from a function of observations to action rows."""

    is_learnable = False
    is_recurrent = False
    runs_inline = False
    network = None
    version = 1

    def __init__(self, name: str) -> None:
        self.name = name
        self.device = torch.device("cpu")

    def rows(self, observations: Sequence[Observation]) -> np.ndarray:
        raise NotImplementedError

    def act(self, observations: Sequence[Observation], deterministic: bool = False, hidden=None) -> ActResult:  # type: ignore[no-untyped-def]
        del deterministic, hidden
        rows = np.asarray(self.rows(observations), dtype=np.int64).reshape(len(observations), -1)
        # A row without the optional levers' columns leaves them to the host (not sent).
        levers = frozenset(name for name in OPTIONAL_LEVERS if LEVER_COLUMN[name] < rows.shape[1])
        padded = np.zeros((len(observations), ACTION_WIDTH), dtype=np.int64)
        padded[:, : rows.shape[1]] = rows
        actions = torch.from_numpy(padded)
        ones, zeros = torch.ones(len(observations)), torch.zeros(len(observations))
        decisions = build_decisions(
            observations,
            actions,
            confidences=ones,
            urgencies=ones,
            log_probs=zeros,
            values=zeros,
            policy=self.name,
            version=self.version,
            levers=levers,
        )
        return ActResult(actions, zeros, zeros, ones, ones, decisions)

    def forget(self, run_ids: Sequence[str]) -> None:
        del run_ids

    def state_dict(self) -> dict:
        return {}

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(())


class WaitBundle(_RowsBundle):
    def __init__(self) -> None:
        super().__init__("static")

    def rows(self, observations: Sequence[Observation]) -> np.ndarray:
        rows = np.zeros((len(observations), 2), dtype=np.int64)
        rows[:, 1] = OP_INDEX[Op.WAIT]
        return rows


class RandomBundle(_RowsBundle):
    def __init__(self, seed: int, levers: bool = False) -> None:
        super().__init__("random")
        # Without levers, as the committed traces were recorded (esperd's random before issue 16).
        self.policy = RandomPolicy(seed, levers=levers)

    def rows(self, observations: Sequence[Observation]) -> np.ndarray:
        return self.policy.act(observations)


class PlanBundle(_RowsBundle):
    """esperd serving the simulator's FixedPlanPolicy: the manual germinations (`variant`: with
    one lever varied, esperd.sim.policies.LEVER_VARIANTS)."""

    def __init__(self, plans: Mapping[str, Sequence[tuple[int, Blueprint]]], variant: str = "manual") -> None:
        super().__init__("manual")  # the commands' policy; the run id names the variant
        self.policy = lever_plan_policy(variant, plans, epoch=3, train_epochs=2)

    def rows(self, observations: Sequence[Observation]) -> np.ndarray:
        return self.policy.act(observations)


def manual_plans(
    task: str, width: int, seeds: Sequence[int], run_id
) -> dict[str, list[tuple[int, Blueprint]]]:  # type: ignore[no-untyped-def]
    """Two planned seeds per run: consecutive (layer, blueprint) pairs of a cycle over every slotted
    layer and the blueprints of its family, so the sweep covers layers and blueprints evenly."""
    model = build_model(task, 10, width=width)
    pairs = []
    for layer in model.layers:
        if layer.slot is None:
            continue
        family = layer.slot.family
        pairs += [(layer.layer_id, bp) for bp in Blueprint if bp.family is family]
    rng = np.random.default_rng(12345)
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    cycle = itertools.cycle(order)
    plans = {}
    for seed in seeds:
        first = next(cycle)
        second = next(p for p in cycle if p[0] != first[0])
        plans[run_id(seed)] = [first, second]
    return plans


def controller_bundle(  # type: ignore[no-untyped-def]
    name: str, plans: Mapping[str, Sequence[tuple[int, Blueprint]]], seed: int, random_levers: bool = False
):
    if name == "static":
        return WaitBundle()
    if name == "random":
        return RandomBundle(seed, random_levers)
    if name == "manual":
        return PlanBundle(plans)
    if name.startswith(LEVER_PREFIX):
        return PlanBundle(plans, name.removeprefix(LEVER_PREFIX))
    return None  # heuristic: what esperd serves


# ------------------------------------------------------------------ recording


def daemon_config(url: str, state_dir: Path):  # type: ignore[no-untyped-def]
    return config_from_dict(
        {
            "nats": {"servers": [url], "reconnect_wait_s": 0.2},
            "service": {"state_dir": str(state_dir), "use_uvloop": False, "log_level": "warning"},
            # Host epochs take a fraction of a second here: decide on every packet, and let the
            # optimistic stage view (not a wall-clock cooldown) keep a layer from double commands.
            "scheduler": {"min_interval_s": 0.02, "cooldown_s": 0.05, "max_wait_ms": 2.0},
            "policy": {"name": "heuristic"},
        }
    )


async def run_host(url: str, config: HostConfig, run_id: str) -> float:
    """One real training run linked to esperd; returns its final validation accuracy."""
    val_samples = int(load_task(config.task).y_val.shape[0])
    client = await HostClient.connect(url, run_id, total_epochs=config.epochs, val_samples=val_samples)
    try:
        report = await HostRun(config, link=client).run()
    finally:
        await client.close()
    return report.final.val_accuracy


async def record_controller(
    url: str,
    controller: str,
    task: str,
    width: int,
    epochs: int,
    seeds: Sequence[int],
    holdout: set[int],
    out: Path,
    concurrency: int,
    random_levers: bool = False,
) -> None:
    def run_id(seed: int) -> str:
        return f"{task}-w{width}-{controller}-s{seed}"

    def recorded(seed: int) -> bool:
        path = out / _split(seed, holdout) / f"{run_id(seed)}.jsonl"
        return path.exists() or path.with_name(path.name + ".gz").exists()

    todo = [s for s in seeds if not recorded(s)]
    if not todo:
        return
    # Planned over every seed, not only those left to record: a seed's plan (and its lever
    # variants') stays the same when a recording resumes.
    planned = controller == "manual" or controller.startswith(LEVER_PREFIX)
    plans = manual_plans(task, width, seeds, run_id) if planned else {}
    with tempfile.TemporaryDirectory() as state:
        service = Service(daemon_config(url, Path(state)), env={})
        served = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        bundle = controller_bundle(controller, plans, seed=min(todo), random_levers=random_levers)
        if bundle is not None:
            service.decisions.swap_policy(bundle)
        nc = await nats.connect(url)
        splits = {run_id(s): _split(s, holdout) for s in todo}
        tap = TraceTap(nc, out, route=splits.get)  # runs of other controllers are not ours: dropped
        await tap.start()
        try:
            gate = asyncio.Semaphore(concurrency)

            async def one(seed: int) -> None:
                async with gate:
                    started = time.perf_counter()
                    config = HostConfig(
                        task=task, width=width, epochs=epochs, seed=seed, epoch_pause_s=0.1, log=None
                    )
                    accuracy = await run_host(url, config, run_id(seed))
                    print(
                        f"  {run_id(seed)}: val acc {accuracy:.4f} ({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )

            await asyncio.gather(*(one(seed) for seed in todo))
            await asyncio.sleep(0.5)  # the last acks and packets reach the taps
        finally:
            await tap.stop()
            await nc.close()
            service.request_stop()
            await asyncio.wait_for(served, 30)


def _split(seed: int, holdout: set[int]) -> str:
    return "holdout" if seed in holdout else "fit"


def controllers(names: str, variants: str) -> list[str]:
    """The controllers to record, lever-sweep expanded into manual + lever-<variant> each."""
    out: list[str] = []
    for name in names.split(","):
        if name == LEVER_SWEEP:
            unknown = set(variants.split(",")) - set(LEVER_VARIANTS)
            if unknown:
                known = ", ".join(LEVER_VARIANTS)
                raise SystemExit(f"unknown lever variants {sorted(unknown)}; known: {known}")
            out += ["manual"] + [LEVER_PREFIX + v for v in variants.split(",")]
        elif name in CONTROLLERS:
            out.append(name)
        else:
            raise SystemExit(f"unknown controller {name!r}: {', '.join(CONTROLLERS)}, {LEVER_SWEEP}")
    return list(dict.fromkeys(out))


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/traces"))
    p.add_argument(
        "--tasks",
        default="digits:2:20,sequence:0:12",
        help="task:width:epochs,... (width 0: the task's default)",
    )
    p.add_argument(
        "--controllers", default=",".join(CONTROLLERS), help=f"of {', '.join(CONTROLLERS)}, {LEVER_SWEEP}"
    )
    p.add_argument(
        "--lever-variants",
        default="shared,lr0p5,lr2,steep0p5,steep2,dwell1,dwell5",
        help=f"the variants {LEVER_SWEEP} records, of {', '.join(LEVER_VARIANTS)}",
    )
    p.add_argument("--seeds", default="0-11")
    p.add_argument("--holdout-seeds", default="8-11", help="recorded under <out>/holdout/, never fitted")
    p.add_argument("--concurrency", type=int, default=2, help="host runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quick", action="store_true", help="one task, 2 seeds, 6 epochs: a smoke test")
    p.add_argument(
        "--random-levers",
        action="store_true",
        help="the random controller draws every optional lever too (traces to fit the levers from)",
    )
    return p.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    configure_logging("warning", "console")
    tasks = [tuple(t.split(":")) for t in args.tasks.split(",")]
    seeds, holdout = parse_seeds(args.seeds), set(parse_seeds(args.holdout_seeds))
    if args.quick:
        tasks, seeds, holdout = [("digits", "2", "6")], [0, 1], {1}
    with tempfile.TemporaryDirectory() as work:
        server = NatsServer(port=free_port(), work_dir=Path(work))
        server.start()
        try:
            for task, width, epochs in tasks:
                width_value = int(width) or HostConfig().width
                for controller in controllers(args.controllers, args.lever_variants):
                    print(f"{task} width {width_value}, {epochs} epochs, {controller}", flush=True)
                    await record_controller(
                        server.url,
                        controller,
                        task,
                        width_value,
                        int(epochs),
                        seeds,
                        holdout,
                        args.out,
                        args.concurrency,
                        args.random_levers,
                    )
        finally:
            server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
