"""Serialization benchmark: one realistic SystemStatePacket, encoded and decoded four ways.

    python benchmarks/bench_serialization.py [--iterations N] [--repeats R] [--strict]

Measures the encode+decode round trip (median of R repeats of N iterations, perf_counter_ns)
for our Codec (msgpack, JSON), stdlib json on the equivalent dict, and dataclasses + json.
All four run in the same process, one after another, so the ratios are comparable.
Budgets: msgpack packet <= 300 bytes; Codec msgpack round trip <= 5 us; every Codec round
trip < 80 us (the seed documents' serialization budget). `--strict` exits 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from esperd_contracts import Blueprint, Codec, SeedSlotState, SeedStage, SystemStatePacket

SIZE_BUDGET_BYTES = 300
MSGPACK_BUDGET_US = 5.0
SEED_DOC_BUDGET_US = 80.0


def build_packet() -> SystemStatePacket:
    """A state packet as a CIFAR-scale host would send it at the end of an epoch."""
    return SystemStatePacket(
        epoch=42,
        global_step=16_380,
        train_loss=0.6931,
        train_accuracy=0.7842,
        val_loss=0.8125,
        val_accuracy=0.7391,
        metrics={"lr": 0.0125, "grad_norm": 1.84, "ece": 0.042, "wd": 0.0005},
        seeds=[
            # Just germinated and training in isolation: not blended yet, so no counterfactual.
            SeedSlotState(
                layer_id=3,
                stage=SeedStage.TRAINING,
                blueprint=Blueprint.CONV_LIGHT,
                alpha=0.0,
                epochs_in_stage=2,
                params=18_496,
                counterfactual=0.0,
                total_improvement=0.0,
                seed_id=7,
            ),
            # Two epochs into a standard (5-epoch) blend.
            SeedSlotState(
                layer_id=7,
                stage=SeedStage.BLENDING,
                blueprint=Blueprint.BOTTLENECK,
                alpha=0.4,
                epochs_in_stage=2,
                params=36_928,
                counterfactual=0.0123,
                total_improvement=0.0085,
                seed_id=5,
            ),
            # Fully blended, on probation before fossilization.
            SeedSlotState(
                layer_id=11,
                stage=SeedStage.PROBATIONARY,
                blueprint=Blueprint.SQUEEZE_EXCITE,
                alpha=1.0,
                epochs_in_stage=1,
                params=8_256,
                counterfactual=0.0212,
                total_improvement=0.0187,
                seed_id=2,
            ),
        ],
        host_params=11_173_962,
        total_params=11_237_642,
        timestamp=1_732_540_803.125,
    )


# ------------------------------------------------------------- baselines


def to_plain_dict(packet: SystemStatePacket) -> dict[str, Any]:
    """The equivalent dict a hand-written stdlib implementation would send (seeds keyed)."""
    out: dict[str, Any] = {"kind": "state"}
    for name in SystemStatePacket.__struct_fields__:
        out[name] = getattr(packet, name)
    out["seeds"] = [
        {
            name: (v.value if isinstance(v, enum.Enum) else v)
            for name, v in ((n, getattr(seed, n)) for n in SeedSlotState.__struct_fields__)
        }
        for seed in packet.seeds
    ]
    return out


@dataclasses.dataclass
class SeedSlotStateDC:
    layer_id: int
    stage: SeedStage = SeedStage.DORMANT
    blueprint: Blueprint | None = None
    alpha: float = 0.0
    epochs_in_stage: int = 0
    params: int = 0
    counterfactual: float = 0.0
    total_improvement: float = 0.0
    seed_id: int = 0


@dataclasses.dataclass
class SystemStateDC:
    epoch: int = 0
    global_step: int = 0
    train_loss: float = 0.0
    train_accuracy: float = 0.0
    val_loss: float = 0.0
    val_accuracy: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    hardware: dict[str, Any] | None = None
    seeds: list[SeedSlotStateDC] = dataclasses.field(default_factory=list)
    host_params: int = 0
    total_params: int = 0
    timestamp: float = 0.0
    done: bool = False
    v: int = 1
    kind: str = "state"


def to_dataclass(packet: SystemStatePacket) -> SystemStateDC:
    fields = msgspec.structs.asdict(packet)
    fields["seeds"] = [SeedSlotStateDC(**msgspec.structs.asdict(s)) for s in packet.seeds]
    return SystemStateDC(**fields)


def _enum_values(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in items}


def dataclass_round_trip(obj: SystemStateDC) -> SystemStateDC:
    """asdict -> json.dumps -> json.loads -> rebuild the dataclasses (enums included)."""
    data = json.dumps(dataclasses.asdict(obj, dict_factory=_enum_values))
    raw = json.loads(data)
    raw["seeds"] = [
        SeedSlotStateDC(
            **{
                **s,
                "stage": SeedStage(s["stage"]),
                "blueprint": Blueprint(s["blueprint"]) if s["blueprint"] is not None else None,
            }
        )
        for s in raw["seeds"]
    ]
    return SystemStateDC(**raw)


# ------------------------------------------------------------- timing


def median_ns(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    """Median over `repeats` of the mean time per call of `fn`, in nanoseconds."""
    for _ in range(min(iterations, 2_000)):  # warm caches and allocator before measuring
        fn()
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        per_call.append((time.perf_counter_ns() - start) / iterations)
    return statistics.median(per_call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--strict", action="store_true", help="exit 1 if a budget fails")
    args = parser.parse_args(argv)

    codec = Codec()
    packet = build_packet()
    mp = codec.encode(packet)
    js = codec.encode_json(packet)
    plain = to_plain_dict(packet)
    plain_json = json.dumps(plain).encode()
    dc = to_dataclass(packet)

    # Every contender must reproduce the packet, or its timing means nothing.
    original = msgspec.structs.asdict(packet)
    assert msgspec.structs.asdict(codec.decode(mp)) == original
    assert msgspec.structs.asdict(codec.decode(js)) == original
    assert json.loads(json.dumps(plain)) == plain
    assert dataclass_round_trip(dc) == dc

    print(
        f"python {platform.python_version()} ({platform.python_implementation()}),"
        f" msgspec {msgspec.__version__}"
    )
    print(f"{platform.machine()} {platform.processor() or platform.platform()}")
    print()
    print("packet (keyed JSON form; on the wire msgpack is positional):")
    print(json.dumps(json.loads(js), indent=2))
    print()
    print(f"sizes: codec msgpack {len(mp)} B | codec JSON {len(js)} B | stdlib json dict {len(plain_json)} B")
    print()

    cases: list[tuple[str, Callable[[], object]]] = [
        ("Codec msgpack", lambda: codec.decode(codec.encode(packet))),
        ("Codec JSON", lambda: codec.decode(codec.encode_json(packet))),
        ("stdlib json dict", lambda: json.loads(json.dumps(plain))),
        ("dataclass + json", lambda: dataclass_round_trip(dc)),
    ]
    print(f"encode+decode round trip, median of {args.repeats} x {args.iterations} iterations:")
    results = {name: median_ns(fn, args.iterations, args.repeats) / 1_000 for name, fn in cases}
    base_mp, base_json = results["Codec msgpack"], results["Codec JSON"]
    for name, us in results.items():
        ratios = f"{us / base_mp:6.1f}x vs Codec msgpack   {us / base_json:6.1f}x vs Codec JSON"
        print(f"  {name:<18} {us:8.2f} us   {ratios}")
    print("  (the Codec validates types and ranges while decoding; the baselines do not)")
    print()

    seed = f"{SEED_DOC_BUDGET_US:g} us (seed docs)"
    checks = [
        (f"msgpack size {len(mp)} B <= {SIZE_BUDGET_BYTES} B", len(mp) <= SIZE_BUDGET_BYTES),
        (
            f"Codec msgpack round trip {base_mp:.2f} us <= {MSGPACK_BUDGET_US:g} us",
            base_mp <= MSGPACK_BUDGET_US,
        ),
        (f"Codec msgpack round trip {base_mp:.2f} us < {seed}", base_mp < SEED_DOC_BUDGET_US),
        (f"Codec JSON round trip {base_json:.2f} us < {seed}", base_json < SEED_DOC_BUDGET_US),
    ]
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    # For context only (not gating): would the dataclass baseline meet the seed documents' budget?
    dc_us = results["dataclass + json"]
    verdict = "meets" if dc_us < SEED_DOC_BUDGET_US else "misses"
    print(f"info  dataclass + json baseline {dc_us:.2f} us {verdict} the < {seed} budget")
    failed = not all(ok for _, ok in checks)
    return 1 if (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
