"""Online learning from real runs: esperd serves a GNN and learns (PPO) from the runs it steers.

    python benchmarks/online_learning.py --checkpoint benchmarks/results/gnn_calibrated.safetensors \\
        --runs 100 --concurrency 3

Two arms on the same run seeds, one after the other, each with its own esperd (in this process,
over a private nats-server) and the reference host (`examples/host`, real PyTorch training):

  frozen    the starting checkpoint served as is (sampling its actions), learner off;
  learning  the same checkpoint served with `[learner] algorithm = "ppo"`: every decision is
            recorded, rewarded from the run's later state packets, and PPO updates swap new
            weights in while the runs go on.

Runs stream through `--concurrency` at a time, in seed order. Writes
`benchmarks/results/online_learning.json` (one record per run), `online_learning.md` (outcome by
run index in blocks, learning minus frozen paired by seed with a bootstrap 95% interval) and the
learner's final weights as `benchmarks/results/gnn_online.safetensors`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from esperd.client import HostClient  # noqa: E402
from esperd.config import config_from_dict  # noqa: E402
from esperd.logs import configure_logging  # noqa: E402
from esperd.ops.natsserver import NatsServer  # noqa: E402
from esperd.service import Service  # noqa: E402
from esperd_examples.host.data import load_task  # noqa: E402
from esperd_examples.host.train import HostConfig, HostRun  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def daemon_config(url: str, state_dir: Path, args: argparse.Namespace, learning: bool) -> Any:
    learner: dict[str, Any] = {"algorithm": "ppo" if learning else "off", "checkpoint_interval_s": 60.0}
    learner["rewards"] = {"mode": "shaped", "shaping_weight": 0.2}
    learner["ppo"] = {
        "lr": args.lr,
        "target_kl": 0.02,
        "entropy_coef": 0.0,
        "rollout_size": args.rollout,
        "minibatch_size": min(64, args.rollout),
        "warmup_updates": 0,
    }
    return config_from_dict(
        {
            "nats": {"servers": [url], "reconnect_wait_s": 0.2},
            "service": {
                "state_dir": str(state_dir),
                "use_uvloop": False,
                "log_level": "warning",
                "torch_threads": 1,  # more threads than cores only spin on a shared machine
            },
            "scheduler": {"min_interval_s": 0.02, "cooldown_s": 0.05, "max_wait_ms": 2.0},
            "policy": {
                "name": "gnn",
                "hidden_size": args.hidden,
                "checkpoint": str(args.checkpoint),
                "fallback": "heuristic",
                "deterministic": False,
            },
            "learner": learner,
        }
    )


async def one_run(url: str, task: str, width: int, epochs: int, seed: int, arm: str) -> dict[str, Any]:
    run_id = f"online-{arm}-{task}-w{width}-s{seed}"
    config = HostConfig(task=task, width=width, epochs=epochs, seed=seed, epoch_pause_s=0.1, log=None)
    val_samples = int(load_task(task).y_val.shape[0])
    client = await HostClient.connect(url, run_id, total_epochs=epochs, val_samples=val_samples)
    try:
        report = await HostRun(config, link=client).run()
    finally:
        await client.close()
    final = report.final
    versions = {r.command.policy_version for r in report.commands}
    return {
        "arm": arm,
        "seed": seed,
        "val_accuracy": final.val_accuracy,
        "val_loss": final.val_loss,
        "host_params": final.host_params,
        "total_params": final.total_params,
        "applied": report.applied,
        "rejected": report.rejected,
        "policy_versions": sorted(versions),
    }


async def run_arm(url: str, args: argparse.Namespace, arm: str, seeds: list[int]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as state:
        service = Service(daemon_config(url, Path(state), args, learning=arm == "learning"), env={})
        served = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 60)
        if service.policy_fallback_reason:
            raise SystemExit(f"the checkpoint did not load: {service.policy_fallback_reason}")
        gate = asyncio.Semaphore(args.concurrency)
        started = time.perf_counter()

        async def one(index: int, seed: int) -> None:
            async with gate:
                record = await one_run(url, args.task, args.width, args.epochs, seed, arm)
                record["index"] = index
                record["version_at_end"] = service.decisions.policy.version
                results.append(record)
                elapsed = time.perf_counter() - started
                print(
                    f"  {arm} #{index:3d} seed {seed}: acc {record['val_accuracy']:.4f} params "
                    f"{record['total_params']} v{record['version_at_end']} ({elapsed:.0f} s)",
                    flush=True,
                )

        try:
            await asyncio.gather(*(one(i, s) for i, s in enumerate(seeds)))
        finally:
            status = service.status()
            service.request_stop()
            await asyncio.wait_for(served, 120)
        if arm == "learning":
            saved = Path(state) / "learner" / "policy.safetensors"
            if saved.exists():
                shutil.copy(saved, RESULTS / "gnn_online.safetensors")
            learner = status.learner
            print(f"  learner: {learner}", flush=True)
    return sorted(results, key=lambda r: r["index"])


def bootstrap(diffs: np.ndarray, rng: np.random.Generator, n: int = 10_000) -> tuple[float, float]:
    if diffs.size == 0:
        return float("nan"), float("nan")
    means = rng.choice(diffs, (n, diffs.size)).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def report(args: argparse.Namespace, frozen: list[dict], learning: list[dict], seconds: float) -> str:
    rng = np.random.default_rng(0)
    f = np.array([r["val_accuracy"] for r in frozen])
    lr_ = np.array([r["val_accuracy"] for r in learning])
    fp = np.array([r["total_params"] / r["host_params"] - 1 for r in frozen])
    lp = np.array([r["total_params"] / r["host_params"] - 1 for r in learning])
    block = args.block
    lines = [
        "# Online learning from real runs",
        "",
        "```",
        "python benchmarks/online_learning.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Task {args.task} (width {args.width}), {args.epochs} epochs per run, {len(f)} runs per arm on the "
        f"same seeds ({args.seed0}..{args.seed0 + len(f) - 1}), {args.concurrency} at a time; starting "
        f"checkpoint `{args.checkpoint}` (served sampling); learning arm: PPO, rollout {args.rollout}, "
        f"LR {args.lr}, shaped reward. {seconds / 60:.0f} min in all.",
        "",
        "| runs | frozen acc | learning acc | learning - frozen (paired) | 95% CI | frozen added params | "
        "learning added params |",
        "|---|---|---|---|---|---|---|",
    ]
    for start in range(0, len(f), block):
        sl = slice(start, start + block)
        d = lr_[sl] - f[sl]
        lo, hi = bootstrap(d, rng)
        lines.append(
            f"| {start}-{min(start + block, len(f)) - 1} | {f[sl].mean():.4f} | {lr_[sl].mean():.4f} | "
            f"{d.mean():+.4f} | [{lo:+.4f}, {hi:+.4f}] | {fp[sl].mean():+.1%} | {lp[sl].mean():+.1%} |"
        )
    d = lr_ - f
    lo, hi = bootstrap(d, rng)
    lines += [
        f"| all | {f.mean():.4f} | {lr_.mean():.4f} | {d.mean():+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
        f"{fp.mean():+.1%} | {lp.mean():+.1%} |",
        "",
        f"Slope of (learning - frozen) over run index: {np.polyfit(np.arange(d.size), d, 1)[0] * 100:+.4f} "
        "per 100 runs. Final learner version: "
        f"{max(r['version_at_end'] for r in learning)}.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--hidden", type=int, default=64, help="the checkpoint's hidden size")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--seed0", type=int, default=5000, help="first run seed (never used for fitting)")
    p.add_argument("--task", default="digits")
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--rollout", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--arms", default="frozen,learning")
    return p.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    configure_logging("warning", "console")
    seeds = list(range(args.seed0, args.seed0 + args.runs))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "online_learning.json"
    records: dict[str, list[dict]] = json.loads(out.read_text()) if out.exists() else {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        server = NatsServer(work_dir=Path(work))
        server.start()
        try:
            for arm in args.arms.split(","):
                print(f"{arm}: {len(seeds)} runs", flush=True)
                records[arm] = await run_arm(server.url, args, arm, seeds)
                out.write_text(json.dumps(records, indent=1))
        finally:
            server.stop()
    if "frozen" in records and "learning" in records:
        text = report(args, records["frozen"], records["learning"], time.perf_counter() - started)
        (RESULTS / "online_learning.md").write_text(text)
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
