"""Health signals applied to the node arena in one vectorized pass over many messages and runs.

What one signal does to its layer's row (the semantics `RunState` documented per signal, kept
exactly): push the health into the layer's trend window (least-squares slope and EWMA, O(1));
set the problematic / needs-attention flags from health, trend and errors; take the slot's
stage, alpha, epochs in stage, blending velocity and the lever telemetry (issue 16) when the
signal speaks of seed slot 0 and is not older than the slot information held (host timestamps);
write the telemetry features;
and report a material change (stage changed, a flag differs from the run's last observation,
or health moved more than `material_health_delta` since then).

Here the signals of every queued message are read into columns once (`msgspec.structs.astuple`
and `zip`: C loops, no Python per field), and each step above is one numpy operation over all of
them. A layer that appears more than once (two messages of one run, or a repeated layer in a
batch) is applied in rounds: its k-th signal in the k-th round, so signals of one layer are
applied in the order they came, as one at a time would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import msgspec
import numpy as np

from esperd.analyzer import table as T
from esperd.analyzer.config import AnalyzerConfig
from esperd.analyzer.masks import DORMANT
from esperd.analyzer.observation import LEVER_TELEMETRY, NODE_FEATURE_INDEX, STAGE_INDEX
from esperd.analyzer.table import NodeArena
from esperd_contracts import HealthSignal, SeedStage

_EPOCHS_IN_STAGE_SCALE = 12.0  # the longest blend tempo (glacial)
_F = NODE_FEATURE_INDEX
_FIELD = {name: i for i, name in enumerate(HealthSignal.__struct_fields__)}
_NUMERIC = (
    "health_score",
    "seed_id",
    "activation_variance",
    "dead_neuron_ratio",
    "avg_correlation",
    "execution_latency_us",
    "error_count",
    "active_seeds",
    "total_seeds",
    "timestamp",
    "gradient_norm",
    "seed_gradient_ratio",
    "alpha",
    "epochs_in_stage",
    "blending_velocity",
    *LEVER_TELEMETRY,
)
_NUMERIC_COLUMNS = [_FIELD[name] for name in _NUMERIC]
_DORMANT_STAGE = SeedStage.DORMANT
_WIDTH = len(_FIELD)
_STAGE_OF_ID = {id(stage): index for stage, index in STAGE_INDEX.items()}
# How each lever telemetry field becomes its feature (see observation.NODE_FEATURES): clipped
# into [low, high], or squashed as x / (1 + x) (norms and variances, unbounded on the wire).
_SQUASHED = np.array(
    [name not in ("g2_headroom", "coadaptation_delta", "lr_stability_ratio") for name in LEVER_TELEMETRY]
)
_LEVER_LOW = np.where(_SQUASHED, 0.0, -1.0)


def lever_features(values: np.ndarray) -> np.ndarray:
    """The lever telemetry features of signals' raw lever fields ([..., len(LEVER_TELEMETRY)])."""
    clipped = np.clip(values, _LEVER_LOW, 1.0)
    squashed = np.where(values > 0.0, values / (1.0 + np.maximum(values, 0.0)), values)
    out: np.ndarray = np.where(_SQUASHED, squashed, clipped)
    return out


# Up to this many signals in a pass, they are applied one by one in Python: a vectorized pass has a
# fixed cost of some hundred numpy calls, which a few signals do not repay.
SCALAR_MAX = 24


class QueuedHealth(NamedTuple):
    """One message's signals, waiting to be applied: `rows` are row numbers within the run's block,
    one per signal (signals for layers the run does not have were left out when it was queued)."""

    table: T.NodeTable
    rows: list[int]
    signals: Sequence[HealthSignal]
    batch_ts: float  # the batch's timestamp, for signals without their own
    now: float  # the analyzer clock when it arrived


class Applied(NamedTuple):
    """Per queued message: a material change; a problematic flag flipped (clusters are stale)."""

    material: np.ndarray
    flipped: np.ndarray


def apply_health(arena: NodeArena, queued: Sequence[QueuedHealth], cfg: AnalyzerConfig) -> Applied:
    """Apply every queued message's signals in order (see the module doc)."""
    messages = len(queued)
    counts = np.fromiter((len(q.rows) for q in queued), np.int64, messages)
    total = int(counts.sum())
    material = np.zeros(messages, dtype=bool)
    flipped = np.zeros(messages, dtype=bool)
    if total == 0:
        return Applied(material, flipped)
    if total <= SCALAR_MAX:
        for m, q in enumerate(queued):
            material[m], flipped[m] = _apply_one_by_one(arena, cfg, q)
        return Applied(material, flipped)
    signals = _Signals(queued, counts, total)
    for select in _rounds(signals.row):
        _apply_round(arena, cfg, signals, select, material, flipped)
    return Applied(material, flipped)


class _Signals:
    """Every queued signal as columns (float64 unless said), in arrival order."""

    def __init__(self, queued: Sequence[QueuedHealth], counts: np.ndarray, total: int) -> None:
        # Each signal's fields as a tuple, all of them in one object array, and the numeric ones
        # converted at once: three C loops, no Python per signal or per field.
        every = itertools.chain.from_iterable(q.signals for q in queued)
        fields = np.fromiter(
            itertools.chain.from_iterable(map(msgspec.structs.astuple, every)), object, total * _WIDTH
        ).reshape(total, _WIDTH)
        values = fields[:, _NUMERIC_COLUMNS].T.astype(np.float64)
        (
            self.health,
            self.seed_id,
            self.variance,
            self.dead,
            self.correlation,
            self.latency_us,
            self.errors,
            self.active,
            self.seeds,
            own_ts,
            self.gradient,
            self.seed_gradient,
            self.alpha,
            self.epochs_in_stage,
            self.velocity,
        ) = values[: -len(LEVER_TELEMETRY)]
        self.levers = values[-len(LEVER_TELEMETRY) :].T  # [signals, lever fields]
        # By identity: the decoder hands out the enum's members, and an Enum hashes in Python.
        stages = map(id, fields[:, _FIELD["seed_stage"]])
        self.stage = np.fromiter(map(_STAGE_OF_ID.__getitem__, stages), np.int64, total)
        local = np.fromiter(itertools.chain.from_iterable(q.rows for q in queued), np.int64, total)
        if len(queued) == 1:
            q = queued[0]
            self.row = local + q.table.start
            self.ts = np.where(own_ts != 0.0, own_ts, q.batch_ts) if q.batch_ts else own_ts
            self.now: np.ndarray | float = q.now
            self.message = np.zeros(total, dtype=np.int64)
        else:
            self.row = local + np.repeat(np.fromiter((q.table.start for q in queued), np.int64), counts)
            batch_ts = np.repeat(np.fromiter((q.batch_ts for q in queued), np.float64), counts)
            self.ts = np.where(own_ts != 0.0, own_ts, batch_ts)  # a signal's own timestamp, else its batch's
            self.now = np.repeat(np.fromiter((q.now for q in queued), np.float64), counts)
            self.message = np.repeat(np.arange(len(queued)), counts)


def _rounds(rows: np.ndarray) -> list[slice | np.ndarray]:
    """Selections of signals with distinct rows, in order: the k-th signal of each row in round k."""
    n = rows.shape[0]
    if n == 1:
        return [slice(None)]
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    if first.all():
        return [slice(None)]
    position = np.arange(n)
    occurrence = np.empty(n, dtype=np.int64)
    occurrence[order] = position - np.maximum.accumulate(np.where(first, position, 0))
    return [np.flatnonzero(occurrence == k) for k in range(int(occurrence.max()) + 1)]


def _push(
    arena: NodeArena, rows: np.ndarray, state: np.ndarray, health: np.ndarray, alpha: float
) -> np.ndarray:
    """Push one value per (distinct) row into its window, updating the rows' `state` (their aux
    columns, written back by the caller); the slope after the push.

    The closed forms of esperd.analyzer.window.SlidingTrend, operation for operation, so the
    running sums round exactly as its do.
    """
    size = arena.window
    count, head = state[:, T.W_COUNT], state[:, T.W_HEAD]
    sum_y, sum_xy, ewma = state[:, T.W_SUM_Y], state[:, T.W_SUM_XY], state[:, T.W_EWMA]
    full = count >= size
    slot = np.where(full, head, count).astype(np.int64)
    oldest = arena.win[rows, slot]
    arena.win[rows, slot] = health
    new_sum_xy = np.where(full, sum_xy + ((size - 1) * health - (sum_y - oldest)), sum_xy + count * health)
    sum_y += np.where(full, health - oldest, health)
    sum_xy[:] = new_sum_xy
    ewma[:] = np.where(count == 0, health, ewma + alpha * (health - ewma))
    head += full
    head[head >= size] = 0
    state[:, T.W_SINCE_SYNC] += full
    count += ~full
    if full.any() and state[:, T.W_SINCE_SYNC].max() >= arena.sync_every:
        sync = np.flatnonzero(state[:, T.W_SINCE_SYNC] >= arena.sync_every)
        sum_y[sync], sum_xy[sync] = _window_sums(arena, rows[sync], head[sync])
        state[sync, T.W_SINCE_SYNC] = 0
    # 12 (T - (n - 1) S / 2) / (n (n^2 - 1)): the least-squares slope; 0 with fewer than two values.
    slope: np.ndarray = np.where(
        count >= 2,
        12.0 * (sum_xy - 0.5 * (count - 1) * sum_y) / np.maximum(count * (count * count - 1), 1),
        0.0,
    )
    return slope


def _window_sums(arena: NodeArena, rows: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum(y_k) and sum(k * y_k) over full windows, oldest first, added in order as Python's sum does."""
    size = arena.window
    sum_y = np.zeros(rows.shape[0])
    sum_xy = np.zeros(rows.shape[0])
    head = head.astype(np.int64)
    for k in range(size):
        y = arena.win[rows, (head + k) % size]
        sum_y += y
        sum_xy += k * y
    return sum_y, sum_xy


def _apply_round(
    arena: NodeArena,
    cfg: AnalyzerConfig,
    s: _Signals,
    select: slice | np.ndarray,
    material: np.ndarray,
    flipped: np.ndarray,
) -> None:
    rows = s.row[select]
    health = s.health[select]
    errors = s.errors[select]
    feat, aux = arena.feat, arena.aux
    state = aux[rows]  # a copy: updated below, written back once
    old = feat[rows, T.PROBLEMATIC : T.SIGNAL_END]
    slot_ts, stage = state[:, T.SLOT_TS], state[:, T.STAGE]
    material_before = (
        (np.abs(health - state[:, T.SEEN_HEALTH]) > cfg.material_health_delta),
        state[:, T.SEEN_PROBLEMATIC] > 0.5,
        state[:, T.SEEN_ATTENTION] > 0.5,
    )
    slope = _push(arena, rows, state, health, cfg.ewma_alpha)
    problematic = (health < cfg.problematic_health) | (slope < cfg.problematic_trend)
    problematic |= errors > cfg.problematic_errors
    attention = (health < cfg.attention_health) & (slope < cfg.attention_trend)
    # A signal whose seed fields are all defaults (a hand-typed one) says nothing about the slot;
    # one older than the slot information held (by host timestamp) must not undo it.
    seeds, active, alpha, epochs = (
        s.seeds[select],
        s.active[select],
        s.alpha[select],
        s.epochs_in_stage[select],
    )
    signal_stage = s.stage[select]
    ts = s.ts[select]
    seed_aware = (seeds != 0) | (active != 0) | (signal_stage != DORMANT) | (alpha != 0.0) | (epochs != 0)
    takes_slot = seed_aware & (s.seed_id[select] == 0) & ((ts == 0.0) | (ts >= slot_ts))
    new_stage = np.where(takes_slot, signal_stage, stage)
    out = np.empty((rows.shape[0], T.SIGNAL_END), dtype=np.float32)
    out[:, T.HEALTH] = health
    out[:, T.EWMA] = state[:, T.W_EWMA]
    out[:, _F["health_trend"]] = np.clip(slope, -1.0, 1.0)
    out[:, _F["activation_variance"]] = np.log1p(s.variance[select])
    out[:, _F["dead_neuron_ratio"]] = s.dead[select]
    out[:, _F["avg_correlation"]] = s.correlation[select]
    out[:, _F["latency_ms"]] = np.log1p(s.latency_us[select] / 1000.0)
    out[:, _F["error_rate"]] = np.minimum(errors / 10.0, 1.0)
    out[:, _F["seed_utilization"]] = np.minimum(active / np.maximum(seeds, 1.0), 1.0)
    out[:, T.PROBLEMATIC] = problematic
    out[:, T.ATTENTION] = attention
    out[:, T.IN_CLUSTER] = 0.0  # in_cluster lives in the cluster cache; observe() fills it
    out[:, T.GRADIENT] = np.log1p(s.gradient[select])
    out[:, _F["seed_gradient_ratio"]] = np.minimum(s.seed_gradient[select], 1.0)
    slot = np.stack(
        (alpha, np.minimum(epochs / _EPOCHS_IN_STAGE_SCALE, 1.0), np.clip(s.velocity[select], -1.0, 1.0)), 1
    )
    out[:, T.ALPHA :] = np.where(takes_slot[:, None], slot, old[:, T.ALPHA - T.PROBLEMATIC :])
    feat[rows, : T.SIGNAL_END] = out
    old_levers = feat[rows, T.LEVER_FIRST : T.LEVER_END]
    levers = lever_features(s.levers[select])
    feat[rows, T.LEVER_FIRST : T.LEVER_END] = np.where(takes_slot[:, None], levers, old_levers)
    _latency(state, s.latency_us[select], cfg.ewma_alpha)
    state[:, T.LAST_SEEN] = s.now if isinstance(s.now, float) else s.now[select]
    state[:, T.WEIGHT] = np.maximum(seeds, 1.0)
    changed = new_stage != stage  # before the stage column is overwritten
    slot_ts[:] = np.where(takes_slot, np.maximum(ts, slot_ts), slot_ts)
    stage[:] = new_stage
    aux[rows] = state
    moved, seen_problematic, seen_attention = material_before
    changed |= moved | (problematic != seen_problematic) | (attention != seen_attention)
    message = s.message[select]
    material[message[changed]] = True
    flipped[message[problematic != (old[:, 0] > 0.5)]] = True


# Latencies (us) the statistics take: below a nanosecond is no measurement (0 is "not measured"),
# and above 1000 s counts as 1000 s (the wire allows up to 1e300, whose square would overflow).
MIN_LATENCY_US = 1e-3
MAX_LATENCY_US = 1e9


def _latency(state: np.ndarray, latency: np.ndarray, alpha: float) -> None:
    """Fold each signal's latency into its row's latency statistics (table.LAT_LAST ...): the
    EWMA and exponentially weighted variance, and the EWMA of the throughput's relative change.
    A latency below MIN_LATENCY_US is not a measurement and changes nothing."""
    last, mean, var, trend = (state[:, c] for c in (T.LAT_LAST, T.LAT_MEAN, T.LAT_VAR, T.TPUT_TREND))
    measured = latency >= MIN_LATENCY_US
    latency = np.minimum(latency, MAX_LATENCY_US)
    later = measured & (last > 0.0)
    d = latency - mean
    change = last / np.where(measured, latency, 1.0) - 1.0  # throughput now / before - 1
    state[:, T.LAT_MEAN] = np.where(later, mean + alpha * d, np.where(measured, latency, mean))
    state[:, T.LAT_VAR] = np.where(later, (1.0 - alpha) * (var + alpha * (d * d)), var)
    state[:, T.TPUT_TREND] = np.where(later, trend + alpha * (change - trend), trend)
    state[:, T.LAT_LAST] = np.where(measured, latency, last)


def _latency_one(
    latency: float, last: float, mean: float, var: float, trend: float, alpha: float
) -> tuple[float, float, float, float]:
    """`_latency` for one signal, in Python floats (the same arithmetic)."""
    if latency < MIN_LATENCY_US:
        return last, mean, var, trend
    latency = min(latency, MAX_LATENCY_US)
    if last <= 0.0:
        return latency, latency, var, trend
    d = latency - mean
    change = last / latency - 1.0
    return (
        latency,
        mean + alpha * d,
        (1.0 - alpha) * (var + alpha * (d * d)),
        trend + alpha * (change - trend),
    )


def _clip(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def _squash(value: float) -> float:
    return value / (1.0 + value) if value > 0.0 else value  # the wire keeps these >= 0


def _lever_features_one(s: HealthSignal) -> tuple[float, ...]:
    """`lever_features` of one signal, in Python floats (the same arithmetic, no numpy calls)."""
    return (
        _clip(s.g2_headroom, -1.0, 1.0),
        _squash(s.gradient_stability),
        _squash(s.host_gradient_via_seed),
        _clip(s.coadaptation_delta, -1.0, 1.0),
        _squash(s.seed_loss_gradient),
        _squash(s.seed_weight_magnitude),
        _clip(s.lr_stability_ratio, -1.0, 1.0),
        _squash(s.alpha_variance),
    )


def _apply_one_by_one(arena: NodeArena, cfg: AnalyzerConfig, q: QueuedHealth) -> tuple[bool, bool]:
    """One message's signals, one at a time: the same semantics (and arithmetic) as the vectorized
    pass, for small passes. (material change, a problematic flag flipped)."""
    feat, aux, win = arena.feat, arena.aux, arena.win
    size, alpha = arena.window, cfg.ewma_alpha
    material = flipped = False
    for local, s in zip(q.rows, q.signals, strict=True):
        row = q.table.start + local
        ts = s.timestamp or q.batch_ts
        (
            _,
            _,
            slot_ts,
            stage,
            seen_h,
            seen_p,
            seen_a,
            count_f,
            head_f,
            since,
            sum_y,
            sum_xy,
            ewma,
            lat_last,
            lat_mean,
            lat_var,
            tput_trend,
        ) = aux[row].tolist()
        lat_last, lat_mean, lat_var, tput_trend = _latency_one(
            s.execution_latency_us, lat_last, lat_mean, lat_var, tput_trend, alpha
        )
        count, head, h = int(count_f), int(head_f), s.health_score
        if count < size:  # esperd.analyzer.window.SlidingTrend.push, on the row's columns
            win[row, count] = h
            sum_xy += count * h
            sum_y += h
            ewma = h if count == 0 else ewma + alpha * (h - ewma)
            count += 1
        else:
            oldest = float(win[row, head])
            win[row, head] = h
            head = head + 1 if head + 1 < size else 0
            sum_xy += (size - 1) * h - (sum_y - oldest)
            sum_y += h - oldest
            ewma += alpha * (h - ewma)
            since += 1
            if since >= arena.sync_every:
                values = win[row].tolist()
                window = values[head:] + values[:head]
                sum_y, sum_xy = 0.0, 0.0
                for k, y in enumerate(window):
                    sum_y += y
                    sum_xy += k * y
                since = 0
        slope = (
            12.0 * (sum_xy - 0.5 * (count - 1) * sum_y) / (count * (count * count - 1)) if count >= 2 else 0.0
        )
        problematic = (
            h < cfg.problematic_health
            or slope < cfg.problematic_trend
            or s.error_count > cfg.problematic_errors
        )
        attention = h < cfg.attention_health and slope < cfg.attention_trend
        old = feat[row, T.PROBLEMATIC : T.SIGNAL_END].tolist()
        flipped |= problematic != (old[0] > 0.5)
        total = s.total_seeds
        seed_aware = (
            total or s.active_seeds or s.seed_stage is not _DORMANT_STAGE or s.alpha or s.epochs_in_stage
        )
        if seed_aware and s.seed_id == 0 and (ts == 0.0 or ts >= slot_ts):
            new_stage = float(STAGE_INDEX[s.seed_stage])
            slot = (
                s.alpha,
                min(s.epochs_in_stage / _EPOCHS_IN_STAGE_SCALE, 1.0),
                _clip(s.blending_velocity, -1.0, 1.0),
            )
            slot_ts = max(ts, slot_ts)
            feat[row, T.LEVER_FIRST : T.LEVER_END] = _lever_features_one(s)
        else:
            new_stage = stage
            slot = tuple(old[T.ALPHA - T.PROBLEMATIC :])
        feat[row, : T.SIGNAL_END] = (
            h,
            ewma,
            _clip(slope, -1.0, 1.0),
            math.log1p(s.activation_variance),
            s.dead_neuron_ratio,
            s.avg_correlation,
            math.log1p(s.execution_latency_us / 1000.0),
            min(s.error_count / 10.0, 1.0),
            min(s.active_seeds / max(total, 1), 1.0),
            1.0 if problematic else 0.0,  # floats, not bools: numpy converts them faster
            1.0 if attention else 0.0,
            0.0,  # in_cluster lives in the cluster cache; observe() fills it
            math.log1p(s.gradient_norm),
            min(s.seed_gradient_ratio, 1.0),
            *slot,
        )
        aux[row] = (
            q.now,
            max(total, 1),
            slot_ts,
            new_stage,
            seen_h,
            seen_p,
            seen_a,
            count,
            head,
            since,
            sum_y,
            sum_xy,
            ewma,
            lat_last,
            lat_mean,
            lat_var,
            tput_trend,
        )
        material |= bool(
            new_stage != stage
            or abs(h - seen_h) > cfg.material_health_delta
            or problematic != (seen_p > 0.5)
            or attention != (seen_a > 0.5)
        )
    return material, flipped


# The scalar path spells out lever_features per field: keep the two in step.
assert LEVER_TELEMETRY == (
    "g2_headroom",
    "gradient_stability",
    "host_gradient_via_seed",
    "coadaptation_delta",
    "seed_loss_gradient",
    "seed_weight_magnitude",
    "lr_stability_ratio",
    "alpha_variance",
)
