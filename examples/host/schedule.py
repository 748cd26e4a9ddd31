"""A fixed germination schedule applied by the host itself: no esperd, no telemetry.

It is the "fixed schedule" control of `../shared/EVIDENCE.md` and the tool of the manual
germination sweep (`benchmarks/germination_sweep.py`): a blueprint germinated at a fixed
layer and epoch, advanced to BLENDING after a fixed number of TRAINING epochs, left to
blend over its tempo and fossilized as soon as it reaches PROBATIONARY -- whatever it did
to accuracy. Comparing it with a controller separates "more capacity helps" from
"choosing where, when and what helps".

    schedule = FixedSchedule([Germination("block3", Blueprint.CONV_LIGHT, epoch=2)])
    report = await run_scheduled(HostRun(config), schedule)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from esperd_contracts import AdaptationCommand, BlendAlgorithm, Blueprint, Op, SeedStage, Tempo
from esperd_examples.host.train import HostRun, RunReport


@dataclass(frozen=True, slots=True)
class Germination:
    """One planned seed: `blueprint` on layer `layer` (its name), germinated before epoch `epoch`."""

    layer: str
    blueprint: Blueprint
    epoch: int = 2
    train_epochs: int = 2  # epochs in TRAINING before ADVANCE starts the blend
    blend: BlendAlgorithm = BlendAlgorithm.SIGMOID
    tempo: Tempo = Tempo.STANDARD

    def label(self) -> str:
        return f"{self.blueprint.value}@{self.layer}:e{self.epoch}"


class FixedSchedule:
    """The commands a fixed plan issues at each epoch boundary, from the slots' stages alone."""

    name = "fixed"

    def __init__(self, germinations: Sequence[Germination]) -> None:
        layers = [g.layer for g in germinations]
        if len(set(layers)) != len(layers):
            raise ValueError(f"one germination per layer (a slot holds one seed); got {layers}")
        self.germinations = tuple(germinations)
        self._ids = itertools.count(1)

    def due(self, run: HostRun) -> list[AdaptationCommand]:
        """Commands to apply before training epoch `run.epoch` starts."""
        commands = []
        for plan in self.germinations:
            layer = run.model.layer_named(plan.layer)
            slot = layer.slot
            if slot is None:
                raise ValueError(f"layer {plan.layer!r} has no seed slot")
            op = self._next_op(plan, slot.stage, slot.lifecycle.epochs_in_stage, run.epoch)
            if op is not None:
                commands.append(self._command(run, layer.layer_id, op, plan))
        return commands

    @staticmethod
    def _next_op(plan: Germination, stage: SeedStage, epochs_in_stage: int, epoch: int) -> Op | None:
        if stage is SeedStage.DORMANT and epoch == plan.epoch:
            return Op.GERMINATE
        if stage is SeedStage.TRAINING and epochs_in_stage >= plan.train_epochs:
            return Op.ADVANCE
        if stage is SeedStage.PROBATIONARY:
            return Op.FOSSILIZE
        return None

    def _command(self, run: HostRun, layer_id: int, op: Op, plan: Germination) -> AdaptationCommand:
        levers = {}
        if op is Op.GERMINATE:
            levers = {"blueprint": plan.blueprint, "blend": plan.blend, "tempo": plan.tempo}
        return AdaptationCommand(
            command_id=f"fixed-{next(self._ids)}",
            run_id=run.run_id,
            layer_id=layer_id,
            op=op,
            policy=self.name,
            reason=plan.label(),
            **levers,
        )


async def run_scheduled(run: HostRun, schedule: FixedSchedule) -> RunReport:
    """Train `run` for its configured epochs, applying `schedule`'s commands at epoch boundaries."""
    run.start()
    for _ in range(run.config.epochs):
        for command in schedule.due(run):
            run.handle(command)
        await run.run_epoch()
    await run.finish()
    return run.report
