"""One training run as the analyzer sees it: graph, per-layer windows, seed slots, training state."""

from __future__ import annotations

import functools
import math
import operator
import zlib
from collections.abc import Callable, Sequence

import msgspec
import numpy as np

from esperd.analyzer import analysis, table as T
from esperd.analyzer.config import AnalyzerConfig, AnalyzerError
from esperd.analyzer.graph import Graph, components, gcn_normalize
from esperd.analyzer.ingest import QueuedHealth
from esperd.analyzer.masks import LIVE_STAGE, STAGE_ONE_HOT, op_mask
from esperd.analyzer.observation import (
    BLUEPRINT_INDEX,
    BLUEPRINTS,
    COUNTERFACTUAL_Z_SCALE,
    EPOCHS_REMAINING_SCALE,
    GLOBAL_FEATURE_INDEX,
    GLOBAL_FEATURES,
    HISTORY,
    LAYER_KINDS,
    METRIC_BUCKETS,
    NODE_FEATURE_INDEX,
    NODE_FEATURES,
    OP_INDEX,
    OPS,
    STAGE_INDEX,
    STAGES,
    Observation,
)
from esperd.analyzer.table import NodeArena, NodeTable
from esperd_contracts import (
    Blueprint,
    HardwareContext,
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    next_stage,
)
from esperd_contracts.status import MAX_LISTED_CLUSTERS, MAX_LISTED_LAYERS, RunAnalysis

_STAGE_SLICE = slice(T.STAGE_FIRST, T.STAGE_FIRST + STAGE_ONE_HOT.shape[0])
_FLAG_COLUMNS = [T.PROBLEMATIC, T.ATTENTION]
_STALENESS_SCALE_S = 60.0  # per the NODE_FEATURES contract
_KIND_ONE_HOT = np.eye(len(LAYER_KINDS), dtype=np.float32)
#: Ops after which a slot's seed has no blend weight (any other op leaves alpha as the host reported it).
_ALPHA_RESET = frozenset({Op.GERMINATE, Op.PRUNE})
_EPOCHS_IN_STAGE_SCALE = 12.0  # the longest blend tempo (glacial)
_LAYER_ID = operator.attrgetter("layer_id")
_GERMINATE = OP_INDEX[Op.GERMINATE]
_ANALYSIS = [
    NODE_FEATURE_INDEX[name]
    for name in (
        "latency_variance",
        "throughput_trend",
        "stability",
        "readiness",
        "depth",
        "position",
        "upstream_health",
        "downstream_health",
    )
]


_G = GLOBAL_FEATURE_INDEX
(
    _G_EPOCH,
    _G_TRAIN_LOSS,
    _G_VAL_LOSS,
    _G_TRAIN_ACCURACY,
    _G_VAL_ACCURACY,
    _G_VAL_ACCURACY_DELTA,
    _G_PLATEAU,
    _G_OVERALL_HEALTH,
    _G_PROBLEMATIC,
    _G_CLUSTERS,
    _G_PARAM_GROWTH,
    _G_ACTIVE,
    _G_LOG_NODES,
    _G_INFERRED,
    _G_BUDGET_KNOWN,
    _G_REMAINING,
    _G_GLOBAL_STEP,
    _G_LOSS_DELTA,
    _G_BEST_ACCURACY,
    _G_BEST_LOSS,
    _G_LOSS_HISTORY,
    _G_ACCURACY_HISTORY,
    _G_METRICS_COUNT,
) = (
    _G[name]
    for name in (
        "epoch",
        "train_loss",
        "val_loss",
        "train_accuracy",
        "val_accuracy",
        "val_accuracy_delta",
        "plateau_epochs",
        "overall_health",
        "problematic_fraction",
        "cluster_count",
        "param_growth",
        "active_seed_fraction",
        "log_nodes",
        "inferred_topology",
        "budget_known",
        "epochs_remaining",
        "global_step",
        "loss_delta",
        "best_val_accuracy",
        "best_val_loss",
        "loss_history_0",
        "accuracy_history_0",
        "metrics_count",
    )
)


# Called with a run's node and edge counts before its graph grows to them; raises AnalyzerError to refuse.
SizeCheck = Callable[[int, int], None]


class TrainingState(msgspec.Struct, kw_only=True):
    """The run-level numbers from the latest SystemStatePacket, plus what is derived across packets."""

    epoch: int = 0
    global_step: int = 0
    train_loss: float = 0.0
    val_loss: float = 0.0
    train_accuracy: float = 0.0
    val_accuracy: float = 0.0
    val_accuracy_delta: float = 0.0  # change since the previous packet
    val_loss_delta: float = 0.0  # likewise
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    # The last HISTORY packets' val loss and accuracy, newest first.
    loss_history: list[float] = []
    accuracy_history: list[float] = []
    metrics: dict[str, float] = {}  # the latest packet's metrics map
    hardware: HardwareContext | None = None  # the latest hardware a packet gave
    best_epoch: int = 0
    plateau_epochs: int = 0  # epochs since val accuracy last improved by plateau_min_delta
    host_params: int = 0
    total_params: int = 0
    total_epochs: int = 0  # the host's planned training length; 0 = unknown
    val_samples: int = 0  # validation samples behind val_accuracy; 0 = unknown
    done: bool = False
    packets: int = 0

    @property
    def epochs_remaining(self) -> int | None:
        """Epochs still to train after the latest packet, or None when the host did not say."""
        if not self.total_epochs:
            return None
        return max(self.total_epochs - self.epoch - 1, 0)


def counterfactual_se(mean: float, spread: float, samples: int, val_samples: int, default: float) -> float:
    """Standard error of a seed's mean counterfactual over `samples` epochs.

    Two parts. The validation set is finite: the counterfactual is a paired difference on the
    same `val_samples` samples, and at least |mean| * n of them changed their answer (at least
    one), so its error is at least sqrt(max(|mean|, 1/n) / n) -- a difference of a few samples is
    noise. It is the same set every epoch, so averaging epochs does not shrink it. And the seed's
    contribution moves from epoch to epoch (`spread`, the sample standard deviation), which does
    average out. Without the validation size, `default` stands for the first part.
    """
    finite = math.sqrt(max(abs(mean), 1.0 / val_samples) / val_samples) if val_samples > 0 else default
    return math.sqrt(finite * finite + (spread * spread / samples if samples > 1 else 0.0))


class RunSummary(msgspec.Struct, kw_only=True):
    """A small read-only view of one run for status endpoints."""

    run_id: str
    nodes: int
    edges: int
    inferred: bool
    topology_version: int
    problematic: int
    needs_attention: int
    clusters: int
    overall_health: float
    epoch: int
    done: bool
    idle_s: float
    dropped_signals: int


def _clip(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


@functools.lru_cache(maxsize=4096)
def _bucket(key: str) -> str:
    """The global feature a metric key is hashed into (crc32: the same in every process)."""
    return f"metric_bucket_{zlib.crc32(key.encode()) % METRIC_BUCKETS}"


@functools.lru_cache(maxsize=1024)
def _metric_buckets(items: tuple[tuple[str, float], ...]) -> tuple[tuple[int, float], ...]:
    """The metric bucket features of a metrics map's items, as (global column, value) pairs (see
    observation.GLOBAL_FEATURES); cached, as a host sends the same map packet after packet."""
    sums: dict[str, list[float]] = {}
    for key, value in items:
        squashed = math.copysign(math.log1p(abs(value)), value) / 10.0
        sums.setdefault(_bucket(key), []).append(squashed)
    return tuple(
        (GLOBAL_FEATURE_INDEX[name], _clip(sum(values) / len(values), -1.0, 1.0))
        for name, values in sums.items()
    )


def _hardware(hardware: HardwareContext | None) -> dict[str, float]:
    if hardware is None:
        return {}
    return {
        "hardware_known": 1.0,
        "gpu_utilization": hardware.gpu_utilization,
        "gpu_memory": min(math.log1p(hardware.gpu_memory_gb) / 7.0, 1.0),
        "cpu_utilization": hardware.cpu_utilization,
        "host_memory": min(math.log1p(hardware.host_memory_gb) / 7.0, 1.0),
    }


def _match_rows(old_ids: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
    """For each new layer id, the row holding it among `old_ids`, or -1."""
    if old_ids.shape[0] == 0:
        return np.full(new_ids.shape[0], -1, dtype=np.int64)
    order = np.argsort(old_ids)
    sorted_ids = old_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, new_ids), old_ids.shape[0] - 1)
    return np.where(sorted_ids[pos] == new_ids, order[pos], -1)


class RunState:
    """All the analyzer keeps about one run. Single-threaded: owned by the event loop."""

    def __init__(
        self,
        run_id: str,
        config: AnalyzerConfig,
        arena: NodeArena,
        now: float,
        size_check: SizeCheck | None = None,
    ) -> None:
        self.run_id = run_id
        self.config = config
        self.graph: Graph | None = None
        self.topology_version = 0  # bumps on every graph change, inferred growth included
        self.host_topology_version = 0  # as the host numbered its last TopologyPacket
        self.training = TrainingState()
        self.last_seen = now
        self.dropped_signals = 0  # signals for layers outside a host-declared topology
        self.gcn_builds = 0  # how often the GCN adjacency was computed (it is cached per version)
        self._size_check = size_check
        self._table = NodeTable(arena)
        self._row_of: dict[int, int] = {}
        self._node_rows: np.ndarray | None = None  # node index -> table row, per graph version
        self._gcn: tuple[np.ndarray, np.ndarray] | None = None
        self._clusters: list[np.ndarray] | None = None  # None: flags or graph changed since computed
        self._in_cluster = np.zeros(0, dtype=bool)
        # Host rejections of GERMINATE: layer id -> rejected blueprint indices, and the count per layer.
        # Counterfactuals measured on probation, per layer id: [count, mean, sum of squared deviations].
        self._probation_cf: dict[int, list[float]] = {}
        self._rejected: dict[int, set[int]] = {}
        self._germinate_rejections: dict[int, int] = {}
        self._rejection_version = 0
        # (topology version, rejection version) -> (blueprint mask, layers that may germinate), cached so
        # that the mask keeps its identity between changes (policy batching caches by it).
        self._masks: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ graph

    @property
    def num_nodes(self) -> int:
        return self._table.n

    def adopt(self, graph: Graph) -> bool:
        """Make a host-declared graph current; layers in both keep their history. True if it changed."""
        if graph.same_as(self.graph):
            return False
        table = self._table
        old_rows = _match_rows(table.layer, graph.layer_ids)
        table.reorder(old_rows, graph.layer_ids)
        table.feat[:, T.LOG_PARAMS] = np.log10(graph.params + 1.0) / 10.0
        table.feat[:, T.FAMILY_CNN] = graph.family_cnn
        table.feat[:, T.KIND_FIRST : T.KIND_FIRST + len(LAYER_KINDS)] = _KIND_ONE_HOT[graph.kind_index]
        self._row_of = dict(zip(graph.layer_ids.tolist(), range(graph.num_nodes), strict=True))
        self._set_graph(graph)
        return True

    def _grow_inferred(self, layer_ids: Sequence[int]) -> None:
        """Add layers known only from signals; until a topology arrives they form a chain by id."""
        if self.graph is not None and not self.graph.inferred:
            return
        cap = self.config.max_nodes_per_run
        if self._table.n + len(layer_ids) > cap:
            raise AnalyzerError("too_many_nodes", f"run {self.run_id} would exceed {cap} layers")
        first = self._table.n
        if self._size_check is not None:
            self._size_check(first + len(layer_ids), first + len(layer_ids) - 1)  # the chain's edges
        for offset, layer_id in enumerate(layer_ids):
            self._row_of[layer_id] = first + offset
        self._table.append(layer_ids)
        self._set_graph(Graph.chain(self._table.layer[: self._table.n]))

    def _set_graph(self, graph: Graph) -> None:
        self.graph = graph
        self.topology_version += 1
        self._node_rows = None
        self._gcn = None
        self._clusters = None

    def _rows(self) -> np.ndarray:
        """Table row of each node, in node (layer id) order."""
        if self._node_rows is None:
            self._node_rows = np.argsort(self._table.layer[: self._table.n], kind="stable")
        return self._node_rows

    def gcn_adjacency(self) -> tuple[np.ndarray, np.ndarray]:
        """The normalized adjacency of the current graph, computed once per topology version."""
        if self._gcn is None:
            assert self.graph is not None
            self._gcn = gcn_normalize(self.graph.edge_index, self.graph.num_nodes)
            self.gcn_builds += 1
        return self._gcn

    # ---------------------------------------------------------------- signals

    def queue_signals(self, signals: Sequence[HealthSignal], batch_ts: float, now: float) -> QueuedHealth:
        """The signals as a queue entry for esperd.analyzer.ingest (which applies them, in order).

        Layers first seen here are added now (an inferred graph grows; AnalyzerError if it may not),
        and signals for layers a host-declared topology lacks are dropped and counted.
        """
        row_of = self._row_of
        rows: list[int | None] = list(map(row_of.get, map(_LAYER_ID, signals)))
        if None in rows:
            new = [s.layer_id for s, row in zip(signals, rows, strict=True) if row is None]
            self._grow_inferred(list(dict.fromkeys(new)))  # all at once: one graph rebuild per batch
            rows = list(map(row_of.get, map(_LAYER_ID, signals)))
            if None in rows:  # layers the host's own topology does not declare
                kept = [(s, row) for s, row in zip(signals, rows, strict=True) if row is not None]
                self.dropped_signals += len(rows) - len(kept)
                signals = [s for s, _ in kept]
                rows = [row for _, row in kept]
        self.last_seen = now
        return QueuedHealth(self._table, rows, signals, batch_ts, now)  # type: ignore[arg-type]  # no None left

    def applied(self, flipped: bool) -> None:
        """Queued signals were applied; `flipped`: some layer's problematic flag changed."""
        if flipped:
            self._clusters = None  # problem clusters must be recomputed

    def release(self) -> None:
        """Give the run's rows back to the arena (the run is forgotten)."""
        self._table.release()

    # ------------------------------------------------------------------ state

    def ingest_state(self, packet: SystemStatePacket, now: float) -> bool:
        """Apply a state packet; True if a seed slot changed stage or the run just finished."""
        slots = [slot for slot in packet.seeds if slot.seed_id == 0]  # one actionable slot per layer (v1)
        new = [slot.layer_id for slot in slots if slot.layer_id not in self._row_of]
        if new:
            self._grow_inferred(list(dict.fromkeys(new)))
        material = self._update_training(packet)
        feat, aux = self._table.feat, self._table.aux
        ts = packet.timestamp
        for slot in slots:
            row = self._row_of.get(slot.layer_id)
            if row is None or (ts != 0.0 and ts < aux[row, T.SLOT_TS]):
                continue
            stage = STAGE_INDEX[slot.stage]
            material |= bool(stage != aux[row, T.STAGE])
            feat[row, T.ALPHA : T.ALPHA + 2] = (
                slot.alpha,
                min(slot.epochs_in_stage / _EPOCHS_IN_STAGE_SCALE, 1.0),
            )
            feat[row, T.COUNTERFACTUAL : T.COUNTERFACTUAL + 2] = (
                _clip(slot.counterfactual, -1.0, 1.0),
                _clip(slot.total_improvement, -1.0, 1.0),
            )
            feat[row, T.COUNTERFACTUAL_Z] = self._counterfactual_z(slot.layer_id, slot)
            self._set_blueprint(row, slot.blueprint)
            feat[row, T.MILESTONE_FIRST : T.MILESTONE_END] = [
                0.0 if value is None else _clip(value, -1.0, 1.0)
                for value in (
                    slot.counterfactual_alpha25,
                    slot.counterfactual_alpha50,
                    slot.counterfactual_alpha75,
                    slot.counterfactual_alpha100,
                )
            ]
            aux[row, T.SLOT_TS : T.STAGE + 1] = (max(ts, aux[row, T.SLOT_TS]), stage)
        self.last_seen = now
        return material

    def _counterfactual_z(self, layer_id: int, slot: SeedSlotState) -> float:
        """Fold a probation counterfactual into the layer's running mean; its z feature (0 off probation)."""
        if slot.stage is not SeedStage.PROBATIONARY:
            self._probation_cf.pop(layer_id, None)
            return 0.0
        stats = self._probation_cf.setdefault(layer_id, [0.0, 0.0, 0.0])
        stats[0] += 1.0
        delta = slot.counterfactual - stats[1]
        stats[1] += delta / stats[0]
        stats[2] += delta * (slot.counterfactual - stats[1])
        count, mean = int(stats[0]), stats[1]
        spread = math.sqrt(stats[2] / (count - 1)) if count > 1 else 0.0
        se = counterfactual_se(mean, spread, count, self.training.val_samples, self.config.counterfactual_se)
        return _clip(mean / se / COUNTERFACTUAL_Z_SCALE, -1.0, 1.0)

    # ------------------------------------------------------------------- acks

    def _set_blueprint(self, row: int, blueprint: Blueprint | None) -> None:
        """The slot's blueprint one-hot (all 0 for none)."""
        columns = self._table.feat[row, T.BLUEPRINT_FIRST : T.BLUEPRINT_FIRST + len(BLUEPRINTS)]
        columns[:] = 0.0
        if blueprint is not None:
            columns[BLUEPRINT_INDEX[blueprint]] = 1.0

    def note_applied(
        self, layer_id: int, op: Op, timestamp: float = 0.0, blueprint: Blueprint | None = None
    ) -> bool:
        """The host applied `op` on a layer's slot: move our view of its stage now, not at the next
        packet (which reconciles it). False when our view does not allow `op` (it was stale)."""
        row = self._row_of.get(layer_id)
        if row is None or op is Op.WAIT:
            return False
        aux, feat = self._table.aux, self._table.feat
        stage = STAGES[int(aux[row, T.STAGE])]
        try:
            target = next_stage(stage, op)
        except ValueError:
            return False
        if target is not stage:
            feat[row, T.ALPHA + 1] = 0.0  # epochs in the new stage
        if op in _ALPHA_RESET:  # a new seed, or none: what was measured of the old one is gone
            feat[row, T.ALPHA] = 0.0
            feat[row, T.COUNTERFACTUAL : T.COUNTERFACTUAL + 2] = 0.0
            feat[row, T.LEVER_FIRST : T.LEVER_END] = 0.0
            feat[row, T.MILESTONE_FIRST : T.MILESTONE_END] = 0.0
            self._set_blueprint(row, blueprint if op is Op.GERMINATE else None)
        if target is not SeedStage.PROBATIONARY:
            feat[row, T.COUNTERFACTUAL_Z] = 0.0
            self._probation_cf.pop(layer_id, None)
        # Slot information the host stamped before it applied the op must not undo it.
        aux[row, T.SLOT_TS : T.STAGE + 1] = (max(timestamp, aux[row, T.SLOT_TS]), STAGE_INDEX[target])
        return True

    def note_rejected(self, layer_id: int, op: Op, blueprint: Blueprint | None) -> None:
        """The host rejected `op` on a layer. A rejected GERMINATE masks its blueprint there."""
        if op is not Op.GERMINATE:
            return
        count = self._germinate_rejections.get(layer_id, 0) + 1
        self._germinate_rejections[layer_id] = count
        if blueprint is not None:
            self._rejected.setdefault(layer_id, set()).add(BLUEPRINT_INDEX[blueprint])
        self._rejection_version += 1

    def _action_masks(self, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
        """(blueprint mask, can germinate) with the host's rejections applied; cached per change."""
        key = (self.topology_version, self._rejection_version)
        if self._masks is not None and self._masks[0] == key:
            return self._masks[1], self._masks[2]
        if not self._rejected and not self._germinate_rejections:
            blueprints, can = graph.blueprint_mask, graph.can_germinate
        else:
            blueprints, can = graph.blueprint_mask.copy(), graph.can_germinate.copy()
            cfg = self.config
            layers_per_blueprint = np.zeros(len(BLUEPRINTS), dtype=np.int64)
            for rejected in self._rejected.values():
                layers_per_blueprint[list(rejected)] += 1
            blueprints[:, layers_per_blueprint >= cfg.blueprint_rejections_run_wide] = False
            node_of = {layer_id: i for i, layer_id in enumerate(graph.layer_ids.tolist())}
            for layer_id, rejected in self._rejected.items():
                node = node_of.get(layer_id)
                if node is not None:
                    blueprints[node, list(rejected)] = False
            for layer_id, count in self._germinate_rejections.items():
                node = node_of.get(layer_id)
                if node is not None and count >= cfg.max_germinate_rejections:
                    can[node] = False
            can &= blueprints.any(axis=1)
            blueprints.flags.writeable = False
            can.flags.writeable = False
        self._masks = (key, blueprints, can)
        return blueprints, can

    def _update_training(self, p: SystemStatePacket) -> bool:
        tr = self.training
        finished = p.done and not tr.done
        tr.val_accuracy_delta = p.val_accuracy - tr.val_accuracy if tr.packets else 0.0
        tr.val_loss_delta = p.val_loss - tr.val_loss if tr.packets else 0.0
        tr.best_val_loss = min(tr.best_val_loss, p.val_loss)
        tr.loss_history = [p.val_loss, *tr.loss_history[: HISTORY - 1]]
        tr.accuracy_history = [p.val_accuracy, *tr.accuracy_history[: HISTORY - 1]]
        tr.metrics = dict(p.metrics)
        tr.hardware = p.hardware or tr.hardware
        if p.val_accuracy > tr.best_val_accuracy + self.config.plateau_min_delta or not tr.packets:
            tr.best_val_accuracy, tr.best_epoch = p.val_accuracy, p.epoch
        tr.plateau_epochs = max(p.epoch - tr.best_epoch, 0)
        tr.epoch, tr.global_step = p.epoch, p.global_step
        tr.train_loss, tr.val_loss = p.train_loss, p.val_loss
        tr.train_accuracy, tr.val_accuracy = p.train_accuracy, p.val_accuracy
        if p.host_params:  # a packet that omits the sizes keeps the last known ones
            tr.host_params, tr.total_params = p.host_params, p.total_params
        tr.total_epochs = p.total_epochs or tr.total_epochs  # likewise the budget and validation size
        tr.val_samples = p.val_samples or tr.val_samples
        tr.done = tr.done or p.done
        tr.packets += 1
        return finished

    # ---------------------------------------------------------------- analysis

    def _problematic(self) -> np.ndarray:
        """is_problematic per node, in node order."""
        problematic: np.ndarray = self._table.feat[self._rows(), T.PROBLEMATIC] > 0.5
        return problematic

    def _cluster_state(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Problem clusters (node indices) and in-cluster flags, recomputed only after a flag flip."""
        if self._clusters is None:
            assert self.graph is not None
            self._clusters = components(self.graph.edge_index, self._problematic())
            in_cluster = np.zeros(self.graph.num_nodes, dtype=bool)
            for group in self._clusters:
                if group.size >= 2:
                    in_cluster[group] = True
            self._in_cluster = in_cluster
        return self._clusters, self._in_cluster

    def clusters(self) -> list[list[int]]:
        """Connected groups of problematic layers (layer ids) over the undirected graph."""
        if self.graph is None:
            return []
        groups, _ = self._cluster_state()
        return [self.graph.layer_ids[group].tolist() for group in groups]

    def overall_health(self) -> float:
        """Mean health of the layers that reported, weighted by seed count (max(total_seeds, 1))."""
        n = self._table.n
        aux = self._table.aux[:n]
        reported = aux[:, T.LAST_SEEN] > -np.inf
        if not reported.any():
            return self.config.default_health
        weights = aux[reported, T.WEIGHT]
        health = self._table.feat[:n][reported, T.HEALTH].astype(np.float64)
        return float(np.dot(health, weights) / weights.sum())

    def observe(self, now: float) -> Observation:
        """The run as arrays for the policy (see observation.py). Resets the material-change baseline."""
        graph = self.graph
        if graph is None:
            return self._empty_observation(now)
        rows = self._rows()
        table = self._table
        x = table.feat[rows]  # fancy indexing: a fresh copy the caller may keep
        aux = table.aux[rows]
        stages = aux[:, T.STAGE].astype(np.int64)
        groups, in_cluster = self._cluster_state()
        x[:, T.IN_CLUSTER] = in_cluster
        x[:, T.STALENESS] = np.clip((now - aux[:, T.LAST_SEEN]) / _STALENESS_SCALE_S, 0.0, 1.0)
        x[:, _STAGE_SLICE] = STAGE_ONE_HOT[stages]
        gcn_index, gcn_weight = self.gcn_adjacency()
        blueprint_mask, can_germinate = self._action_masks(graph)
        ops = op_mask(stages, can_germinate)
        x[:, _ANALYSIS] = self._analysis(graph, rows, x, aux, ops[:, _GERMINATE])
        n = table.n
        # The baseline health as reported (float64), not the float32 feature (see table.SEEN_HEALTH).
        table.aux[:n, T.SEEN_HEALTH] = table.arena.latest(
            table.start + np.arange(n), self.config.default_health
        )
        table.aux[:n, T.SEEN_PROBLEMATIC : T.SEEN_ATTENTION + 1] = table.feat[:n][:, _FLAG_COLUMNS]
        return Observation(
            run_id=self.run_id,
            topology_version=self.topology_version,
            layer_ids=graph.layer_ids,
            node_features=x,
            edge_index=graph.edge_index,
            gcn_edge_index=gcn_index,
            gcn_edge_weight=gcn_weight,
            global_features=self._global_features(x, stages, len(groups)),
            op_mask=ops,
            blueprint_mask=blueprint_mask,
            stages=stages,
            epoch=self.training.epoch,
            timestamp=now,
        )

    def _analysis(
        self, graph: Graph, rows: np.ndarray, x: np.ndarray, aux: np.ndarray, germinate: np.ndarray
    ) -> np.ndarray:
        """001's per-layer analysis (esperd.analyzer.analysis), columns in _ANALYSIS order."""
        table = self._table
        window = table.arena.win[table.start + rows]
        spread = analysis.health_spread(window, aux[:, T.W_COUNT])
        latency = analysis.latency_variance(aux[:, T.LAT_MEAN], aux[:, T.LAT_VAR])
        steady = analysis.stability(spread, latency)
        ready = analysis.readiness(germinate, x[:, T.EWMA], steady, x[:, T.STALENESS])
        depth, position = analysis.position(graph.depth)
        upstream, downstream = analysis.neighbour_health(
            graph.edge_index, x[:, T.HEALTH], self.config.default_health
        )
        trend = np.clip(aux[:, T.TPUT_TREND], -1.0, 1.0)
        return np.stack([latency, trend, steady, ready, depth, position, upstream, downstream], axis=1)

    def _global_features(self, x: np.ndarray, stages: np.ndarray, n_clusters: int) -> np.ndarray:
        n = x.shape[0]
        row = self.global_row(
            n,
            int(np.count_nonzero(x[:, T.PROBLEMATIC])),
            int(np.count_nonzero(LIVE_STAGE[stages])),
            n_clusters,
            self.overall_health(),
        )
        return np.array(row, dtype=np.float32)

    def global_row(
        self, n: int, problematic: int, active: int, n_clusters: int, overall_health: float
    ) -> list[float]:
        """The global features (GLOBAL_FEATURES order, float64) from the run's training state and
        the node counts an observation found (`n` nodes, `problematic` flagged, `active` live seeds)."""
        tr = self.training
        growth = tr.total_params / tr.host_params - 1.0 if tr.host_params else 0.0
        remaining = tr.epochs_remaining
        row = [0.0] * len(GLOBAL_FEATURES)
        row[_G_EPOCH] = min(tr.epoch / 100.0, 1.0)
        row[_G_TRAIN_LOSS] = math.log1p(tr.train_loss)
        row[_G_VAL_LOSS] = math.log1p(tr.val_loss)
        row[_G_TRAIN_ACCURACY] = tr.train_accuracy
        row[_G_VAL_ACCURACY] = tr.val_accuracy
        row[_G_VAL_ACCURACY_DELTA] = _clip(tr.val_accuracy_delta, -1.0, 1.0)
        row[_G_PLATEAU] = min(tr.plateau_epochs / 10.0, 1.0)
        row[_G_OVERALL_HEALTH] = overall_health
        row[_G_PROBLEMATIC] = problematic / n if n else 0.0
        row[_G_CLUSTERS] = min(n_clusters / 10.0, 1.0)
        row[_G_PARAM_GROWTH] = _clip(growth, 0.0, 1.0)
        row[_G_ACTIVE] = active / n if n else 0.0
        row[_G_LOG_NODES] = math.log10(n + 1) / 4.0
        row[_G_INFERRED] = float(self.graph is None or self.graph.inferred)
        row[_G_BUDGET_KNOWN] = float(tr.total_epochs > 0)
        row[_G_REMAINING] = 1.0 if remaining is None else min(remaining / EPOCHS_REMAINING_SCALE, 1.0)
        row[_G_GLOBAL_STEP] = min(math.log10(tr.global_step + 1) / 7.0, 1.0)
        row[_G_LOSS_DELTA] = _clip(tr.val_loss_delta, -1.0, 1.0)
        row[_G_BEST_ACCURACY] = max(tr.best_val_accuracy, 0.0)
        row[_G_BEST_LOSS] = math.log1p(tr.best_val_loss) if tr.packets else 0.0
        for k, v in enumerate(tr.loss_history):
            row[_G_LOSS_HISTORY + k] = math.log1p(v)
        for k, v in enumerate(tr.accuracy_history):
            row[_G_ACCURACY_HISTORY + k] = v
        if tr.metrics:
            for column, value in _metric_buckets(tuple(tr.metrics.items())):
                row[column] = value
        row[_G_METRICS_COUNT] = min(len(tr.metrics) / 16.0, 1.0)
        for name, value in _hardware(tr.hardware).items():
            row[GLOBAL_FEATURE_INDEX[name]] = value
        return row

    def _empty_observation(self, now: float) -> Observation:
        """A run known only from state packets: no nodes yet, global features only."""
        no_nodes = np.zeros(0, dtype=np.int64)
        return Observation(
            run_id=self.run_id,
            topology_version=self.topology_version,
            layer_ids=no_nodes,
            node_features=np.zeros((0, len(NODE_FEATURES)), dtype=np.float32),
            edge_index=np.zeros((2, 0), dtype=np.int64),
            gcn_edge_index=np.zeros((2, 0), dtype=np.int64),
            gcn_edge_weight=np.zeros(0, dtype=np.float32),
            global_features=self._global_features(np.zeros((0, len(NODE_FEATURES)), np.float32), no_nodes, 0),
            op_mask=np.zeros((0, len(OPS)), dtype=bool),
            blueprint_mask=np.zeros((0, len(BLUEPRINTS)), dtype=bool),
            stages=no_nodes,
            epoch=self.training.epoch,
            timestamp=now,
        )

    def analysis(self) -> RunAnalysis:
        """The run's analysis summary for the status: counts, and which layers (listing bounded)."""
        if self.graph is None:
            return RunAnalysis(
                run_id=self.run_id,
                layers=0,
                overall_health=self.overall_health(),
                problematic=0,
                needs_attention=0,
                clusters=0,
                epoch=self.training.epoch,
                done=self.training.done,
            )
        rows = self._rows()
        feat = self._table.feat[rows]
        ids = self.graph.layer_ids
        problematic = ids[feat[:, T.PROBLEMATIC] > 0.5]
        attention = ids[feat[:, T.ATTENTION] > 0.5]
        clusters = sorted(self.clusters(), key=len, reverse=True)
        return RunAnalysis(
            run_id=self.run_id,
            layers=self.graph.num_nodes,
            overall_health=self.overall_health(),
            problematic=int(problematic.shape[0]),
            needs_attention=int(attention.shape[0]),
            clusters=len(clusters),
            problematic_layers=problematic[:MAX_LISTED_LAYERS].tolist(),
            attention_layers=attention[:MAX_LISTED_LAYERS].tolist(),
            cluster_layers=[group[:MAX_LISTED_LAYERS] for group in clusters[:MAX_LISTED_CLUSTERS]],
            epoch=self.training.epoch,
            done=self.training.done,
        )

    def summary(self, now: float) -> RunSummary:
        n = self._table.n
        feat = self._table.feat[:n]
        return RunSummary(
            run_id=self.run_id,
            nodes=n,
            edges=self.graph.num_edges if self.graph is not None else 0,
            inferred=self.graph is None or self.graph.inferred,
            topology_version=self.topology_version,
            problematic=int(np.count_nonzero(feat[:, T.PROBLEMATIC])),
            needs_attention=int(np.count_nonzero(feat[:, T.ATTENTION])),
            clusters=len(self.clusters()),
            overall_health=self.overall_health(),
            epoch=self.training.epoch,
            done=self.training.done,
            idle_s=max(now - self.last_seen, 0.0),
            dropped_signals=self.dropped_signals,
        )
