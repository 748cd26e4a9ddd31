"""Reference host: instrumentation overhead; accuracy/size with no seeds, the heuristic, the untrained GNN.

    .venv/bin/python benchmarks/bench_host.py [--overhead-epochs 40] [--epochs 30] [--seeds 0,1,2]
                                              [--width 8] [--threads 1] [--strict]

Overhead: two identical digits runs (same seed, same batches) trained epoch by epoch in
alternation: one bare -- no hooks, no packets, no event-loop yields -- and one
instrumented: forward hooks and gradient norms on every K-th step, one HealthBatch per
such step, a state packet per epoch, published through `HostClient` to a real
nats-server (no esperd subscribed: only the host's side is timed). The figure is the
median over epoch pairs of the training-step time ratio, in process CPU time (other
tenants of a shared machine inflate wall time at random; alternating epochs cancels the
slow drift that remains) and in wall time. Both runs must reach bit-identical losses:
telemetry reads tensors, it never changes them.

Evidence: final validation accuracy and parameter count after `--epochs` epochs with no
seeds (the bare loop), with esperd serving the heuristic policy (default rules), and with
esperd serving the untrained GNN (`policy.name = "gnn"`, weights from init seed 0),
mean over `--seeds`. esperd runs as a subprocess (`python -m esperd.cli --config`) on
the same nats-server; hosts wait 50 ms after each state packet so decisions land
before the next epoch, as they would between real (minutes-long) epochs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import nats
import torch

from esperd.client import HostClient
from esperd.ops.natsserver import NatsServer
from esperd_contracts import SeedStage
from esperd_examples.host.train import EpochReport, HostConfig, HostRun, RunReport

ROOT = Path(__file__).resolve().parents[1]

OVERHEAD_BUDGET_PCT = 5.0
DEFAULT_K = HostConfig().health_every
KS = tuple(dict.fromkeys((DEFAULT_K, 5, 1)))  # the default first
POLICIES: tuple[str | None, ...] = (None, "heuristic", "gnn")


# ------------------------------------------------------------------ overhead


async def bare_run(config: HostConfig) -> RunReport:
    return await HostRun(config, run_id="bare").run()


async def linked_run(url: str, run_id: str, config: HostConfig) -> RunReport:
    client = await HostClient.connect(url, run_id)
    try:
        return await HostRun(config, link=client).run()
    finally:
        await client.close()


@dataclass(slots=True)
class Overhead:
    health_every: int
    bare: list[EpochReport]
    instrumented: list[EpochReport]

    def ratios(self, cpu: bool) -> list[float]:
        """Instrumented / bare training-step time, per epoch pair."""
        key = (lambda e: e.train_cpu_seconds) if cpu else (lambda e: e.train_seconds)
        return [key(i) / key(b) for b, i in zip(self.bare, self.instrumented, strict=True)]

    def pct(self, cpu: bool) -> float:
        return (statistics.median(self.ratios(cpu)) - 1.0) * 100

    def interval(self, cpu: bool, level: float = 0.9, draws: int = 2000) -> tuple[float, float]:
        """Bootstrap confidence interval of the median ratio, in percent overhead."""
        ratios, rng = self.ratios(cpu), random.Random(0)
        medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
        low, high = medians[int(draws * (1 - level) / 2)], medians[int(draws * (1 + level) / 2) - 1]
        return (low - 1.0) * 100, (high - 1.0) * 100

    def accounted_pct(self) -> float:
        """Time inside the instrumentation code itself over the rest of the same steps (no noise
        from other tenants, but blind to indirect costs such as cache pollution)."""
        own = sum(e.telemetry_seconds for e in self.instrumented)
        return own / (sum(e.train_cpu_seconds for e in self.instrumented) - own) * 100

    def ms_per_step(self, reports: list[EpochReport], cpu: bool) -> float:
        seconds = [(e.train_cpu_seconds if cpu else e.train_seconds) / e.steps for e in reports]
        return statistics.median(seconds) * 1e3


async def measure_overhead(url: str, args: argparse.Namespace, k: int) -> Overhead:
    """Two identical runs, bare and instrumented, trained epoch by epoch in alternation."""
    config = HostConfig(epochs=args.overhead_epochs + 1, width=args.width, seed=0, health_every=k)
    client = await HostClient.connect(url, f"overhead-k{k}")
    try:
        bare = HostRun(replace(config, telemetry=False), run_id="bare")
        probed = HostRun(config, link=client)
        bare.start()
        probed.start()
        for epoch in range(config.epochs):
            for run in (bare, probed) if epoch % 2 else (probed, bare):  # neither always goes first
                await run.run_epoch()
        await probed.finish()
    finally:
        await client.close()
    losses = ([e.train_loss for e in run.report.epochs] for run in (bare, probed))
    if next(losses) != next(losses):
        raise SystemExit("instrumented training diverged from the bare run: telemetry changed the math")
    return Overhead(k, bare.report.epochs[1:], probed.report.epochs[1:])  # epoch 0 warms caches up


# ------------------------------------------------------------------ evidence


def daemon_toml(url: str, state_dir: Path, policy: str) -> str:
    return "\n".join(
        [
            "[nats]",
            f'servers = ["{url}"]',
            "[service]",
            f'state_dir = "{state_dir}"',
            'log_level = "warning"',
            'device = "cpu"',
            "[scheduler]",
            "min_interval_s = 0.0  # decide on every state packet: epochs here last a second",
            "cooldown_s = 0.05",
            "[policy]",
            f'name = "{policy}"',
            "",
        ]
    )


@contextlib.asynccontextmanager
async def esperd(url: str, workdir: Path, policy: str) -> AsyncIterator[Callable[[], object]]:
    """esperd serving `policy` as a subprocess; yields a coroutine factory returning its status."""
    config = workdir / f"esperd-{policy}.toml"
    config.write_text(daemon_toml(url, workdir / f"state-{policy}", policy))
    log = (workdir / f"esperd-{policy}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "esperd.cli", "--config", str(config), stdout=log, stderr=log
    )
    nc = await nats.connect(url)

    async def status() -> dict:
        return json.loads((await nc.request("esperd.status", b"", timeout=2.0)).data)

    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.returncode is not None:
                raise SystemExit(f"esperd exited with {proc.returncode}; see {log.name}")
            with contextlib.suppress(Exception):
                if (await status())["policy"]["name"] == policy:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"esperd did not answer status in 60 s; see {log.name}")
            await asyncio.sleep(0.2)
        yield status
    finally:
        await nc.close()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=30)
        log.close()


@dataclass(slots=True)
class Outcome:
    policy: str
    seed: int
    val_accuracy: float
    total_params: int
    host_params: int
    applied: int
    rejected: int
    fossilized: int
    live: int


def outcome(policy: str, seed: int, report: RunReport) -> Outcome:
    final = report.final
    stages = [s.stage for s in final.seeds]
    live = (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY)
    return Outcome(
        policy,
        seed,
        final.val_accuracy,
        final.total_params,
        final.host_params,
        report.applied,
        report.rejected,
        stages.count(SeedStage.FOSSILIZED),
        sum(stage in live for stage in stages),
    )


async def evidence(url: str, args: argparse.Namespace, workdir: Path) -> list[Outcome]:
    outcomes = []
    for policy in POLICIES:
        config = HostConfig(epochs=args.epochs, width=args.width, epoch_pause_s=0.05)
        if policy is None:
            for seed in args.seeds:
                report = await bare_run(replace(config, seed=seed, telemetry=False, epoch_pause_s=0.0))
                outcomes.append(outcome("no seeds", seed, report))
            continue
        async with esperd(url, workdir, policy) as status:
            for seed in args.seeds:
                report = await linked_run(url, f"{policy}-seed{seed}", replace(config, seed=seed))
                outcomes.append(outcome(policy, seed, report))
                reasons = collections.Counter(r.reason for r in report.commands if not r.applied)
                print(
                    f"  {policy:<9} seed {seed}: val {report.final.val_accuracy:.4f}, "
                    f"params {report.final.total_params}, commands {report.applied} applied / "
                    f"{report.rejected} rejected" + (f" {dict(reasons)}" if reasons else ""),
                    flush=True,
                )
            final = await status()  # type: ignore[misc]
            print(
                f"  esperd ({policy}): commands {final['commands_total']} "
                f"{final['decisions']['commands_by_op']}, "
                f"acks {final['acks_by_status']}",
                flush=True,
            )
    return outcomes


# ------------------------------------------------------------------ report


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def print_overhead(results: list[Overhead], pairs: int) -> None:
    print(f"\ninstrumentation overhead of training-step time ({pairs} alternating epoch pairs per K):")
    print(
        f"  {'health every':<14}{'bare ms/step':>13}{'instr. ms/step':>15}{'CPU overhead [90% CI]':>26}"
        f"{'wall':>9}{'accounted':>11}"
    )
    for r in results:
        bare, probed = r.ms_per_step(r.bare, cpu=True), r.ms_per_step(r.instrumented, cpu=True)
        low, high = r.interval(cpu=True)
        ci = f"{r.pct(cpu=True):.2f}% [{low:.1f}, {high:.1f}]"
        print(
            f"  K = {r.health_every:<10}{bare:>13.3f}{probed:>15.3f}{ci:>26}"
            f"{r.pct(cpu=False):>8.2f}%{r.accounted_pct():>10.2f}%"
        )


def print_evidence(outcomes: list[Outcome], seeds: list[int], epochs: int) -> None:
    print(f"\nevidence: digits CNN, {epochs} epochs, mean ± std over seeds {seeds}:")
    header = f"  {'policy':<11}{'val accuracy':>18}{'total params':>14}{'host params':>13}"
    print(header + f"{'applied':>9}{'rejected':>10}{'fossilized':>12}{'live':>6}")
    for policy in dict.fromkeys(o.policy for o in outcomes):
        rows = [o for o in outcomes if o.policy == policy]
        params = statistics.fmean(o.total_params for o in rows)
        print(
            f"  {policy:<11}{mean_std([o.val_accuracy for o in rows]):>18}{params:>14.0f}"
            f"{rows[0].host_params:>13}"
            f"{statistics.fmean(o.applied for o in rows):>9.1f}"
            f"{statistics.fmean(o.rejected for o in rows):>10.1f}"
            f"{statistics.fmean(o.fossilized for o in rows):>12.1f}"
            f"{statistics.fmean(o.live for o in rows):>6.1f}"
        )


async def bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-host-") as tmp:
        workdir = Path(tmp)
        server = NatsServer(work_dir=workdir)
        server.start()
        try:
            started = time.perf_counter()
            overhead = (
                [await measure_overhead(server.url, args, k) for k in KS] if args.overhead_epochs else []
            )
            if overhead:
                print_overhead(overhead, args.overhead_epochs)
            outcomes = await evidence(server.url, args, workdir) if args.epochs else []
            if outcomes:
                print_evidence(outcomes, args.seeds, args.epochs)
            print(f"\n(total {time.perf_counter() - started:.0f} s)")
        finally:
            server.stop()
    if not overhead:
        return 0
    pct = next(r for r in overhead if r.health_every == DEFAULT_K).pct(cpu=True)
    verdict = "PASS" if pct <= OVERHEAD_BUDGET_PCT else "FAIL"
    print(
        f"{verdict}  instrumentation overhead {pct:.2f}% of training-step CPU time <= "
        f"{OVERHEAD_BUDGET_PCT:.0f}% (default K = {DEFAULT_K})"
    )
    return 1 if verdict == "FAIL" and args.strict else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--overhead-epochs", type=int, default=40, help="bare/instrumented epoch pairs per K (0: skip)"
    )
    parser.add_argument(
        "--epochs", type=int, default=30, help="epochs per evidence run (0: skip the evidence)"
    )
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=8, help="the CNN's stem channels")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the overhead budget FAILs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from esperd.logs import configure_logging

    configure_logging("warning")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
        f"threads {torch.get_num_threads()}, width {args.width}"
    )
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
