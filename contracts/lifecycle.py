"""The seed lifecycle as data: which op is legal from which stage, and where it leads."""

from __future__ import annotations

from esperd_contracts.enums import Op, SeedStage

S = SeedStage

#: (stage, op) -> stage the op leads to. WAIT is legal everywhere and changes nothing.
#: The host's own moves are in AUTOMATIC.
TRANSITIONS: dict[tuple[SeedStage, Op], SeedStage] = {
    (S.DORMANT, Op.GERMINATE): S.GERMINATED,
    (S.GERMINATED, Op.PRUNE): S.PRUNED,
    (S.TRAINING, Op.ADVANCE): S.BLENDING,
    (S.TRAINING, Op.PRUNE): S.PRUNED,
    (S.BLENDING, Op.ADVANCE): S.PROBATIONARY,
    (S.BLENDING, Op.SET_ALPHA_TARGET): S.BLENDING,
    (S.BLENDING, Op.PRUNE): S.PRUNED,
    (S.PROBATIONARY, Op.FOSSILIZE): S.FOSSILIZED,
    (S.PROBATIONARY, Op.PRUNE): S.PRUNED,
}

#: Stages a host moves through on its own (no command needed): a germinated seed starts
#: training, a blend ends in probation when the tempo's epochs have passed (ADVANCE ends it
#: early), and a pruned slot is free again after its cooldown.
AUTOMATIC: dict[SeedStage, SeedStage] = {
    S.GERMINATED: S.TRAINING,
    S.BLENDING: S.PROBATIONARY,
    S.PRUNED: S.DORMANT,
}

#: stage -> ops legal from it, WAIT included.
LEGAL_OPS: dict[SeedStage, frozenset[Op]] = {
    stage: frozenset({Op.WAIT} | {op for (s, op) in TRANSITIONS if s is stage}) for stage in SeedStage
}

del S


def is_legal(op: Op, stage: SeedStage) -> bool:
    """Whether `op` may be issued to a slot in `stage`."""
    return op in LEGAL_OPS[stage]


def next_stage(stage: SeedStage, op: Op) -> SeedStage:
    """The stage `op` leads to from `stage`; raises ValueError for an illegal op."""
    if op is Op.WAIT:
        return stage
    try:
        return TRANSITIONS[(stage, op)]
    except KeyError:
        raise ValueError(f"{op.value} is illegal from {stage.value}") from None
