"""The analyzer: live per-run layer graphs built from host telemetry, observed as arrays.

numpy and `contracts` only (no torch, no nats), so it is cheap to import and test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esperd.lazy import lazy_exports

if TYPE_CHECKING:
    from esperd.analyzer.analyzer import Analyzer, AnalyzerSummary
    from esperd.analyzer.config import AnalyzerConfig, AnalyzerError
    from esperd.analyzer.graph import Graph, components, gcn_normalize
    from esperd.analyzer.observation import GLOBAL_FEATURES, NODE_FEATURES, Observation
    from esperd.analyzer.run import RunState, RunSummary, TrainingState
    from esperd.analyzer.window import SlidingTrend

_EXPORTS = {
    "Analyzer": "analyzer",
    "AnalyzerConfig": "config",
    "AnalyzerError": "config",
    "AnalyzerSummary": "analyzer",
    "GLOBAL_FEATURES": "observation",
    "Graph": "graph",
    "NODE_FEATURES": "observation",
    "Observation": "observation",
    "RunState": "run",
    "RunSummary": "run",
    "SlidingTrend": "window",
    "TrainingState": "run",
    "components": "graph",
    "gcn_normalize": "graph",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
