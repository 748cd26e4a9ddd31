"""The analyzer: live per-run layer graphs built from host telemetry, observed as arrays.

numpy and `contracts` only (no torch, no nats), so it is cheap to import and test.
"""

from __future__ import annotations

from esperd.analyzer.analyzer import Analyzer, AnalyzerSummary
from esperd.analyzer.config import AnalyzerConfig, AnalyzerError
from esperd.analyzer.graph import Graph, components, gcn_normalize
from esperd.analyzer.observation import GLOBAL_FEATURES, NODE_FEATURES, Observation
from esperd.analyzer.run import RunState, RunSummary, TrainingState
from esperd.analyzer.window import SlidingTrend

__all__ = [
    "GLOBAL_FEATURES",
    "NODE_FEATURES",
    "Analyzer",
    "AnalyzerConfig",
    "AnalyzerError",
    "AnalyzerSummary",
    "Graph",
    "Observation",
    "RunState",
    "RunSummary",
    "SlidingTrend",
    "TrainingState",
    "components",
    "gcn_normalize",
]
