"""Serving bundles that served before, kept for reuse by a later swap once nothing references them.

Loading weights into a retired bundle is far cheaper than building one, whose Python holds the
GIL that the decision thread then waits for. The event loop retires bundles; the learner's
executor thread takes them back, hence the lock.
"""

from __future__ import annotations

import sys
import threading

from esperd.policy.base import PolicyBundle


class BundlePool:
    """The two most recently retired serving bundles (one is usually free by the next swap)."""

    def __init__(self, keep: int = 2) -> None:
        self._keep = keep
        self._retired: list[PolicyBundle] = []
        self._lock = threading.Lock()

    def retire(self, bundle: PolicyBundle) -> None:
        with self._lock:
            self._retired.append(bundle)
            del self._retired[: -self._keep]

    def reusable(self) -> PolicyBundle | None:
        """A retired bundle that nothing references any more (no batch in flight on it, no caller
        keeping it) and that holds no run's recurrent state; None if there is none."""
        with self._lock:
            for i in range(len(self._retired)):
                # Three references when unused: the list's, `bundle`'s and getrefcount's argument. A recurrent
                # bundle that still holds runs' hidden states is not reused: a fresh one starts
                # every run from zeros, a reused one would resume states two versions old.
                bundle = self._retired[i]
                if sys.getrefcount(bundle) <= 3 and not _holds_run_memory(bundle):
                    return self._retired.pop(i)
        return None


def _holds_run_memory(bundle: PolicyBundle) -> bool:
    """Whether the bundle keeps per-run recurrent state (the LSTM's hidden states)."""
    return getattr(bundle, "tracked_runs", 0) > 0
