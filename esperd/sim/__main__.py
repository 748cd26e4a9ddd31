"""Run simulated hosts against a running esperd over NATS.

    python -m esperd.sim --nats nats://127.0.0.1:4222 --runs 4 --epoch-s 0.5

Prints every command received (and whether it was applied) and a summary at the end.
Ctrl-C stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from esperd.sim.config import SimConfig
from esperd.sim.host import SimHosts, describe_command
from esperd_contracts import DEFAULT_PREFIX


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL")
    parser.add_argument("--runs", type=int, default=4, help="concurrent simulated runs")
    parser.add_argument("--epoch-s", type=float, default=0.5, help="seconds per simulated epoch")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per episode (run)")
    parser.add_argument("--episodes", type=int, default=0, help="episodes per run slot (0 = forever)")
    parser.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0 = never)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="subject prefix")
    parser.add_argument(
        "--run-prefix", default="sim", help="run ids are <run-prefix>-<session>-<i>-<episode>"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print each command")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    config = SimConfig(epochs=args.epochs, run_prefix=args.run_prefix)
    on_command = None if args.quiet else (lambda *a: print(describe_command(*a), flush=True))
    hosts = SimHosts(
        args.nats,
        args.runs,
        config=config,
        seed=args.seed,
        epoch_s=args.epoch_s,
        episodes=args.episodes,
        prefix=args.prefix,
        on_command=on_command,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if args.duration > 0:
        loop.call_later(args.duration, stop.set)
    print(f"simulating {args.runs} runs against {args.nats} ({args.epoch_s}s per epoch)", flush=True)
    stats = await hosts.run(stop)
    print(
        f"epochs {stats.epochs}, episodes finished {stats.episodes_finished}, commands {stats.commands} "
        f"(applied {stats.applied}, rejected {stats.rejected}) by op {stats.by_op}, "
        f"connection errors {stats.connection_errors}",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
