"""Seed lifecycle: every (stage, op) pair against DESIGN.md's transition table."""

from __future__ import annotations

import itertools

import pytest

from esperd_contracts import AUTOMATIC, LEGAL_OPS, TRANSITIONS, Op, SeedStage, is_legal, next_stage

S = SeedStage

# Written out from DESIGN.md's diagram, independently of esperd_contracts.lifecycle, so a change to the
# table there is a deliberate change here too. SET_ALPHA_TARGET retunes a seed while it blends.
EXPECTED: dict[tuple[SeedStage, Op], SeedStage] = {
    (S.DORMANT, Op.GERMINATE): S.GERMINATED,
    (S.TRAINING, Op.ADVANCE): S.BLENDING,
    (S.BLENDING, Op.ADVANCE): S.PROBATIONARY,
    (S.BLENDING, Op.SET_ALPHA_TARGET): S.BLENDING,
    (S.PROBATIONARY, Op.FOSSILIZE): S.FOSSILIZED,
    (S.GERMINATED, Op.PRUNE): S.PRUNED,
    (S.TRAINING, Op.PRUNE): S.PRUNED,
    (S.BLENDING, Op.PRUNE): S.PRUNED,
    (S.PROBATIONARY, Op.PRUNE): S.PRUNED,
}

ALL_PAIRS = list(itertools.product(SeedStage, Op))
LEGAL_PAIRS = [(s, o) for s, o in ALL_PAIRS if o is Op.WAIT or (s, o) in EXPECTED]
ILLEGAL_PAIRS = [(s, o) for s, o in ALL_PAIRS if (s, o) not in LEGAL_PAIRS]


def _id(pair: tuple[SeedStage, Op]) -> str:
    return f"{pair[0].value}-{pair[1].value}"


def test_transition_table_matches_design() -> None:
    assert TRANSITIONS == EXPECTED


def test_pair_lists_cover_everything() -> None:
    assert len(ALL_PAIRS) == len(SeedStage) * len(Op)
    assert set(LEGAL_PAIRS).isdisjoint(ILLEGAL_PAIRS)
    assert len(LEGAL_PAIRS) == len(SeedStage) + len(EXPECTED)


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=_id)
def test_is_legal_matches_table(pair: tuple[SeedStage, Op]) -> None:
    stage, op = pair
    expected = op is Op.WAIT or (stage, op) in TRANSITIONS
    assert is_legal(op, stage) is expected
    assert (op in LEGAL_OPS[stage]) is expected


@pytest.mark.parametrize("pair", LEGAL_PAIRS, ids=_id)
def test_next_stage_of_legal_ops(pair: tuple[SeedStage, Op]) -> None:
    stage, op = pair
    expected = stage if op is Op.WAIT else EXPECTED[(stage, op)]
    assert next_stage(stage, op) is expected


@pytest.mark.parametrize("pair", ILLEGAL_PAIRS, ids=_id)
def test_next_stage_rejects_illegal_ops(pair: tuple[SeedStage, Op]) -> None:
    stage, op = pair
    with pytest.raises(ValueError, match=f"{op.value} is illegal from {stage.value}"):
        next_stage(stage, op)


@pytest.mark.parametrize("stage", list(SeedStage), ids=lambda s: s.value)
def test_wait_is_legal_everywhere_and_changes_nothing(stage: SeedStage) -> None:
    assert is_legal(Op.WAIT, stage)
    assert next_stage(stage, Op.WAIT) is stage


def test_terminal_and_transient_stages_only_wait() -> None:
    # FOSSILIZED is final; GERMINATED->TRAINING and PRUNED->DORMANT are taken by the host itself,
    # but GERMINATED may still be pruned.
    assert LEGAL_OPS[S.FOSSILIZED] == frozenset({Op.WAIT})
    assert LEGAL_OPS[S.PRUNED] == frozenset({Op.WAIT})
    assert LEGAL_OPS[S.GERMINATED] == frozenset({Op.WAIT, Op.PRUNE})


def test_automatic_transitions() -> None:
    assert AUTOMATIC == {S.GERMINATED: S.TRAINING, S.BLENDING: S.PROBATIONARY, S.PRUNED: S.DORMANT}
    # Only the end of a blend may also be commanded (ADVANCE ends it early).
    both = {
        stage
        for stage, target in AUTOMATIC.items()
        if any(TRANSITIONS[(s, o)] is target for (s, o) in TRANSITIONS if s is stage)
    }
    assert both == {S.BLENDING}


def test_every_stage_reachable_from_dormant() -> None:
    edges: dict[SeedStage, set[SeedStage]] = {s: set() for s in SeedStage}
    for (src, _), dst in TRANSITIONS.items():
        edges[src].add(dst)
    for src, dst in AUTOMATIC.items():
        edges[src].add(dst)
    seen, todo = {S.DORMANT}, [S.DORMANT]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert seen == set(SeedStage)


def test_pruned_slot_returns_to_dormant_and_can_regerminate() -> None:
    stage = next_stage(S.TRAINING, Op.PRUNE)
    assert stage is S.PRUNED
    assert not is_legal(Op.GERMINATE, stage)
    stage = AUTOMATIC[stage]
    assert next_stage(stage, Op.GERMINATE) is S.GERMINATED


def test_full_happy_path() -> None:
    stage = next_stage(S.DORMANT, Op.GERMINATE)
    stage = AUTOMATIC[stage]
    for op in (Op.ADVANCE, Op.SET_ALPHA_TARGET, Op.ADVANCE, Op.FOSSILIZE):
        stage = next_stage(stage, op)
    assert stage is S.FOSSILIZED
