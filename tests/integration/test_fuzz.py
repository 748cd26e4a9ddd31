"""Bad input at scale, bounded: the fuzz campaign's payload families against a real nats-server.

The full campaign (>= 100,000 payloads against `esperd` as a process) is `scripts/fuzz_campaign.py`;
this runs 3,000 of the same families against an in-process daemon, with the same checks:
status answers throughout, every payload is counted (the daemon's per-reason counts equal an
oracle's: the same intake and topology validation run here on every payload), unknown acks are
counted, nothing raises inside a handler, and a good run keeps getting its commands at the rate
it got them before the fuzzing started.
"""

from __future__ import annotations

from pathlib import Path

import nats

from esperd.ops.natsserver import NatsServer
from esperd_contracts import Codec, SystemStatePacket
from scripts.fuzz_campaign import (
    ANALYZER,
    FAMILIES,
    LIMITS,
    POLICY,
    SCHEDULER,
    FuzzGenerator,
    Oracle,
    Payload,
    StatusPoller,
    check_counts,
    daemon_processed,
    good_phase,
    publish_payloads,
    summarize_good,
    wait_caught_up,
)
from tests.integration.helpers import daemon_config, running_daemon, wait_for_status

PAYLOADS = 3_000
SEED = 20_240_601


def fuzz_config(url: str, state_dir: Path, **analyzer: object) -> object:
    return daemon_config(
        url, state_dir, limits=LIMITS, analyzer={**ANALYZER, **analyzer}, scheduler=SCHEDULER, policy=POLICY
    )


async def test_fuzz_families_are_counted_by_reason_and_good_runs_are_unaffected(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with running_daemon(fuzz_config(nats_server.url, tmp_path, idle_ttl_s=2.0)) as service:
        nc = await nats.connect(nats_server.url, name="fuzz-test")
        poller = StatusPoller(nc, interval_s=0.25, timeout_s=2.0)
        poller.start()
        oracle = Oracle()
        try:
            # A clean baseline for the good run's commands per state packet.
            base, _ = await good_phase(nats_server.url, ["t-base"], 2.0, oracle)

            gen = FuzzGenerator(SEED, good_runs=("t-good",))
            for p in gen.bootstrap():
                oracle.feed(p)
                await nc.publish(p.subject, p.data, headers=p.headers)

            async def fuzz() -> dict[str, object]:
                return await publish_payloads(
                    nc,
                    gen.stream(PAYLOADS),
                    oracle,
                    status=poller.ask,
                    max_lag=1000,
                    deadline_s=60.0,
                    chunk=100,
                )

            good, pub = await good_phase(nats_server.url, ["t-good"], 3.0, oracle, during=fuzz)
            final = await wait_caught_up(poller.ask, oracle, timeout=20.0)
        finally:
            await poller.stop()
            await nc.close()
        assert not service._stopping  # still serving; running_daemon's exit then stops it cleanly

    # Every family was exercised, and the publisher finished.
    assert pub["sent"] == PAYLOADS and not pub["timed_out"]
    assert set(pub["families"]) == set(FAMILIES), set(FAMILIES) - set(pub["families"])
    # The generator's expectations held (a valid message accepted, a broken one refused).
    assert not oracle.surprises, oracle.surprises
    # Status answered every poll, promptly.
    assert poller.failures == 0
    assert len(poller.latencies_ms) >= 10 and poller.max_ms < 2_000
    # Every payload counted exactly once, by reason; unknown acks counted; no handler raised.
    assert not check_counts(final, oracle), check_counts(final, oracle)
    assert final["rejected_total"] >= 0.5 * PAYLOADS  # most of it is garbage, and was refused
    assert final["scheduler"]["unknown_acks"] > 50
    assert final["nats"]["errors"] == 0
    # The good run: only its own ADVANCE commands, at (nearly) the clean rate.
    b, g = summarize_good(base), summarize_good(good)
    assert b["commands"] >= 10, b
    assert g["wrong"] == 0 and b["wrong"] == 0
    assert g["ratio_min"] >= 0.8 * b["ratio_mean"], (g, b)


async def test_a_single_garbage_payload_of_each_family_leaves_status_and_counters_consistent(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """One payload per family, each checked on its own: the smallest reproducer when the big test fails."""
    async with running_daemon(fuzz_config(nats_server.url, tmp_path)):
        nc = await nats.connect(nats_server.url, name="fuzz-one-each")
        try:
            gen = FuzzGenerator(SEED + 1)
            oracle = Oracle()
            for p in gen.bootstrap():
                oracle.feed(p)
                await nc.publish(p.subject, p.data, headers=p.headers)
            for family in FAMILIES:
                for _ in range(5):
                    p = getattr(gen, f"_f_{family}")()
                    oracle.feed(p)
                    await nc.publish(p.subject, p.data, headers=p.headers)
                    st = await wait_for_status(
                        nc, lambda s: daemon_processed(s) >= oracle.processed, timeout=5.0
                    )
                    assert daemon_processed(st) == oracle.processed, (family, p.subject, p.data[:64])
            assert not check_counts(st, oracle), check_counts(st, oracle)
        finally:
            await nc.close()


async def test_huge_losses_do_not_raise_in_the_handler(nats_server: NatsServer, tmp_path: Path) -> None:
    """A finite loss near the top of its range (<= 1e300) must not make the state handler raise.

    Found by the fuzz campaign: the loss governor squared (x - mean), which overflowed above
    ~1.3e154 and turned the packet into an internal_error.
    """
    async with running_daemon(fuzz_config(nats_server.url, tmp_path)):
        nc = await nats.connect(nats_server.url, name="fuzz-huge-loss")
        try:
            oracle, codec = Oracle(), Codec()
            for i, loss in enumerate([0.5, 0.6, 0.55, 0.52, 0.58, 1e200, 0.5, 0.5]):
                p = Payload(
                    "extreme_numbers",
                    "esper.huge-loss.state",
                    codec.encode(SystemStatePacket(epoch=i, val_loss=loss, train_loss=loss)),
                )
                oracle.feed(p)
                await nc.publish(p.subject, p.data)
            st = await wait_for_status(nc, lambda s: daemon_processed(s) >= oracle.processed, timeout=5.0)
        finally:
            await nc.close()
    assert daemon_processed(st) == oracle.processed
    assert "internal_error" not in st["rejected_by_reason"]
    assert not check_counts(st, oracle), check_counts(st, oracle)
