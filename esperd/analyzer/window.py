"""A sliding window of one signal with its least-squares trend and EWMA, each O(1) per push."""

from __future__ import annotations


class SlidingTrend:
    """Least-squares slope over the last `size` values, plus an EWMA of all values.

    The window keeps the running sums S = sum(y_k) and T = sum(k * y_k), where k = 0 is the
    oldest value. When a value y_0 leaves and y_new enters, every remaining value moves
    one position down, which subtracts (S - y_0) from T; so
        T' = T - (S - y_0) + (n - 1) * y_new,   S' = S - y_0 + y_new,
    and the slope is a closed form of S, T and n. No pass over the window per push.
    """

    __slots__ = (
        "_alpha",
        "_buf",
        "_ewma",
        "_head",
        "_n",
        "_pushes_since_sync",
        "_size",
        "_sum_xy",
        "_sum_y",
        "_sync_every",
    )

    def __init__(self, size: int, alpha: float) -> None:
        if size < 2:
            raise ValueError("window size must be >= 2")
        self._size = size
        self._alpha = alpha
        self._buf = [0.0] * size  # ring buffer; _head is the oldest value once full
        self._head = 0
        self._n = 0
        self._sum_y = 0.0
        self._sum_xy = 0.0
        self._ewma = 0.0
        # Running sums drift by rounding over millions of pushes; recomputing them from the
        # window every so often keeps them exact at an amortized cost far below O(1) per push.
        self._sync_every = max(1024, 16 * size)
        self._pushes_since_sync = 0

    def push(self, y: float) -> None:
        """Add one value, dropping the oldest once the window is full."""
        n = self._n
        if n < self._size:
            self._buf[n] = y
            self._sum_xy += n * y
            self._sum_y += y
            self._n = n + 1
            self._ewma = y if n == 0 else self._ewma + self._alpha * (y - self._ewma)
            return
        head = self._head
        oldest = self._buf[head]
        self._buf[head] = y
        self._head = head + 1 if head + 1 < n else 0
        self._sum_xy += (n - 1) * y - (self._sum_y - oldest)
        self._sum_y += y - oldest
        self._ewma += self._alpha * (y - self._ewma)
        self._pushes_since_sync += 1
        if self._pushes_since_sync >= self._sync_every:
            self._resync()

    @property
    def slope(self) -> float:
        """Least-squares slope per push over the window; 0 with fewer than two values."""
        n = self._n
        if n < 2:
            return 0.0
        # n*T - Sx*S over n*Sxx - Sx^2, with Sx = n(n-1)/2 and Sxx = (n-1)n(2n-1)/6.
        return 12.0 * (self._sum_xy - 0.5 * (n - 1) * self._sum_y) / (n * (n * n - 1))

    @property
    def ewma(self) -> float:
        """Exponentially weighted mean; the first value seeds it."""
        return self._ewma

    @property
    def count(self) -> int:
        """How many values the window holds now (at most its size)."""
        return self._n

    @property
    def size(self) -> int:
        return self._size

    def values(self) -> list[float]:
        """The window, oldest first (O(size); for tests and debugging)."""
        if self._n < self._size:
            return self._buf[: self._n]
        return self._buf[self._head :] + self._buf[: self._head]

    def _resync(self) -> None:
        window = self.values()
        self._sum_y = sum(window)
        self._sum_xy = sum(k * y for k, y in enumerate(window))
        self._pushes_since_sync = 0
