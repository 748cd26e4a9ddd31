"""Run one reference-host training run against esperd (or alone).

    python -m esperd_examples.host --nats nats://127.0.0.1:4222 --run r1 --epochs 10 [--seed 0]
    python -m esperd_examples.host --no-esperd --epochs 10

Several can run at once against one esperd: give each its own --run.
Prints one line per epoch and per command; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import torch

from esperd_contracts import Blueprint
from esperd_examples.host.data import TASKS
from esperd_examples.host.train import HostConfig, HostRun, RunReport


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = HostConfig()  # the CLI's defaults are the config's, so the two cannot drift apart
    p = argparse.ArgumentParser(prog="python -m esperd_examples.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL of the broker esperd listens on")
    p.add_argument("--run", default="host-1", help="run id ([A-Za-z0-9_-]{1,64})")
    p.add_argument("--no-esperd", action="store_true", help="train alone: no NATS, no telemetry")
    p.add_argument("--task", choices=TASKS, default=d.task)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--width", type=float, default=d.width, help="the CNN's stem channels (fractional: rounded per layer)"
    )
    p.add_argument(
        "--depth", type=int, default=None, help="transformer blocks (sort) / hidden layers (teacher)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (cosine-decayed to 10%%)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--health-every", type=int, default=d.health_every, help="one HealthBatch every K steps")
    p.add_argument(
        "--cooldown-epochs",
        type=int,
        default=d.cooldown_epochs,
        help="PRUNED -> DORMANT after this many epochs",
    )
    p.add_argument(
        "--blueprints", default="", help="comma-separated subset this host implements (default all)"
    )
    p.add_argument("--degrade", default=None, help="fault injection: kill units of this layer progressively")
    p.add_argument("--degrade-max", type=float, default=d.degrade_max)
    p.add_argument(
        "--epoch-pause",
        type=float,
        default=d.epoch_pause_s,
        help="seconds to wait for commands after each epoch",
    )
    p.add_argument("--quiet", action="store_true", help="only the JSON summary")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> HostConfig:
    blueprints = tuple(Blueprint(name.strip()) for name in args.blueprints.split(",") if name.strip()) or None
    return HostConfig(
        task=args.task,
        width=args.width,
        depth=args.depth,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        telemetry=not args.no_esperd,
        health_every=args.health_every,
        cooldown_epochs=args.cooldown_epochs,
        blueprints=blueprints,
        degrade=args.degrade,
        degrade_max=args.degrade_max,
        epoch_pause_s=args.epoch_pause,
        log=None if args.quiet else lambda line: print(line, flush=True),
    )


def summary(report: RunReport) -> dict[str, object]:
    final = report.final
    return {
        "run": report.run_id,
        "epochs": len(report.epochs),
        "val_accuracy": round(final.val_accuracy, 4),
        "val_loss": round(final.val_loss, 4),
        "host_params": final.host_params,
        "total_params": final.total_params,
        "commands_applied": report.applied,
        "commands_rejected": report.rejected,
        "commands_stale": report.stale_commands,
        "health_batches": report.health_batches,
        "seeds": {str(s.layer_id): s.stage.value for s in final.seeds},
    }


async def main_async(args: argparse.Namespace) -> RunReport:
    config = config_from_args(args)
    if args.no_esperd:
        return await HostRun(config, run_id=args.run).run()
    from esperd.client import HostClient  # only needed with esperd

    client = await HostClient.connect(args.nats, args.run)
    try:
        return await HostRun(config, link=client).run()
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        report = asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
