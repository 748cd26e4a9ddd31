"""The vectorized simulator path computes what the per-run path computed.

Two pins: (1) an Analyzer fed the simulator's packets run by run (`ingest_state`, `observe`) and
one fed them all at once (`ingest_states`, `observe_many`, as SimEnv does) agree on every
observation and material-change flag, over episodes with every lifecycle stage and resets;
(2) a SimEnv trajectory (fixed seeds, a seeded random policy) matches per-step fingerprints
written by the simulator before its steps were vectorized (tests/support/sim_fingerprint.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from esperd.analyzer import Analyzer, AnalyzerConfig, Observation
from esperd.analyzer.observation import NODE_FEATURE_INDEX
from esperd.learn.config import RewardConfig
from esperd.sim import Command, HostBatch, RandomPolicy, SimConfig, SimEnv
from esperd.sim.packets import health_batch, state_packet, telemetry, topology_packet
from esperd_contracts import Blueprint, Op

FINGERPRINT = Path(__file__).parent / "support" / "sim_fingerprint.json"
CONFIG = SimConfig(epochs=14, val_samples=2000, reward=RewardConfig(mode="shaped"))


def assert_same(a: Observation, b: Observation) -> None:
    for name in Observation.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            if name == "global_features":  # the overall health is summed in another order
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=name)
            else:
                np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x == y, name


def act_at_random(hosts: HostBatch, rng: np.random.Generator) -> None:
    """Germinate, advance, fossilize, prune at random: every stage is visited."""
    for e in range(hosts.num_envs):
        layer = int(rng.integers(hosts.n_layers[e]))
        op = [Op.GERMINATE, Op.ADVANCE, Op.FOSSILIZE, Op.PRUNE, Op.WAIT][int(rng.integers(5))]
        blueprint = Blueprint.DEPTHWISE if rng.random() < 0.5 else Blueprint.LORA
        hosts.apply(e, Command(layer_id=layer, op=op, blueprint=blueprint))


def test_batched_analyzer_calls_match_per_run_calls() -> None:
    n = 6
    hosts = HostBatch(n, CONFIG, np.random.default_rng(3))
    rng = np.random.default_rng(4)
    config = AnalyzerConfig(max_runs=64)
    clock = [0.0]
    one, many = (Analyzer(config, clock=lambda: clock[0]) for _ in range(2))
    ids = [""] * n

    def begin(envs: list[int]) -> None:
        tel = telemetry(hosts)
        for e in envs:
            ids[e] = f"r{e}-{int(hosts.episode[e])}"
            for analyzer in (one, many):
                analyzer.ingest_topology(ids[e], topology_packet(hosts, e, clock[0]))
                analyzer.ingest_health(ids[e], health_batch(hosts, tel, e, clock[0]))
                analyzer.ingest_state(ids[e], state_packet(hosts, tel, e, clock[0], done=False))

    hosts.reset(np.arange(n))
    begin(list(range(n)))
    stages_seen: set[int] = set()
    probation_z = 0
    for _ in range(3 * CONFIG.epochs):
        act_at_random(hosts, rng)
        hosts.advance()
        clock[0] += 1.0
        tel, dones = telemetry(hosts), hosts.done()
        packets = [state_packet(hosts, tel, e, clock[0], bool(dones[e])) for e in range(n)]
        for analyzer in (one, many):
            for e in range(n):
                analyzer.queue_health(ids[e], health_batch(hosts, tel, e, clock[0]))
        expected = [one.ingest_state(run_id, packet) for run_id, packet in zip(ids, packets, strict=True)]
        assert many.ingest_states(ids, packets) == expected
        for a, b in zip([one.observe(r) for r in ids], many.observe_many(ids), strict=True):
            assert_same(a, b)
            stages_seen.update(a.stages.tolist())
            probation_z += int(np.count_nonzero(a.node_features[:, NODE_FEATURE_INDEX["counterfactual_z"]]))
        assert one.flush() == many.flush()
        finished = np.flatnonzero(dones).tolist()
        for e in finished:
            one.remove_run(ids[e])
            many.remove_run(ids[e])
        if finished:
            hosts.reset(finished)
            begin(finished)
    assert len(stages_seen) >= 6  # the comparison covered the lifecycle, not only dormant slots
    assert probation_z > 0  # and probation counterfactuals


def fingerprint(steps: int) -> list[list[float]]:
    env = SimEnv(6, CONFIG, seed=11)
    policy = RandomPolicy(seed=12)
    obs = env.reset()
    rows = []
    for _ in range(steps):
        obs, rewards, dones, infos = env.step(policy.act(obs))
        rows.append(
            [
                float(sum(float(o.node_features.astype(np.float64).sum()) for o in obs)),
                float(sum(float(o.global_features.astype(np.float64).sum()) for o in obs)),
                int(sum(int(o.op_mask.sum()) for o in obs)),
                float(rewards.sum()),
                int(dones.sum()),
                int(sum(i.applied for i in infos)),
            ]
        )
    return rows


def test_sim_trajectory_matches_the_per_run_simulator() -> None:
    expected = json.loads(FINGERPRINT.read_text())
    got = fingerprint(len(expected))
    assert sum(row[4] for row in got) > 0  # episodes ended and restarted on the way
    for step, (want, row) in enumerate(zip(expected, got, strict=True)):
        assert row[2:3] + row[4:] == want[2:3] + want[4:], step
        assert row[:2] + row[3:4] == pytest.approx(want[:2] + want[3:4], rel=1e-9, abs=1e-9), step
