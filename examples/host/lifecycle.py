"""The seed lifecycle of one slot as a small stage machine, driven by the contracts' table.

No torch here: the legal ops and where they lead come from `esperd_contracts.TRANSITIONS` /
`esperd_contracts.LEGAL_OPS`, so the host and esperd's action masks can never disagree.
Commands move a slot between stages; the epoch boundary moves it on its own:

    GERMINATED --(next epoch boundary)--> TRAINING
    TRAINING   --(after the GERMINATE's dwell_epochs, at the epoch boundary)--> BLENDING
    BLENDING   --(blend complete, at the epoch boundary)--> PROBATIONARY
    PRUNED     --(after `cooldown_epochs` epoch boundaries)--> DORMANT
"""

from __future__ import annotations

from dataclasses import dataclass

from esperd_contracts import AUTOMATIC, Op, SeedStage, is_legal, next_stage


class IllegalTransition(ValueError):
    """An op that the lifecycle table does not allow from the slot's stage."""


@dataclass(slots=True)
class SeedLifecycle:
    """Stage, time in stage and the prune cooldown of one seed slot."""

    cooldown_epochs: int = 2
    stage: SeedStage = SeedStage.DORMANT
    epochs_in_stage: int = 0

    def check(self, op: Op) -> str | None:
        """Why `op` cannot be applied now, or None when it can."""
        if is_legal(op, self.stage):
            return None
        return f"{op.value} is illegal from {self.stage.value}"

    def apply(self, op: Op) -> SeedStage:
        """Take the transition `op` leads to (WAIT changes nothing); returns the new stage."""
        reason = self.check(op)
        if reason is not None:
            raise IllegalTransition(reason)
        target = next_stage(self.stage, op)
        if target is not self.stage:
            self._enter(target)
        return self.stage

    def end_epoch(self, *, blend_complete: bool = False, dwell: int | None = None) -> SeedStage:
        """Count the epoch, then take the automatic transition due at this boundary, if any.
        `dwell`: epochs in TRAINING after which the seed starts blending by itself (None: it
        waits for ADVANCE)."""
        self.epochs_in_stage += 1
        if self.stage is SeedStage.GERMINATED:
            self._enter(AUTOMATIC[SeedStage.GERMINATED])
        elif self.stage is SeedStage.TRAINING and dwell is not None and self.epochs_in_stage >= dwell:
            # Not in esperd_contracts.AUTOMATIC either: only when the GERMINATE asked for a dwell.
            self._enter(next_stage(SeedStage.TRAINING, Op.ADVANCE))
        elif self.stage is SeedStage.PRUNED and self.epochs_in_stage >= self.cooldown_epochs:
            self._enter(AUTOMATIC[SeedStage.PRUNED])
        elif self.stage is SeedStage.BLENDING and blend_complete:
            # Not in esperd_contracts.AUTOMATIC: the host finishes a completed blend itself so a
            # seed does not sit at alpha 1 waiting for a command (ADVANCE does it earlier).
            self._enter(next_stage(SeedStage.BLENDING, Op.ADVANCE))
        return self.stage

    def _enter(self, stage: SeedStage) -> None:
        self.stage = stage
        self.epochs_in_stage = 0
