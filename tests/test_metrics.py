"""Metric families from a status snapshot (pure logic), rendered and re-read by prometheus-client."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from esperd.config import ConfigError, config_from_dict
from esperd.ops.metrics import LatencyHistogram, Snapshot, families, parse_listen
from esperd.service import Service
from esperd_contracts.status import (
    ClusterStatus,
    ClusterView,
    LearnerStatus,
    RailsStatus,
    ReloadStatus,
    TaskStatus,
)


def exposed(snapshot: Snapshot) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Render with prometheus-client, parse back with its parser."""

    class Fixed(Collector):
        def collect(self):  # noqa: ANN202 - the Collector protocol
            return families(snapshot)

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def status(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a service.Status
    state = tmp_path_factory.mktemp("state")
    service = Service(config_from_dict({"service": {"state_dir": str(state), "use_uvloop": False}}), env={})
    learner = LearnerStatus(
        algorithm="ppo",
        updates=12,
        trips=2,
        worker_deaths=1,
        swaps=5,
        breaker="open",
        failures=9,
        budget_violations={"step": 4},
        breaker_transitions={"closed->open": 1, "open->half_open": 1, "half_open->open": 1},
    )
    view = ClusterView(members=[], gone=[], left=[], unowned_partitions=[], age_s=0.0)
    cluster = ClusterStatus(
        "b",
        ["a", "b", "c"],
        foreign_messages=40,
        handovers=3,
        partitions={1: 17, 4: 18},
        lease_lapses=2,
        acquisitions=5,
        errors=1,
        subscribed=[],
        view=view,
    )
    return msgspec.structs.replace(service.status(), learner=learner, cluster=cluster)


def test_learner_and_cluster_sections_become_metrics(status) -> None:  # noqa: ANN001
    samples = exposed(Snapshot(status, LatencyHistogram().cumulative(), 0.0, "b"))
    me = ("esperd_instance", "b")
    assert samples[("esperd_learner_updates_total", frozenset({me}))] == 12
    assert samples[("esperd_learner_trips_total", frozenset({me}))] == 2
    assert samples[("esperd_learner_worker_deaths_total", frozenset({me}))] == 1
    assert samples[("esperd_learner_swaps_total", frozenset({me}))] == 5
    assert samples[("esperd_learner_breaker_open", frozenset({me}))] == 1
    assert samples[("esperd_learner_breaker_half_open", frozenset({me}))] == 0
    assert samples[("esperd_learner_failures_total", frozenset({me}))] == 9
    transitions = {
        dict(labels)["transition"]: value
        for (name, labels), value in samples.items()
        if name == "esperd_learner_breaker_transitions_total"
    }
    assert samples[("esperd_learner_budget_violations_total", frozenset({me, ("budget", "step")}))] == 4
    assert samples[("esperd_learner_budget_violations_total", frozenset({me, ("budget", "batch")}))] == 0
    assert transitions == {
        "closed->open": 1,
        "open->half_open": 1,
        "half_open->open": 1,
        "half_open->closed": 0,
    }
    assert samples[("esperd_policy_version", frozenset({me}))] == 1
    assert samples[("esperd_cluster_members", frozenset({me}))] == 3
    assert samples[("esperd_cluster_foreign_messages_total", frozenset({me}))] == 40
    assert samples[("esperd_cluster_handovers_total", frozenset({me}))] == 3
    assert samples[("esperd_cluster_partitions", frozenset({me}))] == 2
    assert samples[("esperd_cluster_lease_lapses_total", frozenset({me}))] == 2
    assert samples[("esperd_cluster_errors_total", frozenset({me}))] == 1
    assert samples[("esperd_decisions_fenced_total", frozenset({me}))] == 0
    assert all(dict(labels).get("esperd_instance") == "b" for _, labels in samples)


def test_rail_blocks_become_metrics_by_rail(status) -> None:  # noqa: ANN001
    rails = RailsStatus(
        blocked_total=5, blocked_by_rail={"confidence": 3, "command_rate": 2}, masked_by_rail={}
    )
    samples = exposed(
        Snapshot(msgspec.structs.replace(status, rails=rails), LatencyHistogram().cumulative(), 0.0, "b")
    )
    blocks = {
        dict(labels)["rail"]: value
        for (name, labels), value in samples.items()
        if name == "esperd_rail_blocks_total"
    }
    assert blocks == {
        "confidence": 3,
        "command_rate": 2,
        "urgency": 0,
        "param_budget": 0,
        "active_seeds": 0,
        "late_germination": 0,
        "seed_pool": 0,
    }
    assert not [name for name, _ in samples if name.startswith("esperd_seed_pool")]  # no pool configured


def test_the_seed_pool_is_exposed_when_configured(status) -> None:  # noqa: ANN001
    rails = RailsStatus(seed_pool=8, seed_pool_live=3)
    samples = exposed(
        Snapshot(msgspec.structs.replace(status, rails=rails), LatencyHistogram().cumulative(), 0.0, "b")
    )
    pool = {name: value for (name, _), value in samples.items() if name.startswith("esperd_seed_pool")}
    assert pool == {"esperd_seed_pool_size": 8, "esperd_seed_pool_live": 3}


def test_without_learner_or_cluster_those_metrics_are_absent(status) -> None:  # noqa: ANN001
    bare = msgspec.structs.replace(status, learner=None, cluster=None)
    names = {name for name, _ in exposed(Snapshot(bare, LatencyHistogram().cumulative(), 0.0, "x"))}
    assert not {n for n in names if n.startswith(("esperd_learner_", "esperd_cluster_"))}
    assert "esperd_runs" in names and "esperd_messages_accepted_total" in names


def test_latency_histogram_buckets_are_cumulative() -> None:
    histogram = LatencyHistogram((0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 3.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.01", 2), ("0.1", 3), ("+Inf", 4)]  # le is inclusive
    assert histogram.sum == pytest.approx(3.065)


def test_listen_addresses(tmp_path: Path) -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert config_from_dict({"metrics": {"listen": "localhost:9464"}}).metrics.listen == "localhost:9464"
    assert config_from_dict({}).metrics.listen == ""
    for bad in ("9464", "127.0.0.1", "http://127.0.0.1:9464", "host:port"):
        with pytest.raises(ConfigError, match="metrics.listen"):
            config_from_dict({"metrics": {"listen": bad}})


def test_task_restarts_checkpoint_failures_and_reloads_become_metrics(status) -> None:  # noqa: ANN001

    tasks = {"decisions": TaskStatus(running=True), "housekeeping": TaskStatus(running=True, restarts=3)}
    learner = LearnerStatus(algorithm="ppo", checkpoint_failures=4)
    changed = msgspec.structs.replace(
        status, tasks=tasks, learner=learner, reload=ReloadStatus(reloads=2, refused=1)
    )
    samples = exposed(Snapshot(changed, LatencyHistogram().cumulative(), 0.0, "b"))
    me = ("esperd_instance", "b")
    assert samples[("esperd_task_restarts_total", frozenset({me, ("task", "housekeeping")}))] == 3
    assert samples[("esperd_task_restarts_total", frozenset({me, ("task", "decisions")}))] == 0
    assert samples[("esperd_learner_checkpoint_failures_total", frozenset({me}))] == 4
    assert samples[("esperd_reloads_total", frozenset({me}))] == 2
    assert samples[("esperd_reloads_refused_total", frozenset({me}))] == 1
