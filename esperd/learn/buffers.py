"""Experience buffers: an on-policy rollout buffer (PPO) and a prioritized replay buffer (IMPALA).

Both hold Transition objects, which reference Observations rather than copying them:
topology arrays are shared per run and topology version, and a transition's next_obs
is the next transition's obs, so a step costs its per-step arrays (node features,
op mask, stages, globals) and a few small objects -- nothing per node.

Both are sinks for the Recorder (`recorder.add_sink(buffer.add)`) and both are
thread-safe: the event loop adds while the learner thread drains or samples.
Both persist without pickle (`save` / `load`, see esperd.learn.persist).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
import numpy as np

from esperd.learn.experience import Transition
from esperd.learn.persist import BufferFileError, load_experience, save_experience
from esperd.learn.sumtree import SumTree

__all__ = [
    "BufferFileError",
    "ReplayBuffer",
    "ReplayStats",
    "RolloutBuffer",
    "RolloutStats",
    "SampledBatch",
    "SampledSequences",
]


# ---------------------------------------------------------------- rollout (PPO)


class RolloutStats(msgspec.Struct, kw_only=True):
    size: int
    capacity: int
    min_version: int
    added: int  # kept on arrival
    dropped_stale: int  # made by a policy older than min_version (on arrival or when it rose)
    dropped_overflow: int  # oldest dropped because the learner did not drain in time
    drained: int


class RolloutBuffer:
    """On-policy transitions, oldest first, until the learner drains them.

    PPO may only learn from the policy it updates, so transitions made by a version older
    than `min_version` are dropped (and counted), on arrival and whenever `min_version`
    rises after a swap. When full, the oldest transition makes room: the learner is
    behind, and fresh data is worth more than old.
    """

    def __init__(self, capacity: int = 4096, *, min_version: int = 0) -> None:
        if capacity < 1:
            raise ValueError("rollout capacity must be >= 1")
        self.capacity = int(capacity)
        self.min_version = int(min_version)
        self._items: collections.deque[Transition] = collections.deque()
        self._lock = threading.Lock()
        self.added = 0
        self.dropped_stale = 0
        self.dropped_overflow = 0
        self.drained = 0

    def add(self, transition: Transition) -> bool:
        """Keep `transition` unless it is stale; False if it was dropped."""
        with self._lock:
            if transition.policy_version < self.min_version:
                self.dropped_stale += 1
                return False
            if len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped_overflow += 1
            self._items.append(transition)
            self.added += 1
            return True

    __call__ = add  # a Recorder sink

    def extend(self, transitions: Iterable[Transition]) -> int:
        """Add many; returns how many were kept."""
        return sum(self.add(t) for t in transitions)

    def set_min_version(self, version: int) -> int:
        """Only keep transitions made by `version` or later from now on; returns how many were dropped."""
        with self._lock:
            self.min_version = int(version)
            kept = [t for t in self._items if t.policy_version >= self.min_version]
            dropped = len(self._items) - len(kept)
            if dropped:
                self._items = collections.deque(kept)
                self.dropped_stale += dropped
            return dropped

    def ready(self, min_size: int) -> bool:
        """Whether at least `min_size` transitions are waiting."""
        return len(self._items) >= min_size

    def drain(self) -> list[Transition]:
        """Every transition held, oldest first; the buffer is empty afterwards."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self.drained += len(items)
            return items

    def peek(self) -> list[Transition]:
        """Every transition held, oldest first, without removing them."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> RolloutStats:
        return RolloutStats(
            size=len(self._items),
            capacity=self.capacity,
            min_version=self.min_version,
            added=self.added,
            dropped_stale=self.dropped_stale,
            dropped_overflow=self.dropped_overflow,
            drained=self.drained,
        )

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the held transitions to `path` (atomic); returns the file size."""
        with self._lock:
            items = list(self._items)
            state = {"capacity": self.capacity, "min_version": self.min_version}
        return save_experience(path, items, kind="rollout", state=state)

    def load(self, path: str | os.PathLike[str]) -> int:
        """Replace the contents with a saved buffer's (this buffer's capacity and min_version apply:
        stale and excess-oldest transitions are dropped and counted); returns how many were kept."""
        loaded = load_experience(path)
        with self._lock:
            self._items.clear()
        return self.extend(loaded.transitions)


# ---------------------------------------------------------------- replay (IMPALA)


class SampledBatch(msgspec.Struct, kw_only=True):
    """`ReplayBuffer.sample`'s result (also unpacks as (transitions, indices, weights))."""

    transitions: list[Transition]
    indices: np.ndarray  # int64 [B] buffer slots, for update_priorities
    weights: np.ndarray  # float32 [B] importance weights, at most max_importance_weight (1 when uniform)
    beta: float
    stamps: (
        np.ndarray
    )  # int64 [B] when each slot was filled: pass to update_priorities to skip overwritten ones

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.transitions, self.indices, self.weights))


class SampledSequences(msgspec.Struct, kw_only=True):
    """`ReplayBuffer.sample_sequences`'s result: up to `length` consecutive steps of one run each."""

    sequences: list[list[Transition]]  # each starts at indices[b]; shorter where the chain breaks
    indices: np.ndarray  # int64 [B] slots of each sequence's first step
    slots: np.ndarray  # int64 [length, B] slots, time-major, -1 past a sequence's end
    weights: np.ndarray  # float32 [B], importance weights of the first steps
    beta: float
    stamps: np.ndarray  # int64 [B] fill stamps of the first steps (see SampledBatch)
    slot_stamps: np.ndarray | None = None  # int64 [length, B] fill stamps of `slots`, -1 past an end


class ReplayStats(msgspec.Struct, kw_only=True):
    size: int
    capacity: int
    prioritized: bool
    added: int
    overwritten: int
    samples: int  # sample() calls (the beta schedule's step)
    beta: float
    max_priority: float
    priority_total: float


class ReplayBuffer:
    """A ring buffer of Transitions with uniform or prioritized (sum-tree) sampling.

    Prioritized replay (Schaul et al. 2016): P(i) = p_i^alpha / sum_k p_k^alpha with
    p_i = |td_i| + eps; a new transition gets the largest priority seen so far, so it is
    sampled at least once soon. Importance weights (N * P(i))^-beta are capped at
    `max_importance_weight` (seed document 002: 10), so a transition sampled far less often than
    uniform counts at most that much more, while the weights keep their scale from batch to batch
    (dividing by each batch's largest, as before, made a step's size depend on the rarest sample
    drawn); beta anneals linearly from beta_start to beta_end over beta_anneal_steps calls to
    `sample`.

    The buffer also links each stored transition to the stored transition of the same run
    whose obs is its next_obs, so `sample_sequences` can hand out [T, B] unrolls for V-trace.
    """

    def __init__(
        self,
        capacity: int = 100_000,
        *,
        prioritized: bool = True,
        alpha: float = 0.6,
        beta_start: float = 0.4,
        beta_end: float = 1.0,
        beta_anneal_steps: int = 100_000,
        eps: float = 1e-6,
        seed: int | None = None,
        max_importance_weight: float = 10.0,
    ) -> None:
        if capacity < 1:
            raise ValueError("replay capacity must be >= 1")
        if alpha < 0 or not 0 <= beta_start <= 1 or not 0 <= beta_end <= 1:
            raise ValueError("alpha must be >= 0 and betas in [0, 1]")
        if eps <= 0:
            raise ValueError("eps must be > 0 (a zero priority is never sampled again)")
        if not max_importance_weight > 0:
            raise ValueError("max_importance_weight must be > 0")
        self.max_importance_weight = float(max_importance_weight)
        self.capacity = int(capacity)
        self.prioritized = bool(prioritized)
        self.alpha = float(alpha)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.beta_anneal_steps = max(int(beta_anneal_steps), 1)
        self.eps = float(eps)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._items: list[Transition | None] = [None] * self.capacity
        # Raw priorities p_i (not alpha-scaled), for save and for changing alpha on load.
        self._priority = np.zeros(self.capacity, dtype=np.float64)
        self._tree = SumTree(self.capacity)
        # Successor / predecessor slot of the same run, -1 for none. Python lists: the add path
        # touches single items, where a list is faster than numpy.
        self._next: list[int] = [-1] * self.capacity
        self._prev: list[int] = [-1] * self.capacity
        # A number per fill, unique for this object's life (load and clear do not reset it):
        # tells a late priority update for an overwritten slot (the learner trains between
        # sample and update) from a current one, and names a transition to the learner's child
        # process, which holds the ones it was sent by (slot, stamp).
        self._stamp = np.full(self.capacity, -1, dtype=np.int64)
        self._fills = 0
        self._tail: dict[str, int] = {}  # run -> slot of its newest transition still awaiting a successor
        self._pos = 0
        self._size = 0
        self.max_priority = 1.0
        self.added = 0
        self.overwritten = 0
        self.sample_steps = 0

    # ------------------------------------------------------------ adding

    def add(self, transition: Transition) -> int:
        """Store `transition` (overwriting the oldest when full) at max priority; returns its slot."""
        with self._lock:
            return self._add(transition, self.max_priority)

    __call__ = add  # a Recorder sink

    def extend(self, transitions: Iterable[Transition]) -> None:
        with self._lock:
            for t in transitions:
                self._add(t, self.max_priority)

    def _add(self, t: Transition, priority: float) -> int:
        slot = self._pos
        old = self._items[slot]
        if old is not None:
            self._unlink(slot, old)
            self.overwritten += 1
        self._items[slot] = t
        self._stamp[slot] = self._fills
        self._fills += 1
        self._priority[slot] = priority
        self._tree.set(slot, priority**self.alpha)
        run = t.obs.run_id
        prev = self._tail.get(run)
        if prev is not None:
            before = self._items[prev]
            if before is not None and before.next_obs is t.obs:
                self._next[prev] = slot
                self._prev[slot] = prev
        if t.done or t.next_obs is None or t.next_obs is t.obs:
            self._tail.pop(run, None)  # episode over (or truncated onto itself): no successor coming
        else:
            self._tail[run] = slot
        self._pos = (slot + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)
        self.added += 1
        return slot

    def _unlink(self, slot: int, old: Transition) -> None:
        p, n = self._prev[slot], self._next[slot]
        if p >= 0:
            self._next[p] = -1
            self._prev[slot] = -1
        if n >= 0:
            self._prev[n] = -1
            self._next[slot] = -1
        if self._tail.get(old.obs.run_id) == slot:
            del self._tail[old.obs.run_id]

    # ------------------------------------------------------------ sampling

    @property
    def beta(self) -> float:
        """The importance-sampling exponent for the next `sample` call."""
        frac = min(self.sample_steps / self.beta_anneal_steps, 1.0)
        return self.beta_start + (self.beta_end - self.beta_start) * frac

    def sample(self, batch: int, rng: np.random.Generator | None = None) -> SampledBatch:
        """`batch` transitions, with replacement; unpacks as (transitions, indices, weights)."""
        with self._lock:
            indices, weights, beta = self._sample_indices(batch, rng)
            items = self._items
            transitions = [items[i] for i in indices.tolist()]
            stamps = self._stamp[indices]
        return SampledBatch(
            transitions=transitions,
            indices=indices,
            weights=weights,
            beta=beta,  # type: ignore[arg-type]
            stamps=stamps,
        )

    def sample_sequences(
        self, batch: int, length: int, rng: np.random.Generator | None = None
    ) -> SampledSequences:
        """`batch` unrolls of up to `length` consecutive steps of one run, starts drawn as in `sample`.

        A sequence stops early at an episode's end or where its successor is not (or no longer)
        stored; `slots` is -1 there. Update priorities with the start slots (`indices`)."""
        if length < 1:
            raise ValueError("sequence length must be >= 1")
        with self._lock:
            indices, weights, beta = self._sample_indices(batch, rng)
            slots = np.full((length, batch), -1, dtype=np.int64)
            slots[0] = indices
            nxt, items = self._next, self._items
            sequences = []
            for b, start in enumerate(indices.tolist()):
                seq = [items[start]]
                cur = start
                for t in range(1, length):
                    cur = nxt[cur]
                    if cur < 0:
                        break
                    slots[t, b] = cur
                    seq.append(items[cur])
                sequences.append(seq)
            stamps = self._stamp[indices]
            slot_stamps = np.where(slots >= 0, self._stamp[np.maximum(slots, 0)], -1)
        return SampledSequences(
            sequences=sequences,
            indices=indices,
            slots=slots,
            weights=weights,  # type: ignore[arg-type]
            beta=beta,
            stamps=stamps,
            slot_stamps=slot_stamps,
        )

    def _sample_indices(
        self, batch: int, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        size = self._size
        if size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        rng = rng if rng is not None else self._rng
        beta = self.beta
        self.sample_steps += 1
        if not self.prioritized:
            return rng.integers(0, size, batch, dtype=np.int64), np.ones(batch, dtype=np.float32), beta
        total = self._tree.total
        # Stratified: one draw per equal slice of the total, so a batch covers the whole range.
        targets = (np.arange(batch) + rng.random(batch)) * (total / batch)
        indices = self._tree.find(targets)
        # Float rounding can walk a descent into the empty leaves past the end: use the last stored one.
        np.minimum(indices, size - 1, out=indices)
        probs = self._tree.get(indices) / total
        weights = np.minimum((size * probs) ** (-beta), self.max_importance_weight)
        return indices, weights.astype(np.float32), beta

    def update_priorities(
        self, indices: np.ndarray, td_errors: np.ndarray | Sequence[float], stamps: np.ndarray | None = None
    ) -> int:
        """Set p_i = |td_i| + eps for the sampled slots (non-finite errors count as the max priority).

        With the sample's `stamps`, slots overwritten since the sample are skipped (their
        transition is gone); returns how many priorities were set."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        td = np.abs(_numpy(td_errors).astype(np.float64).reshape(-1))
        if idx.shape != td.shape:
            raise ValueError("one td error per index")
        with self._lock:
            if idx.size and (idx.min() < 0 or idx.max() >= self._size):
                raise IndexError("priority index out of range of the stored transitions")
            if stamps is not None:
                current = self._stamp[idx] == np.asarray(stamps, dtype=np.int64).reshape(-1)
                idx, td = idx[current], td[current]
            p = np.where(np.isfinite(td), td + self.eps, self.max_priority)
            self._priority[idx] = p
            self._tree.update(idx, p**self.alpha)
            if p.size:
                self.max_priority = max(self.max_priority, float(p.max()))
            return int(idx.size)

    # ------------------------------------------------------------ access

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, slot: int) -> Transition:
        if not 0 <= slot < self._size:
            raise IndexError(slot)
        item = self._items[slot]
        assert item is not None
        return item

    def successor(self, slot: int) -> int:
        """The slot of the stored transition that follows `slot` in its run, or -1."""
        return self._next[slot]

    def priorities(self) -> np.ndarray:
        """Raw priorities of the stored slots (a copy)."""
        return self._priority[: self._size].copy()

    def transitions(self) -> list[Transition]:
        """Every stored transition, oldest first."""
        with self._lock:
            return self._ordered()[0]

    def _ordered(self) -> tuple[list[Transition], np.ndarray]:
        if self._size < self.capacity:
            order = np.arange(self._size)
        else:
            order = (np.arange(self.capacity) + self._pos) % self.capacity
        items = self._items
        return [items[i] for i in order.tolist()], self._priority[order]  # type: ignore[misc]

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._items = [None] * self.capacity
        self._priority.fill(0.0)
        self._tree.clear()
        self._stamp.fill(-1)
        self._next = [-1] * self.capacity
        self._prev = [-1] * self.capacity
        self._tail.clear()
        self._pos = self._size = 0
        self.max_priority = 1.0

    def stats(self) -> ReplayStats:
        return ReplayStats(
            size=self._size,
            capacity=self.capacity,
            prioritized=self.prioritized,
            added=self.added,
            overwritten=self.overwritten,
            samples=self.sample_steps,
            beta=round(self.beta, 6),
            max_priority=self.max_priority,
            priority_total=self._tree.total,
        )

    # ------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the stored transitions (oldest first) and their priorities to `path` atomically."""
        with self._lock:
            items, priorities = self._ordered()
            state = {
                "capacity": self.capacity,
                "prioritized": self.prioritized,
                "alpha": self.alpha,
                "sample_steps": self.sample_steps,
                "max_priority": self.max_priority,
                "added": self.added,
                "overwritten": self.overwritten,
            }
        return save_experience(path, items, kind="replay", priorities=priorities, state=state)

    def load(self, path: str | os.PathLike[str]) -> int:
        """Replace the contents with a saved buffer's; returns how many transitions were kept.

        This buffer's settings apply (a smaller capacity keeps the newest transitions); the
        saved priorities, max priority and beta step carry over. A file without priorities
        (a rollout buffer's) loads at max priority."""
        loaded = load_experience(Path(path))
        transitions = loaded.transitions
        priorities = loaded.priorities
        state = loaded.state
        with self._lock:
            self._clear()
            self.added = 0
            max_p = _positive_float(state.get("max_priority"), 1.0)
            if priorities is None:
                priorities = np.full(len(transitions), max_p)
            keep = min(len(transitions), self.capacity)
            start = len(transitions) - keep
            for t, p in zip(transitions[start:], priorities[start:].tolist(), strict=True):
                self._add(t, max(p, self.eps))
            self.max_priority = max([max_p, *priorities[start:].tolist()])
            steps = state.get("sample_steps", 0)
            self.sample_steps = steps if isinstance(steps, int) and steps >= 0 else 0
            self.added = max(_count(state.get("added"), 0), self.added)
            self.overwritten = _count(state.get("overwritten"), 0)
            return keep


def _numpy(values: object) -> np.ndarray:
    """An array from numpy, a sequence, or a torch tensor (detached, on the CPU)."""
    detach = getattr(values, "detach", None)
    if detach is not None:
        return detach().cpu().numpy()
    return np.asarray(values)


def _count(value: object, default: int) -> int:
    return value if isinstance(value, int) and value >= 0 else default


def _positive_float(value: object, default: float) -> float:
    if isinstance(value, (int, float)) and np.isfinite(value) and value > 0:
        return float(value)
    return default
