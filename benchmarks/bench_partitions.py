"""Several instances splitting the traffic: the share of the messages each esperd receives.

    .venv/bin/python benchmarks/bench_partitions.py [--runs 200] [--rounds 20] [--partitions 32]
                                                    [--repeats 3] [--strict]

Set-up (all on this machine): one real nats-server with JetStream (the lease bucket) and the
partition mapping of the README's "Splitting the traffic" (`esperd.ops.subjectmap.mapping_config`), and
two `esperd --config` processes in cluster mode (heuristic policy) on it. Per repeat, two phases:

  * baseline: `[cluster] mapped_prefix` unset, so each instance subscribes to `esper.*.*`, receives
    every message and drops the runs it does not own (what esperd did before the mapping);
  * mapped: `mapped_prefix = "esperd.in"`: each subscribes only to the partitions it holds.

In each phase this process publishes `--rounds` health signals to each of `--runs` runs (round
robin) once both instances hold their partitions, waits until the instances' counters settle, and
reads how many messages each instance's handler saw (`accepted_total + rejected_total +
cluster.foreign_messages`, from `esperd.status.<instance>`). Share = that count / messages sent.

Then, in the mapped phase, the handover: instance b is SIGKILLed (a crash); once a holds and has
subscribed to every partition, another burst is sent and a's share of it is reported.

Budget (PASS/FAIL; `--strict` exits 1 on FAIL): in the mapped phase the larger share is <= 0.60
in the median repeat, and after the handover the survivor receives every message (share 1.0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402 - after the path set-up, so the script runs from anywhere
from nats.aio.client import Client  # noqa: E402

from esperd.ops.natsserver import NatsServer  # noqa: E402
from esperd.ops.subjectmap import mapping_config  # noqa: E402

MAPPED_PREFIX = "esperd.in"
BUDGET_SHARE = 0.60


def esperd_config(tmp: Path, url: str, name: str, bucket: str, partitions: int, mapped: bool) -> Path:
    path = tmp / f"{bucket}-{name}.toml"
    path.write_text(
        f"""
[nats]
servers = ["{url}"]
[service]
state_dir = "{tmp / bucket / name}"
log_level = "warning"
log_format = "json"
torch_threads = 1
device = "cpu"
drain_timeout_s = 5.0
[cluster]
enabled = true
instance_id = "{name}"
heartbeat_s = 0.25
dead_after_s = 1.5
settle_s = 0.3
partitions = {partitions}
bucket = "{bucket}"
mapped_prefix = "{MAPPED_PREFIX if mapped else ""}"
[policy]
name = "heuristic"
""",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def instances(tmp: Path, url: str, bucket: str, partitions: int, mapped: bool) -> Iterator[dict[str, Any]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in ("a", "b"):
            config = esperd_config(tmp, url, name, bucket, partitions, mapped)
            with (tmp / f"{bucket}-{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "esperd.cli", "--config", str(config)], stdout=log, stderr=log
                )
        yield procs
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def status(nc: Client, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((await nc.request(f"esperd.status.{name}", b"", timeout=1.0)).data)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None


def received(st: dict[str, Any]) -> int:
    return int(st["accepted_total"] + st["rejected_total"] + st["cluster"]["foreign_messages"])


async def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


async def settled(nc: Client, names: list[str], partitions: int, mapped: bool) -> bool:
    """Every instance answers, the partitions are split, and (mapped) subscriptions follow the leases."""
    answers = [await status(nc, n) for n in names]
    if any(a is None or a.get("cluster") is None for a in answers):
        return False
    held = [set(a["cluster"]["partitions"]) for a in answers]  # type: ignore[index]
    if sum(len(h) for h in held) != partitions or not all(held):
        return False
    return not mapped or all(
        sorted(map(int, h)) == a["cluster"]["subscribed"]  # type: ignore[index]
        for h, a in zip(held, answers, strict=True)
    )


async def burst(nc: Client, runs: int, rounds: int) -> int:
    payload = b'{"kind":"health","layer_id":1,"health_score":0.8}'
    sent = 0
    for r in range(rounds):
        for i in range(runs):
            await nc.publish(f"esper.pb{i}.health", payload)
            sent += 1
        if r % 5 == 4:
            await nc.flush()
            await asyncio.sleep(0.05)  # let two daemons on a small machine keep up (no slow-consumer drops)
    await nc.flush()
    return sent


async def counts_after(nc: Client, names: list[str], expect_at_least: int) -> dict[str, int]:
    """Each instance's received count once the total stops moving (or reaches what was sent)."""
    last: dict[str, int] = {}
    stable = 0
    for _ in range(150):
        answers = {n: await status(nc, n) for n in names}
        now = {n: received(a) for n, a in answers.items() if a is not None}
        stable = stable + 1 if now == last else 0
        last = now
        if sum(now.values()) >= expect_at_least and stable >= 3:
            break
        await asyncio.sleep(0.2)
    return last


async def phase(tmp: Path, url: str, args: argparse.Namespace, mapped: bool) -> dict[str, Any]:
    bucket = f"bench{uuid.uuid4().hex[:8]}"
    names = ["a", "b"]
    with instances(tmp, url, bucket, args.partitions, mapped) as procs:
        nc = await nats.connect(url)
        try:
            await wait_for(lambda: settled(nc, names, args.partitions, mapped), 90, "both instances")
            before = {n: received((await status(nc, n)) or {}) for n in names}
            sent = await burst(nc, args.runs, args.rounds)
            after = await counts_after(nc, names, sent + sum(before.values()))
            shares = {n: (after.get(n, 0) - before[n]) / sent for n in names}
            result: dict[str, Any] = {"sent": sent, "shares": shares}
            if mapped:
                procs["b"].kill()  # a crash: b's leases expire after dead_after_s

                async def a_alone() -> bool:
                    st = await status(nc, "a")
                    return bool(st) and st["cluster"]["subscribed"] == list(range(args.partitions))  # type: ignore[index]

                started = time.monotonic()
                await wait_for(a_alone, 30, "a to take every partition")
                result["handover_s"] = time.monotonic() - started
                base = received((await status(nc, "a")) or {})
                again = await burst(nc, args.runs, args.rounds)
                got = await counts_after(nc, ["a"], base + again)
                result["handover_share"] = (got["a"] - base) / again
            return result
        finally:
            await nc.close()


async def main_async(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    # Two brokers: with the mapping on, esper.<run>.<channel> is moved for everyone, so the baseline
    # (instances that subscribe to esper.*.*) needs a broker without it.
    plain = NatsServer(store_dir=tmp / "js-plain", work_dir=tmp / "plain")
    mapped_broker = NatsServer(
        store_dir=tmp / "js-mapped",
        work_dir=tmp / "mapped",
        config_text=mapping_config("esper", MAPPED_PREFIX, args.partitions),
    )
    plain.start()
    mapped_broker.start()
    print(f"# bench_partitions: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}")
    print(
        f"# {args.runs} runs x {args.rounds} rounds, {args.partitions} partitions, 2 instances, "
        f"repeats {args.repeats}"
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        for repeat in range(args.repeats):
            for mapped in (False, True):
                label = "mapped" if mapped else "baseline"
                url = mapped_broker.url if mapped else plain.url
                result = await phase(tmp, url, args, mapped)
                rows.append((label, result))
                shares = "  ".join(f"{n}={s:.3f}" for n, s in result["shares"].items())
                extra = ""
                if mapped:
                    handover, share = result["handover_s"], result["handover_share"]
                    extra = f"  handover: {handover:.1f}s, survivor share {share:.3f}"
                print(
                    f"repeat {repeat}  {label:8s}  sent {result['sent']}  shares {shares}{extra}", flush=True
                )
    finally:
        plain.stop()
        mapped_broker.stop()
    base_max = statistics.median(max(r["shares"].values()) for label, r in rows if label == "baseline")
    mapped_max = statistics.median(max(r["shares"].values()) for label, r in rows if label == "mapped")
    mapped_sum = statistics.median(sum(r["shares"].values()) for label, r in rows if label == "mapped")
    survivor = min(r["handover_share"] for label, r in rows if label == "mapped")
    ratio = mapped_max / base_max if base_max else float("nan")
    print(f"median larger share: baseline {base_max:.3f}, mapped {mapped_max:.3f} (ratio {ratio:.2f})")
    print(f"median total share, mapped: {mapped_sum:.3f} (1.0 = every message received exactly once)")
    print(f"lowest survivor share after a handover: {survivor:.3f}")
    ok = mapped_max <= BUDGET_SHARE and survivor >= 0.999
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict}: larger share <= {BUDGET_SHARE} when mapped; the survivor receives everything")
    return 0 if ok or not args.strict else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strict", action="store_true", help="exit 1 on FAIL")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
