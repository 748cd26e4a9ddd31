"""Quick-start demo: esperd with the example config (embedded NATS) and simulated hosts.

    python -m esperd_examples.demo --config examples/esperd.toml [--runs 3] [--epoch-s 0.5] [--duration 0]

Starts `esperd --config FILE` as a child process, then runs simulated training hosts
(`esperd.sim.host`: layers that degrade and recover, seed slots with the real lifecycle)
that stream topology, health and state packets into it, apply the commands esperd sends
back (acking each, applied or rejected with a reason), and start a new run when one
finishes. Prints every command and, every few seconds, esperd's status. Ctrl-C stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from typing import Any

import nats

from esperd.config import load_config
from esperd.sim import SimConfig
from esperd.sim.host import SimHosts, describe_command

STATUS_EVERY_S = 5.0


async def _quiet(exc: Exception) -> None:
    del exc  # refused connections are expected while esperd starts


async def wait_for_status(url: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(
                url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=1, error_cb=_quiet
            )
            try:
                return json.loads((await nc.request("esperd.status", b"", timeout=1)).data)
            finally:
                await nc.close()
        except Exception:  # noqa: BLE001 - esperd still starting
            await asyncio.sleep(0.3)
    raise TimeoutError("esperd did not answer esperd.status")


def status_line(status: dict[str, Any]) -> str:
    by_op = status.get("decisions", {}).get("commands_by_op", {})
    return (
        f"status: runs={status['runs']} accepted={status['accepted_total']} "
        f"rejected={status['rejected_total']} "
        f"commands={status['commands_total']} {by_op} acks={status.get('acks_by_status', {})} "
        f"policy={status['policy']}"
    )


async def main_async(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    url = config.nats.servers[0]
    daemon = subprocess.Popen([sys.executable, "-m", "esperd.cli", "--config", args.config])  # noqa: ASYNC220 - returns at once
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await wait_for_status(url)
        server = "" if url == "nats://127.0.0.1:4222" else f" --server {url}"
        print(
            f"esperd is up on {url}; simulating {args.runs} training runs ({args.epoch_s}s per epoch, "
            f"40 epochs each). In another terminal:\n  .venv/bin/esperd watch{server}    "
            f".venv/bin/esperd status{server}\n",
            flush=True,
        )
        cooldown = config.scheduler.cooldown_s
        if cooldown > 4 * args.epoch_s:
            print(
                f"note: scheduler.cooldown_s = {cooldown:g}s is {cooldown / args.epoch_s:.0f} simulated "
                f"epochs: a layer waits that long before its next lifecycle command.\n",
                flush=True,
            )
        hosts = SimHosts(
            url,
            args.runs,
            config=SimConfig(run_prefix="demo"),
            seed=0,
            epoch_s=args.epoch_s,
            prefix=config.nats.subject_prefix,
            on_command=lambda *a: print(describe_command(*a), flush=True),
        )
        running = asyncio.create_task(hosts.run(stop))
        if args.duration > 0:
            loop.call_later(args.duration, stop.set)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_EVERY_S)
            print(status_line(await wait_for_status(url)), flush=True)
        stats = await running
        print(
            f"hosts: {stats.epochs} epochs, {stats.episodes_finished} runs finished, "
            f"{stats.commands} commands ({stats.applied} applied, {stats.rejected} rejected)",
            flush=True,
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(daemon.wait)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/esperd.toml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epoch-s", type=float, default=0.5, help="seconds per simulated epoch")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = Ctrl-C)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
