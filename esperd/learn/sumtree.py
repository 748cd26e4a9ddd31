"""A numpy-backed sum tree: O(log n) priority updates and prefix-sum sampling, batched.

Leaves hold non-negative priorities; every inner node holds the sum of its two
children, so the root is the total and a value in [0, total) finds the leaf whose
cumulative range contains it by one descent. Both updates and descents are done
for a whole batch at once, one numpy operation per tree level; single-leaf sets
(one per added transition) are summed up lazily, all together, before the next read.
"""

from __future__ import annotations

import numpy as np


class SumTree:
    """Priorities of `capacity` leaves (float64), summed up a complete binary tree.

    Layout: a 1-based heap of 2 * P nodes, P = capacity rounded up to a power of two;
    node 1 is the root and leaf i is node P + i. Unused leaves stay 0, so they are
    never found.
    """

    __slots__ = ("_depth", "_dirty", "_leaf0", "_tree", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("sum tree capacity must be >= 1")
        self.capacity = int(capacity)
        leaves = 1
        depth = 0
        while leaves < capacity:
            leaves *= 2
            depth += 1
        self._leaf0 = leaves
        self._depth = depth
        self._tree = np.zeros(2 * leaves, dtype=np.float64)
        self._dirty: list[int] = []  # leaves set since the last flush (their ancestors are stale)

    @property
    def total(self) -> float:
        """The sum of all priorities."""
        self._flush()
        return float(self._tree[1])

    def get(self, indices: np.ndarray | int) -> np.ndarray:
        """The priorities of the given leaves."""
        return self._tree[self._leaf0 + np.asarray(indices, dtype=np.int64)]

    def leaves(self) -> np.ndarray:
        """A view of every leaf's priority (read it, do not write it)."""
        return self._tree[self._leaf0 : self._leaf0 + self.capacity]

    def set(self, index: int, priority: float) -> None:
        """Set one leaf now; its ancestors are summed lazily, for all pending leaves at once.

        The add path calls this once per transition: a Python loop up the tree would cost it a
        step per level, while recording the leaf is one assignment and the next
        `total`/`find`/`update` fixes every pending ancestor in one numpy pass per level.
        """
        node = self._leaf0 + index
        self._tree[node] = priority
        self._dirty.append(node)

    def _flush(self) -> None:
        dirty = self._dirty
        if not dirty:
            return
        if len(dirty) * 4 >= self._leaf0:
            self._dirty = []
            self.rebuild()  # most of the tree changed: recompute it all
            return
        self._dirty = []
        self._propagate(np.unique(np.array(dirty, dtype=np.int64)))

    def _propagate(self, nodes: np.ndarray) -> None:
        tree = self._tree
        for _ in range(self._depth):
            # Duplicate parents just write the same sum twice: no need to sort them out again.
            nodes = nodes >> 1
            tree[nodes] = tree[2 * nodes] + tree[2 * nodes + 1]

    def rebuild(self) -> None:
        """Recompute every inner node from the leaves (O(capacity), vectorized)."""
        tree = self._tree
        lo = self._leaf0
        while lo > 1:
            # Children of [lo/2, lo) are [lo, 2lo): pairwise sums of a contiguous slice.
            tree[lo // 2 : lo] = tree[lo : 2 * lo : 2] + tree[lo + 1 : 2 * lo : 2]
            lo //= 2

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set many leaves; duplicates keep the last value. One numpy pass per level."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self.capacity:
            raise IndexError("sum tree index out of range")
        p = np.asarray(priorities, dtype=np.float64)
        if np.any(p < 0) or not np.all(np.isfinite(p)):
            raise ValueError("priorities must be finite and non-negative")
        self._flush()
        nodes = idx + self._leaf0
        self._tree[nodes] = p
        self._propagate(nodes)

    def find(self, values: np.ndarray) -> np.ndarray:
        """For each value in [0, total), the leaf whose cumulative range holds it."""
        self._flush()
        v = np.array(values, dtype=np.float64)  # a copy: the descent consumes it
        tree = self._tree
        nodes = np.ones(v.shape, dtype=np.int64)
        for _ in range(self._depth):
            nodes <<= 1
            left_sum = tree[nodes]
            right = v >= left_sum
            np.subtract(v, left_sum, out=v, where=right)
            nodes += right
        return nodes - self._leaf0

    def clear(self) -> None:
        self._tree.fill(0.0)
        self._dirty = []
