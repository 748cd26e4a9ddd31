"""Analyzer settings and its one error type."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from esperd.section import Section


class AnalyzerError(ValueError):
    """Input the analyzer refuses. `reason` is a short counter key (e.g. "cycle")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class AnalyzerConfig(Section, frozen=True):
    """Thresholds, window and bounds. Defaults follow the Tamiyo seed document.

    The Meta bounds are checked when the config is decoded (msgspec.convert from TOML);
    `__post_init__` repeats the checks that matter for direct construction.
    """

    # Trend window and smoothing.
    window_size: Annotated[int, Meta(ge=2, le=10_000)] = 10
    ewma_alpha: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.3
    # is_problematic: health < problematic_health or trend < problematic_trend
    #                 or error_count > problematic_errors.
    problematic_health: float = 0.3
    problematic_trend: float = -0.1
    problematic_errors: Annotated[int, Meta(ge=0)] = 5
    # needs_attention: health < attention_health and trend < attention_trend.
    attention_health: float = 0.5
    attention_trend: float = 0.0
    # A change is "material" (worth a decision) when a flag flips or health moves more
    # than this since the run was last observed.
    material_health_delta: Annotated[float, Meta(ge=0.0)] = 0.1
    # Health assumed for a layer that has not reported yet ("no data = healthy").
    default_health: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0
    # Validation accuracy must beat the best by more than this to end a plateau.
    plateau_min_delta: Annotated[float, Meta(ge=0.0)] = 1e-3
    # Standard error assumed for one counterfactual measurement when the host does not report its
    # validation size (SystemStatePacket.val_samples); with it, the error follows from the size.
    counterfactual_se: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.005
    # Host rejections of GERMINATE steer the next choice: the rejected blueprint is masked on its
    # layer for the rest of the run; one rejected on `blueprint_rejections_run_wide` layers is masked
    # on every layer (the host lacks it); a layer with `max_germinate_rejections` is not germinated.
    blueprint_rejections_run_wide: Annotated[int, Meta(ge=1)] = 2
    max_germinate_rejections: Annotated[int, Meta(ge=1)] = 3
    # Bounds.
    max_runs: Annotated[int, Meta(ge=1)] = 1024
    max_nodes_per_run: Annotated[int, Meta(ge=1)] = 4096
    max_edges_per_run: Annotated[int, Meta(ge=0)] = 65_536
    idle_ttl_s: Annotated[float, Meta(gt=0.0)] = 600.0
    # A run that said `done` keeps its slot this long for late acks, then is dropped.
    done_grace_s: Annotated[float, Meta(ge=0.0)] = 5.0
    # Estimated memory for every run's state together (esperd.runs.estimated_bytes: per run, per
    # layer, per edge). A new run, or a graph that grows, beyond it is refused (memory_budget).
    memory_budget_mb: Annotated[float, Meta(gt=0.0)] = 1024.0

    def __post_init__(self) -> None:
        if self.window_size < 2:
            raise ValueError("window_size must be >= 2 (a slope needs two points)")
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError("ewma_alpha must be in (0, 1]")
        if self.max_runs < 1 or self.max_nodes_per_run < 1 or self.max_edges_per_run < 0:
            raise ValueError("max_runs and max_nodes_per_run must be >= 1, max_edges_per_run >= 0")
        if self.idle_ttl_s <= 0.0:
            raise ValueError("idle_ttl_s must be > 0")
        if self.done_grace_s < 0.0:
            raise ValueError("done_grace_s must be >= 0")
        if self.memory_budget_mb <= 0.0:
            raise ValueError("memory_budget_mb must be > 0")
