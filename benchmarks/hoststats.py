"""Paired statistics for the real-host benchmarks: per-seed differences and bootstrap intervals.

Every comparison pairs two arms on the same run seeds (same data, init and batch order up to the
point where they differ), takes the per-seed differences and reports their mean with a
percentile-bootstrap 95% interval over seeds (`../shared/EVIDENCE.md`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Interval:
    """A mean with its bootstrap interval, over `n` values."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0.0 or self.high < 0.0)

    def format(self, scale: float = 100.0, digits: int = 2) -> str:
        """'+1.23 [+0.40, +2.01]' (in points when scale is 100)."""
        if self.n == 0:
            return "n/a"
        f = f"{{:+.{digits}f}}"
        if self.n == 1:
            return f.format(self.mean * scale) + " (1 seed)"
        lo, hi = f.format(self.low * scale), f.format(self.high * scale)
        return f"{f.format(self.mean * scale)} [{lo}, {hi}]"


def bootstrap_mean(
    values: Sequence[float], *, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """The mean of `values` and its percentile-bootstrap interval (resampling values with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if x.size == 1:
        return Interval(float(x[0]), float(x[0]), float(x[0]), 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(x.mean()), float(low), float(high), int(x.size))


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """a[seed] - b[seed] on the seeds both have."""
    return {seed: a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())}


def paired(a: Mapping[int, float], b: Mapping[int, float], **kwargs: float) -> Interval:
    """Mean of a - b over shared seeds, with its bootstrap interval."""
    return bootstrap_mean(list(paired_differences(a, b).values()), **kwargs)  # type: ignore[arg-type]


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than two values): the seed-to-seed spread."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0..4]; '0,2,5-7' -> [0, 2, 5, 6, 7]."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds
