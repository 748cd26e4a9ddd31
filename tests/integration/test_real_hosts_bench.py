"""benchmarks/real_hosts.py end to end on a tiny slice: real hosts and esperd services, a real nats-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import real_hosts
from esperd.ops.traces import read_trace
from esperd_examples.host.tasks import benchmark_task

CONTROLLERS = ",".join(
    ["static-small", "static-reshuffled", "heuristic", "matched-heuristic", "fixed", "random"]
    + ["gnn-sim", "gnn-real", "gnn-online"]
)


def _records(out: Path) -> dict[str, dict]:
    lines = (out / "real_hosts.runs.jsonl").read_text().splitlines()
    return {r["controller"]: r for r in map(json.loads, lines)}


@pytest.mark.timeout(400)  # ~40 s on a quiet machine: 6 runs, 3 esperd services, 2 worker processes
def test_a_tiny_slice_runs_every_kind_of_controller_and_resumes(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = [
        "--tasks", "digits", "--seeds", "0", "--epochs", "3", "--controllers", CONTROLLERS,
        "--out", str(tmp_path), "--traces", str(tmp_path / "traces"), "--no-plot",
        "--gnn-online-checkpoint", str(tmp_path / "absent.safetensors"),
    ]  # fmt: skip
    assert real_hosts.main(argv) == 0
    records = _records(tmp_path)
    assert set(records) == set(CONTROLLERS.split(",")) - {"gnn-online"}  # absent checkpoint: not run
    assert all(r["epochs"] == 3 and 0.0 < r["val_accuracy"] <= 1.0 for r in records.values())

    spec = benchmark_task("digits")
    fixed = records["fixed"]  # one germination per slotted layer before epoch 2, all applied
    assert fixed["applied_by_op"] == {"germinate": len(spec.fixed_schedule())} and fixed["rejected"] == 0
    assert fixed["added_params"] > 0
    reshuffled, small = records["static-reshuffled"], records["static-small"]  # A/A: another batch order only
    assert reshuffled["total_params"] == small["total_params"] and reshuffled["commands"] == 0
    assert reshuffled["curve"] != small["curve"]
    matched = records["matched-heuristic"]  # sized by the heuristic's run of the same seed
    assert matched["width"] == spec.width_for_params(records["heuristic"]["total_params"])

    # Every run left a gzipped trace; the fixed schedule's commands went over NATS like esperd's.
    for controller, record in records.items():
        path = tmp_path / "traces" / "digits" / controller / f"{record['run']}.jsonl.gz"
        channels = {r.channel for r in read_trace(path)}
        assert {"topology", "health", "state"} <= channels, (controller, channels)
    fixed_trace = read_trace(tmp_path / "traces" / "digits" / "fixed" / "digits-fixed-s0.jsonl.gz")
    assert sum(r.channel == "command" for r in fixed_trace) == len(spec.fixed_schedule())
    assert sum(r.channel == "ack" for r in fixed_trace) == len(spec.fixed_schedule())

    report = (tmp_path / "real_hosts.md").read_text()
    assert "The A/A control" in report and "| static small, reshuffled (A/A) |" in report
    levers = report.split("### Levers sent")[1]  # the levers each GERMINATE carried, from the traces
    n = len(spec.fixed_schedule())
    assert f"| fixed schedule | {n} | sigmoid ({n}) | standard ({n}) | default ({n}) |" in levers
    assert "gnn-online: NOT RUN" in report and "| heuristic |" in report and "Δ vs static small" in report
    summary = json.loads((tmp_path / "real_hosts.json").read_text())["summary"]["digits"]
    assert [s["controller"] for s in summary][0] == "static-small"

    # A second invocation with the same settings finds every run stored and runs none.
    capsys.readouterr()
    before = (tmp_path / "real_hosts.runs.jsonl").read_bytes()
    assert real_hosts.main(argv) == 0
    assert "0 to run" in capsys.readouterr().out
    assert (tmp_path / "real_hosts.runs.jsonl").read_bytes() == before
    assert not list((tmp_path / "traces").rglob("*.jsonl"))  # every trace was compressed

    # Runs remember the code they ran. One recorded with other code is kept and reported by
    # default, and rerun (with the run matched to it) under --rerun-stale-code.
    assert "Every run was recorded with this checkout's code" in report
    code = real_hosts.code_versions()
    assert {r["code"] for r in records.values()} == {code["host"], code["esperd"]}
    lines = [json.loads(line) for line in before.decode().splitlines()]
    for record in lines:
        if record["controller"] == "heuristic":
            record["code"] = "older"
    (tmp_path / "real_hosts.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert real_hosts.main(argv) == 0
    assert "0 to run" in capsys.readouterr().out
    assert "(`--rerun-stale-code` reruns them): heuristic 1 of 1." in (tmp_path / "real_hosts.md").read_text()
    args = real_hosts.parse_args([*argv, "--rerun-stale-code"])
    controllers = list(args.controllers)
    gnn = real_hosts.resolve_gnn(args, controllers)[0]  # drops the absent gnn-online
    settings = real_hosts.Settings(epochs={"digits": 3}, gnn=gnn, code=code, rerun_stale_code=True)
    store = real_hosts.Store(tmp_path / "real_hosts.runs.jsonl", fresh=False)
    plan = real_hosts.run_plan(args.tasks, controllers, args.seeds)
    todo = {c for _, c, _ in real_hosts.pending(plan, store, settings)}
    assert todo == {"heuristic", "matched-heuristic"}
