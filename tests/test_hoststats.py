"""The real-host benchmarks' paired statistics (pure functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.hoststats import bootstrap_mean, paired, paired_differences, parse_seeds, spread


def test_paired_differences_use_only_the_seeds_both_arms_have() -> None:
    a, b = {0: 0.9, 1: 0.8, 2: 0.7}, {1: 0.75, 2: 0.72, 3: 0.1}
    assert paired_differences(a, b) == pytest.approx({1: 0.05, 2: -0.02})
    assert paired(a, b).n == 2


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_seeds() -> None:
    rng = np.random.default_rng(0)
    few = bootstrap_mean(list(rng.normal(0.01, 0.02, 5)))
    many = bootstrap_mean(list(rng.normal(0.01, 0.02, 80)))
    assert few.low <= few.mean <= few.high and many.low <= many.mean <= many.high
    assert (many.high - many.low) < (few.high - few.low)
    assert bootstrap_mean([0.02] * 6).format() == "+2.00 [+2.00, +2.00]"


def test_an_interval_excludes_zero_only_when_both_ends_are_on_one_side() -> None:
    assert bootstrap_mean([0.01, 0.02, 0.015, 0.012, 0.03]).excludes_zero
    assert not bootstrap_mean([0.05, -0.04, 0.01, -0.02, 0.03]).excludes_zero
    assert not bootstrap_mean([0.05]).excludes_zero  # one seed proves nothing
    assert math.isnan(bootstrap_mean([]).mean) and bootstrap_mean([]).format() == "n/a"


def test_the_bootstrap_is_reproducible() -> None:
    values = [0.01, -0.005, 0.02, 0.0, 0.013]
    assert bootstrap_mean(values) == bootstrap_mean(values)


def test_spread_and_seed_lists() -> None:
    assert spread([0.5]) == 0.0 and spread([1.0, 3.0]) == pytest.approx(math.sqrt(2))
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,3, 5-6") == [0, 3, 5, 6]
    with pytest.raises(ValueError):
        parse_seeds(" , ")
