"""Multi-objective choice among candidates, as seed document 002 specifies it (pure: no torch).

Each candidate scores three objectives: performance and adaptability (higher is better) and
risk (lower is better). `non_dominated_sort` splits the candidates into Pareto fronts (NSGA-II's
fast non-dominated sorting); `crowding_distance` measures how isolated each member of a front is
(infinite at a front's extremes). `select` picks from the first front the candidate with the best
weighted score (002's weights: performance 0.5, risk 0.3, adaptability 0.2), a tie going to the
larger crowding distance, then to the earlier candidate. A dominated candidate is never chosen,
whatever the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec


class Objectives(msgspec.Struct, frozen=True):
    """One candidate's scores. Performance and adaptability: higher is better; risk: lower is better."""

    performance: float
    risk: float
    adaptability: float

    def maximized(self) -> tuple[float, float, float]:
        """The scores with every objective to be maximized (risk negated)."""
        return (self.performance, -self.risk, self.adaptability)


class Weights(msgspec.Struct, frozen=True):
    """How much each objective counts in the final pick among the non-dominated candidates."""

    performance: float = 0.5
    risk: float = 0.3
    adaptability: float = 0.2

    def score(self, o: Objectives) -> float:
        return self.performance * o.performance - self.risk * o.risk + self.adaptability * o.adaptability


SEED_WEIGHTS = Weights()  # 002: 0.5 / 0.3 / 0.2


def dominates(a: Objectives, b: Objectives) -> bool:
    """a is at least as good as b in every objective and better in one."""
    pa, pb = a.maximized(), b.maximized()
    return all(x >= y for x, y in zip(pa, pb, strict=True)) and any(
        x > y for x, y in zip(pa, pb, strict=True)
    )


def non_dominated_sort(candidates: Sequence[Objectives]) -> list[list[int]]:
    """Pareto fronts as lists of candidate indices (ascending), the non-dominated first."""
    n = len(candidates)
    dominated_by: list[list[int]] = [[] for _ in range(n)]  # i -> the candidates i dominates
    count = [0] * n  # i -> how many candidates dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(candidates[i], candidates[j]):
                dominated_by[i].append(j)
                count[j] += 1
            elif dominates(candidates[j], candidates[i]):
                dominated_by[j].append(i)
                count[i] += 1
    fronts: list[list[int]] = []
    front = [i for i in range(n) if count[i] == 0]
    while front:
        fronts.append(sorted(front))
        following = []
        for i in front:
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    following.append(j)
        front = following
    return fronts


def crowding_distance(candidates: Sequence[Objectives], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II crowding distance of each member of `front`: per objective, the gap between its
    neighbours over the objective's range on the front, summed; infinite at either extreme of an
    objective the front varies in."""
    distance = dict.fromkeys(front, 0.0)
    if len(front) <= 2:
        return dict.fromkeys(front, math.inf)
    points = {i: candidates[i].maximized() for i in front}
    for k in range(3):
        ordered = sorted(front, key=lambda i: (points[i][k], i))
        low, high = points[ordered[0]][k], points[ordered[-1]][k]
        if high == low:
            continue  # an objective the front does not vary in has no extremes: it says nothing
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        for before, here, after in zip(ordered, ordered[1:], ordered[2:], strict=False):
            distance[here] += (points[after][k] - points[before][k]) / (high - low)
    return distance


def select(candidates: Sequence[Objectives], weights: Weights = SEED_WEIGHTS) -> int:
    """The index of the candidate to take (see the module docstring). ValueError when there are none."""
    if not candidates:
        raise ValueError("pareto: no candidates to choose from")
    first = non_dominated_sort(candidates)[0]
    crowding = crowding_distance(candidates, first)
    return min(first, key=lambda i: (-weights.score(candidates[i]), -crowding[i], i))


def argmax(candidates: Sequence[Objectives]) -> int:
    """The candidate with the best performance alone (the first of equals): `selection = "argmax"`."""
    if not candidates:
        raise ValueError("pareto: no candidates to choose from")
    return min(range(len(candidates)), key=lambda i: (-candidates[i].performance, i))
