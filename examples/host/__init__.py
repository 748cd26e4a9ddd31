"""The reference host: a real PyTorch training loop with Kasmina-style seed slots that esperd drives.

    python -m esperd_examples.host --nats nats://127.0.0.1:4222 --run r1 --epochs 10 [--seed 0]
    python -m esperd_examples.host --no-esperd --epochs 10          # the same training, no esperd

In process: `await HostRun(HostConfig(...), link=await HostClient.connect(url, run)).run()`.
"""

from __future__ import annotations

from esperd_examples.host.blending import BlendSchedule, shape
from esperd_examples.host.blueprints import (
    ALL_SEEDS,
    CNN_SEEDS,
    TRANSFORMER_SEEDS,
    UnsupportedBlueprint,
    build_seed,
)
from esperd_examples.host.lifecycle import IllegalTransition, SeedLifecycle
from esperd_examples.host.models import Block, DigitsCNN, HostModel, Layer, TinyTransformer, build_model
from esperd_examples.host.slot import SeedSlot
from esperd_examples.host.telemetry import LayerProbe, activation_stats, health_score, layer_edges, topology
from esperd_examples.host.train import CommandRecord, EpochReport, HostConfig, HostRun, Link, RunReport

__all__ = [
    "ALL_SEEDS",
    "CNN_SEEDS",
    "TRANSFORMER_SEEDS",
    "BlendSchedule",
    "Block",
    "CommandRecord",
    "DigitsCNN",
    "EpochReport",
    "HostConfig",
    "HostModel",
    "HostRun",
    "IllegalTransition",
    "Layer",
    "LayerProbe",
    "Link",
    "RunReport",
    "SeedLifecycle",
    "SeedSlot",
    "TinyTransformer",
    "UnsupportedBlueprint",
    "activation_stats",
    "build_model",
    "build_seed",
    "health_score",
    "layer_edges",
    "shape",
    "topology",
]
