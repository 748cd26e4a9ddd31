"""Many runs observed in one vectorized pass (`Analyzer.observe_many`).

`RunState.observe` costs a few dozen numpy calls per run, whatever the run's size; with many
small runs (the simulator steps 64 at once) those fixed costs are most of the work. Here every
per-node step runs once over the nodes of all the runs, concatenated in run order, and each run's
Observation gets its rows as views of the shared arrays. Per run there is only what is cached per
graph (GCN adjacency, masks, problem clusters) and the global features' Python scalars.

The values are `RunState.observe`'s, step for step: every per-node operation is the same
elementwise numpy operation, and the neighbour sums add the same edges in the same order. The
overall health is a per-run sum here (a dot product there), so it may differ in the last bit.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import msgspec
import numpy as np

from esperd.analyzer import analysis, table as T
from esperd.analyzer.ingest import _STAGE_OF_ID
from esperd.analyzer.masks import GERMINATE, LIVE_STAGE, STAGE_ONE_HOT, STAGE_OP_MASK
from esperd.analyzer.observation import BLUEPRINT_INDEX, BLUEPRINTS, STAGE_INDEX, Observation
from esperd.analyzer.run import (
    _ANALYSIS,
    _EPOCHS_IN_STAGE_SCALE,
    _FLAG_COLUMNS,
    _LAYER_ID,
    _STAGE_SLICE,
    _STALENESS_SCALE_S,
    RunState,
)
from esperd_contracts import SeedSlotState, SeedStage, SystemStatePacket


def observe_runs(runs: Sequence[RunState], now: float) -> list[Observation]:
    """`[run.observe(now) for run in runs]`, computed together (see the module doc)."""
    out: list[Observation | None] = [None] * len(runs)
    batch = []
    for i, run in enumerate(runs):
        if run.graph is None or run.graph.num_nodes == 0:
            out[i] = run.observe(now)
        else:
            batch.append(i)
    if batch:
        for i, obs in zip(batch, _observe_graphs([runs[i] for i in batch], now), strict=True):
            out[i] = obs
    return out  # type: ignore[return-value]  # every slot is filled


def _observe_graphs(runs: Sequence[RunState], now: float) -> list[Observation]:
    """Runs that all have a graph of at least one node."""
    arena = runs[0]._table.arena
    cfg = runs[0].config
    graphs = [run.graph for run in runs]
    sizes = np.fromiter((g.num_nodes for g in graphs), np.int64, len(runs))  # type: ignore[union-attr]
    offsets = np.zeros(len(runs) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    starts = offsets[:-1]
    rows = np.concatenate([run._rows() + run._table.start for run in runs])
    x = arena.feat[rows]
    aux = arena.aux[rows]
    stages = aux[:, T.STAGE].astype(np.int64)
    cluster_states = [run._cluster_state() for run in runs]
    masks = [run._action_masks(g) for run, g in zip(runs, graphs, strict=True)]  # type: ignore[arg-type]
    x[:, T.IN_CLUSTER] = np.concatenate([in_cluster for _, in_cluster in cluster_states])
    x[:, T.STALENESS] = np.clip((now - aux[:, T.LAST_SEEN]) / _STALENESS_SCALE_S, 0.0, 1.0)
    x[:, _STAGE_SLICE] = STAGE_ONE_HOT[stages]
    ops = STAGE_OP_MASK[stages]
    ops[:, GERMINATE] &= np.concatenate([can for _, can in masks])
    # 001's analysis (RunState._analysis), over every node at once.
    spread = analysis.health_spread(arena.win[rows], aux[:, T.W_COUNT])
    latency = analysis.latency_variance(aux[:, T.LAT_MEAN], aux[:, T.LAT_VAR])
    steady = analysis.stability(spread, latency)
    ready = analysis.readiness(ops[:, GERMINATE], x[:, T.EWMA], steady, x[:, T.STALENESS])
    depth = np.concatenate([g.depth for g in graphs])  # type: ignore[union-attr]
    deepest = np.repeat(np.maximum.reduceat(depth, starts), sizes)
    scaled = np.minimum(depth / analysis.DEPTH_SCALE, 1.0)
    relative = np.where(deepest > 0, depth / np.maximum(deepest, 1), 0.0)
    edges = np.concatenate(
        [g.edge_index + start for g, start in zip(graphs, starts.tolist(), strict=True)],  # type: ignore[union-attr]
        axis=1,
    )
    upstream, downstream = analysis.neighbour_health(edges, x[:, T.HEALTH], cfg.default_health)
    trend = np.clip(aux[:, T.TPUT_TREND], -1.0, 1.0)
    columns = [latency, trend, steady, ready, scaled, relative, upstream, downstream]
    x[:, _ANALYSIS] = np.stack(columns, axis=1)
    # The material-change baseline (RunState.observe): health as reported, and the flags.
    arena.aux[rows, T.SEEN_HEALTH] = arena.latest(rows, cfg.default_health)
    arena.aux[rows, T.SEEN_PROBLEMATIC : T.SEEN_ATTENTION + 1] = arena.feat[rows][:, _FLAG_COLUMNS]
    # Global features: the node counts and the overall health per run, then each run's scalars.
    problematic = np.add.reduceat(x[:, T.PROBLEMATIC] != 0, starts).tolist()
    active = np.add.reduceat(LIVE_STAGE[stages], starts).tolist()
    reported = aux[:, T.LAST_SEEN] > -np.inf
    weights = np.where(reported, aux[:, T.WEIGHT], 0.0)
    weighted = np.add.reduceat(x[:, T.HEALTH].astype(np.float64) * weights, starts)
    total = np.add.reduceat(weights, starts)
    any_reported = np.add.reduceat(reported, starts) > 0
    overall = np.where(any_reported, weighted / np.where(any_reported, total, 1.0), cfg.default_health)
    globals_ = np.array(
        [
            run.global_row(n, p, a, len(clusters), h)
            for run, n, p, a, (clusters, _), h in zip(
                runs, sizes.tolist(), problematic, active, cluster_states, overall.tolist(), strict=True
            )
        ],
        dtype=np.float32,
    )
    observations = []
    for k, (run, graph, (blueprint_mask, _)) in enumerate(zip(runs, graphs, masks, strict=True)):
        assert graph is not None
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        gcn_index, gcn_weight = run.gcn_adjacency()
        observations.append(
            Observation(
                run_id=run.run_id,
                topology_version=run.topology_version,
                layer_ids=graph.layer_ids,
                node_features=x[lo:hi],
                edge_index=graph.edge_index,
                gcn_edge_index=gcn_index,
                gcn_edge_weight=gcn_weight,
                global_features=globals_[k],
                op_mask=ops[lo:hi],
                blueprint_mask=blueprint_mask,
                stages=stages[lo:hi],
                epoch=run.training.epoch,
                timestamp=now,
            )
        )
    return observations


_SLOT_FIELD = {name: i for i, name in enumerate(SeedSlotState.__struct_fields__)}
_SLOT_WIDTH = len(_SLOT_FIELD)
_SLOT_NUMERIC = [
    _SLOT_FIELD[name]
    for name in ("layer_id", "alpha", "epochs_in_stage", "counterfactual", "total_improvement", "seed_id")
]
_SLOT_MILESTONES = [_SLOT_FIELD[f"counterfactual_alpha{a}"] for a in (25, 50, 75, 100)]
_BLUEPRINT_OF_ID = {id(bp): i for bp, i in BLUEPRINT_INDEX.items()}
_BLUEPRINT_OF_ID[id(None)] = -1
_PROBATIONARY = STAGE_INDEX[SeedStage.PROBATIONARY]
_BLUEPRINT_COLUMNS = slice(T.BLUEPRINT_FIRST, T.BLUEPRINT_FIRST + len(BLUEPRINTS))


def ingest_states(runs: Sequence[RunState], packets: Sequence[SystemStatePacket], now: float) -> list[bool]:
    """`[run.ingest_state(packet, now) ...]`, the seed slots of all the packets applied in one
    vectorized pass (the training numbers and probation counterfactuals stay per run, in Python).
    A packet with a slot for a layer its run lacks (the graph grows), or a layer twice, is applied
    on its own first, as RunState.ingest_state would."""
    material = [False] * len(runs)
    batch: list[int] = []
    rows: list[list[int]] = []
    for i, (run, packet) in enumerate(zip(runs, packets, strict=True)):
        local = list(map(run._row_of.get, map(_LAYER_ID, packet.seeds)))
        if None in local or len(set(local)) != len(local):
            material[i] = run.ingest_state(packet, now)
        else:
            batch.append(i)
            rows.append(local)  # type: ignore[arg-type]  # no None left
    if not batch:
        return material
    for i in batch:
        runs[i].last_seen = now
        material[i] = runs[i]._update_training(packets[i])
    counts = np.fromiter((len(rows[k]) for k in range(len(batch))), np.int64, len(batch))
    total = int(counts.sum())
    if total == 0:
        return material
    slots = list(itertools.chain.from_iterable(packets[i].seeds for i in batch))
    fields = np.fromiter(
        itertools.chain.from_iterable(map(msgspec.structs.astuple, slots)), object, total * _SLOT_WIDTH
    ).reshape(total, _SLOT_WIDTH)
    layer, alpha, epochs, cf, ti, seed_id = fields[:, _SLOT_NUMERIC].T.astype(np.float64)
    stages = map(id, fields[:, _SLOT_FIELD["stage"]])  # by identity, as ingest reads signals' stages
    stage = np.fromiter(map(_STAGE_OF_ID.__getitem__, stages), np.int64, total)
    blueprint = np.fromiter(
        map(_BLUEPRINT_OF_ID.__getitem__, map(id, fields[:, _SLOT_FIELD["blueprint"]])), np.int64, total
    )
    milestones = fields[:, _SLOT_MILESTONES]
    unset = np.frompyfunc(lambda value: value is None, 1, 1)(milestones).astype(bool)
    milestones = np.clip(np.where(unset, 0.0, milestones).astype(np.float64), -1.0, 1.0)
    message = np.repeat(np.arange(len(batch)), counts)
    start = np.fromiter((runs[i]._table.start for i in batch), np.int64, len(batch))
    row = np.fromiter(itertools.chain.from_iterable(rows), np.int64, total) + start[message]
    ts = np.fromiter((packets[i].timestamp for i in batch), np.float64, len(batch))[message]
    arena = runs[batch[0]]._table.arena
    feat, aux = arena.feat, arena.aux
    slot_ts = aux[row, T.SLOT_TS]
    # One actionable slot per layer (v1); slot information older than what is held is ignored.
    take = (seed_id == 0) & ((ts == 0.0) | (ts >= slot_ts))
    changed = take & (stage != aux[row, T.STAGE])
    sel = np.flatnonzero(take)
    r = row[sel]
    feat[r, T.ALPHA] = alpha[sel]
    feat[r, T.ALPHA + 1] = np.minimum(epochs[sel] / _EPOCHS_IN_STAGE_SCALE, 1.0)
    feat[r, T.COUNTERFACTUAL] = np.clip(cf[sel], -1.0, 1.0)
    feat[r, T.COUNTERFACTUAL + 1] = np.clip(ti[sel], -1.0, 1.0)
    feat[r, T.COUNTERFACTUAL_Z] = 0.0
    one_hot = np.zeros((sel.size, len(BLUEPRINTS)), dtype=np.float32)
    has = blueprint[sel] >= 0
    one_hot[np.flatnonzero(has), blueprint[sel][has]] = 1.0
    feat[r, _BLUEPRINT_COLUMNS] = one_hot
    feat[r, T.MILESTONE_FIRST : T.MILESTONE_END] = milestones[sel]
    aux[r, T.SLOT_TS] = np.maximum(ts[sel], slot_ts[sel])
    aux[r, T.STAGE] = stage[sel]
    # The probation counterfactuals are running statistics per layer: folded in per slot, in order.
    # Only slots on probation, and slots of runs with statistics to drop, need a look.
    holding = np.fromiter((bool(runs[i]._probation_cf) for i in batch), bool, len(batch))
    probation = stage == _PROBATIONARY
    for k in sel[probation[sel] | holding[message[sel]]].tolist():
        run = runs[batch[int(message[k])]]
        if probation[k]:
            feat[row[k], T.COUNTERFACTUAL_Z] = run._counterfactual_z(int(layer[k]), slots[k])
        else:
            run._probation_cf.pop(int(layer[k]), None)
    for k in np.unique(message[changed]).tolist():
        material[batch[k]] = True
    return material
