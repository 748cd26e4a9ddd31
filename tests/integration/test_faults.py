"""Faults survived, each caused for real: `esperd --config FILE` as a process on a real nats-server.

1. nats-server SIGKILLed mid-stream and restarted on the same port: esperd (same pid) reconnects,
   resubscribes, keeps its runs and policy, and commands resume for runs it only knew from before.
2. esperd SIGTERMed while a learner update is running on its worker thread: exit 0, the final
   checkpoint (policy, optimizer, counters, buffer) is on disk, and a restart resumes that version
   and buffer size.
3. esperd SIGKILLed (no final save): a restart resumes from the last periodic checkpoint; a garbled
   buffer or a truncated policy file is detected and logged, and the daemon still starts and serves
   without loading any of it.
4. A malicious checkpoint (a pickle whose unpickling would run code) as `[policy] checkpoint` and
   as `<state_dir>/learner/learner.pt`: refused with a clear error, nothing executed, the daemon
   serves the fallback (resp. a fresh) policy.
5. A diverging learner (lr 1.0, huge reward weights) under load: the breaker trips, commands keep
   flowing, and every command comes from a policy version whose weights were finite when served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
import torch
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.config import config_from_dict
from esperd.learn.persist import load_experience
from esperd.ops.natsserver import NatsServer
from esperd.policy import create_policy
from esperd.policy.checkpoint import read_policy_checkpoint, save_policy_checkpoint
from esperd.sim import SimConfig
from esperd.sim.host import SimHosts
from esperd_contracts import Codec
from tests.integration.helpers import status
from tests.support.timing import until

REPO = Path(__file__).resolve().parents[2]
CODEC = Codec()
START_TIMEOUT_S = 90.0  # importing torch and torch_geometric takes ~10 s on a loaded 2-core machine
EXIT_TIMEOUT_S = 60.0

# Short episodes with early, quick degradation: many decisions and rewards per second.
# Short episodes without the budget in their packets: the heuristic still germinates in them.
FAST_SIM = SimConfig(
    epochs=12, min_layers=6, max_layers=8, onset_fraction=0.0, degrade_epochs=2, report_budget=False
)
GNN = {"name": "gnn", "hidden_size": 64, "gnn_layers": 2}
PPO_FAST = {"rollout_size": 16, "minibatch_size": 8, "epochs": 4, "warmup_updates": 0}

pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------ config files


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _toml(table: dict[str, Any], prefix: str = "") -> str:
    scalars = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    out = [f"[{prefix}]", *scalars] if prefix and scalars else scalars
    for key, value in table.items():
        if isinstance(value, dict):
            out.append(_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def config_dict(url: str, state_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "nats": {"servers": [url], "reconnect_wait_s": 0.2},
        "service": {
            "state_dir": str(state_dir),
            "drain_timeout_s": 10.0,
            "torch_threads": 1,
            "device": "cpu",
            "log_format": "json",
            "status_interval_s": 3600.0,
        },
        "scheduler": {"min_interval_s": 0.0, "cooldown_s": 0.1, "max_wait_ms": 1.0},
        # The untrained GNN these tests serve must act: the confidence and urgency rails (0.7,
        # 0.5; tests/test_rails.py) would block nearly all it proposes. The other rails stay on.
        "rails": {"confidence_threshold": 0.0, "urgency_threshold": 0.0},
    }
    return _merge(base, sections)


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(_toml(raw) + "\n", encoding="utf-8")
    config_from_dict(raw)  # the daemon will accept it (fail here, not in a subprocess)
    return path


# ------------------------------------------------------------------ the daemon as a process


class Esperd:
    """`esperd --config FILE` (or a probe wrapping it) with its JSON log lines in a file."""

    def __init__(self, config: Path, log: Path, argv: list[str] | None = None) -> None:
        self.config = config
        self.log = log
        self.argv = argv or [sys.executable, "-m", "esperd.cli"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Esperd:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*self.argv, "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.text().splitlines():
            if not line.startswith("{"):
                continue  # nats-py's stdlib logging, tracebacks
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    found.append(event)
        return found

    def tail(self, chars: int = 4000) -> str:
        return self.text()[-chars:]

    def sigterm(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"esperd did not exit within {timeout}s of SIGTERM:\n{self.tail()}")

    def sigkill(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(30)

    def ensure_dead(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(30)


@contextlib.asynccontextmanager
async def esperd_process(config: Path, log: Path, argv: list[str] | None = None) -> AsyncIterator[Esperd]:
    daemon = Esperd(config, log, argv).start()
    try:
        yield daemon
    finally:
        daemon.ensure_dead()


async def wait_status(
    nc: Client, daemon: Esperd, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    """Poll `esperd.status` until `predicate` holds; fail (with the daemon's log) on timeout or death."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if not daemon.alive():
            pytest.fail(
                f"esperd exited ({daemon.proc and daemon.proc.returncode}) waiting for {what}:\n"
                f"{daemon.tail()}"
            )
        try:
            last = await status(nc, timeout=3.0)
        except Exception:  # noqa: BLE001 - not up yet, or mid-reconnect
            await asyncio.sleep(0.1)
            continue
        if predicate(last):
            return last
        await asyncio.sleep(0.05)
    pytest.fail(
        f"timed out after {timeout}s waiting for {what}; last status {json.dumps(last)[:1500]}\n"
        f"{daemon.tail()}"
    )


def ready(s: dict[str, Any]) -> bool:
    return "version" in s and not s.get("stopping", True)


# Runs esperd exactly as `esperd --config FILE` does, with observation-only hooks that print JSON
# lines to the same log: every policy the decision loop is handed (its version and whether all its
# weights are finite, before it serves a batch), and the start and end of every learner update on
# the worker thread (so a test can send SIGTERM while one is demonstrably running).
PROBE = """
import json, sys, time
import torch
from esperd.decisions import DecisionLoop
from esperd.learn.learner import Learner

def emit(**fields):
    print(json.dumps({**fields, "t": time.time()}), file=sys.stderr, flush=True)

def report(policy, how):
    finite = all(bool(torch.isfinite(v).all()) for v in policy.state_dict().values() if v.is_floating_point())
    emit(event="probe.serve", how=how, version=policy.version, finite=finite)

init, swap, train = DecisionLoop.__init__, DecisionLoop.swap_policy, Learner._train

def probed_init(self, scheduler, policy, *args, **kwargs):
    report(policy, "initial")
    init(self, scheduler, policy, *args, **kwargs)

def probed_swap(self, policy):
    report(policy, "swap")
    swap(self, policy)

def probed_train(self, batch, *args):
    emit(event="probe.train.start", serving=self.serving.version, batch=len(batch))
    try:
        return train(self, batch, *args)
    finally:
        emit(event="probe.train.end", serving=self.serving.version)

DecisionLoop.__init__, DecisionLoop.swap_policy, Learner._train = probed_init, probed_swap, probed_train
from esperd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def probed(tmp_path: Path) -> list[str]:
    """argv running esperd under PROBE."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    return [sys.executable, str(probe)]


# ------------------------------------------------------------------ hosts and a command tap


@contextlib.asynccontextmanager
async def sim_hosts(
    url: str, runs: int, epoch_s: float, config: SimConfig = FAST_SIM, seed: int = 3
) -> AsyncIterator[SimHosts]:
    """Simulated training runs publishing in this process (each run on its own connection)."""
    stop = asyncio.Event()
    hosts = SimHosts(url, runs, config=config, seed=seed, epoch_s=epoch_s)
    task = asyncio.create_task(hosts.run(stop))
    try:
        yield hosts
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)


@dataclass
class Tap:
    """Every command esperd publishes: (arrival time, run id, policy, version, confidence)."""

    seen: list[tuple[float, str, str, int, float]] = field(default_factory=list)

    async def on_msg(self, msg: Msg) -> None:
        content_type = msg.headers.get("Content-Type") if msg.headers else None
        c = CODEC.decode_command(msg.data, content_type)
        self.seen.append((time.monotonic(), c.run_id, c.policy, c.policy_version, c.confidence))


async def tap_commands(nc: Client) -> Tap:
    tap = Tap()
    await nc.subscribe("esper.*.command", cb=tap.on_msg)
    await nc.flush()
    return tap


# ------------------------------------------------------------------ checkpoint files


def checkpoint_files(state_dir: Path) -> dict[str, Any]:
    """What a restart would read: policy version, buffered transitions, the learner's counters."""
    directory = state_dir / "learner"
    meta, _ = read_policy_checkpoint(directory / "policy.safetensors")
    extra = torch.load(directory / "learner.pt", weights_only=True)
    return {
        "version": int(meta["version"]),
        "buffered": len(load_experience(directory / "buffer.safetensors").transitions),
        "updates": int(extra["status"]["updates"]),
    }


class _Payload:
    """Unpickling this runs `exec`, which creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


# ================================================================== 1. broker SIGKILL


async def test_broker_sigkill_mid_stream_reconnects_keeps_state_and_commands_resume(tmp_path: Path) -> None:
    broker = NatsServer(work_dir=tmp_path / "nats")
    broker.start()
    # Long episodes: the runs alive before the outage are the same runs after it (their topology
    # was only ever sent before the kill, so commands for them after it need the kept state).
    long_sim = SimConfig(epochs=10_000, min_layers=6, max_layers=8, onset_fraction=0.0, degrade_epochs=2)
    # Learning, so the state kept across the outage includes a learned policy version.
    raw = config_dict(
        broker.url,
        tmp_path / "state",
        policy=GNN,
        learner={"algorithm": "ppo", "checkpoint_interval_s": 3600.0, "ppo": PPO_FAST},
    )
    config = write_config(tmp_path / "esperd.toml", raw)
    nc: Client | None = None
    try:
        async with esperd_process(config, tmp_path / "esperd.log") as daemon:
            nc = await nats.connect(
                broker.url,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                name="fault-test",
            )
            tap = await tap_commands(nc)
            await wait_status(nc, daemon, ready, START_TIMEOUT_S, "esperd ready")
            async with sim_hosts(broker.url, 4, epoch_s=0.1, config=long_sim) as hosts:
                before = await wait_status(
                    nc,
                    daemon,
                    lambda s: s["runs"] >= 4 and s["commands_total"] >= 5 and s["policy"]["version"] >= 1,
                    90,
                    "commands and a learned version before the outage",
                )
                await until(lambda: len(tap.seen) >= 5, 20, "tapped commands before the outage")
                runs_before = set(hosts.run_ids)
                assert {r for _, r, *_ in tap.seen} <= runs_before

                broker.kill()  # SIGKILL, mid-stream: hosts publish every 100 ms, esperd is deciding
                await asyncio.sleep(1.5)
                assert daemon.alive(), daemon.tail()
                broker.start()  # same port, empty: no subscriptions survive on the broker side

                after = await wait_status(
                    nc,
                    daemon,
                    lambda s: s["nats"]["reconnects"] >= 1 and s["nats"]["connected"],
                    60,
                    "esperd reconnected",
                )
                restarted_at = time.monotonic()
                commands_at_reconnect = after["commands_total"]
                await until(
                    lambda: sum(1 for t, r, *_ in tap.seen if t > restarted_at and r in runs_before) >= 5,
                    60,
                    "commands after the broker restart",
                )
                resumed = await wait_status(
                    nc,
                    daemon,
                    lambda s: (
                        s["commands_total"] > commands_at_reconnect
                        and s["accepted_total"] > after["accepted_total"]
                    ),
                    30,
                    "intake and decisions after restart",
                )
                assert set(hosts.run_ids) == runs_before  # no host started a new episode meanwhile
            code = daemon.sigterm()
        events = daemon.events()
    finally:
        if nc is not None:
            await nc.close()
        broker.stop()

    assert code == 0, daemon.tail()
    # One process throughout: uptime kept growing, state was not rebuilt from scratch.
    assert after["uptime_s"] > before["uptime_s"] and resumed["uptime_s"] > after["uptime_s"]
    assert after["runs"] >= 4 and resumed["runs"] >= 4  # the runs survived the outage
    # The learned policy was kept (the learner may have moved on, never back to a fresh version).
    assert before["policy"]["version"] >= 1
    assert after["policy"]["name"] == resumed["policy"]["name"] == "gnn"
    assert resumed["policy"]["version"] >= after["policy"]["version"] >= before["policy"]["version"]
    assert after["learner"]["updates"] >= before["learner"]["updates"]
    assert after["experience"]["transitions_closed"] >= before["experience"]["transitions_closed"]
    assert after["accepted_total"] >= before["accepted_total"]
    assert after["commands_total"] >= before["commands_total"]
    assert resumed["nats"]["disconnects"] >= 1 and resumed["nats"]["reconnects"] >= 1
    assert resumed["decisions"]["failures"] == 0
    names = [e.get("event") for e in events]
    assert "disconnected from NATS; reconnecting" in names and "reconnected to NATS" in names
    assert "handler failed" not in names


# ================================================================== 2. esperd SIGTERM while learning


# Updates long enough (hundreds of ms at least) that SIGTERM lands inside one; the breaker is not
# the subject here, so a KL excursion of a long update does not pause learning.
LEARNING: dict[str, dict[str, Any]] = {
    # PPO: 80 optimizer steps per update, no KL early stop.
    "ppo": {
        "algorithm": "ppo",
        "checkpoint_interval_s": 3600.0,
        "ppo": {**PPO_FAST, "rollout_size": 64, "minibatch_size": 8, "epochs": 10, "target_kl": 1e6},
        "breaker": {"kl_limit_ppo": 100.0, "recovery_s": 1.0},
    },
    # IMPALA: its replay buffer survives updates, so the saved and resumed buffer is not empty.
    "impala": {
        "algorithm": "impala",
        "checkpoint_interval_s": 3600.0,
        "min_replay": 64,
        "replay_capacity": 1000,
        "impala": {"batch_size": 256},
        "breaker": {"kl_limit_impala": 100.0, "recovery_s": 1.0},
    },
}


@pytest.mark.parametrize("algorithm", ["ppo", "impala"])
async def test_sigterm_mid_update_saves_checkpoint_and_restart_resumes_version_and_buffer(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path, algorithm: str
) -> None:
    state = tmp_path / "state"
    raw = config_dict(nats_server.url, state, policy=GNN, learner=LEARNING[algorithm])
    config = write_config(tmp_path / "esperd.toml", raw)

    def in_update(daemon: Esperd) -> bool:
        """A learner update has started on the worker thread and not ended (after >= 2 swaps)."""
        events = [e for e in daemon.events() if e.get("event", "").startswith("probe.")]
        swaps = sum(1 for e in events if e["event"] == "probe.serve" and e["how"] == "swap")
        starts = sum(1 for e in events if e["event"] == "probe.train.start")
        ends = sum(1 for e in events if e["event"] == "probe.train.end")
        return swaps >= 2 and starts > ends

    async with esperd_process(config, tmp_path / "first.log", probed(tmp_path)) as daemon:
        await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "esperd ready")
        async with sim_hosts(nats_server.url, 6, epoch_s=0.05):
            await until(lambda: in_update(daemon) or not daemon.alive(), 90, "a learner update in flight")
            code = daemon.sigterm()  # hosts still publishing, an update running on the worker
    first = daemon

    assert code == 0, first.tail()
    events = first.events()
    names = [e.get("event") for e in events]
    stopping = names.index("esperd stopping")
    # SIGTERM really landed inside an update: the last one started before the stop ended after it.
    last_start = max(i for i, n in enumerate(names[:stopping]) if n == "probe.train.start")
    assert "probe.train.end" not in names[last_start:stopping], first.tail()
    assert "final learner checkpoint failed" not in names, first.tail()
    saves = [i for i, n in enumerate(names) if n == "learner checkpoint saved"]
    assert saves and saves[-1] > stopping, "no checkpoint saved on SIGTERM"
    final = saves[-1]
    # The final save waited for the update in flight (and any the learner started while NATS
    # drained): no optimizer step runs while it is written, and none starts after it ...
    assert names[:final].count("probe.train.start") == names[:final].count("probe.train.end"), first.tail()
    assert "probe.train.start" not in names[final:], first.tail()
    saved = events[final]
    served = [e["version"] for e in events if e.get("event") == "probe.serve"]
    on_disk = checkpoint_files(state)
    # ... and the log line, the files and the last version handed to the decision loop agree.
    assert saved["version"] == on_disk["version"] == served[-1] >= 2
    assert saved["buffered"] == on_disk["buffered"]
    if algorithm == "impala":
        assert on_disk["buffered"] > 0
    assert all(e["finite"] for e in events if e.get("event") == "probe.serve")

    async with esperd_process(config, tmp_path / "second.log") as restarted:
        st = await wait_status(nats_client, restarted, ready, START_TIMEOUT_S, "restarted esperd ready")
        assert restarted.sigterm() == 0, restarted.tail()
    assert st["policy"]["name"] == "gnn" and st["policy"]["version"] == on_disk["version"]
    assert st["learner"]["serving_version"] == on_disk["version"]
    assert st["learner"]["buffered"] == on_disk["buffered"]
    assert st["learner"]["updates"] == on_disk["updates"]
    resumed = restarted.events("learner resumed")
    assert (
        resumed
        and resumed[0]["version"] == on_disk["version"]
        and resumed[0]["buffered"] == on_disk["buffered"]
    )


# ================================================================== 3. esperd SIGKILL, corruption


# IMPALA here (PPO in test 2): its replay buffer is not drained by an update, so the periodic
# checkpoint holds experience worth resuming (a PPO rollout is usually empty right after the update
# that precedes a periodic save).
IMPALA = {
    "algorithm": "impala",
    "checkpoint_interval_s": 1.0,
    "min_replay": 32,
    "replay_capacity": 1000,
    "impala": {"batch_size": 16},
}


@dataclass
class Killed:
    state: Path  # the killed daemon's state dir (copy it before use)
    files: dict[str, Any]  # what the checkpoint on disk holds
    last_status: dict[str, Any]  # the daemon's last answer before SIGKILL
    log: str
    periodic_saves: int
    last_logged_version: int  # of the last periodic checkpoint the killed daemon finished


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def killed(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Killed:
    """A learning daemon SIGKILLed after its periodic checkpoint held a learned version."""
    root = tmp_path_factory.mktemp("killed")
    state = root / "state"
    config = write_config(
        root / "esperd.toml", config_dict(nats_server.url, state, policy=GNN, learner=IMPALA)
    )
    nc = await nats.connect(nats_server.url)
    try:
        async with esperd_process(config, root / "esperd.log") as daemon:
            await wait_status(nc, daemon, ready, START_TIMEOUT_S, "esperd ready")
            async with sim_hosts(nats_server.url, 6, epoch_s=0.05):
                await until(
                    lambda: (
                        any(
                            e["version"] >= 1 and e["buffered"] > 0
                            for e in daemon.events("learner checkpoint saved")
                        )
                        or not daemon.alive()
                    ),
                    90,
                    "a periodic checkpoint of a learned version",
                )
                last = await status(nc, timeout=3.0)
                assert daemon.sigkill() == -signal.SIGKILL
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    text = daemon.text()
    assert "esperd stopping" not in text  # SIGKILL: no drain, no final save
    saves = daemon.events("learner checkpoint saved")
    return Killed(
        state=state,
        files=checkpoint_files(state),
        last_status=last,
        log=text,
        periodic_saves=len(saves),
        last_logged_version=saves[-1]["version"],
    )


def copy_state(killed: Killed, tmp_path: Path, nats_url: str) -> tuple[Path, Path]:
    state = tmp_path / "state"
    shutil.copytree(killed.state / "learner", state / "learner")
    return state, write_config(
        tmp_path / "esperd.toml", config_dict(nats_url, state, policy=GNN, learner=IMPALA)
    )


async def test_sigkill_restart_resumes_from_last_periodic_checkpoint(
    killed: Killed, nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    assert killed.periodic_saves >= 1 and killed.files["version"] >= 1 and killed.files["buffered"] > 0
    # The files on disk are the last periodic checkpoint (or, had SIGKILL hit a save half-way, its
    # policy file already replaced): never older than the last one logged, never newer than what
    # was serving when the process died.
    assert killed.last_logged_version <= killed.files["version"] <= killed.last_status["policy"]["version"]
    _, config = copy_state(killed, tmp_path, nats_server.url)
    async with esperd_process(config, tmp_path / "restart.log") as daemon:
        st = await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "restarted esperd ready")
        code = daemon.sigterm()
    assert code == 0, daemon.tail()
    assert st["policy"] == {"name": "gnn", "version": killed.files["version"], "fallback_reason": ""}
    assert st["learner"]["serving_version"] == killed.files["version"]
    assert st["learner"]["buffered"] == killed.files["buffered"]
    assert st["learner"]["updates"] == killed.files["updates"]
    names = [e.get("event") for e in daemon.events()]
    assert "learner resumed" in names and "learner checkpoint unusable; starting fresh" not in names


def test_sigkill_of_esperd_leaves_no_learner_worker_behind(killed: Killed) -> None:
    learner = killed.last_status["learner"]
    assert learner["worker"] == "process" and learner["worker_deaths"] == 0
    pid = learner["worker_pid"]
    assert pid > 0
    deadline = time.monotonic() + 5.0  # PR_SET_PDEATHSIG: at once; socket EOF: after its update
    while _pid_alive(pid):
        assert time.monotonic() < deadline, f"learner worker {pid} outlived its SIGKILLed esperd"
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def test_sigkill_then_garbled_buffer_is_detected_and_policy_still_resumes(
    killed: Killed, nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    state, config = copy_state(killed, tmp_path, nats_server.url)
    buffer = state / "learner" / "buffer.safetensors"
    data = bytearray(buffer.read_bytes())
    for i in range(len(data) - 64, len(data)):  # the tail is array data: the CRC no longer matches
        data[i] ^= 0xA5
    buffer.write_bytes(bytes(data))

    async with esperd_process(config, tmp_path / "restart.log") as daemon:
        st = await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "restarted esperd ready")
        code = daemon.sigterm()
    assert code == 0, daemon.tail()
    errors = daemon.events("learner buffer unusable; starting with an empty buffer")
    assert errors and errors[0]["level"] == "error", daemon.tail()
    assert "corrupt" in errors[0]["error"] or "not a readable" in errors[0]["error"], errors[0]
    # The policy file was sound: its version serves; nothing of the garbled buffer was kept.
    assert st["policy"]["version"] == killed.files["version"]
    assert st["learner"]["buffered"] == 0


async def test_sigkill_then_truncated_policy_is_refused_and_daemon_serves_fresh_policy(
    killed: Killed, nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    state, config = copy_state(killed, tmp_path, nats_server.url)
    policy_file = state / "learner" / "policy.safetensors"
    size = policy_file.stat().st_size
    with policy_file.open("r+b") as fh:
        fh.truncate(size // 2)  # what a crash mid-write without the atomic rename would leave

    tap = await tap_commands(nats_client)
    async with esperd_process(config, tmp_path / "restart.log") as daemon:
        st = await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "restarted esperd ready")
        async with sim_hosts(nats_server.url, 2, epoch_s=0.05):
            served = await wait_status(
                nats_client, daemon, lambda s: s["commands_total"] >= 3, 60, "commands from the fresh policy"
            )
        code = daemon.sigterm()
    assert code == 0, daemon.tail()
    errors = daemon.events("learner checkpoint unusable; starting fresh")
    assert errors and "corrupt or unreadable" in errors[0]["error"], daemon.tail()
    # Nothing of the checkpoint was applied: fresh weights (version 0), empty buffer, no counters.
    assert st["policy"] == {"name": "gnn", "version": 0, "fallback_reason": ""}
    assert st["learner"]["buffered"] == 0 and st["learner"]["updates"] == 0
    assert served["decisions"]["failures"] == 0
    assert any(policy == "gnn" for _, _, policy, _, _ in tap.seen)


# ================================================================== 4. malicious checkpoints


def test_payloads_are_live(tmp_path: Path) -> None:
    """The payloads below do run code when loaded unsafely: their refusal later is meaningful."""
    raw_marker, torch_marker = tmp_path / "raw.marker", tmp_path / "torch.marker"
    pickle.loads(pickle.dumps(_Payload(raw_marker)))  # on purpose
    assert raw_marker.exists()
    torch.save({"algo": _Payload(torch_marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # on purpose
    assert torch_marker.exists()


async def test_malicious_policy_checkpoint_is_refused_and_fallback_serves(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned.marker"
    evil = tmp_path / "policy.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    raw = config_dict(
        nats_server.url, tmp_path / "state", policy={**GNN, "checkpoint": str(evil), "fallback": "heuristic"}
    )
    config = write_config(tmp_path / "esperd.toml", raw)

    tap = await tap_commands(nats_client)
    async with esperd_process(config, tmp_path / "esperd.log") as daemon:
        st = await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "esperd ready")
        async with sim_hosts(nats_server.url, 3, epoch_s=0.05):
            served = await wait_status(
                nats_client,
                daemon,
                lambda s: s["commands_total"] >= 1,
                60,
                "commands from the fallback policy",
            )
        code = daemon.sigterm()
    assert code == 0, daemon.tail()
    assert not marker.exists(), "the checkpoint's payload ran"
    assert st["policy"]["name"] == "heuristic"  # the fallback, not the configured gnn
    assert "corrupt or unreadable" in st["policy"]["fallback_reason"]
    assert str(evil) in st["policy"]["fallback_reason"]
    rejected = daemon.events("policy.checkpoint_rejected")
    assert rejected and rejected[0]["level"] == "warning" and rejected[0]["fallback"] == "heuristic"
    assert served["decisions"]["failures"] == 0
    assert tap.seen and all(policy == "heuristic" for _, _, policy, _, _ in tap.seen)


async def test_malicious_learner_state_is_refused_and_nothing_of_the_checkpoint_loads(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned.marker"
    state = tmp_path / "state"
    raw = config_dict(nats_server.url, state, policy=GNN, learner={"algorithm": "ppo", "ppo": PPO_FAST})
    config = write_config(tmp_path / "esperd.toml", raw)
    # A sound policy file (version 7) beside a learner.pt in torch's own zip format whose pickle
    # carries the payload: the checkpoint as a whole must be refused, the payload never run.
    policy_config = config_from_dict(raw).policy
    bundle = create_policy(policy_config.name, policy_config, "cpu")
    bundle.load_state_dict(bundle.state_dict(), version=7)
    save_policy_checkpoint(state / "learner" / "policy.safetensors", bundle)
    torch.save({"algo": _Payload(marker), "status": {"updates": 99}}, state / "learner" / "learner.pt")

    async with esperd_process(config, tmp_path / "esperd.log") as daemon:
        st = await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "esperd ready")
        code = daemon.sigterm()
    assert code == 0, daemon.tail()
    assert not marker.exists(), "learner.pt's payload ran"
    errors = daemon.events("learner checkpoint unusable; starting fresh")
    assert errors and errors[0]["level"] == "error", daemon.tail()
    # Refused by torch's weights-only unpickler, which names what the pickle would have called.
    error = errors[0]["error"]
    assert "GLOBAL exec" in error and ("weights-only" in error or "weights_only" in error), error
    assert st["policy"] == {"name": "gnn", "version": 0, "fallback_reason": ""}  # not version 7
    assert st["learner"]["updates"] == 0 and st["learner"]["buffered"] == 0


# ================================================================== 5. diverging learner under load


async def test_diverging_learner_under_load_trips_breaker_and_never_serves_non_finite_weights(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    raw = config_dict(
        nats_server.url,
        tmp_path / "state",
        policy=GNN,
        learner={
            "algorithm": "ppo",
            "checkpoint_interval_s": 3600.0,
            "rewards": {"accuracy_weight": 1e6, "rent_weight": 1e6, "rejected_penalty": 1e6},
            "ppo": {**PPO_FAST, "lr": 1.0, "max_grad_norm": 1e6, "epochs": 8},
            "breaker": {"recovery_s": 2.0},
        },
    )
    config = write_config(tmp_path / "esperd.toml", raw)

    tap = await tap_commands(nats_client)
    open_seen: list[dict[str, Any]] = []
    async with esperd_process(config, tmp_path / "esperd.log", probed(tmp_path)) as daemon:
        await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "esperd ready")
        async with sim_hosts(nats_server.url, 6, epoch_s=0.05):

            def tripped(s: dict[str, Any]) -> bool:
                if s["learner"]["breaker"] == "open":
                    open_seen.append(s)
                return s["learner"]["trips"] >= 1

            trip = await wait_status(nats_client, daemon, tripped, 90, "the breaker to trip")
            tapped_at_trip = len(tap.seen)
            # Paused for recovery_s, learning resumes, diverges again and trips again; decisions
            # go on throughout.
            again = await wait_status(
                nats_client,
                daemon,
                lambda s: (
                    tripped(s)
                    and s["learner"]["trips"] >= 2
                    and s["commands_total"] >= trip["commands_total"] + 10
                ),
                60,
                "a second trip after the pause",
            )
            after = await wait_status(
                nats_client,
                daemon,
                lambda s: s["commands_total"] >= again["commands_total"] + 5,
                30,
                "commands after the second trip",
            )
            await until(lambda: len(tap.seen) >= tapped_at_trip + 15, 20, "tapped commands after the trips")
        code = daemon.sigterm()
    assert code == 0, daemon.tail()

    assert open_seen, "the breaker was never seen open"
    assert trip["learner"]["last_trip"], trip["learner"]
    assert after["learner"]["trips"] >= 2
    assert after["decisions"]["failures"] == 0
    served = daemon.events("probe.serve")
    assert served and served[0]["how"] == "initial"
    assert all(s["finite"] for s in served), [s for s in served if not s["finite"]]
    finite_versions = {s["version"] for s in served}
    versions = [v for _, _, _, v, _ in tap.seen]
    assert versions and set(versions) <= finite_versions, (sorted(set(versions)), sorted(finite_versions))
    assert all(math.isfinite(c) and 0.0 <= c <= 1.0 for *_, c in tap.seen)
    # Every failed update was rolled back and logged with its reason, every opening of the
    # breaker too (the fifth failure in its window, then each failed probe); the learner never
    # handed NaN to the decision loop.
    rollbacks = daemon.events("learner update failed; rolled back to the last good weights")
    trips = daemon.events("learner circuit breaker opened; learning paused")
    assert len(trips) >= 2 and all(t["reason"] for t in trips)
    assert len(rollbacks) >= 5 + 1 and all(r["reason"] for r in rollbacks)
    assert trip["learner"]["failures"] >= 5 and after["learner"]["breaker_transitions"]["closed->open"] >= 1
    assert "policy act failed" not in {e.get("event") for e in daemon.events()}
