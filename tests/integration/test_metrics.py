"""Prometheus metrics, scraped over real HTTP from a real daemon and parsed by prometheus-client's
own text parser: the counters move as hosts talk, every esperd metric carries the instance label,
and a listener that cannot bind is a one-line error, not a traceback.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from esperd.ops.natsserver import NatsServer, free_port
from tests.integration.helpers import daemon_config, running_daemon, wait_for_status
from tests.integration.test_decisions_e2e import POLICY, SCHEDULER, hosts, next_command
from tests.integration.test_readable_output import drive_host, drive_json_run

ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[str, Samples, dict[str, str]]:
    """GET /metrics: the text, every sample by (name, labels), and each family's type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels` (0 if there is none)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


async def test_a_scrape_shows_the_counters_moving(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    port = free_port()
    config = daemon_config(
        nats_server.url,
        tmp_path,
        scheduler=SCHEDULER,
        policy=POLICY,
        metrics={"listen": f"127.0.0.1:{port}"},
        cluster={"instance_id": "esperd-a"},
    )
    async with running_daemon(config), hosts(nats_server.url, "grow") as (grow,):
        _, before, types = await asyncio.to_thread(scrape, port)
        drive_host(grow)
        command = await next_command(grow)
        grow.ack(command, applied=True)
        await drive_json_run(nats_client, "typed")
        await nats_client.publish("esper.grow.health", b"not a packet")
        await nats_client.publish("esper.grow.health", b'{"kind":"health","layer_id":1,"health_score":7}')
        await wait_for_status(
            nats_client,
            lambda s: (
                s["acks_by_status"].get("applied") == 1
                and s["rejected_total"] == 2
                and s["decisions"]["commands_by_op"].get("germinate", 0) >= 2
            ),
        )
        text, after, types = await asyncio.to_thread(scrape, port)

    # Before any traffic: the families exist, the known label values at zero.
    me = ("esperd_instance", "esperd-a")
    assert before[("esperd_decision_latency_seconds_count", (me,))] == 0
    for kind in ("topology", "health", "health_batch", "state", "ack"):
        assert before[("esperd_messages_accepted_total", (me, ("kind", kind)))] == 0
    for status in ("applied", "rejected", "timed_out"):
        assert before[("esperd_acks_total", (me, ("status", status)))] == 0
    assert before[("esperd_commands_total", (me, ("op", "germinate")))] == 0
    assert value(before, "esperd_nats_connected") == 1
    # After: each counter moved by what happened.
    assert value(after, "esperd_messages_accepted_total", kind="topology") == 2
    assert value(after, "esperd_messages_accepted_total", kind="health_batch") >= 4
    assert value(after, "esperd_messages_accepted_total", kind="state") == 2
    assert value(after, "esperd_messages_accepted_total", kind="ack") == 1
    assert value(after, "esperd_messages_rejected_total", reason="malformed") == 1
    assert value(after, "esperd_messages_rejected_total", reason="invalid") == 1
    assert value(after, "esperd_commands_total", op="germinate") == 2
    assert value(after, "esperd_acks_total", status="applied") == 1
    assert value(after, "esperd_runs") == 2
    assert value(after, "esperd_runs_memory_budget_bytes") == 1024 * 2**20
    assert 0 < value(after, "esperd_runs_memory_used_bytes") < value(after, "esperd_runs_memory_budget_bytes")
    assert value(after, "esperd_runs_reused_total") == 0
    assert value(after, "esperd_decisions_total") >= 2
    latency_count = value(after, "esperd_decision_latency_seconds_count")
    assert latency_count == 2 and value(after, "esperd_decision_latency_seconds_sum") > 0
    assert value(after, "esperd_decision_latency_seconds_bucket", le="+Inf") == latency_count
    assert (
        value(after, "esperd_scheduler_overflow_total") == 0 and value(after, "esperd_commands_pending") == 1
    )
    assert value(after, "esperd_nats_slow_consumer_drops_total") == 0
    assert value(after, "esperd_nats_max_payload_bytes") == 1024 * 1024
    assert value(after, "esperd_policy_version") == 1
    assert value(after, "esperd_info", policy="heuristic") == 1
    assert value(after, "process_resident_memory_bytes") > 0
    # Types as prometheus-client's parser reads them, and the instance label on every esperd sample.
    assert types["esperd_messages_accepted"] == "counter" and types["esperd_runs"] == "gauge"
    assert types["esperd_decision_latency_seconds"] == "histogram"
    esperd_samples = [ls for n, ls in after if n.startswith("esperd_")]
    assert esperd_samples and all(("esperd_instance", "esperd-a") in ls for ls in esperd_samples)
    assert "# HELP esperd_messages_rejected_total Messages refused, by reason" in text


async def test_metrics_off_by_default(nats_server: NatsServer, tmp_path: Path) -> None:
    async with running_daemon(daemon_config(nats_server.url, tmp_path)) as service:
        assert service._metrics is None and service.latency is None
        assert service.decisions.observe_latency is None


def test_a_taken_port_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "esperd.toml"
        config.write_text(
            f'[nats]\nservers = ["nats://127.0.0.1:{free_port()}"]\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
            f'[service]\nstate_dir = "{tmp_path / "state"}"\nlog_format = "console"\n',
            encoding="utf-8",
        )
        proc = subprocess.run(
            [sys.executable, "-m", "esperd.cli", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 69, output  # ExitCode.UNAVAILABLE: a port esperd listens on is taken
    assert "could not start" in output and f"metrics.listen = '127.0.0.1:{port}'" in output
    assert "Address already in use" in output
    assert "Traceback" not in output
