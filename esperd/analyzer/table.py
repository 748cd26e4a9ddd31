"""Column storage for one run's layers: one numpy row per layer, written in place per signal."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from esperd.analyzer.masks import DORMANT
from esperd.analyzer.observation import NODE_FEATURE_INDEX, NODE_FEATURES

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

# Bookkeeping columns (float64), not seen by the policy.
LAST_SEEN = 0  # analyzer clock of the layer's latest health signal; -inf before the first
WEIGHT = 1  # max(total_seeds, 1): the layer's weight in the overall health
SLOT_TS = 2  # host timestamp of the newest seed-slot information applied
STAGE = 3  # index into STAGES of the slot's stage
SEEN_HEALTH = 4  # health / flags as of the run's last observation, for "material change"
SEEN_PROBLEMATIC = 5
SEEN_ATTENTION = 6
AUX_COLUMNS = 7


class NodeTable:
    """One row per layer. Rows stay where they are while layers are added; `reorder` compacts."""

    def __init__(self, default_health: float) -> None:
        self._default_feat = np.zeros(len(NODE_FEATURES), dtype=np.float32)
        self._default_feat[[HEALTH, EWMA]] = default_health
        self._default_aux = np.array([-np.inf, 1.0, 0.0, DORMANT, default_health, 0.0, 0.0])
        self.n = 0
        self.feat = np.empty((0, len(NODE_FEATURES)), dtype=np.float32)
        self.aux = np.empty((0, AUX_COLUMNS), dtype=np.float64)
        self.layer = np.empty(0, dtype=np.int64)  # layer id of each row

    def append(self, layer_ids: Sequence[int]) -> None:
        """Add default rows for new layers at the end (amortized O(1) per row)."""
        k = len(layer_ids)
        if self.n + k > self.layer.shape[0]:
            self._resize(max(16, 2 * (self.n + k)))
        rows = slice(self.n, self.n + k)
        self.feat[rows] = self._default_feat
        self.aux[rows] = self._default_aux
        self.layer[rows] = layer_ids
        self.n += k

    def reorder(self, old_rows: np.ndarray, layer_ids: np.ndarray) -> None:
        """Rebuild so that new row i is old row old_rows[i], or a default row where that is -1."""
        n = layer_ids.shape[0]
        keep = old_rows >= 0
        feat = np.tile(self._default_feat, (n, 1))
        aux = np.tile(self._default_aux, (n, 1))
        feat[keep] = self.feat[old_rows[keep]]
        aux[keep] = self.aux[old_rows[keep]]
        self.feat, self.aux, self.layer, self.n = feat, aux, layer_ids.astype(np.int64, copy=True), n

    def _resize(self, capacity: int) -> None:
        n = self.n
        feat = np.empty((capacity, self.feat.shape[1]), dtype=np.float32)
        aux = np.empty((capacity, AUX_COLUMNS), dtype=np.float64)
        layer = np.empty(capacity, dtype=np.int64)
        feat[:n], aux[:n], layer[:n] = self.feat[:n], self.aux[:n], self.layer[:n]
        self.feat, self.aux, self.layer = feat, aux, layer
