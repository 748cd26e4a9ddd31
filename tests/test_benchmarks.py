"""The benchmarks that drive the daemon's internals still run and do work, at toy sizes.

They sit outside mypy and the package, so an internal API change can leave one running and
measuring nothing (bench_learner once decided nothing after the decision loop's `observe` began
to take a batch). These runs assert work was done, never a speed: the figures belong to
benchmarks/RESULTS.md, run at full size on a quiet machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_benchmark(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, f"benchmarks/{name}.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_bench_saturation_decides_every_run() -> None:
    out = run_benchmark("bench_saturation", "--runs", "64", "--rounds", "1", "--batch", "16")
    found = re.search(r"policy act ([\d,]+), decision loop ([\d,]+) \(", out)
    assert found is not None, out
    assert number(found[1]) > 0 and number(found[2]) > 0


def test_bench_learner_decides_in_every_phase() -> None:
    out = run_benchmark(
        "bench_learner", "--skip-throughput", "--phase-s", "1", "--rounds", "1", "--runs", "8"
    )
    for phase in ("idle", "impala learning", "ppo learning"):
        found = re.search(rf"^  {phase}\s+(\d+)\s", out, re.MULTILINE)
        assert found is not None and int(found[1]) > 0, (phase, out)


def test_bench_e2e_latency_answers_every_state_packet() -> None:
    out = run_benchmark("bench_e2e_latency", "--runs", "2", "--seconds", "1", "--warmup", "0")
    found = re.search(r"^\s+2 esperd\s+(\d+)\s+\S+\s+\S+\s+\S+\s+(\d+)\s+(\d+)$", out, re.MULTILINE)
    assert found is not None, out
    samples, missing, unmatched = (int(g) for g in found.groups())
    assert samples > 0 and missing == 0 and unmatched == 0


def test_bench_ingest_takes_the_whole_burst() -> None:
    out = run_benchmark("bench_ingest", "--messages", "500", "--repeats", "1", "--max-pending-mb", "256")
    found = re.search(r"^esperd\s+(\d+)\s+(\d+)\s", out, re.MULTILINE)
    assert found is not None, out
    assert (int(found[1]), int(found[2])) == (500, 0)  # handled, dropped


def test_bench_sim_steps_and_scores_the_policies() -> None:
    out = run_benchmark("bench_sim", "--steps", "5", "--reps", "1", "--seeds", "1", "--episodes", "1")
    assert re.search(r"random policy\s+64 envs\s+[\d,]+", out), out
    assert "heuristic beats random" in out
