"""Column storage for every run's layers: one numpy row per layer, all runs in shared arrays.

The rows of every run live in one `NodeArena` (struct of arrays: the feature table, the
bookkeeping columns and each layer's trend window), each run in a block of its own, so that
health signals from many runs are applied in one vectorized pass (esperd.analyzer.ingest) and
a run's own code reads and writes its rows through plain numpy views (`NodeTable`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from esperd.analyzer.masks import DORMANT
from esperd.analyzer.observation import (
    BLUEPRINTS,
    LEVER_TELEMETRY,
    MILESTONE_FEATURES,
    NODE_FEATURE_INDEX,
    NODE_FEATURES,
)

# Node feature columns the analyzer writes by position (NODE_FEATURES order is the contract).
HEALTH = NODE_FEATURE_INDEX["health"]
EWMA = NODE_FEATURE_INDEX["health_ewma"]
PROBLEMATIC = NODE_FEATURE_INDEX["is_problematic"]
ATTENTION = NODE_FEATURE_INDEX["needs_attention"]
IN_CLUSTER = NODE_FEATURE_INDEX["in_cluster"]
GRADIENT = NODE_FEATURE_INDEX["gradient_norm"]
ALPHA = NODE_FEATURE_INDEX["alpha"]
LOG_PARAMS = NODE_FEATURE_INDEX["log_params"]
FAMILY_CNN = NODE_FEATURE_INDEX["family_cnn"]
COUNTERFACTUAL = NODE_FEATURE_INDEX["counterfactual"]
STALENESS = NODE_FEATURE_INDEX["staleness"]
STAGE_FIRST = NODE_FEATURE_INDEX["stage_dormant"]  # first of the stage one-hot columns
COUNTERFACTUAL_Z = NODE_FEATURE_INDEX["counterfactual_z"]
KIND_FIRST = NODE_FEATURE_INDEX["kind_conv"]  # first of the layer-kind one-hot columns

SIGNAL_END = NODE_FEATURE_INDEX["blending_velocity"] + 1  # a health signal writes columns [0, SIGNAL_END)
LEVER_FIRST = NODE_FEATURE_INDEX[LEVER_TELEMETRY[0]]  # ... and [LEVER_FIRST, LEVER_END): its lever telemetry
LEVER_END = LEVER_FIRST + len(LEVER_TELEMETRY)
MILESTONE_FIRST = NODE_FEATURE_INDEX[MILESTONE_FEATURES[0]]  # the state packet's milestone counterfactuals
MILESTONE_END = MILESTONE_FIRST + len(MILESTONE_FEATURES)
BLUEPRINT_FIRST = NODE_FEATURE_INDEX["blueprint_" + BLUEPRINTS[0].value]  # the slot's blueprint, one-hot

# Ingest writes contiguous column runs in one assignment each; make sure they are contiguous.
assert NODE_FEATURES[HEALTH:SIGNAL_END] == (
    "health",
    "health_ewma",
    "health_trend",
    "activation_variance",
    "dead_neuron_ratio",
    "avg_correlation",
    "latency_ms",
    "error_rate",
    "seed_utilization",
    "is_problematic",
    "needs_attention",
    "in_cluster",
    "gradient_norm",
    "seed_gradient_ratio",
    "alpha",
    "epochs_in_stage",
    "blending_velocity",
)
assert HEALTH == 0
assert NODE_FEATURES[COUNTERFACTUAL : COUNTERFACTUAL + 2] == ("counterfactual", "total_improvement")
assert NODE_FEATURES[LEVER_FIRST:LEVER_END] == LEVER_TELEMETRY
assert NODE_FEATURES[MILESTONE_FIRST:MILESTONE_END] == MILESTONE_FEATURES
assert NODE_FEATURES[BLUEPRINT_FIRST : BLUEPRINT_FIRST + len(BLUEPRINTS)] == tuple(
    f"blueprint_{bp.value}" for bp in BLUEPRINTS
)

# Bookkeeping columns (float64), not seen by the policy.
LAST_SEEN = 0  # analyzer clock of the layer's latest health signal; -inf before the first
WEIGHT = 1  # max(total_seeds, 1): the layer's weight in the overall health
SLOT_TS = 2  # host timestamp of the newest seed-slot information applied
STAGE = 3  # index into STAGES of the slot's stage
# Health / flags as of the run's last observation, for "material change". The health is the one
# reported (float64, the newest value of the trend window): the float32 feature column rounds it
# either way (float32(0.1) > 0.1, float32(0.7) < 0.7), which would decide a move of about
# `material_health_delta` (0.1 -> 0.0 is not more than 0.1; 0.7 -> 0.59999999 is).
SEEN_HEALTH = 4
SEEN_PROBLEMATIC = 5
SEEN_ATTENTION = 6
# The layer's trend window (see esperd.analyzer.window.SlidingTrend, its one-row reference; the
# values themselves are in NodeArena.win, a ring buffer): how many it holds, the slot of the
# oldest once full, pushes since the running sums were last recomputed (counts, exact as floats),
# the running sums sum(y_k) and sum(k * y_k) (k = 0 is the oldest), and the EWMA. Kept with the
# bookkeeping so that one gather and one scatter per pass read and write all of a row's state.
W_COUNT = 7
W_HEAD = 8
W_SINCE_SYNC = 9
W_SUM_Y = 10
W_SUM_XY = 11
W_EWMA = 12
# Latency statistics (001's performance trends; issue 16 item 5), updated by each signal that
# measures a latency (> 0): the previous latency (us; 0 before the first), the EWMA of the
# latency and its exponentially weighted variance, and the EWMA of the relative change in
# throughput (forward passes per second, 1 / latency) from one signal to the next.
LAT_LAST = 13
LAT_MEAN = 14
LAT_VAR = 15
TPUT_TREND = 16
AUX_COLUMNS = 17

MIN_BLOCK = 16


def block_size(rows: int) -> int:
    """The block a run of `rows` layers gets: a power of two, at least MIN_BLOCK, with room to grow."""
    size = MIN_BLOCK
    while size < rows:
        size *= 2
    return size


class NodeArena:
    """Every run's node rows. A run owns a block [start, start + size); freed blocks are reused by
    size, and the arrays double when no free block fits (so a view is only good until the next
    `allocate`: take them afresh, as NodeTable does)."""

    def __init__(self, default_health: float, window: int) -> None:
        self.window = window
        self.default_feat = np.zeros(len(NODE_FEATURES), dtype=np.float32)
        self.default_feat[[HEALTH, EWMA]] = default_health
        self.default_aux = np.array(
            [-np.inf, 1.0, 0.0, DORMANT, default_health, *([0.0] * (AUX_COLUMNS - 5))]
        )
        self.capacity = 0
        self.top = 0  # rows below this were handed out at some point
        self._free: dict[int, list[int]] = {}  # block size -> starts of free blocks
        self.feat = np.empty((0, len(NODE_FEATURES)), dtype=np.float32)
        self.aux = np.empty((0, AUX_COLUMNS), dtype=np.float64)
        self.layer = np.empty(0, dtype=np.int64)  # layer id of each row
        self.win = np.empty((0, window), dtype=np.float64)  # each row's window values, a ring buffer
        # Running sums drift by rounding over millions of pushes; each row's are recomputed from its
        # window every so many pushes (amortized far below O(1) per push).
        self.sync_every = max(1024, 16 * window)

    _COLUMNS = ("feat", "aux", "layer", "win")

    @property
    def rows_in_use(self) -> int:
        return self.top - sum(size * len(starts) for size, starts in self._free.items())

    def allocate(self, size: int) -> int:
        """The start of a free block of `size` rows (a block_size)."""
        free = self._free.get(size)
        if free:
            return free.pop()
        if self.top + size > self.capacity:
            self._grow(max(2 * self.capacity, self.top + size, 64))
        start = self.top
        self.top += size
        return start

    def release(self, start: int, size: int) -> None:
        self._free.setdefault(size, []).append(start)

    def reset(self, rows: slice | np.ndarray) -> None:
        """Default rows: features, bookkeeping and an empty trend window."""
        self.feat[rows] = self.default_feat
        self.aux[rows] = self.default_aux

    def copy_rows(self, source: np.ndarray | slice, target: np.ndarray | slice) -> None:
        """Rows `source` copied to rows `target` (every column; the two must not overlap)."""
        for name in self._COLUMNS:
            column = getattr(self, name)
            column[target] = column[source]

    def latest(self, rows: np.ndarray, default: float) -> np.ndarray:
        """Each row's newest window value (float64, as pushed); `default` where the window is empty."""
        count, head = self.aux[rows, W_COUNT], self.aux[rows, W_HEAD]
        slot = (np.where(count < self.window, count, head) - 1).astype(np.int64) % self.window
        out: np.ndarray = np.where(count > 0, self.win[rows, slot], default)
        return out

    def window_values(self, row: int) -> list[float]:
        """A row's trend window, oldest first (for tests and debugging)."""
        count, head = int(self.aux[row, W_COUNT]), int(self.aux[row, W_HEAD])
        values: list[float] = self.win[row].tolist()
        if count < self.window:
            return values[:count]
        return values[head:] + values[:head]

    def _grow(self, capacity: int) -> None:
        for name in self._COLUMNS:
            old = getattr(self, name)
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self.top] = old[: self.top]
            setattr(self, name, new)
        self.capacity = capacity


class NodeTable:
    """One run's rows in the arena: rows 0..n-1 of its block, addressed relative to the block.

    Rows stay where they are while layers are added; `reorder` rebuilds them in a new order.
    The views (`feat`, `aux`, `layer`) are taken afresh on each access: another run's growth
    may move the arena's arrays.
    """

    def __init__(self, arena: NodeArena) -> None:
        self.arena = arena
        self.n = 0
        self.start = 0
        self.size = 0  # block size; 0 = no block yet

    @property
    def feat(self) -> np.ndarray:
        return self.arena.feat[self.start : self.start + self.n]

    @property
    def aux(self) -> np.ndarray:
        return self.arena.aux[self.start : self.start + self.n]

    @property
    def layer(self) -> np.ndarray:
        return self.arena.layer[self.start : self.start + self.n]

    def append(self, layer_ids: Sequence[int]) -> None:
        """Add default rows for new layers at the end (amortized O(1) per row)."""
        k = len(layer_ids)
        if self.n + k > self.size:
            self._move(block_size(2 * (self.n + k)))
        arena = self.arena
        rows = slice(self.start + self.n, self.start + self.n + k)
        arena.reset(rows)
        arena.layer[rows] = layer_ids
        self.n += k

    def reorder(self, old_rows: np.ndarray, layer_ids: np.ndarray) -> None:
        """Rebuild so that new row i is old row old_rows[i], or a default row where that is -1."""
        n = layer_ids.shape[0]
        arena = self.arena
        size = block_size(n)
        start = arena.allocate(size)  # may grow the arena: every index below is taken after it
        keep = np.flatnonzero(old_rows >= 0)
        target = start + np.arange(n)
        arena.reset(target)
        arena.copy_rows(self.start + old_rows[keep], target[keep])
        arena.layer[start : start + n] = layer_ids
        self._release()
        self.start, self.size, self.n = start, size, n

    def release(self) -> None:
        """Give the rows back (the run is forgotten)."""
        self._release()
        self.n = 0

    def _release(self) -> None:
        if self.size:
            self.arena.release(self.start, self.size)
        self.size = 0

    def _move(self, size: int) -> None:
        start = self.arena.allocate(size)
        if self.n:
            self.arena.copy_rows(slice(self.start, self.start + self.n), slice(start, start + self.n))
        self._release()
        self.start, self.size = start, size
