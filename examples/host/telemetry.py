"""Per-layer telemetry from real tensors, the health score, and the topology from torch.fx.

Statistics of a layer's output (the Block's, seed included), units being channels of a
conv map or features of a linear/transformer layer:

    activation_variance   variance over every element of the output
    dead_neuron_ratio     share of units whose |activation| <= 1e-6 for every sample and
                          position (a ReLU unit that never fires)
    avg_correlation       mean |Pearson correlation| between up to 16 evenly spaced live
                          units across the samples (per-sample spatial means for conv maps,
                          every position for sequences); redundant units push it to 1
    gradient_norm         L2 norm of the layer's host-parameter gradients after backward
    seed_gradient_ratio   seed-parameter gradient norm / host gradient norm
    execution_latency_us  wall time of the Block's forward (CPU clock; on GPU it would
                          need a synchronise, so it is host-side dispatch time there)

Health score, in [0, 1] (each factor is 1 for a healthy layer and falls towards 0 on one
failure mode, so a layer is as healthy as its worst symptom lets it be):

    health = (1 - dead_ratio) * (1 - |avg_correlation| / 2)
             * sqrt(band(variance, 1e-4, 1e4)) * sqrt(band(gradient_norm, 1e-6, 1e2))
    band(x, lo, hi) = x / (x + lo) * hi / (hi + x)   (~1 inside [lo, hi], -> 0 outside)

A typical layer of the digits CNN scores 0.75-0.9 (its units correlate somewhat); a
layer with half its units dead scores below 0.45. The gradient factor is 1 for a layer
with no parameters.

Probing costs forward hooks, so `LayerProbe.capture()` attaches them only for the steps
that report (every K-th step); the others run bare.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from contracts import HealthSignal, TopologyNode, TopologyPacket
from examples.host.models import Block, HostModel, Layer

DEAD_EPS = 1e-6
MAX_CORRELATED_UNITS = 16


@dataclass(frozen=True, slots=True)
class ActivationStats:
    variance: float
    dead_ratio: float
    avg_correlation: float


def _units_by_samples(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as [samples, units] for correlation, and the unit dimension of x."""
    if x.dim() == 4:  # [B, C, H, W]: one sample per image, spatially averaged
        return x.mean(dim=(2, 3)), 1
    if x.dim() >= 3:  # [B, T, D]: every position is a sample
        return x.reshape(-1, x.shape[-1]), x.dim() - 1
    return x.reshape(x.shape[0], -1), 1


def activation_tensors(x: torch.Tensor) -> torch.Tensor:
    """[variance, dead_ratio, avg_correlation] of a layer output, as one tensor (no host sync)."""
    x = x.detach().float()
    samples, unit_dim = _units_by_samples(x)
    reduce = [d for d in range(x.dim()) if d != unit_dim]
    dead = x.abs().amax(dim=reduce) <= DEAD_EPS
    return torch.stack([x.var(unbiased=False), dead.float().mean(), _avg_abs_correlation(samples, ~dead)])


def _avg_abs_correlation(samples: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Mean |corr| over pairs of up to 16 evenly spaced units with nonzero spread."""
    units = samples.shape[1]
    if units < 2 or samples.shape[0] < 2:
        return samples.new_zeros(())
    index = (
        torch.linspace(0, units - 1, min(units, MAX_CORRELATED_UNITS), device=samples.device).round().long()
    )
    picked = samples[:, index]
    centred = picked - picked.mean(dim=0)
    std = centred.pow(2).mean(dim=0).sqrt()
    usable = (std > 1e-8) & alive[index]
    z = centred / std.clamp_min(1e-8)
    corr = (z.T @ z) / samples.shape[0]
    pair = usable[:, None] & usable[None, :] & ~torch.eye(index.numel(), dtype=torch.bool, device=z.device)
    count = pair.sum()
    return torch.where(count > 0, (corr.abs() * pair).sum() / count.clamp_min(1), corr.new_zeros(())).clamp(
        0, 1
    )


def activation_stats(x: torch.Tensor) -> ActivationStats:
    """The activation statistics of one tensor, as Python floats."""
    variance, dead, corr = activation_tensors(x).tolist()
    return ActivationStats(variance, dead, corr)


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


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor | None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@dataclass(slots=True)
class _LayerReading:
    stats: torch.Tensor | None = None
    latency_ns: int = 0
    host_grad: torch.Tensor | None = None
    seed_grad: torch.Tensor | None = None
    started_ns: int = 0


@dataclass(slots=True)
class LayerProbe:
    """Forward hooks (while capturing) and gradient reads for every layer of a HostModel."""

    model: HostModel
    readings: dict[int, _LayerReading] = field(default_factory=dict)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record activations and latency of every layer for the forward passes inside."""
        handles = []
        for layer in self.model.layers:
            reading = self.readings.setdefault(layer.layer_id, _LayerReading())
            handles.append(layer.block.register_forward_pre_hook(self._before(reading)))
            handles.append(layer.block.register_forward_hook(self._after(reading)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _before(reading: _LayerReading):
        def hook(module: nn.Module, args: object) -> None:
            reading.started_ns = time.perf_counter_ns()

        return hook

    @staticmethod
    def _after(reading: _LayerReading):
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            reading.latency_ns = time.perf_counter_ns() - reading.started_ns
            with torch.no_grad():
                reading.stats = activation_tensors(output)

        return hook

    def read_gradients(self) -> None:
        """After backward: gradient norms of each layer's host and seed parameters."""
        for layer in self.model.layers:
            reading = self.readings.setdefault(layer.layer_id, _LayerReading())
            reading.host_grad = _grad_norm(layer.block.host_parameters())
            slot = layer.slot
            reading.seed_grad = _grad_norm(slot.seed_parameters()) if slot is not None else None

    def signals(self, timestamp: float | None = None) -> list[HealthSignal]:
        """One HealthSignal per layer from the latest readings (one host sync for all of them)."""
        now = time.time() if timestamp is None else timestamp
        layers = [
            layer
            for layer in self.model.layers
            if layer.layer_id in self.readings and self.readings[layer.layer_id].stats is not None
        ]
        if not layers:
            return []
        nan = torch.tensor(float("nan"))
        rows = []
        for layer in layers:
            r = self.readings[layer.layer_id]
            grads = [g if g is not None else nan for g in (r.host_grad, r.seed_grad)]
            rows.append(torch.cat([r.stats.cpu(), torch.stack(grads).cpu()]))  # type: ignore[union-attr]
        values = torch.stack(rows).tolist()
        return [
            _signal(layer, self.readings[layer.layer_id], v, now)
            for layer, v in zip(layers, values, strict=True)
        ]


def _finite(value: float, low: float = 0.0, high: float = 1e300) -> tuple[float, int]:
    """(value clipped into range, 1 if it was not finite else 0)."""
    if not math.isfinite(value):
        return 0.0, 1
    return min(max(value, low), high), 0


def _signal(layer: Layer, reading: _LayerReading, values: list[float], now: float) -> HealthSignal:
    variance, dead, corr, host_grad, seed_grad = values
    has_grad = not math.isnan(host_grad)
    variance, bad_var = _finite(variance)
    dead, bad_dead = _finite(dead, 0.0, 1.0)
    corr, bad_corr = _finite(corr, -1.0, 1.0)
    grad, bad_grad = _finite(host_grad) if has_grad else (0.0, 0)
    seed_norm = 0.0 if math.isnan(seed_grad) else seed_grad
    ratio, bad_ratio = _finite(seed_norm / grad) if grad > 0 else (0.0, 0)
    errors = bad_var + bad_dead + bad_corr + bad_grad + bad_ratio
    health = 0.0 if errors else health_score(dead, corr, variance, grad if has_grad else None)
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
