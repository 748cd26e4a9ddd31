"""002's multi-objective selection (esperd.pareto) against hand-worked cases."""

from __future__ import annotations

import math

import pytest

from esperd.pareto import (
    Objectives,
    Weights,
    argmax,
    crowding_distance,
    dominates,
    non_dominated_sort,
    select,
)


def o(performance: float, risk: float, adaptability: float) -> Objectives:
    return Objectives(performance, risk, adaptability)


# A, B trade off; C is dominated by B; D by A (same performance and adaptability, more risk);
# E by B and by C.
A, B, C, D, E = o(0.9, 0.5, 0.1), o(0.5, 0.1, 0.5), o(0.4, 0.2, 0.4), o(0.9, 0.6, 0.1), o(0.3, 0.3, 0.3)


def test_dominance_counts_lower_risk_as_better() -> None:
    assert dominates(B, C) and dominates(A, D) and dominates(C, E)
    assert not dominates(A, B) and not dominates(B, A)
    assert not dominates(A, A)  # equal is not better
    assert not dominates(D, E) and not dominates(E, D)


def test_non_dominated_sorting_peels_fronts() -> None:
    # Front 1: A, B. Then C (only B dominated it) and D (only A). Then E (B and C dominated it).
    assert non_dominated_sort([A, B, C, D, E]) == [[0, 1], [2, 3], [4]]
    assert non_dominated_sort([]) == []
    assert non_dominated_sort([C, C]) == [[0, 1]]  # equals do not dominate each other


def test_crowding_distance_by_hand() -> None:
    # Four points trading performance for adaptability, risk constant (it says nothing).
    front = [o(1.0, 0.0, 0.0), o(0.8, 0.0, 0.2), o(0.5, 0.0, 0.5), o(0.0, 0.0, 1.0)]
    # Performance, ascending 0, .5, .8, 1 (range 1): point 2 gets .8 - 0 = .8, point 1 gets 1 - .5 = .5.
    # Adaptability, ascending 0, .2, .5, 1: point 1 gets .5 - 0 = .5, point 2 gets 1 - .2 = .8.
    distance = crowding_distance(front, [0, 1, 2, 3])
    assert distance[0] == distance[3] == math.inf
    assert distance[1] == pytest.approx(1.0) and distance[2] == pytest.approx(1.6)
    assert crowding_distance(front, [1, 2]) == {1: math.inf, 2: math.inf}  # two: both extremes


def test_select_takes_the_best_weighted_score_on_the_first_front() -> None:
    # 0.5 p - 0.3 r + 0.2 a:  X .30 - .12 + .10 = .28;  Y .25 - .03 + .08 = .30;
    # Z .275 - .09 + .04 = .225;  W (dominated by Y) .20 - .06 + .06 = .20.
    x, y, z, w = o(0.6, 0.4, 0.5), o(0.5, 0.1, 0.4), o(0.55, 0.3, 0.2), o(0.4, 0.2, 0.3)
    assert non_dominated_sort([x, y, z, w]) == [[0, 1, 2], [3]]
    assert select([x, y, z, w]) == 1
    assert argmax([x, y, z, w]) == 0  # performance alone
    assert select([x, y, z, w], Weights(performance=1.0, risk=0.0, adaptability=0.0)) == 0
    assert select([w]) == 0
    with pytest.raises(ValueError):
        select([])


def test_a_tie_goes_to_the_less_crowded_candidate() -> None:
    # Equal weights on performance and adaptability; the extremes score .4, the middle two .5.
    front = [o(1.0, 0.0, -0.2), o(0.7, 0.0, 0.3), o(0.6, 0.0, 0.4), o(-0.2, 0.0, 1.0)]
    # Range 1.2 for both. Point 1: (1 - .6)/1.2 + (.4 + .2)/1.2 = .833; point 2: (.7 + .2)/1.2 +
    # (1 - .3)/1.2 = 1.333: point 2 is the more isolated of the two tied.
    distance = crowding_distance(front, [0, 1, 2, 3])
    assert distance[1] == pytest.approx(1.0 / 1.2) and distance[2] == pytest.approx(1.6 / 1.2)
    assert select(front, Weights(performance=0.5, risk=0.0, adaptability=0.5)) == 2
