"""Controllers compared on real training runs: real PyTorch hosts driven through a real esperd over NATS.

    .venv/bin/python benchmarks/real_hosts.py [--tasks digits,sort,teacher] [--seeds 0-7]
        [--controllers all|a,b,...] [--jobs 2] [--gnn-checkpoint PATH] [--gnn-online-checkpoint PATH]
        [--out benchmarks/results] [--traces benchmarks/traces/real_hosts] [--fresh] [--quick]

Every task of `examples/host/tasks.py` runs every run seed under every controller; a run seed
fixes the data, the host's init and its batch order, so arms are paired by seed:

  static-small       the host as it starts, no seeds (the floor)
  static-reshuffled  static small again, same init, another batch order (seed + 1000): the A/A
                     control. It changes nothing that matters, so how far its worst seed lands
                     below static small is the noise floor of the safety check
  static-large       a static model with about twice the small model's parameters (the ceiling)
  matched-heuristic  "static matched": a static model whose parameter count is the one the
                     heuristic's run of the same seed ended with (matched per seed; any grown
                     controller X can be matched with `matched-X`)
  fixed              a fixed schedule, no telemetry: one seed per slotted layer (conv_light on
                     conv layers, mlp_small on the others) at epoch 2, advanced after 2 epochs,
                     fossilized at probation (`TaskSpec.fixed_schedule`); its commands travel
                     over NATS on the run's command subject like esperd's
  random             esperd serving the registered `random` policy (uniform over legal actions)
  heuristic          esperd serving the heuristic (its defaults)
  gnn-sim            esperd serving the GNN trained in the simulator (--gnn-checkpoint; by default
                     the one trained on the calibrated simulator, benchmarks/results/
                     gnn_calibrated.safetensors; trained first with the README's recipe if absent)
  gnn-real           esperd serving the GNN fitted to the heuristic's decisions on real runs of
                     the tuning seeds (benchmarks/real_imitation.py; --gnn-real-checkpoint,
                     benchmarks/results/gnn_real_bc.safetensors; skipped, and said so, when absent):
                     where online fine-tuning starts
  gnn-online         esperd serving the GNN after online fine-tuning on real runs
                     (--gnn-online-checkpoint; skipped, and said so, when absent)

One nats-server (started here, on a free loopback port) carries everything; each esperd
controller is an esperd `Service` in this process with its own subject prefix
(`bench.<controller>`), so all of them serve at once. Host runs go to --jobs worker
processes of one torch thread each; every run, static ones included, speaks the wire
contract (topology, health, state, acks), and `esperd.ops.traces.TraceTap` writes each run's
messages to <traces>/<task>/<controller>/<run>.jsonl for simulator calibration.

Each finished run is appended to <out>/real_hosts.runs.jsonl; a rerun skips the runs already
there with the same settings (so an interrupted benchmark resumes and one can add tasks,
controllers or seeds), unless --fresh. Each run records the version of the code it ran (a hash
of examples/host, and of esperd/ and contracts/ for esperd's controllers); a stored run from
other code is kept unless --rerun-stale-code, and the report lists such runs by controller.
Then <out>/real_hosts.md and .json (per task: final
validation accuracy and loss, total and added parameters, wall time, commands sent and
rejected; paired differences against the heuristic and against static small with bootstrap
95% intervals; the safety check and the issue's goals) and real_hosts.png (accuracy against
parameters; needs matplotlib, checked before any run starts: `pip install -e '.[plot]'`).

--quick: every controller on digits, seeds 0-1, 12 epochs: a smoke test (a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.hoststats import parse_seeds  # noqa: E402
from benchmarks.real_hosts_report import GROWN, write_results  # noqa: E402
from esperd_examples.host.schedule import Germination  # noqa: E402
from esperd_examples.host.tasks import BENCHMARK_TASKS, benchmark_task  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_GNN = RESULTS / "gnn_calibrated.safetensors"
DEFAULT_GNN_CONFIG = RESULTS / "gnn_calibrated_train.toml"
DEFAULT_GNN_ONLINE = RESULTS / "gnn_online.safetensors"
DEFAULT_GNN_REAL = RESULTS / "gnn_real_bc.safetensors"
TRAINED_GNN_DIR = ROOT / "runs" / "real-hosts-gnn"

CONTROLLERS: dict[str, str] = {
    "static-small": "the host as it starts, no seeds",
    "static-reshuffled": "static small with another batch order (A/A control)",
    "static-large": "static, about 2x the small model's parameters",
    "matched-heuristic": "static, the parameters the heuristic's run of the same seed ended with",
    "fixed": "fixed schedule: one seed per slotted layer at epoch 2, no telemetry",
    "random": "esperd, random legal policy",
    "heuristic": "esperd, heuristic",
    "gnn-sim": "esperd, GNN trained in the simulator",
    "gnn-real": "esperd, GNN cloned from the heuristic on real runs (tuning seeds)",
    "gnn-online": "esperd, GNN after online fine-tuning on real runs",
}
ESPERD_POLICIES = {
    "random": "random",
    "heuristic": "heuristic",
    "gnn-sim": "gnn",
    "gnn-real": "gnn",
    "gnn-online": "gnn",
}
#: The esperd settings every controller shares. Host epochs last a fraction of a second here, so
#: decide on every packet; a layer waits for the ack of its last command (not a wall-clock cooldown).
SCHEDULER = {"min_interval_s": 0.02, "cooldown_s": 0.05, "max_wait_ms": 2.0}
EPOCH_PAUSE_S = 0.1  # the host waits this long for commands after each state packet
RESHUFFLE_OFFSET = 1000  # static-reshuffled's batch order seed: the run seed plus this


# ------------------------------------------------------------------ one run (in a worker process)


@dataclass(frozen=True, slots=True)
class Job:
    """One training run: which task, controller and seed, and how to reach esperd."""

    task: str
    controller: str
    seed: int
    width: float
    epochs: int
    url: str
    prefix: str
    schedule: tuple[Germination, ...] = ()
    order_seed: int | None = None  # the batch order's seed when it is not the run seed

    @property
    def run_id(self) -> str:
        return f"{self.task}-{self.controller}-s{self.seed}"


def run_job(job: Job) -> dict[str, Any]:
    """Train one run to the end; returns its record. Runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    return asyncio.run(_run_job(job))


async def _run_job(job: Job) -> dict[str, Any]:
    from esperd.client import HostClient
    from esperd_examples.host.data import load_task
    from esperd_examples.host.schedule import FixedSchedule
    from esperd_examples.host.train import HostRun

    spec = benchmark_task(job.task)
    config = spec.config(
        job.seed,
        width=job.width,
        epochs=job.epochs,
        epoch_pause_s=EPOCH_PAUSE_S,
        log=None,
        order_seed=job.order_seed,
    )
    val_labels = int(load_task(spec.task).y_val.numel())
    started = time.perf_counter()
    client = await HostClient.connect(
        job.url, job.run_id, prefix=job.prefix, total_epochs=config.epochs, val_samples=val_labels
    )
    try:
        run = HostRun(config, link=client)
        if job.schedule:
            report = await _run_published_schedule(run, client, FixedSchedule(job.schedule))
        else:
            report = await run.run()
    finally:
        await client.close()
    return run_record(job, report, time.perf_counter() - started, spec.params())


async def _run_published_schedule(run: Any, client: Any, schedule: Any) -> Any:
    """A fixed schedule whose commands go out on the run's command subject, as esperd's would.

    Each epoch's commands are published before the epoch starts and awaited in the host's
    queue, so the host applies them at the epoch's first step (acks and all) -- the same
    path as an esperd command, recorded in the trace -- at a deterministic point.
    """
    from esperd_contracts import Channel, Codec, run_subject

    codec, subject = Codec(), run_subject(run.run_id, Channel.COMMAND, client.prefix)
    run.start()
    for _ in range(run.config.epochs):
        due = schedule.due(run)
        for command in due:
            await client.nc.publish(subject, codec.encode(command))
        if due:
            await client.nc.flush()
            deadline = time.monotonic() + 10.0
            while client.commands.qsize() < len(due) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        await run.run_epoch()
    await run.finish()
    return run.report


def run_record(job: Job, report: Any, wall_s: float, small_params: int) -> dict[str, Any]:
    """What the benchmark keeps of one run."""
    from esperd_contracts import Op

    final = report.final
    records = report.commands
    rejected = [r for r in records if not r.applied]
    germinations = [
        {
            "epoch": r.epoch,
            "layer": r.command.layer_id,
            "blueprint": r.command.blueprint.value if r.command.blueprint else None,
            "applied": r.applied,
        }
        for r in records
        if r.command.op is Op.GERMINATE
    ]
    return {
        "task": job.task,
        "controller": job.controller,
        "seed": job.seed,
        "run": job.run_id,
        "width": job.width,
        "epochs": len(report.epochs),
        "val_accuracy": final.val_accuracy,
        "val_loss": final.val_loss,
        "train_accuracy": final.train_accuracy,
        "total_params": final.total_params,
        "host_params": final.host_params,
        "added_params": final.total_params - small_params,
        "commands": len(records),
        "applied": len(records) - len(rejected),
        "rejected": len(rejected),
        "rejected_after_finish": sum(r.reason == "the run has finished" for r in rejected),
        "rejection_reasons": dict(Counter(_reason_kind(r.reason) for r in rejected)),
        "applied_by_op": dict(Counter(r.command.op.value for r in records if r.applied)),
        "germinations": germinations,
        "final_stages": {str(s.layer_id): s.stage.value for s in final.seeds},
        "curve": [round(e.val_accuracy, 5) for e in report.epochs],
        "wall_s": wall_s,
        "train_s": report.train_seconds,
    }


def _reason_kind(reason: str) -> str:
    """A rejection reason without its particulars (layer ids, names), for counting."""
    return reason.split(" (layer")[0].split(";")[0][:80]


# ------------------------------------------------------------------ esperd controllers


def source_hash(*directories: Path) -> str:
    """A hash of every .py file under these directories (paths and contents)."""
    digest = hashlib.sha256()
    for directory in directories:
        for path in sorted(directory.rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_versions() -> dict[str, str]:
    """The code a run depends on: the reference host's for every run; esperd's and the contract's
    too for the runs esperd controls."""
    host = source_hash(ROOT / "examples" / "host")
    return {"host": host, "esperd": host + "+" + source_hash(ROOT / "esperd", ROOT / "contracts")}


def code_kind(controller: str) -> str:
    return "esperd" if controller in ESPERD_POLICIES else "host"


@dataclass(slots=True)
class Settings:
    """Everything that decides what a run does; a stored run with other settings is rerun."""

    epochs: dict[str, int]
    gnn: dict[str, Any] = field(default_factory=dict)  # controller -> policy section (checkpoint hash)
    scheduler: dict[str, float] = field(default_factory=lambda: dict(SCHEDULER))
    epoch_pause_s: float = EPOCH_PAUSE_S
    # The checkout's code (`code_versions`); with rerun_stale_code, a stored run recorded with
    # other code is rerun. Without it, it is kept and the report says so.
    code: dict[str, str] = field(default_factory=dict)
    rerun_stale_code: bool = False

    def code_of(self, controller: str) -> str | None:
        """The code version a stored run must have been recorded with (None: any)."""
        return self.code.get(code_kind(controller)) if self.rerun_stale_code else None

    def fingerprint(self, task: str, controller: str) -> str:
        spec = benchmark_task(task)
        data = {
            "spec": {k: v for k, v in asdict(spec).items() if k != "summary"},
            "epochs": self.epochs[task],
            "controller": controller,
            "policy": self.gnn.get(controller.removeprefix("matched-"), {}),
            "scheduler": self.scheduler,
            "pause": self.epoch_pause_s,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def policy_section(controller: str, settings: Settings) -> dict[str, Any]:
    section: dict[str, Any] = {"name": ESPERD_POLICIES[controller]}
    if controller == "random":
        section["init_seed"] = 0
    section.update({k: v for k, v in settings.gnn.get(controller, {}).items() if k != "sha256"})
    return section


def daemon_config(url: str, state_dir: Path, controller: str, settings: Settings) -> Any:
    from esperd.config import config_from_dict

    return config_from_dict(
        {
            "nats": {"servers": [url], "reconnect_wait_s": 0.2, "subject_prefix": prefix_of(controller)},
            "service": {
                "state_dir": str(state_dir),
                "use_uvloop": False,
                "log_level": "warning",
                "torch_threads": 1,
                "device": "cpu",
            },
            "limits": {"max_payload_bytes": 1_000_000},  # within the broker's 1 MiB max_payload
            "scheduler": dict(settings.scheduler),
            "policy": policy_section(controller, settings),
        }
    )


def prefix_of(controller: str) -> str:
    return f"bench.{controller}"


async def start_services(url: str, controllers: Sequence[str], settings: Settings, state: Path) -> list[Any]:
    """One esperd Service per esperd controller, each on its own subject prefix; fails loudly if
    a checkpoint did not load (esperd would otherwise serve its fallback policy)."""
    from esperd.service import Service

    started = []
    for controller in controllers:
        service = Service(daemon_config(url, state / controller, controller, settings), env={})
        task = asyncio.create_task(service.run(), name=f"esperd-{controller}")
        started.append((service, task))
        ready = asyncio.create_task(service.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if task.done():
                task.result()
            raise SystemExit(f"esperd for {controller} did not become ready")
        if service.policy_fallback_reason:
            raise SystemExit(f"{controller}: the policy did not load: {service.policy_fallback_reason}")
        served = service.decisions.policy
        print(
            f"  esperd {controller}: serving {served.name} v{served.version} on {prefix_of(controller)}.*.*"
        )
    return started


async def stop_services(services: list[Any]) -> None:
    for service, _ in services:
        service.request_stop()
    for _, task in services:
        await asyncio.wait_for(task, 60)


# ------------------------------------------------------------------ the learned policies


def resolve_gnn(
    args: argparse.Namespace, controllers: list[str]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Policy sections for gnn-sim / gnn-online; trains gnn-sim's checkpoint if none exists.

    Returns (sections, notes); gnn-online is removed from `controllers` when absent.
    """
    sections: dict[str, dict[str, Any]] = {}
    notes = []
    if "gnn-sim" in controllers:
        checkpoint = args.gnn_checkpoint
        if not checkpoint.exists():
            checkpoint = train_sim_gnn(args)
            notes.append(
                f"gnn-sim: {args.gnn_checkpoint} was absent; trained {checkpoint} first (see --help)."
            )
        sections["gnn-sim"] = gnn_section(checkpoint, args.gnn_config, args.gnn_sampling)
    optional = {
        "gnn-real": (args.gnn_real_checkpoint, "benchmarks/real_imitation.py writes it"),
        "gnn-online": (args.gnn_online_checkpoint, "the online-learning benchmark writes it"),
    }
    for controller, (checkpoint, maker) in optional.items():
        if controller not in controllers:
            continue
        if checkpoint is None or not checkpoint.exists():
            controllers.remove(controller)
            notes.append(
                f"{controller}: NOT RUN -- no checkpoint at {checkpoint} "
                f"({maker}; pass --{controller}-checkpoint)."
            )
        else:
            sections[controller] = gnn_section(checkpoint, args.gnn_config, args.gnn_sampling)
    return sections, notes


def gnn_section(checkpoint: Path, config: Path | None, sampling: bool) -> dict[str, Any]:
    """The [policy] keys that serve `checkpoint`: its training config's [policy] table (hidden size...),
    or the policy.toml `esperd train` wrote next to it."""
    section: dict[str, Any] = {}
    for candidate in (config, checkpoint.parent / "policy.toml"):
        if candidate is not None and candidate.exists():
            section.update(tomllib.loads(candidate.read_text()).get("policy", {}))
            break
    section.pop("name", None)
    section.update(
        {
            "checkpoint": str(checkpoint.resolve()),
            "deterministic": not sampling,
            "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16],
        }
    )
    return section


def train_sim_gnn(args: argparse.Namespace) -> Path:
    """Train the simulator GNN with the README's warm-started recipe (on the calibrated simulator
    when its config exists); `--gnn-train-steps` env steps. Returns best.safetensors."""
    out = TRAINED_GNN_DIR
    command = [
        sys.executable, "-m", "esperd.cli", "train", "--algo", "ppo", "--sim", "--policy", "gnn",
        "--warm-start", "heuristic", "--steps", str(args.gnn_train_steps), "--eval-every", "4",
        "--eval-episodes", "32", "--eval-reward", "basic", "--config", str(DEFAULT_GNN_CONFIG),
        "--out", str(out), "--seed", "1", "--threads", "1", "--quiet",
    ]  # fmt: skip
    sim_config = RESULTS / "sim_calibrated.toml"
    if sim_config.exists():
        command[6:6] = ["--sim-config", str(sim_config)]
    print(f"training the simulator GNN ({args.gnn_train_steps} env steps): {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return out / "best.safetensors"


# ------------------------------------------------------------------ orchestration


class Store:
    """Finished runs: <out>/real_hosts.runs.jsonl, one JSON record per line, appended as they finish."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        if fresh and path.exists():
            path.unlink()
        self.records: dict[tuple[str, str, int], dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[(record["task"], record["controller"], record["seed"])] = record

    def get(
        self, task: str, controller: str, seed: int, fingerprint: str, code: str | None = None
    ) -> dict[str, Any] | None:
        """The stored run with these settings (and this code version, when given), or None."""
        record = self.records.get((task, controller, seed))
        if record is None or record.get("fingerprint") != fingerprint:
            return None
        return record if code is None or record.get("code") == code else None

    def add(self, record: dict[str, Any]) -> None:
        self.records[(record["task"], record["controller"], record["seed"])] = record
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class Orchestrator:
    """Submits runs to the worker pool in order, matched runs once the run they match has finished."""

    def __init__(self, args: argparse.Namespace, settings: Settings, store: Store, url: str) -> None:
        self.args = args
        self.settings = settings
        self.store = store
        self.url = url
        self.done: dict[tuple[str, str, int], asyncio.Future[dict[str, Any]]] = {}
        self.total = 0
        self.finished = 0
        self.started = time.perf_counter()

    def job(self, task: str, controller: str, seed: int, width: float | None = None) -> Job:
        spec = benchmark_task(task)
        schedule = tuple(spec.fixed_schedule()) if controller == "fixed" else ()
        if controller == "static-large":
            width = spec.large_width
        return Job(
            task=task,
            controller=controller,
            seed=seed,
            width=spec.width if width is None else width,
            epochs=self.settings.epochs[task],
            url=self.url,
            prefix=prefix_of(controller),
            schedule=schedule,
            order_seed=seed + RESHUFFLE_OFFSET if controller == "static-reshuffled" else None,
        )

    async def run_all(self, pool: ProcessPoolExecutor, plan: list[tuple[str, str, int]]) -> None:
        loop = asyncio.get_running_loop()
        for key in plan:
            self.done[key] = loop.create_future()
        self.total = len(pending(plan, self.store, self.settings))
        await asyncio.gather(*(self._one(pool, *key) for key in plan))

    def _stored(self, task: str, controller: str, seed: int) -> dict[str, Any] | None:
        settings = self.settings
        return self.store.get(
            task, controller, seed, settings.fingerprint(task, controller), settings.code_of(controller)
        )

    async def _one(self, pool: ProcessPoolExecutor, task: str, controller: str, seed: int) -> None:
        key = (task, controller, seed)
        try:
            width = None
            if controller.startswith("matched-"):  # sized by the grown run of the same seed
                grown = await self._result(task, controller.removeprefix("matched-"), seed)
                width = benchmark_task(task).width_for_params(grown["total_params"])
            record = self._stored(*key)
            if record is not None and width is not None and record["width"] != width:
                record = None  # the run it matches changed since
            if record is None:
                job = self.job(task, controller, seed, width)
                self._forget_trace(job)
                record = await asyncio.get_running_loop().run_in_executor(pool, run_job, job)
                record["fingerprint"] = self.settings.fingerprint(task, controller)
                record["code"] = self.settings.code.get(code_kind(controller), "")
                self.store.add(record)
                self._progress(record)
            self.done[key].set_result(record)
        except BaseException as exc:
            self.done[key].set_exception(exc)
            raise

    def _forget_trace(self, job: Job) -> None:
        """A run about to be (re)run starts a fresh trace: the writer appends to an existing file."""
        if self.args.traces is not None:
            base = self.args.traces / job.task / job.controller / f"{job.run_id}.jsonl"
            for path in (base, base.with_name(base.name + ".gz")):
                path.unlink(missing_ok=True)

    async def _result(self, task: str, controller: str, seed: int) -> dict[str, Any]:
        future = self.done.get((task, controller, seed))
        if future is not None:
            return await asyncio.shield(future)
        stored = self._stored(task, controller, seed)
        if stored is None:
            raise SystemExit(f"matched-{controller} needs {controller}'s run of {task} seed {seed}: add it")
        return stored

    def _progress(self, record: dict[str, Any]) -> None:
        self.finished += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.finished * (self.total - self.finished)
        print(
            f"  [{self.finished}/{self.total} {elapsed:.0f}s, ~{eta:.0f}s left] {record['run']}: "
            f"val {record['val_accuracy']:.4f}, params {record['total_params']} "
            f"({record['added_params']:+d}), commands {record['commands']} ({record['rejected']} rejected), "
            f"{record['wall_s']:.1f}s",
            flush=True,
        )


def code_note(records: list[dict[str, Any]], code: dict[str, str]) -> str:
    """Which runs were recorded with other code than this checkout's, by controller."""
    stale: dict[str, list[int]] = {}
    for record in records:
        controller = record["controller"]
        counts = stale.setdefault(controller, [0, 0])
        counts[1] += 1
        counts[0] += record.get("code") != code[code_kind(controller)]
    old = {c: n for c, n in stale.items() if n[0]}
    if not old:
        return (
            "Every run was recorded with this checkout's code (examples/host, and esperd/ and "
            "contracts/ for esperd's controllers)."
        )
    listed = ", ".join(f"{c} {n[0]} of {n[1]}" for c, n in sorted(old.items()))
    return (
        "Runs recorded with other code than this checkout's, or before code versions were recorded "
        f"(`--rerun-stale-code` reruns them): {listed}."
    )


def run_plan(tasks: list[str], controllers: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """Task by task, seed by seed; esperd controllers first so that matched runs can start early."""
    order = sorted(controllers, key=lambda c: (c.startswith("matched-"), c not in ESPERD_POLICIES))
    return [(task, controller, seed) for task in tasks for seed in seeds for controller in order]


async def start_taps(url: str, controllers: list[str], traces: Path) -> tuple[Any, list[Any]]:
    import nats

    from esperd.ops.traces import TraceTap

    nc = await nats.connect(url, name="real-hosts-traces")
    taps = []
    for controller in controllers:
        tap = TraceTap(
            nc,
            traces,
            prefix=prefix_of(controller),
            route=lambda run, c=controller: f"{run.split('-', 1)[0]}/{c}",
        )
        await tap.start()
        taps.append(tap)
    return nc, taps


def gzip_traces(directory: Path) -> int:
    """Compress every finished trace (`.jsonl` -> `.jsonl.gz`, which the trace readers take)."""
    count = 0
    for path in sorted(directory.rglob("*.jsonl")):
        target = path.with_name(path.name + ".gz")
        with path.open("rb") as src, gzip.open(target, "wb", compresslevel=9) as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
        count += 1
    return count


def pending(plan: list[tuple[str, str, int]], store: Store, settings: Settings) -> list[tuple[str, str, int]]:
    """The runs of `plan` that must run: not stored with these settings, or matched to a run that must."""
    todo: list[tuple[str, str, int]] = []
    for task, controller, seed in plan:
        record = store.get(
            task, controller, seed, settings.fingerprint(task, controller), settings.code_of(controller)
        )
        if record is not None and controller.startswith("matched-"):
            key = (task, controller.removeprefix("matched-"), seed)
            grown = store.get(*key, settings.fingerprint(task, key[1]), settings.code_of(key[1]))
            stale = grown is None or record["width"] != benchmark_task(task).width_for_params(
                grown["total_params"]
            )
            record = None if key in todo or stale else record
        if record is None:
            todo.append((task, controller, seed))
    return todo


async def run_pending(
    args: argparse.Namespace,
    settings: Settings,
    store: Store,
    plan: list[tuple[str, str, int]],
    active: list[str],
) -> None:
    """Start the broker, the esperd services and trace taps the pending runs need, and run them."""
    from esperd.ops.natsserver import NatsServer, free_port

    with tempfile.TemporaryDirectory(prefix="real-hosts-") as work:
        server = NatsServer(port=free_port(), work_dir=Path(work) / "nats")
        server.start()
        services: list[Any] = []
        nc, taps = None, []
        try:
            served = [c for c in active if c in ESPERD_POLICIES]
            services = await start_services(server.url, served, settings, Path(work))
            if args.traces is not None:
                nc, taps = await start_taps(server.url, active, args.traces)
            context = mp.get_context("spawn")  # this process runs threads (NATS, esperd): never fork it
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
                await Orchestrator(args, settings, store, server.url).run_all(pool, plan)
            await asyncio.sleep(0.5)  # the last acks reach the taps
        finally:
            for tap in taps:
                await tap.stop()
            if nc is not None:
                await nc.close()
            await stop_services(services)
            server.stop()


async def main_async(args: argparse.Namespace) -> int:
    from esperd.logs import configure_logging

    configure_logging("warning", "console")
    tasks, controllers, seeds = args.tasks, list(args.controllers), args.seeds
    gnn, notes = resolve_gnn(args, controllers)
    epochs = {task: args.epochs or benchmark_task(task).epochs for task in tasks}
    settings = Settings(epochs=epochs, gnn=gnn, code=code_versions(), rerun_stale_code=args.rerun_stale_code)
    for note in notes:
        print(note, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    store = Store(args.out / "real_hosts.runs.jsonl", args.fresh)
    plan = run_plan(tasks, controllers, seeds)
    todo = pending(plan, store, settings)
    print(f"{len(plan)} runs, {len(plan) - len(todo)} stored, {len(todo)} to run", flush=True)
    if todo:
        await run_pending(args, settings, store, plan, sorted({c for _, c, _ in todo}))
    if args.traces is not None:
        print(f"traces: {gzip_traces(args.traces)} files gzipped under {args.traces}", flush=True)
    records = [store.records[key] for key in plan if key in store.records]
    notes.append(code_note(records, settings.code))
    print(notes[-1], flush=True)
    paths = write_results(records, tasks, controllers, seeds, settings, notes, args)
    for path in paths:
        print(f"wrote {path}", flush=True)
    return 0


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tasks", default=",".join(BENCHMARK_TASKS), help="benchmark tasks (examples/host/tasks.py)"
    )
    p.add_argument("--seeds", default="0-7", help="run seeds, e.g. 0-7 or 0,3,5 (tuning used 100 and up)")
    p.add_argument(
        "--controllers", default="all", help=f"all, or a comma-separated subset of {list(CONTROLLERS)}"
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="host runs at once (worker processes, one torch thread each)"
    )
    p.add_argument("--epochs", type=int, default=0, help="override every task's epochs (0: the task's own)")
    p.add_argument("--gnn-checkpoint", type=Path, default=DEFAULT_GNN, help="the simulator-trained GNN")
    p.add_argument(
        "--gnn-config",
        type=Path,
        default=DEFAULT_GNN_CONFIG,
        help="TOML whose [policy] table serves the GNNs",
    )
    p.add_argument(
        "--gnn-real-checkpoint",
        type=Path,
        default=DEFAULT_GNN_REAL,
        help="the GNN cloned from the heuristic on real runs",
    )
    p.add_argument(
        "--gnn-online-checkpoint", type=Path, default=DEFAULT_GNN_ONLINE, help="the fine-tuned GNN"
    )
    p.add_argument("--gnn-sampling", action="store_true", help="serve the GNNs sampling (default: argmax)")
    p.add_argument(
        "--gnn-train-steps",
        type=int,
        default=65536,
        help="env steps when gnn-sim's checkpoint must be trained",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--traces", type=Path, default=ROOT / "benchmarks" / "traces" / "real_hosts")
    p.add_argument("--no-traces", action="store_true", help="record no traces")
    p.add_argument("--no-plot", action="store_true", help="write the tables only (no matplotlib needed)")
    p.add_argument("--fresh", action="store_true", help="discard stored runs and run everything")
    p.add_argument(
        "--rerun-stale-code",
        action="store_true",
        help="rerun stored runs recorded with other code than this checkout's (default: keep them, "
        "and the report says which)",
    )
    p.add_argument("--quick", action="store_true", help="every controller, digits, seeds 0-1, 12 epochs")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.tasks, args.seeds, args.epochs = "digits", "0-1", args.epochs or 12
        if args.out == RESULTS:
            args.out = Path(tempfile.gettempdir()) / "real-hosts-quick"
        if args.traces == ROOT / "benchmarks" / "traces" / "real_hosts":
            args.traces = args.out / "traces"
    args.tasks = [benchmark_task(t.strip()).name for t in args.tasks.split(",") if t.strip()]
    args.seeds = parse_seeds(args.seeds)
    args.controllers = list(CONTROLLERS) if args.controllers == "all" else args.controllers.split(",")
    for controller in args.controllers:
        grown = controller.removeprefix("matched-")
        if controller not in CONTROLLERS and not (controller.startswith("matched-") and grown in GROWN):
            p.error(
                f"unknown controller {controller!r}; known: {', '.join(CONTROLLERS)} (and matched-<grown>)"
            )
    if args.no_traces:
        args.traces = None
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("the plot needs matplotlib: pip install -e '.[plot]' (or pass --no-plot)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(
        f"real hosts: tasks {args.tasks}, seeds {args.seeds}, controllers {args.controllers}, "
        f"{args.jobs} jobs, python {platform.python_version()}",
        flush=True,
    )
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
