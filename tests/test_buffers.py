"""Sum tree, rollout and replay buffers, and their pickle-free persistence."""

from __future__ import annotations

import itertools
import json
import pickle
import tracemalloc
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from esperd.analyzer.observation import ACTION_WIDTH, Observation
from esperd.learn import persist
from esperd.learn.buffers import BufferFileError, ReplayBuffer, RolloutBuffer
from esperd.learn.experience import Transition
from esperd.learn.sumtree import SumTree
from tests.support.observations import make_observation, random_stages

# Chi-square critical values at p = 0.001 (a fixed rng makes the tests deterministic anyway).
CHI2_CRIT = {3: 16.27, 4: 18.47, 7: 24.32, 9: 27.88}


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def step_obs(base: Observation, rng: np.random.Generator, epoch: int) -> Observation:
    """The next step of `base`'s run: fresh per-step arrays, the very same topology arrays."""
    n = base.num_nodes
    return msgspec.structs.replace(
        base,
        node_features=rng.random(base.node_features.shape, dtype=np.float32),
        global_features=rng.random(base.global_features.shape, dtype=np.float32),
        op_mask=base.op_mask.copy(),
        stages=rng.integers(0, 7, n).astype(np.int64),
        epoch=epoch,
        timestamp=1000.0 + epoch,
    )


def episodes(
    runs: int, steps: int, *, nodes: int = 8, seed: int = 0, done_last: bool = True, hidden: bool = False
) -> list[Transition]:
    """Interleaved runs, as the recorder closes them: next_obs is the next step's obs object."""
    rng = np.random.default_rng(seed)
    bases = [
        make_observation(
            f"run-{r}", nodes + r % 3, seed=seed + r, stages=random_stages(nodes + r % 3, seed + r)
        )
        for r in range(runs)
    ]
    chains = [[step_obs(b, rng, e) for e in range(steps + 1)] for b in bases]
    out = []
    for e in range(steps):
        for r in range(runs):
            last = e == steps - 1 and done_last
            out.append(
                Transition(
                    obs=chains[r][e],
                    action=rng.integers(0, 4, ACTION_WIDTH).astype(np.int64),
                    log_prob=float(-rng.random()),
                    value=float(rng.normal()),
                    policy_version=e // 2,
                    reward=float(rng.normal()),
                    done=last,
                    next_obs=None if last else chains[r][e + 1],
                    hidden=rng.random((2, 6), dtype=np.float32) if hidden else None,
                )
            )
    return out


def same_transition(a: Transition, b: Transition) -> None:
    for field in ("log_prob", "value", "reward", "done", "truncated", "policy_version"):
        assert getattr(a, field) == getattr(b, field), field
    assert np.array_equal(a.action, b.action) and b.action.dtype == np.int64
    assert (a.hidden is None) == (b.hidden is None)
    if a.hidden is not None:
        assert np.array_equal(a.hidden, b.hidden) and b.hidden.dtype == np.float32
    same_obs(a.obs, b.obs)
    assert (a.next_obs is None) == (b.next_obs is None)
    if a.next_obs is not None:
        same_obs(a.next_obs, b.next_obs)


def same_obs(a: Observation, b: Observation) -> None:
    assert (a.run_id, a.topology_version, a.epoch, a.timestamp) == (
        b.run_id,
        b.topology_version,
        b.epoch,
        b.timestamp,
    )
    for field in (
        "layer_ids",
        "node_features",
        "edge_index",
        "gcn_edge_index",
        "gcn_edge_weight",
        "global_features",
        "op_mask",
        "blueprint_mask",
        "stages",
    ):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and np.array_equal(x, y), field


# ---------------------------------------------------------------- sum tree


@pytest.mark.parametrize("capacity", [1, 5, 8, 1000])
def test_sum_tree_totals_and_finds_by_cumulative_range(capacity: int):
    tree = SumTree(capacity)
    p = np.arange(1, capacity + 1, dtype=np.float64)
    tree.update(np.arange(capacity), p)
    assert tree.total == pytest.approx(p.sum())
    cum = np.concatenate([[0.0], np.cumsum(p)])
    # Every leaf's range start, its middle, and just below its end land on that leaf.
    for probe in (cum[:-1], (cum[:-1] + cum[1:]) / 2, cum[1:] - 1e-9):
        assert tree.find(probe).tolist() == list(range(capacity))
    tree.set(capacity - 1, 0.0)
    assert tree.total == pytest.approx(p[:-1].sum())
    assert tree.get(capacity - 1)[()] == 0.0


def test_sum_tree_batch_update_with_duplicates_keeps_sums_exact():
    tree = SumTree(13)
    rng = np.random.default_rng(1)
    for _ in range(200):
        idx = rng.integers(0, 13, 9)
        tree.update(idx, rng.random(9))
    leaves = tree.leaves()
    assert tree.total == pytest.approx(leaves.sum(), rel=1e-12)
    with pytest.raises(IndexError):
        tree.update(np.array([13]), np.array([1.0]))
    with pytest.raises(ValueError):
        tree.update(np.array([0]), np.array([np.nan]))


def test_sum_tree_lazy_single_sets_and_batch_updates_interleave():
    tree = SumTree(37)
    rng = np.random.default_rng(2)
    truth = np.zeros(37)
    for _ in range(300):
        if rng.random() < 0.7:
            i, p = int(rng.integers(0, 37)), float(rng.random())
            tree.set(i, p)
            truth[i] = p
        else:
            idx, p = rng.integers(0, 37, 5), rng.random(5)
            tree.update(idx, p)
            truth[idx] = p  # numpy keeps the last duplicate, as the tree does
        if rng.random() < 0.3:
            assert tree.total == pytest.approx(truth.sum(), rel=1e-12)
            cum = np.cumsum(truth)
            probe = rng.random(50) * truth.sum()
            assert tree.find(probe).tolist() == np.searchsorted(cum, probe, side="right").tolist()
    for i in range(37):  # many pending sets at once take the full-rebuild path
        tree.set(i, 1.0)
    assert tree.total == pytest.approx(37.0)


def test_sum_tree_sampling_is_proportional():
    tree = SumTree(10)
    p = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=np.float64)
    tree.update(np.arange(10), p)
    rng = np.random.default_rng(7)
    leaves = tree.find(rng.random(50_000) * tree.total)
    counts = np.bincount(leaves, minlength=10)
    assert chi2(counts, p / p.sum()) < CHI2_CRIT[9]


# ---------------------------------------------------------------- replay sampling


def test_prioritized_sampling_follows_priorities_to_the_alpha():
    buf = ReplayBuffer(capacity=16, alpha=0.6, seed=0)
    buf.extend(episodes(1, 8, done_last=True))
    td = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.0, 3.0, 0.2])
    buf.update_priorities(np.arange(8), td)
    expected = (td + buf.eps) ** 0.6
    expected /= expected.sum()
    rng = np.random.default_rng(3)
    counts = np.zeros(8)
    for _ in range(400):
        _, idx, _ = buf.sample(64, rng)
        counts += np.bincount(idx, minlength=8)
    assert chi2(counts, expected) < CHI2_CRIT[7]
    assert np.allclose(buf.priorities(), td + buf.eps)


def test_uniform_mode_samples_uniformly_with_unit_weights():
    buf = ReplayBuffer(capacity=16, prioritized=False, seed=0)
    buf.extend(episodes(1, 10))
    buf.update_priorities(np.arange(5), np.full(5, 100.0))  # ignored by uniform sampling
    rng = np.random.default_rng(5)
    counts = np.zeros(10)
    for _ in range(300):
        transitions, idx, weights = buf.sample(50, rng)
        assert np.all(weights == 1.0) and weights.dtype == np.float32
        assert all(t is buf[i] for t, i in zip(transitions, idx.tolist(), strict=True))
        counts += np.bincount(idx, minlength=10)
    assert chi2(counts, np.full(10, 0.1)) < CHI2_CRIT[9]


def test_new_transitions_get_the_max_priority_seen():
    buf = ReplayBuffer(capacity=8)
    buf.extend(episodes(1, 4))
    assert np.all(buf.priorities() == 1.0)
    buf.update_priorities(np.array([0, 1]), np.array([5.0, 0.5]))
    assert buf.max_priority == pytest.approx(5.0 + buf.eps)
    buf.add(episodes(1, 1, seed=9)[0])
    assert buf.priorities()[4] == pytest.approx(5.0 + buf.eps)
    buf.update_priorities(np.array([2]), np.array([np.nan]))  # a non-finite error: max priority
    assert buf.priorities()[2] == pytest.approx(buf.max_priority)
    with pytest.raises(IndexError):
        buf.update_priorities(np.array([5]), np.array([1.0]))  # slot 5 holds nothing yet
    with pytest.raises(ValueError):
        buf.update_priorities(np.array([0, 1]), np.array([1.0]))


def test_late_priority_updates_skip_overwritten_slots():
    buf = ReplayBuffer(capacity=4, seed=0)
    buf.extend(episodes(1, 4))
    batch = buf.sample(4, np.random.default_rng(0))
    buf.add(episodes(1, 1, seed=8)[0])  # overwrites slot 0 while the learner trains
    td = torch.full((4,), 3.0, requires_grad=True) * 1.0  # a torch tensor straight from a loss
    done = buf.update_priorities(batch.indices, td, stamps=batch.stamps)
    assert done == int((batch.indices != 0).sum())
    assert buf.priorities()[0] == pytest.approx(1.0)  # the new transition keeps max priority at add
    assert np.all(
        buf.priorities()[np.unique(batch.indices[batch.indices != 0])] == pytest.approx(3.0 + buf.eps)
    )


def test_fill_stamps_are_never_reused_not_even_after_load_or_clear(tmp_path: Path):
    """(slot, stamp) names one transition for the buffer's life: the learner's child process
    holds transitions by it, so a slot refilled after a load must not look like its old occupant."""
    buf = ReplayBuffer(capacity=4, seed=0)
    buf.extend(episodes(1, 4))
    seen = set(buf.sample(64, np.random.default_rng(0)).stamps.tolist())
    buf.save(tmp_path / "replay.safetensors")
    buf.load(tmp_path / "replay.safetensors")
    after_load = set(buf.sample(64, np.random.default_rng(1)).stamps.tolist())
    buf.clear()
    buf.extend(episodes(1, 4, seed=5))
    after_clear = set(buf.sample(64, np.random.default_rng(2)).stamps.tolist())
    assert len(seen) == len(after_load) == len(after_clear) == 4
    assert not seen & after_load and not after_load & after_clear and not seen & after_clear
    assert buf.stats().added == 4 + 4  # the user-facing count still restarts from the saved one


def test_beta_anneals_linearly_then_holds():
    buf = ReplayBuffer(capacity=8, beta_start=0.4, beta_end=1.0, beta_anneal_steps=10, seed=0)
    buf.extend(episodes(1, 4))
    betas = [buf.sample(2).beta for _ in range(14)]
    assert betas[0] == pytest.approx(0.4)
    assert betas[5] == pytest.approx(0.7)
    assert betas[10:] == pytest.approx([1.0] * 4)
    assert np.all(np.diff(betas) >= 0)
    assert buf.beta == pytest.approx(1.0) and buf.stats().samples == 14


def test_importance_weights_are_capped_at_max_importance_weight_not_normalized():
    """002: weights (N * P(i))^-beta, capped at max_importance_weight (10), not divided by the
    batch's largest."""
    buf = ReplayBuffer(capacity=8, alpha=1.0, beta_start=0.5, beta_anneal_steps=1_000_000, seed=0)
    assert buf.max_importance_weight == 10.0
    buf.extend(episodes(1, 4))
    buf.update_priorities(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]) - buf.eps)
    batch = buf.sample(256, np.random.default_rng(0))
    probs = np.array([1.0, 2.0, 3.0, 4.0])[batch.indices] / 10.0
    raw = (4 * probs) ** -0.5  # 1.58, 1.12, 0.91, 0.79: none reaches the cap
    assert np.allclose(batch.weights, raw, rtol=1e-6)
    assert batch.weights.max() == pytest.approx(np.sqrt(10 / 4), rel=1e-6) and batch.weights.min() < 1.0
    # Rarely drawn (low priority) transitions weigh most.
    assert batch.weights[batch.indices == 0].min() > batch.weights[batch.indices == 3].max()
    # A transition drawn 1,000 times less often than uniform weighs the cap, no more.
    rare = ReplayBuffer(capacity=8, alpha=1.0, beta_start=1.0, seed=0, max_importance_weight=10.0)
    rare.extend(episodes(1, 2))
    rare.update_priorities(np.arange(2), np.array([1.0, 1999.0]) - rare.eps)
    drawn = rare.sample(4000, np.random.default_rng(1))
    assert np.any(drawn.indices == 0)
    assert drawn.weights[drawn.indices == 0] == pytest.approx(10.0)  # (2 * 1/2000)^-1 = 1000, capped
    assert drawn.weights[drawn.indices == 1] == pytest.approx(2000 / 1999 / 2, rel=1e-5)
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=8, max_importance_weight=0.0)


def test_sampling_an_empty_buffer_is_an_error():
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=4).sample(1)


# ---------------------------------------------------------------- ring and links


def test_capacity_wraps_around_keeping_the_newest():
    data = episodes(1, 12, done_last=False)
    buf = ReplayBuffer(capacity=5)
    for t in data:
        buf.add(t)
    assert len(buf) == 5 and buf.stats().overwritten == 7 and buf.stats().added == 12
    assert [t is d for t, d in zip(buf.transitions(), data[-5:], strict=True)] == [True] * 5
    _, idx, _ = buf.sample(100, np.random.default_rng(0))
    assert idx.min() >= 0 and idx.max() < 5
    # Successor links survive the wrap and point at the same run's next step.
    for slot in range(5):
        nxt = buf.successor(slot)
        if nxt >= 0:
            assert buf[slot].next_obs is buf[nxt].obs
    assert sum(buf.successor(s) >= 0 for s in range(5)) == 4  # the newest awaits its successor


def test_sequences_follow_each_run_and_stop_at_episode_end_or_overwrite():
    data = episodes(3, 4, done_last=True)  # runs interleaved: r0 r1 r2 r0 r1 r2 ...
    buf = ReplayBuffer(capacity=12, prioritized=False)
    buf.extend(data)
    seqs = buf.sample_sequences(64, 6, np.random.default_rng(0))
    assert seqs.slots.shape == (6, 64)
    for seq, start in zip(seqs.sequences, seqs.indices.tolist(), strict=True):
        assert seq[0] is buf[start]
        assert all(t.run_id == seq[0].run_id for t in seq)
        assert all(a.next_obs is b.obs for a, b in itertools.pairwise(seq))  # consecutive steps
        assert len(seq) == 4 - start // 3  # to the episode's end, then stop
        assert seq[-1].done
    # Overwriting the oldest steps breaks the links into them.
    buf.extend(episodes(1, 2, seed=5, done_last=False))  # slots 0 and 1 now hold a new run
    assert buf.successor(0) == 1 and buf[0].run_id == buf[1].run_id
    assert buf.stats().overwritten == 2
    for slot in range(len(buf)):
        nxt = buf.successor(slot)
        assert nxt == -1 or buf[slot].next_obs is buf[nxt].obs


# ---------------------------------------------------------------- rollout


def test_rollout_keeps_only_the_current_policy_version():
    data = episodes(2, 6)  # versions 0, 0, 1, 1, 2, 2 per run
    buf = RolloutBuffer(capacity=100, min_version=1)
    kept = buf.extend(data)
    assert kept == 8 and buf.stats().dropped_stale == 4
    assert not buf.ready(9) and buf.ready(8)
    assert buf.set_min_version(2) == 4
    out = buf.drain()
    assert [t.policy_version for t in out] == [2] * 4
    assert out == [t for t in data if t.policy_version == 2]  # arrival order
    assert len(buf) == 0 and buf.drain() == []
    s = buf.stats()
    assert (s.added, s.dropped_stale, s.drained, s.min_version) == (8, 8, 4, 2)


def test_rollout_overflow_drops_the_oldest():
    data = episodes(1, 7)
    buf = RolloutBuffer(capacity=3)
    buf.extend(data)
    assert buf.peek() == data[-3:] and buf.stats().dropped_overflow == 4


# ---------------------------------------------------------------- persistence


def test_replay_round_trip_preserves_everything(tmp_path: Path):
    data = episodes(4, 6, hidden=True)
    # A truncated step (next_obs is its own obs) and an episode still open at save time.
    data.append(msgspec.structs.replace(data[-1], done=False, truncated=True, next_obs=data[-1].obs))
    buf = ReplayBuffer(capacity=64, seed=0)
    buf.extend(data)
    buf.update_priorities(np.arange(10), np.linspace(0.1, 3.0, 10))
    for _ in range(7):
        buf.sample(4)
    path = tmp_path / "replay.safetensors"
    size = buf.save(path)
    assert size == path.stat().st_size
    assert not list(tmp_path.glob(".*.tmp"))

    back = ReplayBuffer(capacity=64)
    assert back.load(path) == len(data)
    loaded = back.transitions()
    for a, b in zip(data, loaded, strict=True):
        same_transition(a, b)
    assert np.array_equal(back.priorities(), buf.priorities())
    assert back.max_priority == buf.max_priority and back.sample_steps == 7 and back.beta == buf.beta
    # next_obs is again the very object the run's next transition holds as obs.
    for i, t in enumerate(loaded[:-1]):
        if not t.done and t.next_obs is not t.obs:
            following = next(u for u in loaded[i + 1 :] if u.run_id == t.run_id)
            assert t.next_obs is following.obs
    assert loaded[-1].truncated and loaded[-1].next_obs is loaded[-1].obs
    # Topology arrays are shared per run and version, read-only, as the analyzer's are.
    by_run: dict[str, list[Observation]] = {}
    for t in loaded:
        by_run.setdefault(t.run_id, []).append(t.obs)
    for observations in by_run.values():
        first = observations[0]
        for o in observations[1:]:
            for field in ("layer_ids", "edge_index", "gcn_edge_index", "gcn_edge_weight", "blueprint_mask"):
                assert getattr(o, field) is getattr(first, field), field
        assert not first.layer_ids.flags.writeable and not first.gcn_edge_weight.flags.writeable
    assert by_run["run-0"][0].layer_ids is not by_run["run-1"][0].layer_ids
    # Links were rebuilt, so sequences work after a restart too.
    for slot in range(len(back)):
        assert back.successor(slot) == buf.successor(slot)


def test_topology_versions_are_stored_once_each(tmp_path: Path):
    rng = np.random.default_rng(0)
    v1 = make_observation("r", 6)
    v2 = msgspec.structs.replace(make_observation("r", 7), topology_version=2)
    # A hand-built observation with equal but separate topology arrays shares the stored entry.
    v1_copy = make_observation("r", 6)
    steps = [step_obs(v1, rng, 0), step_obs(v1_copy, rng, 1), step_obs(v2, rng, 2), step_obs(v2, rng, 3)]
    data = [
        Transition(
            obs=o,
            action=np.zeros(ACTION_WIDTH, np.int64),
            log_prob=0.0,
            value=0.0,
            policy_version=0,
            next_obs=n,
        )
        for o, n in zip(steps, steps[1:] + [None], strict=True)
    ]
    path = tmp_path / "b.safetensors"
    buf = RolloutBuffer(10)
    buf.extend(data)
    buf.save(path)
    with safe_open(str(path), framework="np") as fh:
        assert fh.get_tensor("topo.meta").tolist() == [[0, 1], [0, 2]]
        assert fh.get_tensor("step.topology").tolist() == [0, 0, 1, 1]
    back = RolloutBuffer(10)
    back.load(path)
    out = back.peek()
    assert out[0].obs.layer_ids is out[1].obs.layer_ids
    assert out[2].obs.layer_ids is out[3].obs.layer_ids is not out[0].obs.layer_ids
    assert [t.obs.topology_version for t in out] == [1, 1, 2, 2]
    assert out[2].next_obs is out[3].obs and out[3].next_obs is None


def test_rollout_round_trip_and_cross_loading_into_replay(tmp_path: Path):
    data = episodes(2, 3)
    roll = RolloutBuffer(16)
    roll.extend(data)
    path = tmp_path / "roll.safetensors"
    roll.save(path)
    back = RolloutBuffer(16, min_version=1)  # this buffer's filter applies to what it loads
    assert back.load(path) == 2 and back.stats().dropped_stale == 4
    replay = ReplayBuffer(capacity=4)  # smaller: keeps the newest; no priorities in file: max
    assert replay.load(path) == 4
    for a, b in zip(data[-4:], replay.transitions(), strict=True):
        same_transition(a, b)
    assert np.all(replay.priorities() == 1.0)


def test_empty_buffers_round_trip(tmp_path: Path):
    for buf in (ReplayBuffer(8), RolloutBuffer(8)):
        path = tmp_path / f"{type(buf).__name__}.safetensors"
        buf.save(path)
        assert type(buf)(8).load(path) == 0


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_file(tmp_path: Path):
    path = tmp_path / "b.safetensors"
    buf = ReplayBuffer(8)
    buf.extend(episodes(1, 2))
    buf.save(path)
    before = path.read_bytes()
    bad = episodes(1, 1, seed=3)[0]
    bad.hidden = np.zeros((2, 3, 4), np.float32)  # not [2, H]: refused before anything is written
    buf.add(bad)
    with pytest.raises(ValueError):
        buf.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]


def test_loading_uses_no_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "b.safetensors"
    buf = ReplayBuffer(8)
    buf.extend(episodes(2, 2, hidden=True))
    buf.save(path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert ReplayBuffer(8).load(path) == 4
    assert b"pickle" not in path.read_bytes()


# ---------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    buf = ReplayBuffer(16)
    buf.extend(episodes(2, 3, hidden=True))
    buf.save(path)
    return path


def expect_bad(path: Path, match: str) -> None:
    buf = ReplayBuffer(16)
    buf.extend(episodes(1, 2, seed=4))
    with pytest.raises(BufferFileError, match=match):
        buf.load(path)
    assert len(buf) == 2  # a failed load leaves the buffer as it was


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_file_is_refused(saved: Path, keep: int):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    expect_bad(saved, "not a readable safetensors file")


def test_corrupt_data_is_refused_by_checksum(saved: Path):
    data = bytearray(saved.read_bytes())
    data[-40] ^= 0x01  # one bit in the last array's data
    saved.write_bytes(bytes(data))
    expect_bad(saved, "checksum")


def test_garbage_and_foreign_files_are_refused(tmp_path: Path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x80\x04\x95" + bytes(200))  # a pickle's opening bytes
    expect_bad(junk, "not a readable safetensors file")
    weights = tmp_path / "model.safetensors"
    save_file({"w": np.ones((3, 3), np.float32)}, str(weights))
    expect_bad(weights, "not an esperd experience file")
    other = tmp_path / "other.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(other), metadata={"esperd": json.dumps({"format": "x"})})
    expect_bad(other, "not an esperd experience file")


def rewrite(path: Path, edit: object) -> None:
    """Rewrite a saved file with `edit(arrays, meta)` applied and a fresh (valid) checksum."""
    with safe_open(str(path), framework="np") as fh:
        meta = json.loads(fh.metadata()["esperd"])
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    edit(arrays, meta)  # type: ignore[operator]
    meta["crc32"] = persist._checksum(arrays)
    save_file(arrays, str(path), metadata={"esperd": json.dumps(meta)})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a, m: m.update(format_version=99), "format version"),
        (lambda a, m: a["tr.obs"].__setitem__(0, 10_000), "tr.obs index out of range"),
        (lambda a, m: a["tr.next"].__setitem__(0, -7), "tr.next index out of range"),
        (lambda a, m: a["topo.edge_index"].__setitem__((1, 0), 500), "edge index out of range"),
        (lambda a, m: a["step.node_offsets"].__setitem__(1, a["step.node_offsets"][1] + 1), "node count"),
        (lambda a, m: a.pop("tr.reward"), "missing array"),
        (lambda a, m: a.__setitem__("tr.reward", a["tr.reward"].astype(np.float32)), "dtype"),
        (lambda a, m: m["counts"].update(transitions=1), "expected"),
        (lambda a, m: m.update(runs=[1, 2]), "run ids"),
        (lambda a, m: m["widths"].update(ops=99), "layout"),
        (lambda a, m: a["tr.priority"].__setitem__(0, -1.0), "priorities"),
        (lambda a, m: a["tr.hidden_shape"].__setitem__((0, 1), 999), "tr.hidden"),
    ],
)
def test_consistent_checksum_but_bad_structure_is_refused(saved: Path, edit: object, match: str):
    rewrite(saved, edit)
    expect_bad(saved, match)


def test_missing_file_is_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        ReplayBuffer(4).load(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- memory


def test_twenty_node_transitions_are_compact():
    """100k transitions of 20-node graphs must fit comfortably: measure a few thousand."""
    count = 4000
    rng = np.random.default_rng(0)
    bases = [make_observation(f"run-{r}", 20, seed=r) for r in range(20)]
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        buf = ReplayBuffer(capacity=count)
        chains = {}
        for i in range(count):
            r = i % 20
            nxt = step_obs(bases[r], rng, i)
            obs = chains[r] if r in chains else step_obs(bases[r], rng, i - 1)
            buf.add(
                Transition(
                    obs=obs,
                    action=np.zeros(ACTION_WIDTH, np.int64),
                    log_prob=-float(i),
                    value=float(i),
                    policy_version=1,
                    reward=0.5 * i,
                    next_obs=nxt,
                )
            )
            chains[r] = nxt
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_transition = (used - start) / count
    per_step_data = sum(
        getattr(bases[0], f).nbytes for f in ("node_features", "op_mask", "stages", "global_features")
    )
    topology = sum(
        getattr(bases[0], f).nbytes
        for f in ("layer_ids", "edge_index", "gcn_edge_index", "gcn_edge_weight", "blueprint_mask")
    )
    print(f"{per_transition:.0f} B/transition (per-step arrays {per_step_data} B, topology {topology} B)")
    # Per-step data plus ~1.5 KB of objects; no topology copy, no second obs copy per transition.
    assert per_transition < per_step_data + 1600
    # Within benchmarks/bench_buffers.py's budget (100k transitions of 20-node graphs in 1 GiB) with
    # a quarter to spare. (600 MB before issue 16 widened the node features from 38 to 58.)
    assert per_transition * 100_000 < 0.75 * 2**30
