"""Wire messages for tests: valid by default, any field overridable by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esperd_contracts import (
    AdaptationCommand,
    BlendAlgorithm,
    Blueprint,
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    Tempo,
    TopologyNode,
    TopologyPacket,
)


def chain_topology(
    layers: int | Sequence[str],
    *,
    layer_type: str = "linear",
    first_id: int = 0,
    name_prefix: str = "",
    skips: Sequence[tuple[int, int]] = (),
    **node_fields: Any,
) -> TopologyPacket:
    """A chain of layers first_id -> first_id + 1 -> ..., plus `skips` (pairs of layer ids).

    `layers` is a count (every layer `layer_type`) or one layer type per layer; a layer is named
    `name_prefix` + its index when a prefix is given; `node_fields` go to every TopologyNode.
    """
    kinds = [layer_type] * layers if isinstance(layers, int) else list(layers)
    ids = [first_id + i for i in range(len(kinds))]
    nodes = [
        TopologyNode(
            layer_id=layer_id, name=f"{name_prefix}{i}" if name_prefix else "", layer_type=kind, **node_fields
        )
        for i, (layer_id, kind) in enumerate(zip(ids, kinds, strict=True))
    ]
    edges = [(a, b) for a, b in zip(ids, ids[1:], strict=False)] + [tuple(s) for s in skips]
    return TopologyPacket(nodes=nodes, edges=edges)


def health(layer: int, score: float = 0.9, **fields: Any) -> HealthSignal:
    """One layer's health signal."""
    return HealthSignal(layer_id=layer, health_score=score, **fields)


def seed(layer: int, stage: SeedStage, **fields: Any) -> SeedSlotState:
    """One seed slot's state."""
    return SeedSlotState(layer_id=layer, stage=stage, **fields)


def state(epoch: int, *, seeds: Sequence[SeedSlotState] = (), **fields: Any) -> SystemStatePacket:
    """A state packet at `epoch`."""
    return SystemStatePacket(epoch=epoch, seeds=list(seeds), **fields)


#: The levers a GERMINATE needs, unless a test gives its own.
GERMINATE_LEVERS: dict[str, Any] = {
    "blueprint": Blueprint.CONV_LIGHT,
    "blend": BlendAlgorithm.LINEAR,
    "tempo": Tempo.FAST,
}


def command(
    op: Op, layer_id: int = 0, *, run_id: str = "r1", command_id: str = "c1", **fields: Any
) -> AdaptationCommand:
    """A command as esperd sends it: a GERMINATE carries levers and SET_ALPHA_TARGET a target
    unless `fields` say otherwise."""
    if op is Op.GERMINATE:
        fields = {**GERMINATE_LEVERS, **fields}
    if op is Op.SET_ALPHA_TARGET:
        fields = {"alpha_target": 0.5, **fields}
    return AdaptationCommand(command_id=command_id, run_id=run_id, layer_id=layer_id, op=op, **fields)
