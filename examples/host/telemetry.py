"""Per-layer telemetry from real tensors, the health score, and the topology from torch.fx.

Statistics of a layer's output (the Block's, seed included), units being channels of a
conv map or features of a linear/transformer layer:

    activation_variance   variance over every element of the output
    dead_neuron_ratio     share of units whose |activation| <= 1e-6 for every sample
                          (a ReLU unit that never fires; see `finish`)
    avg_correlation       mean |Pearson correlation| between up to 16 evenly spaced live
                          units across the samples (per-sample spatial means for conv maps,
                          every position for sequences); redundant units push it to 1
    gradient_norm         L2 norm of the layer's host-parameter gradients after backward
    seed_gradient_ratio   seed-parameter gradient norm / host gradient norm
    execution_latency_us  wall time of the Block's forward (CPU clock; on GPU it would
                          need a synchronise, so it is host-side dispatch time there)

And of its seed, when the slot has one (004's lever telemetry; the definitions are the
fields' descriptions in esperd_contracts.HealthSignal):

    seed_loss_gradient      the seed-parameter gradient norm (read with the host's, one fused call)
    seed_weight_magnitude   the seed-parameter norm (in the same call)
    g2_headroom             seed_gradient_ratio - 0.10 (esperd_contracts.G2_THRESHOLD)
    gradient_stability,     from the seed's SeedGradientLog (seedstats.py), fed each probed
    lr_stability_ratio      step's seed gradient norm
    host_gradient_via_seed, from gradient hooks the slot sets while probing when its seed's
    coadaptation_delta      input is not detached: on a view of the layer output that only the
                            seed reads (the seed path's gradient) and on the output itself (both)
    alpha_variance          the variance over the batch of a GATED blend's per-sample alpha

Health score, in [0, 1] (each factor is 1 for a healthy layer and falls towards 0 on one
failure mode, so a layer is as healthy as its worst symptom lets it be):

    health = (1 - dead_ratio) * (1 - |avg_correlation| / 2)
             * sqrt(band(variance, 1e-4, 1e4)) * sqrt(band(gradient_norm, 1e-6, 1e2))
    band(x, lo, hi) = x / (x + lo) * hi / (hi + x)   (~1 inside [lo, hi], -> 0 outside)

A typical layer of the digits CNN scores 0.75-0.9 (its units correlate somewhat); a
layer with half its units dead scores below 0.45. The gradient factor is 1 for a layer
with no parameters.

Probing costs forward hooks, so `LayerProbe.capture()` attaches them only for the steps
that report (every K-th step); the others run bare. A hook reduces the output to two
small tensors on the device (per-sample unit means and one norm: two passes over it);
the rest is finished on the host in numpy, where ops on such tiny arrays cost a
microsecond instead of a torch dispatch's several.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from esperd_contracts import G2_THRESHOLD, HealthSignal, SeedStage, TopologyNode, TopologyPacket
from esperd_examples.host.models import Block, HostModel, Layer

DEAD_EPS = 1e-6
MAX_CORRELATED_UNITS = 16
MAX_CORRELATION_SAMPLES = 256  # rows used for correlation (a transformer batch has B*T)


@dataclass(frozen=True, slots=True)
class ActivationStats:
    variance: float
    dead_ratio: float
    avg_correlation: float


@functools.lru_cache(maxsize=256)
def _unit_index(units: int) -> np.ndarray:
    """Up to 16 evenly spaced unit indices (cached)."""
    return np.unique(np.linspace(0, units - 1, min(units, MAX_CORRELATED_UNITS)).round().astype(np.int64))


@dataclass(frozen=True, slots=True)
class ActivationSummary:
    """What a forward hook keeps of a layer output: two reductions, still on the device."""

    rows: torch.Tensor  # [samples, units]: per-image channel means of a conv map, else the features
    norm: torch.Tensor  # scalar L2 norm over every element
    numel: int


def summarize(x: torch.Tensor) -> ActivationSummary:
    """Reduce a layer output to an ActivationSummary: two passes over it, no host sync."""
    x = x.detach()
    rows = x.mean(dim=(2, 3)) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
    # One fused norm gives E[x^2]; x.var() would be a slower two-pass kernel.
    return ActivationSummary(rows, torch.linalg.vector_norm(x), x.numel())


def finish(summaries: list[ActivationSummary]) -> list[ActivationStats]:
    """The statistics of many layers' summaries, computed together on the host with numpy.

    Layers with the same number of samples (all of them, in a CNN) are stacked so each
    statistic costs a few numpy calls for all layers rather than a few per layer.
    A unit is dead when its per-sample values are all ~0: for a conv map that is its
    spatial mean, which is 0 only if the whole map is (ReLU outputs are >= 0; for signed
    outputs an exact cancellation is vanishingly unlikely).
    """
    arrays = [_host_array(summary.rows) for summary in summaries]
    norms = torch.stack([summary.norm for summary in summaries]).double().cpu().tolist() if summaries else []
    stats: list[ActivationStats] = [ActivationStats(0.0, 0.0, 0.0)] * len(summaries)
    groups: dict[int, list[int]] = {}
    for i, rows in enumerate(arrays):
        if rows.size:
            groups.setdefault(rows.shape[0], []).append(i)
    for members in groups.values():
        means, dead = _means_and_dead(arrays, members)
        correlations = _avg_abs_correlations(arrays, members)
        for j, i in enumerate(members):
            mean_square = norms[i] ** 2 / max(summaries[i].numel, 1)
            # Rows are means of equal-sized groups of x, so their mean is the mean of x.
            variance = max(mean_square - float(means[j]) ** 2, 0.0)
            stats[i] = ActivationStats(variance, float(dead[j]), float(correlations[j]))
    return stats


def _host_array(t: torch.Tensor) -> np.ndarray:
    if t.dtype is torch.float32 and t.device.type == "cpu":
        return t.numpy()  # no copy, no dispatch
    return t.float().cpu().numpy()


def _means_and_dead(arrays: list[np.ndarray], members: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: the mean of its rows, and the share of its units that are ~0 in every row."""
    widths = np.array([arrays[i].shape[1] for i in members])
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    joined = np.concatenate([arrays[i] for i in members], axis=1)  # [samples, all units]
    column_means = joined.mean(axis=0, dtype=np.float64)
    dead_columns = (np.abs(joined).max(axis=0) <= DEAD_EPS).astype(np.float64)
    return np.add.reduceat(column_means, starts) / widths, np.add.reduceat(dead_columns, starts) / widths


def _avg_abs_correlations(arrays: list[np.ndarray], members: list[int]) -> np.ndarray:
    """Per layer: mean |Pearson correlation| over pairs of its sampled units with nonzero spread."""
    n = min(arrays[members[0]].shape[0], MAX_CORRELATION_SAMPLES)
    if n < 2:
        return np.zeros(len(members))
    # [layer, unit, sample]: reductions run along the contiguous last axis (several times faster).
    picked = np.zeros((len(members), MAX_CORRELATED_UNITS, n), dtype=np.float32)  # zero rows: unusable
    for j, i in enumerate(members):
        index = _unit_index(arrays[i].shape[1])
        picked[j, : index.size] = arrays[i][:n, index].T
    centred = picked - picked.mean(axis=2, keepdims=True)
    norms = np.sqrt(np.square(centred).sum(axis=2))
    usable = norms > 1e-6 * norms.max(axis=1, keepdims=True)  # dead units have no spread
    k = usable.sum(axis=1).astype(np.float64)
    # Unusable units become 0, so their correlations vanish; usable ones have |corr| 1 with themselves.
    z = centred / np.where(usable, norms, np.inf)[:, :, None]
    total = np.abs(z @ z.transpose(0, 2, 1)).sum(axis=(1, 2))  # batched BLAS (einsum is much slower)
    pairs = k * (k - 1)
    return np.clip(np.divide(total - k, pairs, out=np.zeros_like(total), where=pairs > 0), 0.0, 1.0)


def activation_stats(x: torch.Tensor) -> ActivationStats:
    """The activation statistics of one tensor, as Python floats."""
    return finish([summarize(x)])[0]


def band(x: float, low: float, high: float) -> float:
    """~1 for x well inside [low, high], falling to 0 as x -> 0 or x -> inf."""
    x = max(x, 0.0)
    return (x / (x + low)) * (high / (high + x))


def health_score(
    dead_ratio: float, avg_correlation: float, variance: float, gradient_norm: float | None
) -> float:
    """The documented health formula (see the module docstring); 0 for non-finite inputs."""
    values = (dead_ratio, avg_correlation, variance, 0.0 if gradient_norm is None else gradient_norm)
    if not all(math.isfinite(v) for v in values):
        return 0.0
    flow = 1.0 if gradient_norm is None else math.sqrt(band(gradient_norm, 1e-6, 1e2))
    score = (
        (1.0 - dead_ratio) * (1.0 - abs(avg_correlation) / 2) * math.sqrt(band(variance, 1e-4, 1e4)) * flow
    )
    return min(max(score, 0.0), 1.0)


# ------------------------------------------------------------------ probing


@dataclass(slots=True)
class _LayerReading:
    summary: ActivationSummary | None = None
    latency_ns: int = 0
    host_grad: float | None = None
    seed_grad: float | None = None
    started_ns: int = 0
    seed: SeedReading | None = None  # the seed's lever telemetry, while the slot holds a seed


@dataclass(frozen=True, slots=True)
class SeedReading:
    """The lever telemetry of one slot's seed at one probed step (see the module doc)."""

    weight_norm: float = 0.0
    via_seed: float = 0.0
    coadaptation: float = 0.0
    alpha_variance: float = 0.0
    gradient_variance: float = 0.0
    stability_ratio: float = 0.0


_TRAINED = frozenset({SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY})


@dataclass(slots=True)
class LayerProbe:
    """Forward hooks (while capturing) and gradient reads for every layer of a HostModel."""

    model: HostModel
    readings: dict[int, _LayerReading] = field(default_factory=dict)
    cost_ns: int = 0  # CPU time spent in the probe's own code (hooks, gradient reads, signals)
    _host_params: list[list[nn.Parameter]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Host parameters never change; walking the module tree for them every step would cost.
        self._host_params = [layer.block.host_parameters() for layer in self.model.layers]

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record activations and latency of every layer for the forward passes inside."""
        t0 = time.thread_time_ns()
        handles = []
        for layer in self.model.layers:
            reading = self.readings.setdefault(layer.layer_id, _LayerReading())
            handles.append(layer.block.register_forward_pre_hook(self._before(reading)))
            handles.append(layer.block.register_forward_hook(self._after(self, reading)))
        for slot in self.model.slots:
            slot.probing = True
            slot.alpha_spread = slot.grad_via_seed = slot.grad_total = None  # this step's, or none
        self.cost_ns += time.thread_time_ns() - t0
        try:
            yield
        finally:
            t0 = time.thread_time_ns()
            for handle in handles:
                handle.remove()
            for slot in self.model.slots:
                slot.probing = False
            self.cost_ns += time.thread_time_ns() - t0

    @staticmethod
    def _before(reading: _LayerReading) -> Callable[[nn.Module, object], None]:
        def hook(module: nn.Module, args: object) -> None:
            reading.started_ns = time.perf_counter_ns()

        return hook

    @staticmethod
    def _after(
        probe: LayerProbe, reading: _LayerReading
    ) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            reading.latency_ns = time.perf_counter_ns() - reading.started_ns
            t0 = time.thread_time_ns()
            with torch.no_grad():
                reading.summary = summarize(output)
            probe.cost_ns += time.thread_time_ns() - t0

        return hook

    def read_gradients(self) -> None:
        """After backward: gradient norms of each layer's host and seed parameters (one fused call)."""
        t0 = time.thread_time_ns()
        groups: list[list[torch.Tensor]] = []
        for layer, host_params in zip(self.model.layers, self._host_params, strict=True):
            slot = layer.slot
            seed_params = slot.seed_parameters() if slot else []
            groups.append([p.grad for p in host_params if p.grad is not None])
            groups.append([p.grad for p in seed_params if p.grad is not None])
            groups.append([p.detach() for p in seed_params])  # the seed's weights, in the same call
        flat = [g for group in groups for g in group]
        norms = torch.stack(torch._foreach_norm(flat)).double().cpu().tolist() if flat else []
        totals: list[float | None] = []
        at = 0
        for group in groups:
            squares = norms[at : at + len(group)]
            at += len(group)
            totals.append(math.sqrt(sum(n * n for n in squares)) if group else None)
        for i, layer in enumerate(self.model.layers):
            reading = self.readings.setdefault(layer.layer_id, _LayerReading())
            reading.host_grad, reading.seed_grad = totals[3 * i], totals[3 * i + 1]
            reading.seed = _seed_reading(layer, reading.seed_grad, totals[3 * i + 2])
        self.cost_ns += time.thread_time_ns() - t0

    def signals(self, timestamp: float | None = None) -> list[HealthSignal]:
        """One HealthSignal per layer that has been captured."""
        now = time.time() if timestamp is None else timestamp
        captured = [
            (layer, reading)
            for layer in self.model.layers
            if (reading := self.readings.get(layer.layer_id)) is not None and reading.summary is not None
        ]
        stats = finish([reading.summary for _, reading in captured])  # type: ignore[misc]
        return [_signal(layer, reading, s, now) for (layer, reading), s in zip(captured, stats, strict=True)]


def _seed_reading(layer: Layer, seed_grad: float | None, weight_norm: float | None) -> SeedReading | None:
    """The slot's seed telemetry after a backward pass (None without a seed); feeds its gradient log."""
    slot = layer.slot
    if slot is None or slot.seed is None:
        return None
    if seed_grad is not None and slot.stage in _TRAINED:
        slot.gradients.record(seed_grad)
    via_norm, coadaptation = 0.0, 0.0
    via, total = slot.grad_via_seed, slot.grad_total
    if via is not None and total is not None:
        direct = total - via
        via_norm, direct_norm = (float(v) for v in torch.stack([via.norm(), direct.norm()]).tolist())
        if via_norm > 0.0 and direct_norm > 0.0:
            coadaptation = float(torch.sum(via * direct)) / (via_norm * direct_norm)
    spread = float(slot.alpha_spread) if slot.alpha_spread is not None else 0.0
    slot.alpha_spread = slot.grad_via_seed = slot.grad_total = None  # read once
    return SeedReading(
        weight_norm=weight_norm or 0.0,
        via_seed=via_norm,
        coadaptation=coadaptation,
        alpha_variance=spread,
        gradient_variance=slot.gradients.variance,
        stability_ratio=slot.gradients.stability_ratio,
    )


def _lever_fields(reading: _LayerReading, ratio: float, bad: int) -> tuple[dict[str, float], int]:
    """The HealthSignal's lever telemetry fields from a seed reading (none without a seed), and
    how many of them were not finite (they are sent as 0 and counted as errors)."""
    seed = reading.seed
    if seed is None:
        return {}, 0
    errors = 0
    fields: dict[str, float] = {}
    for name, value, low, high in (
        ("seed_loss_gradient", reading.seed_grad or 0.0, 0.0, 1e300),
        ("seed_weight_magnitude", seed.weight_norm, 0.0, 1e300),
        ("gradient_stability", seed.gradient_variance, 0.0, 1e300),
        ("host_gradient_via_seed", seed.via_seed, 0.0, 1e300),
        ("coadaptation_delta", seed.coadaptation, -1.0, 1.0),
        ("lr_stability_ratio", seed.stability_ratio, 0.0, 1.0),
        ("alpha_variance", seed.alpha_variance, 0.0, 1e300),
    ):
        fields[name], wrong = _finite(value, low, high)
        errors += wrong
    if reading.seed_grad is not None and not bad:  # the G2 gate reads the ratio of a seed that trains
        fields["g2_headroom"] = ratio - G2_THRESHOLD
    return fields, errors


def _finite(value: float, low: float = 0.0, high: float = 1e300) -> tuple[float, int]:
    """(value clipped into range, 1 if it was not finite else 0)."""
    if not math.isfinite(value):
        return 0.0, 1
    return min(max(value, low), high), 0


def _signal(layer: Layer, reading: _LayerReading, stats: ActivationStats, now: float) -> HealthSignal:
    has_grad = reading.host_grad is not None
    variance, bad_var = _finite(stats.variance)
    dead, bad_dead = _finite(stats.dead_ratio, 0.0, 1.0)
    corr, bad_corr = _finite(stats.avg_correlation, -1.0, 1.0)
    grad, bad_grad = _finite(reading.host_grad) if reading.host_grad is not None else (0.0, 0)
    seed_norm = reading.seed_grad or 0.0
    ratio, bad_ratio = _finite(seed_norm / grad) if grad > 0 else (0.0, 0)
    levers, bad_levers = _lever_fields(reading, ratio, bad_ratio)
    errors = bad_var + bad_dead + bad_corr + bad_grad + bad_ratio
    health = 0.0 if errors else health_score(dead, corr, variance, grad if has_grad else None)
    errors += bad_levers  # a seed's broken reading is an error, not the host layer's ill health
    slot = layer.slot
    extra: dict[str, Any] = {}
    if slot is not None:
        extra = {
            "seed_stage": slot.stage,
            "alpha": min(max(slot.alpha, 0.0), 1.0),
            "epochs_in_stage": slot.lifecycle.epochs_in_stage,
            "blending_velocity": slot.blending_velocity(),
            "active_seeds": int(slot.live),
            "total_seeds": 1,
        }
    return HealthSignal(
        layer_id=layer.layer_id,
        health_score=health,
        activation_variance=variance,
        dead_neuron_ratio=dead,
        avg_correlation=corr,
        execution_latency_us=reading.latency_ns / 1e3,
        error_count=errors,
        timestamp=now,
        gradient_norm=grad,
        seed_gradient_ratio=ratio,
        **extra,
        **levers,
    )


# ------------------------------------------------------------------ topology


class _BlockTracer(torch.fx.Tracer):
    """Treats every Block as one opaque call, so the traced graph is the layer graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Block) or super().is_leaf_module(m, module_qualified_name)


def layer_edges(model: HostModel) -> list[tuple[int, int]]:
    """Directed (src, dst) layer-id edges of the model's dataflow, skip connections included.

    Traces the model with torch.fx and, walking the graph in order, links each layer to the
    nearest layers upstream of its input through any non-layer ops (adds, pooling, views).
    """
    graph = _BlockTracer().trace(model)
    block_ids = {id(layer.block): layer.layer_id for layer in model.layers}
    id_of = {name: block_ids[id(module)] for name, module in model.named_modules() if id(module) in block_ids}
    upstream: dict[torch.fx.Node, frozenset[int]] = {}
    edges: set[tuple[int, int]] = set()
    for node in graph.nodes:
        sources = frozenset().union(*(upstream.get(arg, frozenset()) for arg in node.all_input_nodes))
        layer_id = id_of.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]
        if layer_id is None:
            upstream[node] = sources
        else:
            edges.update((src, layer_id) for src in sources)
            upstream[node] = frozenset({layer_id})
    return sorted(edges)


def topology(model: HostModel, version: int = 1) -> TopologyPacket:
    """The TopologyPacket of a HostModel: its layers (host parameters only) and traced edges."""
    nodes = [
        TopologyNode(
            layer_id=layer.layer_id,
            name=layer.name,
            layer_type=layer.layer_type,
            params=sum(p.numel() for p in layer.block.host_parameters()),
            seed_slots=1 if layer.slot is not None else 0,
        )
        for layer in model.layers
    ]
    return TopologyPacket(
        nodes=nodes, edges=layer_edges(model), topology_version=version, timestamp=time.time()
    )
