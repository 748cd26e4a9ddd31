"""Saving and loading Transitions without pickle: one safetensors file, atomically replaced.

Layout (all arrays concatenated, with offsets; nothing per node, nothing executed on load):

  topo.*   one entry per distinct topology (run, topology_version): layer ids, blueprint mask,
           directed edges, GCN edges and weights;
  step.*   one entry per distinct Observation object (a transition's obs, or a next_obs no stored
           transition holds as obs): its topology entry, node features, op mask, stages,
           global features, epoch, timestamp;
  tr.*     one entry per transition: obs step, next step (-1 for none), action, log-prob, value,
           reward, done, truncated, policy version, recurrent state, optional priority.

The safetensors header's metadata carries one JSON document: format and version, kind, run ids,
counts, the buffer's own state (counters, beta step) and a CRC32 of every array, so a truncated,
corrupt or foreign file raises BufferFileError instead of yielding garbage. On load, observations
of one topology share the same (read-only) topology arrays again, and a transition's next_obs is
the very object the next transition holds as obs.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from esperd.analyzer.observation import (
    ACTION_WIDTH,
    BLUEPRINTS,
    GLOBAL_FEATURES,
    NODE_FEATURES,
    OPS,
    STAGES,
    Observation,
)
from esperd.learn.experience import Transition

FORMAT = "esperd.experience"
# 2: action rows carry every lever (issue 16), 12 columns instead of 5. A version 1 file is refused:
# its log-probabilities were recorded without the new levers' terms.
FORMAT_VERSION = 2
_META_KEY = "esperd"


class BufferFileError(ValueError):
    """An experience file that cannot be loaded: truncated, corrupt, foreign or of another version."""


class LoadedExperience(msgspec.Struct, kw_only=True):
    """What `load_experience` returns."""

    transitions: list[Transition]
    priorities: np.ndarray | None  # float64 [T], raw (not alpha-scaled); None if the file had none
    kind: str  # "replay" | "rollout" | whatever the writer said
    state: dict[str, Any]  # the writing buffer's own counters and settings
    runs: list[str]


# ---------------------------------------------------------------- save


class _Encoder:
    """Collects distinct topologies and observations (by identity) and builds the arrays."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.topo_by_identity: dict[tuple[object, ...], int] = {}
        self.topo_by_version: dict[tuple[str, int], list[int]] = {}
        self.topos: list[Observation] = []  # the first observation seen of each topology
        self.step_by_identity: dict[int, int] = {}
        self.steps: list[Observation] = []
        self.step_topo: list[int] = []

    def step(self, obs: Observation) -> int:
        index = self.step_by_identity.get(id(obs))
        if index is None:
            index = len(self.steps)
            # id() is safe: every observation stays referenced by its transition while we save.
            self.step_by_identity[id(obs)] = index
            self.steps.append(obs)
            self.step_topo.append(self.topology(obs))
        return index

    def topology(self, obs: Observation) -> int:
        # Run and version are part of the key: they are stored per topology entry, not per step.
        key = (obs.run_id, int(obs.topology_version))
        identity = (
            key,
            id(obs.layer_ids),
            id(obs.edge_index),
            id(obs.gcn_edge_index),
            id(obs.gcn_edge_weight),
            id(obs.blueprint_mask),
        )
        index = self.topo_by_identity.get(identity)
        if index is not None:
            return index
        # Same run and version but different array objects (built by hand, or loaded twice):
        # share the entry when the contents match.
        for candidate in self.topo_by_version.get(key, ()):
            if all(
                np.array_equal(a, b)
                for a, b in zip(_topology_arrays(self.topos[candidate]), _topology_arrays(obs), strict=True)
            ):
                self.topo_by_identity[identity] = candidate
                return candidate
        index = len(self.topos)
        self.runs.setdefault(obs.run_id, len(self.runs))
        self.topos.append(obs)
        self.topo_by_version.setdefault(key, []).append(index)
        self.topo_by_identity[identity] = index
        return index

    def arrays(self) -> dict[str, np.ndarray]:
        topos, steps = self.topos, self.steps
        n_topo = np.array([t.num_nodes for t in topos], dtype=np.int64)
        e_topo = np.array([t.edge_index.shape[1] for t in topos], dtype=np.int64)
        g_topo = np.array([t.gcn_edge_index.shape[1] for t in topos], dtype=np.int64)
        n_step = np.array([s.num_nodes for s in steps], dtype=np.int64)
        return {
            "topo.meta": np.array(
                [[self.runs[t.run_id], t.topology_version] for t in topos], dtype=np.int64
            ).reshape(-1, 2),
            "topo.node_offsets": _offsets(n_topo),
            "topo.layer_ids": _cat([t.layer_ids for t in topos], np.int64, (0,)),
            "topo.blueprint_mask": _cat([t.blueprint_mask for t in topos], np.bool_, (0, len(BLUEPRINTS))),
            "topo.edge_offsets": _offsets(e_topo),
            "topo.edge_index": _cat([t.edge_index for t in topos], np.int64, (2, 0), axis=1),
            "topo.gcn_offsets": _offsets(g_topo),
            "topo.gcn_edge_index": _cat([t.gcn_edge_index for t in topos], np.int64, (2, 0), axis=1),
            "topo.gcn_edge_weight": _cat([t.gcn_edge_weight for t in topos], np.float32, (0,)),
            "step.topology": np.array(self.step_topo, dtype=np.int64),
            "step.node_offsets": _offsets(n_step),
            "step.node_features": _cat([s.node_features for s in steps], np.float32, (0, len(NODE_FEATURES))),
            "step.op_mask": _cat([s.op_mask for s in steps], np.bool_, (0, len(OPS))),
            "step.stages": _cat([s.stages for s in steps], np.int64, (0,)),
            "step.global_features": _cat(
                [s.global_features[None] for s in steps], np.float32, (0, len(GLOBAL_FEATURES))
            ),
            "step.epoch": np.array([s.epoch for s in steps], dtype=np.int64),
            "step.timestamp": np.array([s.timestamp for s in steps], dtype=np.float64),
        }


def save_experience(
    path: str | os.PathLike[str],
    transitions: Sequence[Transition],
    *,
    kind: str,
    priorities: np.ndarray | None = None,
    state: Mapping[str, Any] | None = None,
) -> int:
    """Write `transitions` (oldest first) to `path` atomically; returns the file size in bytes."""
    path = Path(path)
    arrays, meta = encode_experience(transitions, kind=kind, priorities=priorities, state=state)
    meta["crc32"] = _checksum(arrays)
    _atomic_save(path, arrays, {_META_KEY: json.dumps(meta, separators=(",", ":"))})
    return path.stat().st_size


def encode_experience(
    transitions: Sequence[Transition],
    *,
    kind: str,
    priorities: np.ndarray | None = None,
    state: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The file's arrays and metadata for `transitions`, without writing them (also what the
    learner's worker process receives: a dozen flat arrays pickle in a fraction of the time the
    transitions' own small arrays take)."""
    enc = _Encoder()
    count = len(transitions)
    obs_index = np.empty(count, dtype=np.int64)
    next_index = np.empty(count, dtype=np.int64)
    hidden_shape = np.full((count, 2), -1, dtype=np.int64)
    hidden: list[np.ndarray] = []
    for i, t in enumerate(transitions):
        obs_index[i] = enc.step(t.obs)
        next_index[i] = -1 if t.next_obs is None else enc.step(t.next_obs)
        if t.hidden is not None:
            h = np.asarray(t.hidden, dtype=np.float32)
            if h.ndim != 2:
                raise ValueError(f"recurrent state must be 2-D [2, H], not shape {h.shape}")
            hidden_shape[i] = h.shape
            hidden.append(h.reshape(-1))
    arrays = enc.arrays()
    actions = (
        np.array(
            [np.asarray(t.action, dtype=np.int64).reshape(-1) for t in transitions], dtype=np.int64
        ).reshape(count, -1)
        if count
        else np.zeros((0, ACTION_WIDTH), np.int64)
    )
    if actions.shape[1] != ACTION_WIDTH:
        raise ValueError(f"actions must have {ACTION_WIDTH} columns, not {actions.shape[1]}")
    arrays.update(
        {
            "tr.obs": obs_index,
            "tr.next": next_index,
            "tr.action": actions,
            "tr.log_prob": np.array([t.log_prob for t in transitions], dtype=np.float64),
            "tr.value": np.array([t.value for t in transitions], dtype=np.float64),
            "tr.reward": np.array([t.reward for t in transitions], dtype=np.float64),
            "tr.done": np.array([t.done for t in transitions], dtype=np.bool_),
            "tr.truncated": np.array([t.truncated for t in transitions], dtype=np.bool_),
            "tr.policy_version": np.array([t.policy_version for t in transitions], dtype=np.int64),
            "tr.hidden_shape": hidden_shape,
            "tr.hidden": np.concatenate(hidden) if hidden else np.zeros(0, dtype=np.float32),
        }
    )
    if priorities is not None:
        p = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if p.shape[0] != count:
            raise ValueError("one priority per transition")
        arrays["tr.priority"] = p
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "runs": list(enc.runs),
        "counts": {"transitions": count, "steps": len(enc.steps), "topologies": len(enc.topos)},
        "widths": {
            "node_features": len(NODE_FEATURES),
            "global_features": len(GLOBAL_FEATURES),
            "ops": len(OPS),
            "blueprints": len(BLUEPRINTS),
            "stages": len(STAGES),
        },
        "state": dict(state or {}),
    }
    return arrays, meta


def _atomic_save(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(arrays, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as fh:  # the data must be on disk before the rename makes it current
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------- load


def load_experience(path: str | os.PathLike[str]) -> LoadedExperience:
    """Read a file written by `save_experience`. FileNotFoundError if absent, else BufferFileError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no experience file at {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            header = fh.metadata() or {}
            # safe_open is not iterable: .keys() is needed.
            arrays = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        raise BufferFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        meta = json.loads(header[_META_KEY])
    except (KeyError, TypeError, ValueError) as exc:
        raise BufferFileError(f"{path}: not an esperd experience file (no {_META_KEY!r} metadata)") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BufferFileError(f"{path}: not an esperd experience file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BufferFileError(
            f"{path}: experience format version {meta.get('format_version')!r}, "
            f"this esperd reads {FORMAT_VERSION}"
        )
    if meta.get("crc32") != _checksum(arrays):
        raise BufferFileError(f"{path}: checksum mismatch (the file is corrupt)")
    try:
        return decode_experience(meta, arrays)
    except BufferFileError as exc:
        raise BufferFileError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BufferFileError(f"{path}: malformed experience file ({exc})") from exc


def decode_experience(meta: dict[str, Any], a: dict[str, np.ndarray]) -> LoadedExperience:
    """The transitions `encode_experience` encoded, validated (BufferFileError if malformed)."""
    _check_widths(meta.get("widths", {}))
    runs = meta["runs"]
    if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
        raise BufferFileError("run ids must be a list of strings")
    counts = meta["counts"]
    arrays = _Arrays(a)
    topos = _read_topologies(arrays, int(counts["topologies"]), len(runs))
    steps = _read_steps(arrays, int(counts["steps"]), topos)
    observations = _observations(topos, steps, runs)
    transitions, priorities = _read_transitions(arrays, int(counts["transitions"]), observations)
    state = meta.get("state", {})
    if not isinstance(state, dict):
        raise BufferFileError("buffer state must be a JSON object")
    return LoadedExperience(
        transitions=transitions, priorities=priorities, kind=str(meta.get("kind", "")), state=state, runs=runs
    )


def _check_widths(widths: object) -> None:
    expected = {
        "node_features": len(NODE_FEATURES),
        "global_features": len(GLOBAL_FEATURES),
        "ops": len(OPS),
        "blueprints": len(BLUEPRINTS),
        "stages": len(STAGES),
    }
    if widths != expected:
        raise BufferFileError(f"observation layout differs from this esperd's ({widths} vs {expected})")


class _Arrays:
    """The loaded arrays, each handed out only with the dtype and shape it must have."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._arrays = arrays

    def has(self, name: str) -> bool:
        return name in self._arrays

    def get(self, name: str, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
        if name not in self._arrays:
            raise BufferFileError(f"missing array {name!r}")
        arr = self._arrays[name]
        if (
            arr.dtype != np.dtype(dtype)
            or arr.ndim != len(shape)
            or any(want is not None and got != want for got, want in zip(arr.shape, shape, strict=True))
        ):
            raise BufferFileError(
                f"array {name!r} has dtype {arr.dtype} shape {arr.shape}, expected {np.dtype(dtype)} {shape}"
            )
        return arr

    def offsets(self, name: str, count: int) -> np.ndarray:
        """`count` + 1 offsets into a concatenated array: from 0, never decreasing."""
        return _check_offsets(self.get(name, np.int64, (count + 1,)), name)


class _Topologies(msgspec.Struct):
    """Every distinct topology's arrays (views into the loaded ones, read-only)."""

    run_index: list[int]
    version: list[int]
    nodes: np.ndarray  # offsets
    layer_ids: np.ndarray
    edge_index: np.ndarray
    edges: np.ndarray  # offsets
    gcn_index: np.ndarray
    gcn_weight: np.ndarray
    gcn: np.ndarray  # offsets
    blueprint_mask: np.ndarray

    def count(self) -> int:
        return len(self.run_index)

    def views(self, k: int) -> tuple[np.ndarray, ...]:
        """Topology `k`'s layer ids, edges, GCN edges and weights, blueprint mask."""
        n, e, c = self.nodes, self.edges, self.gcn
        return (
            self.layer_ids[n[k] : n[k + 1]],
            self.edge_index[:, e[k] : e[k + 1]],
            self.gcn_index[:, c[k] : c[k + 1]],
            self.gcn_weight[c[k] : c[k + 1]],
            self.blueprint_mask[n[k] : n[k + 1]],
        )


class _Steps(msgspec.Struct):
    """Every distinct observation's own arrays."""

    topology: np.ndarray
    nodes: np.ndarray  # offsets
    node_features: np.ndarray
    op_mask: np.ndarray
    stages: np.ndarray
    global_features: np.ndarray
    epoch: np.ndarray
    timestamp: np.ndarray


def _read_topologies(a: _Arrays, n_topo: int, n_runs: int) -> _Topologies:
    meta = a.get("topo.meta", np.int64, (n_topo, 2))
    nodes = a.offsets("topo.node_offsets", n_topo)
    edges = a.offsets("topo.edge_offsets", n_topo)
    gcn = a.offsets("topo.gcn_offsets", n_topo)
    topos = _Topologies(
        run_index=meta[:, 0].tolist(),
        version=meta[:, 1].tolist(),
        nodes=nodes,
        layer_ids=a.get("topo.layer_ids", np.int64, (nodes[-1],)),
        edge_index=a.get("topo.edge_index", np.int64, (2, edges[-1])),
        edges=edges,
        gcn_index=a.get("topo.gcn_edge_index", np.int64, (2, gcn[-1])),
        gcn_weight=a.get("topo.gcn_edge_weight", np.float32, (gcn[-1],)),
        gcn=gcn,
        blueprint_mask=a.get("topo.blueprint_mask", np.bool_, (nodes[-1], len(BLUEPRINTS))),
    )
    # A corrupt file must fail here, not in a policy's forward: every index in range, every
    # edge between existing nodes.
    _check_index(meta[:, 0], n_runs, "topology run")
    n_per_topo = np.diff(nodes)
    for name, index, offsets in (("edge", topos.edge_index, edges), ("gcn edge", topos.gcn_index, gcn)):
        if index.shape[1]:
            owner = np.repeat(np.arange(n_topo), np.diff(offsets))
            if index.min() < 0 or np.any(index >= n_per_topo[owner][None, :]):
                raise BufferFileError(f"{name} index out of range of its topology")
    # Shared read-only by every observation of their version, as the analyzer does.
    for arr in (topos.layer_ids, topos.blueprint_mask, topos.edge_index, topos.gcn_index, topos.gcn_weight):
        arr.flags.writeable = False
    return topos


def _read_steps(a: _Arrays, n_step: int, topos: _Topologies) -> _Steps:
    nodes = a.offsets("step.node_offsets", n_step)
    steps = _Steps(
        topology=a.get("step.topology", np.int64, (n_step,)),
        nodes=nodes,
        node_features=a.get("step.node_features", np.float32, (nodes[-1], len(NODE_FEATURES))),
        op_mask=a.get("step.op_mask", np.bool_, (nodes[-1], len(OPS))),
        stages=a.get("step.stages", np.int64, (nodes[-1],)),
        global_features=a.get("step.global_features", np.float32, (n_step, len(GLOBAL_FEATURES))),
        epoch=a.get("step.epoch", np.int64, (n_step,)),
        timestamp=a.get("step.timestamp", np.float64, (n_step,)),
    )
    _check_index(steps.topology, topos.count(), "step.topology")
    if n_step and not np.array_equal(np.diff(nodes), np.diff(topos.nodes)[steps.topology]):
        raise BufferFileError("a step's node count differs from its topology's")
    _check_index(steps.stages, len(STAGES), "stage")
    return steps


def _observations(topos: _Topologies, steps: _Steps, runs: list[str]) -> list[Observation]:
    # Per-step arrays are copied out of the big loaded arrays: views would keep all of them
    # alive until the ring had overwritten every loaded step (up to 2x the buffer's memory).
    topo_views = [topos.views(k) for k in range(topos.count())]
    topo_run = [runs[r] for r in topos.run_index]
    observations: list[Observation] = []
    bounds = steps.nodes.tolist()
    rows = zip(steps.topology.tolist(), steps.epoch.tolist(), steps.timestamp.tolist(), strict=True)
    for s, (k, epoch, stamp) in enumerate(rows):
        lo, hi = bounds[s], bounds[s + 1]
        lids, edges, gidx, gw, bpm = topo_views[k]
        observations.append(
            Observation(
                run_id=topo_run[k],
                topology_version=topos.version[k],
                layer_ids=lids,
                node_features=steps.node_features[lo:hi].copy(),
                edge_index=edges,
                gcn_edge_index=gidx,
                gcn_edge_weight=gw,
                global_features=steps.global_features[s].copy(),
                op_mask=steps.op_mask[lo:hi].copy(),
                blueprint_mask=bpm,
                stages=steps.stages[lo:hi].copy(),
                epoch=epoch,
                timestamp=stamp,
            )
        )
    return observations


def _read_hidden(a: _Arrays, n_tr: int) -> list[np.ndarray | None]:
    """Each transition's recurrent state ([2, H]) or None."""
    shape = a.get("tr.hidden_shape", np.int64, (n_tr, 2))
    has_h = shape[:, 0] >= 0
    if np.any(shape[has_h] < 0) or np.any(shape[~has_h] != -1):
        raise BufferFileError("bad recurrent state shapes")
    bounds = _offsets(np.where(has_h, shape[:, 0] * shape[:, 1], 0))
    hidden = a.get("tr.hidden", np.float32, (bounds[-1],))
    return [
        hidden[bounds[i] : bounds[i + 1]].reshape(int(shape[i, 0]), int(shape[i, 1])) if has_h[i] else None
        for i in range(n_tr)
    ]


def _read_priorities(a: _Arrays, n_tr: int) -> np.ndarray | None:
    if not a.has("tr.priority"):
        return None
    priorities = a.get("tr.priority", np.float64, (n_tr,))
    if not np.all(np.isfinite(priorities)) or np.any(priorities < 0):
        raise BufferFileError("priorities must be finite and non-negative")
    return priorities


def _read_transitions(
    a: _Arrays, n_tr: int, observations: list[Observation]
) -> tuple[list[Transition], np.ndarray | None]:
    tr_obs = a.get("tr.obs", np.int64, (n_tr,))
    tr_next = a.get("tr.next", np.int64, (n_tr,))
    actions = a.get("tr.action", np.int64, (n_tr, ACTION_WIDTH))
    columns = [
        a.get(name, dtype, (n_tr,)).tolist()
        for name, dtype in (
            ("tr.log_prob", np.float64),
            ("tr.value", np.float64),
            ("tr.reward", np.float64),
            ("tr.done", np.bool_),
            ("tr.truncated", np.bool_),
            ("tr.policy_version", np.int64),
        )
    ]
    hidden = _read_hidden(a, n_tr)
    priorities = _read_priorities(a, n_tr)
    _check_index(tr_obs, len(observations), "tr.obs")
    _check_index(tr_next[tr_next != -1], len(observations), "tr.next")
    rows = zip(tr_obs.tolist(), tr_next.tolist(), *columns, strict=True)
    transitions = [
        Transition(
            obs=observations[o],
            action=actions[i],
            log_prob=logp,
            value=value,
            policy_version=version,
            reward=reward,
            done=done,
            truncated=trunc,
            next_obs=None if nxt < 0 else observations[nxt],
            hidden=hidden[i],
        )
        for i, (o, nxt, logp, value, reward, done, trunc, version) in enumerate(rows)
    ]
    return transitions, priorities


# ---------------------------------------------------------------- helpers


def _topology_arrays(obs: Observation) -> tuple[np.ndarray, ...]:
    return obs.layer_ids, obs.edge_index, obs.gcn_edge_index, obs.gcn_edge_weight, obs.blueprint_mask


def _offsets(sizes: np.ndarray) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _cat(parts: list[np.ndarray], dtype: type, empty: tuple[int, ...], axis: int = 0) -> np.ndarray:
    if not parts:
        return np.zeros(empty, dtype=dtype)
    return np.concatenate([np.asarray(p, dtype=dtype) for p in parts], axis=axis)


def _check_offsets(offsets: np.ndarray, name: str) -> np.ndarray:
    if offsets.shape[0] == 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise BufferFileError(f"{name} must start at 0 and never decrease")
    return offsets


def _check_index(index: np.ndarray, size: int, name: str) -> None:
    if index.size and (index.min() < 0 or index.max() >= size):
        raise BufferFileError(f"{name} index out of range")


def _checksum(arrays: Mapping[str, np.ndarray]) -> str:
    crc = 0
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(repr((arr.dtype.str, arr.shape)).encode(), crc)
        crc = zlib.crc32(arr.reshape(-1).view(np.uint8), crc)
    return f"{crc:08x}"
