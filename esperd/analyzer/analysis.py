"""Seed document 001's per-layer analysis (issue 16 item 5), over one run's nodes at once.

Each function takes arrays in node order and returns one value per node, each in [-1, 1]
(the observation's contract; see observation.NODE_FEATURES):

    latency_variance   the exponentially weighted variance of the layer's forward latency over
                       its squared EWMA (the squared coefficient of variation), clipped to 1
    throughput_trend   the EWMA of the relative change in throughput (1 / latency) from one
                       signal to the next, clipped to [-1, 1]: > 0 the layer is getting faster
    stability          1 / (1 + 10 * sd(health over the trend window) + sqrt(latency_variance)):
                       1 for a layer whose health and latency hold still, -> 0 as they swing
    readiness          how ready the layer is for a germination: 0 unless GERMINATE is legal
                       there now, else (1 - health EWMA) * stability * (1 - staleness) -- a layer
                       that needs help, whose signal is steady enough to trust, and fresh
    depth              the longest path from an input to the layer (Graph.depth) / 32, clipped
    position           depth / the graph's deepest layer's depth (0 input side, 1 output side)
    upstream_health,   mean latest health of the layer's direct predecessors / successors;
    downstream_health  the configured default health (no data: assume healthy) where it has none
"""

from __future__ import annotations

import numpy as np

STABILITY_HEALTH_WEIGHT = 10.0  # a health standard deviation of 0.1 halves the stability
DEPTH_SCALE = 32.0


def health_spread(window: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Standard deviation of each row's first `counts` window values (a ring buffer: order is
    irrelevant to a deviation); 0 with fewer than two."""
    width = window.shape[1]
    valid = np.arange(width)[None, :] < counts[:, None]
    n = np.maximum(counts, 1.0)
    mean = np.where(valid, window, 0.0).sum(axis=1) / n
    squares = np.where(valid, (window - mean[:, None]) ** 2, 0.0).sum(axis=1) / n
    spread: np.ndarray = np.where(counts >= 2, np.sqrt(squares), 0.0)
    return spread


def latency_variance(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Squared coefficient of variation of the latency, clipped to [0, 1]; 0 before any latency."""
    relative = variance / np.where(mean > 0.0, mean * mean, 1.0)
    out: np.ndarray = np.clip(np.where(mean > 0.0, relative, 0.0), 0.0, 1.0)
    return out


def stability(spread: np.ndarray, latency_var: np.ndarray) -> np.ndarray:
    """See the module doc: in (0, 1]."""
    out: np.ndarray = 1.0 / (1.0 + STABILITY_HEALTH_WEIGHT * spread + np.sqrt(latency_var))
    return out


def readiness(
    can_germinate: np.ndarray, health_ewma: np.ndarray, steady: np.ndarray, staleness: np.ndarray
) -> np.ndarray:
    """See the module doc: in [0, 1]."""
    need = np.clip(1.0 - health_ewma, 0.0, 1.0)
    out: np.ndarray = np.where(can_germinate, need * steady * np.clip(1.0 - staleness, 0.0, 1.0), 0.0)
    return out


def position(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(depth / DEPTH_SCALE clipped to 1, depth / the deepest depth) for a graph's depths."""
    deepest = int(depth.max()) if depth.size else 0
    scaled = np.minimum(depth / DEPTH_SCALE, 1.0)
    relative = depth / deepest if deepest > 0 else np.zeros(depth.shape)
    return scaled, relative


def neighbour_health(
    edge_index: np.ndarray, health: np.ndarray, default: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mean health of each node's predecessors, of its successors); `default` where it has none."""
    n = health.shape[0]
    src, dst = edge_index
    health = health.astype(np.float64)
    up_sum = np.bincount(dst, weights=health[src], minlength=n)
    up_count = np.bincount(dst, minlength=n)
    down_sum = np.bincount(src, weights=health[dst], minlength=n)
    down_count = np.bincount(src, minlength=n)
    upstream = np.where(up_count > 0, up_sum / np.maximum(up_count, 1), default)
    downstream = np.where(down_count > 0, down_sum / np.maximum(down_count, 1), default)
    return upstream, downstream
