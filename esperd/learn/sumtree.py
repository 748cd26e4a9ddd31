"""A numpy-backed sum tree: O(log n) priority updates and prefix-sum sampling, batched.

Leaves hold non-negative priorities; every inner node holds the sum of its two
children, so the root is the total and a value in [0, total) finds the leaf whose
cumulative range contains it by one descent. Both updates and descents are done
for a whole batch at once, one numpy operation per tree level.
"""

from __future__ import annotations

import numpy as np


class SumTree:
    """Priorities of `capacity` leaves (float64), summed up a complete binary tree.

    Layout: a 1-based heap of 2 * P nodes, P = capacity rounded up to a power of two;
    node 1 is the root and leaf i is node P + i. Unused leaves stay 0, so they are
    never found.
    """

    __slots__ = ("_depth", "_leaf0", "_tree", "capacity")

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

    @property
    def total(self) -> float:
        """The sum of all priorities."""
        return float(self._tree[1])

    def get(self, indices: np.ndarray | int) -> np.ndarray:
        """The priorities of the given leaves."""
        return self._tree[self._leaf0 + np.asarray(indices, dtype=np.int64)]

    def leaves(self) -> np.ndarray:
        """A view of every leaf's priority (read it, do not write it)."""
        return self._tree[self._leaf0 : self._leaf0 + self.capacity]

    def set(self, index: int, priority: float) -> None:
        """Set one leaf and its ancestors (the add path: plain Python is faster than numpy here)."""
        tree = self._tree
        node = self._leaf0 + index
        tree[node] = priority
        node >>= 1
        while node:
            # Recompute from the children instead of adding a delta: no drift after millions of updates.
            tree[node] = tree[2 * node] + tree[2 * node + 1]
            node >>= 1

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
        tree = self._tree
        nodes = idx + self._leaf0
        tree[nodes] = p
        for _ in range(self._depth):
            nodes = np.unique(nodes >> 1)
            tree[nodes] = tree[2 * nodes] + tree[2 * nodes + 1]

    def find(self, values: np.ndarray) -> np.ndarray:
        """For each value in [0, total), the leaf whose cumulative range holds it."""
        v = np.array(values, dtype=np.float64)  # a copy: the descent consumes it
        tree = self._tree
        nodes = np.ones(v.shape, dtype=np.int64)
        for _ in range(self._depth):
            left = 2 * nodes
            left_sum = tree[left]
            right = v >= left_sum
            v -= np.where(right, left_sum, 0.0)
            nodes = left + right
        return nodes - self._leaf0

    def clear(self) -> None:
        self._tree.fill(0.0)
