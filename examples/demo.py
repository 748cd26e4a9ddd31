"""Quick-start demo: esperd with the example config (embedded NATS) and synthetic hosts.

    python -m examples.demo --config examples/esperd.toml [--runs 3] [--duration 0]

Starts `esperd --config FILE` as a child process, then streams topology, health and
state packets for a few synthetic training runs, applies the commands esperd sends
back (acking each), and prints what flows. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import time

import nats

from contracts import (
    AdaptationCommand,
    HealthSignal,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
    is_legal,
    next_stage,
)
from esperd.client import HostClient
from esperd.config import load_config

LAYERS = [("stem", "conv"), ("block1", "conv"), ("block2", "conv"), ("block3", "conv"), ("pool", "pool"),
          ("fc1", "linear"), ("head", "linear")]
EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (1, 3)]  # (1, 3) is a skip connection


class SyntheticRun:
    """A toy training run: layers whose health drifts, one seed slot per layer."""

    def __init__(self, client: HostClient, seed: int) -> None:
        self.client = client
        self.rng = random.Random(seed)
        self.health = [self.rng.uniform(0.5, 0.95) for _ in LAYERS]
        self.stage = [SeedStage.DORMANT] * len(LAYERS)
        self.epochs_in_stage = [0] * len(LAYERS)
        self.epoch = 0
        self.accuracy = 0.3

    def on_command(self, command: AdaptationCommand) -> None:
        layer = command.layer_id
        if layer >= len(LAYERS) or not is_legal(command.op, self.stage[layer]):
            self.client.ack(command, applied=False, reason=f"{command.op.value} illegal from "
                            f"{self.stage[layer].value if layer < len(LAYERS) else 'unknown layer'}")
            return
        self.stage[layer] = next_stage(self.stage[layer], command.op)
        self.epochs_in_stage[layer] = 0
        self.client.ack(command, applied=True)
        print(f"  {self.client.run_id}: {command.op.value:<16} layer {layer} ({LAYERS[layer][0]}) "
              f"-> {self.stage[layer].value}  [{command.policy} v{command.policy_version}, "
              f"confidence {command.confidence:.2f}]")

    def step_epoch(self) -> None:
        self.epoch += 1
        for i in range(len(LAYERS)):
            drift = -0.04 if i == 2 else 0.0  # block2 degrades: a place to grow
            if self.stage[i] in (SeedStage.BLENDING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED):
                drift = 0.05
            self.health[i] = min(1.0, max(0.0, self.health[i] + drift + self.rng.gauss(0, 0.02)))
            self.epochs_in_stage[i] += 1
            if self.stage[i] is SeedStage.GERMINATED:
                self.stage[i], self.epochs_in_stage[i] = SeedStage.TRAINING, 0
            elif self.stage[i] is SeedStage.PRUNED and self.epochs_in_stage[i] > 2:
                self.stage[i], self.epochs_in_stage[i] = SeedStage.DORMANT, 0
        self.accuracy = min(0.99, self.accuracy + 0.02 * (1 - self.accuracy) + self.rng.gauss(0, 0.003))

    def publish(self) -> None:
        self.client.send_health([
            HealthSignal(layer_id=i, health_score=h, seed_stage=self.stage[i],
                         epochs_in_stage=self.epochs_in_stage[i], total_seeds=1,
                         active_seeds=int(self.stage[i] not in (SeedStage.DORMANT, SeedStage.PRUNED)),
                         timestamp=time.time())
            for i, h in enumerate(self.health)
        ])
        self.client.send_state(SystemStatePacket(
            epoch=self.epoch, val_accuracy=self.accuracy, train_accuracy=min(1.0, self.accuracy + 0.02),
            val_loss=1.0 - self.accuracy, train_loss=0.9 - self.accuracy * 0.8,
            seeds=[SeedSlotState(layer_id=i, stage=s, epochs_in_stage=self.epochs_in_stage[i])
                   for i, s in enumerate(self.stage)],
            host_params=120_000, total_params=120_000, timestamp=time.time(),
        ))


async def run_host(url: str, run_id: str, seed: int, epoch_s: float, stop: asyncio.Event) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=-1)
    client = HostClient(nc, run_id)
    run = SyntheticRun(client, seed)
    await client.start(on_command=run.on_command)
    client.send_topology(TopologyPacket(
        nodes=[TopologyNode(layer_id=i, name=n, layer_type=t, params=10_000) for i, (n, t) in enumerate(LAYERS)],
        edges=EDGES, timestamp=time.time()))
    while not stop.is_set():
        run.step_epoch()
        run.publish()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), epoch_s)
    await client.close()


async def _quiet(exc: Exception) -> None:
    del exc  # refused connections are expected while esperd starts


async def wait_for_status(url: str, timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=1,
                                    error_cb=_quiet)
            try:
                return json.loads((await nc.request("esperd.status", b"", timeout=1)).data)
            finally:
                await nc.close()
        except Exception:  # noqa: BLE001 - esperd still starting
            await asyncio.sleep(0.3)
    raise TimeoutError("esperd did not answer esperd.status")


async def main_async(args: argparse.Namespace) -> int:
    url = load_config(args.config).nats.servers[0]
    daemon = subprocess.Popen([sys.executable, "-m", "esperd.cli", "--config", args.config])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await wait_for_status(url)
        print(f"esperd is up on {url}; streaming {args.runs} synthetic runs. Watch with:\n"
              f"  nats sub 'esper.*.command'    nats req esperd.status ''\n")
        hosts = [asyncio.create_task(run_host(url, f"demo-{i}", i, args.epoch_s, stop)) for i in range(args.runs)]
        if args.duration > 0:
            loop.call_later(args.duration, stop.set)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
            status = await wait_for_status(url)
            print(f"status: runs={status['runs']} accepted={status['accepted_total']} "
                  f"rejected={status['rejected_total']} commands={status['commands_total']} "
                  f"policy={status['policy']}")
        await asyncio.gather(*hosts, return_exceptions=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(daemon.wait)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/esperd.toml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epoch-s", type=float, default=0.5, help="seconds per synthetic epoch")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = Ctrl-C)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
