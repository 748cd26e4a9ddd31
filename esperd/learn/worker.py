"""Where the learner's updates run: a niced child process (the default) or a worker thread.

Why a process: an update is not only torch kernels. Collating observations for `evaluate`, the
optimizer loop and the V-trace/GAE bookkeeping are Python, and on a worker thread all of it
holds the daemon's GIL, so the decision thread and the event loop queue behind it (decision p99
well over its 1.2x-idle target with the learner on a thread: benchmarks/RESULTS.md). In a
child process the
learner's Python has its own interpreter and GIL, runs one torch thread, and its nice value
lets the OS scheduler favour the daemon. The parent keeps the buffers, the breaker and the
serving policy; it sends a batch and gets back the update's stats and the new weights.

The child:
  - is `python -c BOOTSTRAP` (not multiprocessing): it imports nothing of the parent's
    `__main__`, needs no resource tracker, and sets its signals before importing torch;
  - ignores SIGINT, SIGTERM and SIGHUP (the parent drives shutdown and reloads: a SIGTERM to the
    whole process group or cgroup must not kill an update the final checkpoint waits for);
  - dies with the parent: PR_SET_PDEATHSIG (Linux; tied to the spawning thread, so spawn from
    the event loop's thread, which lives as long as the daemon) and EOF on its socket;
  - talks over a private socketpair with multiprocessing.connection framing. Pickle is used on
    that socket only (both ends are this program; nothing it carries is persisted); batches
    travel as the experience file's arrays (`persist.encode_experience`), weights as numpy
    arrays, optimizer state as `torch.save` bytes read back weights-only.

Both workers raise NonFiniteError as `Trainer.update` does; the process worker raises
WorkerDied when its child is gone (the learner logs it, counts it and restarts the child).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Literal, Protocol

import msgspec
import numpy as np
import structlog
import torch

from esperd.learn.config import ImpalaConfig, PPOConfig
from esperd.learn.experience import Transition
from esperd.learn.impala import ImpalaUpdater
from esperd.learn.persist import decode_experience, encode_experience
from esperd.learn.ppo import NonFiniteError, PPOUpdater, UpdateStats
from esperd.policy.base import PolicyBundle

log = structlog.get_logger("esperd.learn")

State = dict[str, torch.Tensor]
Arrays = dict[str, np.ndarray]
Slots = tuple[np.ndarray, np.ndarray]  # (replay slot, fill stamp) of each transition of a batch
PolicyFactory = Callable[[], PolicyBundle]
WorkerMode = Literal["process", "thread"]


class WorkerDied(RuntimeError):
    """The learner's child process is gone (killed, crashed, or never started)."""


class WorkerError(RuntimeError):
    """The child raised something other than NonFiniteError; its text is the message."""


class TrainerSpec(msgspec.Struct, frozen=True):
    """What a Trainer is built from (picklable when `make_policy` is: a module-level function
    or a functools.partial of one, not a lambda)."""

    make_policy: PolicyFactory
    algorithm: str  # "ppo" | "impala"
    ppo: PPOConfig
    impala: ImpalaConfig


class Trainer:
    """The training copy of the policy and its PPO/IMPALA learner, in whichever process runs it."""

    def __init__(self, spec: TrainerSpec, state: State, version: int) -> None:
        self.trainee = spec.make_policy()
        self.trainee.load_state_dict(state, version=version)
        if spec.algorithm == "ppo":
            self.updater: PPOUpdater | ImpalaUpdater = PPOUpdater(self.trainee, spec.ppo)
        else:
            self.updater = ImpalaUpdater(self.trainee, spec.impala)

    def update(
        self, batch: Sequence[Transition], weights: np.ndarray | None, with_state: bool = True
    ) -> tuple[UpdateStats, State | None]:
        """One update; with `with_state`, the new weights, copied (the trainee keeps changing
        under the next one). The weights are checked finite either way."""
        stats = self.updater.update(batch) if weights is None else self.updater.update(batch, weights=weights)
        state = self.trainee.state_dict()
        if not all_finite(state):
            raise NonFiniteError("weights became non-finite")
        return stats, clone_state(state) if with_state else None

    def weights(self) -> State:
        """A copy of the trainee's current weights."""
        return clone_state(self.trainee.state_dict())

    def load_weights(self, state: State, version: int, reset_optimizer: bool) -> None:
        """Back to `state`; with fresh optimizer moments after a rollback (they describe bad updates)."""
        self.trainee.load_state_dict(state, version=version)
        if reset_optimizer:
            self.updater.reset_optimizer()

    def export_algo(self) -> dict[str, Any]:
        return copy.deepcopy(self.updater.state_dict())

    def import_algo(self, state: dict[str, Any]) -> None:
        """Load optimizer state and counters; on any error nothing changed (then it raises)."""
        fresh = copy.deepcopy(self.updater.state_dict())
        try:
            self.updater.load_state_dict(state)
        except Exception:
            self.updater.load_state_dict(fresh)  # undo a partial load
            raise


class Worker(Protocol):
    """What the Learner needs from whatever runs its updates. `update`, `weights`, `export_algo`
    and `import_algo` block: run them off the event loop. `load_weights` never blocks.

    `update` returns the new weights only when asked (`with_state`): the learner asks when it
    will swap them in. Sending ~0.4 MB of weights back after every IMPALA update, most of them
    never served, cost the daemon's GIL more than the batch going out.

    `slots` say where each transition lives in the replay buffer: (slot, stamp) per transition,
    the stamp telling a slot's successive occupants apart. The process worker then sends each
    transition to its child once, and afterwards only where it lives."""

    mode: WorkerMode

    @property
    def pid(self) -> int: ...

    def update(
        self,
        batch: Sequence[Transition],
        weights: np.ndarray | None,
        *,
        with_state: bool = True,
        slots: Slots | None = None,
    ) -> tuple[UpdateStats, State | None]: ...

    def weights(self) -> State: ...

    def load_weights(self, state: State, version: int, *, reset_optimizer: bool) -> None: ...

    def export_algo(self) -> dict[str, Any]: ...

    def import_algo(self, state: dict[str, Any]) -> None: ...

    def restart(self, state: State, version: int) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- thread


class ThreadWorker:
    """Runs the Trainer in this process (on the Learner's worker thread). For fast tests and for
    hosts where a child process is not wanted; its Python shares the daemon's GIL."""

    mode: WorkerMode = "thread"

    def __init__(self, spec: TrainerSpec, state: State, version: int) -> None:
        self.spec = spec
        self.trainer = Trainer(spec, state, version)

    @property
    def pid(self) -> int:
        return os.getpid()

    def update(
        self,
        batch: Sequence[Transition],
        weights: np.ndarray | None,
        *,
        with_state: bool = True,
        slots: Slots | None = None,
    ) -> tuple[UpdateStats, State | None]:
        return self.trainer.update(batch, weights, with_state)

    def weights(self) -> State:
        return self.trainer.weights()

    def load_weights(self, state: State, version: int, *, reset_optimizer: bool) -> None:
        self.trainer.load_weights(state, version, reset_optimizer)

    def export_algo(self) -> dict[str, Any]:
        return self.trainer.export_algo()

    def import_algo(self, state: dict[str, Any]) -> None:
        self.trainer.import_algo(state)

    def restart(self, state: State, version: int) -> None:
        self.trainer = Trainer(self.spec, state, version)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- process (parent side)


# Runs in the child before anything heavy is imported: signals first, then the parent-death
# signal, then a check that the parent did not die before prctl took effect.
BOOTSTRAP = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
parent = int(sys.argv[2])
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(0)
from esperd.learn.worker import child_main
sys.exit(child_main(int(sys.argv[1]), int(sys.argv[3]), int(sys.argv[4])))
"""


class ProcessWorker:
    """The Trainer in a child process, behind a blocking request/reply proxy (one call at a time).

    Spawn, restart and close from the event loop's thread (PR_SET_PDEATHSIG follows the thread
    that spawned the child); `update` and `export_algo` from a worker thread.
    """

    mode: WorkerMode = "process"

    def __init__(
        self, spec: TrainerSpec, state: State, version: int, *, nice: int = 10, threads: int = 1
    ) -> None:
        try:
            pickle.dumps(spec)  # now, not in the first update: a lambda factory cannot reach the child
        except Exception as exc:
            raise ValueError(
                "the process worker needs a picklable policy factory (a module-level function "
                f"or a functools.partial of one, not a lambda): {exc}"
            ) from exc
        self.spec = spec
        self.nice = nice
        self.threads = threads
        self._lock = threading.Lock()  # one request/reply in flight
        self._pending_lock = threading.Lock()  # guards _pending only (never held across I/O)
        self._pending: list[tuple[str, tuple[Any, ...]]] = []  # sent before the next request
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._finalizer: weakref.finalize | None = None
        self.transitions_sent = 0  # over this worker's life, all its children
        self._spawn(state, version)

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    def _spawn(self, state: State, version: int) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            fd = theirs.fileno()
            argv = [
                sys.executable,
                "-c",
                BOOTSTRAP,
                str(fd),
                str(os.getpid()),
                str(self.nice),
                str(self.threads),
            ]
            self._proc = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL)
        self._conn = Connection(ours.detach())
        self._held = HeldSlots()  # a new child holds no transitions
        # Kill the child if this proxy is dropped without close() (tests, errors).
        self._finalizer = weakref.finalize(self, _kill, self._proc, self._conn)
        # Sent with the first request, not now: the child is still importing torch, and a
        # blocking send of the weights would hold up the caller for as long.
        with self._pending_lock:
            self._pending = [("path", (list(sys.path),)), ("init", (self.spec, to_arrays(state), version))]
        log.info("learner worker process started", pid=self._proc.pid, nice=self.nice)

    def update(
        self,
        batch: Sequence[Transition],
        weights: np.ndarray | None,
        *,
        with_state: bool = True,
        slots: Slots | None = None,
    ) -> tuple[UpdateStats, State | None]:
        # New transitions go as the experience file encodes them: a dozen flat arrays, each
        # observation and topology once: pickling the transitions' own small arrays (a couple of
        # dozen a step) held the daemon's GIL many times longer. Transitions the child already
        # holds go as their replay slot alone: a replay batch is mostly transitions sampled
        # before, and encoding them again was the bulk of a batch's cost (figures in
        # benchmarks/RESULTS.md, "Measurements quoted in the code").
        where = None if slots is None else _checked_slots(slots, len(batch))
        new = list(range(len(batch))) if where is None else self._held.missing(where)
        encoded = encode_experience([batch[i] for i in new], kind="batch")
        held = None if where is None else (where, new)
        stats, arrays = self._call("update", encoded, held, weights, with_state)
        if where is not None:
            self._held.add(where[:, new])
        self.transitions_sent += len(new)
        return stats, None if arrays is None else from_arrays(arrays)

    def weights(self) -> State:
        return from_arrays(self._call("weights"))

    @property
    def held(self) -> int:
        """How many replay transitions the child holds (sent once, then named by slot)."""
        return len(self._held)

    def load_weights(self, state: State, version: int, *, reset_optimizer: bool) -> None:
        """Queued: applied in the child before the next request (never blocks the loop)."""
        arrays = to_arrays(clone_state(state))  # the caller's tensors may change before it is sent
        with self._pending_lock:
            older = [p for p in self._pending if p[0] == "load"]
            # Only the newest weights count; an optimizer reset asked for earlier still happens.
            reset_optimizer = reset_optimizer or any(p[1][2] for p in older)
            self._pending = [p for p in self._pending if p[0] != "load"]
            self._pending.append(("load", (arrays, version, reset_optimizer)))

    def export_algo(self) -> dict[str, Any]:
        data = self._call("export_algo")
        return torch.load(io.BytesIO(data), weights_only=True)

    def import_algo(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._call("import_algo", buffer.getvalue())

    def restart(self, state: State, version: int) -> None:
        self.close()
        self._spawn(state, version)

    def close(self) -> None:
        """Stop the child (it exits on EOF; killed if it has not within a second)."""
        if self._finalizer is not None:
            self._finalizer.detach()
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None and conn is not None:
            _kill(proc, conn, grace_s=1.0)

    def _call(self, op: str, *args: Any) -> Any:
        with self._lock:
            conn, proc = self._conn, self._proc
            if conn is None or proc is None:
                raise WorkerDied("the learner worker process is not running")
            with self._pending_lock:
                pending, self._pending = self._pending, []
            try:
                for request in [*pending, (op, args)]:
                    conn.send(request)
                    kind, value = conn.recv()
                    if kind != "ok":
                        break
            except (EOFError, OSError) as exc:
                raise WorkerDied(_exit_reason(proc)) from exc
            except (TypeError, ValueError) as exc:  # close() closed the socket under this call
                raise WorkerDied("the learner worker process was stopped") from exc
        if kind == "nonfinite":
            raise NonFiniteError(value)
        if kind != "ok":
            raise WorkerError(value)
        return value


def _kill(proc: subprocess.Popen[bytes], conn: Connection, grace_s: float = 0.0) -> None:
    conn.close()  # EOF: an idle child exits on its own
    if grace_s > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _exit_reason(proc: subprocess.Popen[bytes]) -> str:
    try:
        code = proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        return f"the learner worker process (pid {proc.pid}) stopped answering"
    if code < 0:
        return f"the learner worker process (pid {proc.pid}) was killed by {signal.Signals(-code).name}"
    return f"the learner worker process (pid {proc.pid}) exited with code {code}"


def make_worker(mode: WorkerMode, spec: TrainerSpec, state: State, version: int, *, nice: int = 10) -> Worker:
    if mode == "thread":
        return ThreadWorker(spec, state, version)
    return ProcessWorker(spec, state, version, nice=nice)


# ---------------------------------------------------------------- process (child side)


def child_main(fd: int, nice: int, threads: int) -> int:
    """The child's loop: one request, one reply, until EOF (the parent closed or died)."""
    if nice:
        os.nice(nice)
    torch.set_num_threads(threads)
    conn = Connection(fd)
    trainer: Trainer | None = None
    held: dict[int, tuple[int, Transition]] = {}  # replay slot -> (stamp, transition), see HeldSlots
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return 0
        try:
            if op == "path":
                sys.path[:] = args[0]  # the parent's, so its factories unpickle here
                reply: tuple[str, Any] = ("ok", None)
            elif op == "init":
                spec, arrays, version = args
                trainer = Trainer(spec, from_arrays(arrays), version)
                reply = ("ok", None)
            else:
                assert trainer is not None, "init first"
                reply = ("ok", _handle(trainer, held, op, args))
        except NonFiniteError as exc:
            reply = ("nonfinite", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except OSError:
            return 0


def _handle(trainer: Trainer, held: dict[int, tuple[int, Transition]], op: str, args: tuple[Any, ...]) -> Any:
    if op == "update":
        (arrays, meta), slots, weights, with_state = args
        batch = decode_experience(meta, arrays).transitions
        if slots is not None:
            batch = _from_held(held, batch, *slots)
        stats, state = trainer.update(batch, weights, with_state)
        return stats, None if state is None else to_arrays(state)
    if op == "weights":
        return to_arrays(trainer.weights())
    if op == "load":
        trainer.load_weights(from_arrays(args[0]), args[1], args[2])
        return None
    if op == "export_algo":
        buffer = io.BytesIO()
        torch.save(trainer.updater.state_dict(), buffer)
        return buffer.getvalue()
    if op == "import_algo":
        trainer.import_algo(torch.load(io.BytesIO(args[0]), weights_only=True))
        return None
    raise ValueError(f"unknown request {op!r}")


# ---------------------------------------------------------------- replay transitions held by the child


class HeldSlots:
    """The parent's record of which replay transitions its child holds: slot -> stamp."""

    def __init__(self) -> None:
        self._stamp: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._stamp)

    def missing(self, where: np.ndarray) -> list[int]:
        """Positions in the batch whose transition the child does not hold (each slot once)."""
        out, seen = [], set()
        for i, (slot, stamp) in enumerate(zip(where[0].tolist(), where[1].tolist(), strict=True)):
            if self._stamp.get(slot) != stamp and slot not in seen:
                seen.add(slot)
                out.append(i)
        return out

    def add(self, where: np.ndarray) -> None:
        self._stamp.update(zip(where[0].tolist(), where[1].tolist(), strict=True))


def _checked_slots(slots: Slots, count: int) -> np.ndarray:
    where = np.stack([np.asarray(s, dtype=np.int64).reshape(-1) for s in slots])
    if where.shape != (2, count):
        raise ValueError(f"one (slot, stamp) per transition: {count} transitions, slots {where.shape}")
    return where


def _from_held(
    held: dict[int, tuple[int, Transition]], new: list[Transition], where: np.ndarray, positions: list[int]
) -> list[Transition]:
    """The child's side: store the batch's new transitions by slot, then the batch in order."""
    for i, t in zip(positions, new, strict=True):
        held[int(where[0, i])] = (int(where[1, i]), t)
    batch = []
    for slot, stamp in zip(where[0].tolist(), where[1].tolist(), strict=True):
        entry = held.get(slot)
        if entry is None or entry[0] != stamp:
            raise KeyError(f"replay slot {slot} (stamp {stamp}) was never sent to the learner worker")
        batch.append(entry[1])
    return batch


# ---------------------------------------------------------------- helpers


def to_arrays(state: State) -> Arrays:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def from_arrays(arrays: Arrays) -> State:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def clone_state(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def all_finite(state: State) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
