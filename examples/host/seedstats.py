"""A seed's gradient history: what 004's dwell and LR levers need to be judged by.

No torch here: the probe feeds it one seed-gradient norm per probed step, and the slot tells it
where epochs end. From that it gives two of the lever telemetry fields (see
esperd_contracts.HealthSignal's descriptions):

    gradient_stability   variance of the seed's gradient norm over its last `window` readings
    lr_stability_ratio   epochs without an explosion / epochs with readings, an explosion
                         being a non-finite norm or one above `explosion_factor` x the median
                         of the readings before it (at least `min_history` of them)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

WINDOW = 16
EXPLOSION_FACTOR = 10.0
MIN_HISTORY = 3


@dataclass(slots=True)
class SeedGradientLog:
    """One seed's probed gradient norms since germination, and which epochs exploded."""

    window: int = WINDOW
    explosion_factor: float = EXPLOSION_FACTOR
    min_history: int = MIN_HISTORY
    recent: deque[float] = field(default_factory=deque)
    epochs: int = 0  # finished epochs that had readings
    stable_epochs: int = 0  # ... of which none exploded
    _read_this_epoch: bool = False
    _exploded_this_epoch: bool = False

    def record(self, norm: float) -> bool:
        """One probed step's seed gradient norm; True if it is an explosion."""
        exploded = not math.isfinite(norm)
        if not exploded and len(self.recent) >= self.min_history:
            exploded = norm > self.explosion_factor * statistics.median(self.recent)
        self._read_this_epoch = True
        self._exploded_this_epoch |= exploded
        if math.isfinite(norm):  # an infinite reading would poison the median and the variance
            self.recent.append(norm)
            if len(self.recent) > self.window:
                self.recent.popleft()
        return exploded

    def end_epoch(self) -> None:
        """An epoch ended: it counts if the seed was read during it."""
        if self._read_this_epoch:
            self.epochs += 1
            self.stable_epochs += not self._exploded_this_epoch
        self._read_this_epoch = self._exploded_this_epoch = False

    @property
    def variance(self) -> float:
        """Population variance of the recent norms (0 with fewer than two)."""
        return statistics.pvariance(self.recent) if len(self.recent) >= 2 else 0.0

    @property
    def stability_ratio(self) -> float:
        """Stable epochs / epochs read, the current one included once read; 0 before any reading."""
        epochs = self.epochs + self._read_this_epoch
        if epochs == 0:
            return 0.0
        stable = self.stable_epochs + (self._read_this_epoch and not self._exploded_this_epoch)
        return stable / epochs
