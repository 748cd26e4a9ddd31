"""benchmarks/real_imitation.py: replaying a recorded real run reproduces the daemon's decisions.

The traces were recorded with the heuristic as it is: a change to its rules fails this test, and the
imitation traces must be recorded again (benchmarks/real_imitation.py says how)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.real_imitation import WAIT, replay_run
from esperd.analyzer.observation import GLOBAL_FEATURES, NODE_FEATURES
from esperd.ops.traces import read_trace, trace_files
from esperd.policy.base import OP
from esperd_contracts import Codec

TRACES = Path(__file__).resolve().parent.parent / "benchmarks" / "traces" / "imitation"


@pytest.mark.parametrize("task", ["digits", "sort", "teacher"])
def test_a_replayed_run_decides_what_the_daemon_sent(task: str) -> None:
    for path in list(trace_files(TRACES / task))[:4]:
        transitions = replay_run(path, Codec())
        recorded = [r.msg for r in read_trace(path) if r.channel == "command" and r.msg is not None]
        acted = [t for t in transitions if t.action[OP] != WAIT]
        # One decision per state packet (and one more per command after an ack), as the daemon
        # made them: the heuristic re-deciding on the replayed observations sends what was sent.
        assert len(acted) == len(recorded), path.name
        assert [int(t.obs.layer_ids[t.action[0]]) for t in acted] == [c["layer_id"] for c in recorded]
        states = sum(1 for r in read_trace(path) if r.channel == "state" and r.msg and not r.msg.get("done"))
        assert len(transitions) >= states
        assert transitions[-1].done and all(not t.done for t in transitions[:-1])
        obs = transitions[0].obs
        assert obs.node_features.shape[1] == len(NODE_FEATURES)
        assert obs.global_features.shape == (len(GLOBAL_FEATURES),)
