"""Fit the GNN to the heuristic's decisions on real host runs: behaviour cloning on real observations.

    .venv/bin/python benchmarks/real_imitation.py --traces benchmarks/traces/imitation \
        [--out benchmarks/results/gnn_real_bc.safetensors] [--steps 1500] [--threads 1]

The simulator-trained GNN sees observations the simulator makes; on the real hosts of
`benchmarks/real_hosts.py` it barely acts (benchmarks/results/real_hosts.md). This fits it to
the observations real hosts make instead. --traces holds traces of real runs steered by the
heuristic (committed: `benchmarks/real_hosts.py --controllers heuristic --seeds 100-131 --traces
DIR`, tuning seeds, never the report's). Each run's messages are replayed in order through
esperd's analyzer; at each state packet (where the daemon decides) a fresh heuristic, which has
seen the same packets, decides again. That reproduces the run's own decisions (the heuristic is
deterministic given what it has seen) on exactly the observations the daemon had. The GNN is
fitted to them with `esperd.learn.imitation.fit_imitation`; every tenth run is held out to report
agreement.

Rewards, for the value head only: the change in validation accuracy from one state packet to the
next; the run's last packet ends the episode.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esperd.analyzer.analyzer import Analyzer  # noqa: E402
from esperd.analyzer.observation import OP_INDEX, Observation  # noqa: E402
from esperd.learn.config import ImitationConfig  # noqa: E402
from esperd.learn.experience import Transition  # noqa: E402
from esperd.learn.imitation import fit_imitation  # noqa: E402
from esperd.ops.traces import read_trace, run_of, trace_files  # noqa: E402
from esperd.policy.base import OP  # noqa: E402
from esperd.policy.checkpoint import save_policy_checkpoint  # noqa: E402
from esperd.policy.config import PolicyConfig  # noqa: E402
from esperd.policy.heuristic import HeuristicPolicy  # noqa: E402
from esperd.policy.registry import create_policy  # noqa: E402
from esperd.train.warmstart import split_runs  # noqa: E402
from esperd_contracts import Codec, Op, SystemStatePacket  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ANALYZED = ("topology", "health", "state")
WAIT = OP_INDEX[Op.WAIT]
Step = tuple[Observation, np.ndarray, float]  # what the daemon saw, the decision, val accuracy then


def replay_run(path: Path, codec: Codec) -> list[Transition]:
    """One recorded run replayed: the heuristic's decision at each point the daemon decided, with its
    observation. The daemon decides after each state packet, and again after an ack (a command
    applied changes what is legal); where the recording shows a command, the replay decides on what
    had arrived by then."""
    run = run_of(path)
    analyzer = Analyzer(clock=lambda: 0.0)
    heuristic = HeuristicPolicy(PolicyConfig(name="heuristic"))
    steps: list[Step] = []
    matched = True  # whether the last step already stands for a recorded command
    commands: dict[str, dict] = {}

    def decide(t: float) -> tuple[Observation, np.ndarray]:
        obs = analyzer.observe(run, now=t)
        return obs, heuristic.act([obs], deterministic=True).actions[0].numpy().copy()

    for record in read_trace(path):
        if record.msg is None:
            continue
        if record.channel == "command":
            commands[record.msg.get("command_id", "")] = record.msg
            if steps:
                _match_command(steps, matched, lambda t=record.t: decide(t))
                matched = True
        elif record.channel == "ack":
            command = commands.get(record.msg.get("command_id", ""))
            if command is not None:
                applied = record.msg.get("status") == "applied"
                analyzer.note_ack(run, command["layer_id"], Op(command["op"]), applied, timestamp=record.t)
        elif record.channel in ANALYZED:
            message = codec.decode(msgspec.json.encode(record.msg))
            analyzer.ingest(run, message, now=record.t)  # type: ignore[arg-type]
            if isinstance(message, SystemStatePacket) and not message.done:
                obs, action = decide(record.t)
                steps.append((obs, action, message.val_accuracy))
                matched = False
    return _transitions(steps)


def _transitions(steps: list[Step]) -> list[Transition]:
    """Steps as Transitions: reward the next step's change in validation accuracy; the last ends it."""
    transitions = []
    for i, (obs, action, accuracy) in enumerate(steps):
        last = i == len(steps) - 1
        reward = 0.0 if last else float(steps[i + 1][2] - accuracy)
        transitions.append(
            Transition(
                obs=obs,
                action=action,
                log_prob=0.0,
                value=0.0,
                policy_version=0,
                reward=reward,
                done=last,
                next_obs=None if last else steps[i + 1][0],
            )
        )
    return transitions


def _match_command(
    steps: list[Step], matched: bool, decide: Callable[[], tuple[Observation, np.ndarray]]
) -> None:
    """A recorded command. The step after the latest packet, if the replay made it a WAIT, was decided
    later, on what had arrived by the command: decide it again. Once that step stands for a command,
    a further command is a further decision (after an ack). Decides only then: a decision commits to
    the heuristic's memory."""
    if not matched:
        if steps[-1][1][OP] == WAIT:
            obs, action = decide()
            steps[-1] = (obs, action, steps[-1][2])
    else:
        obs, action = decide()
        steps.append((obs, action, steps[-1][2]))


def policy_config(path: Path) -> PolicyConfig:
    """The GNN's [policy] table from a training config (hidden size, layers)."""
    table = tomllib.loads(path.read_text()).get("policy", {})
    return msgspec.convert({**table, "name": "gnn"}, PolicyConfig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=Path, required=True, help="traces of heuristic-steered real runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gnn_real_bc.safetensors")
    parser.add_argument("--config", type=Path, default=ROOT / "benchmarks/results/gnn_calibrated_train.toml")
    parser.add_argument("--steps", type=int, default=1500, help="imitation optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more only on an idle machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    codec = Codec()
    files = [p for p in trace_files(args.traces) if "-heuristic-" in p.name]
    if not files:
        raise SystemExit(f"no heuristic traces under {args.traces}")
    transitions = [t for path in files for t in replay_run(path, codec)]
    acting = sum(1 for t in transitions if t.action[OP] != WAIT)
    print(f"{len(files)} runs, {len(transitions)} decisions, {acting} not WAIT", flush=True)
    train, held = split_runs(transitions)
    policy = create_policy("gnn", policy_config(args.config))
    config = ImitationConfig(steps=args.steps, seed=args.seed)
    stats = fit_imitation(policy, train, config, holdout=held)
    print(msgspec.json.encode(stats).decode(), flush=True)
    save_policy_checkpoint(args.out, policy)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
