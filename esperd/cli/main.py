"""`esperd` command line: run the daemon, check a config, export schemas, train a policy offline.

Exit codes (README "Operations", systemd/README.md): see `ExitCode`.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import esperd
from esperd.ops.signals import Signals
from esperd_contracts import DEFAULT_PREFIX
from esperd_contracts.subjects import RUN_ID_PATTERN

# Everything else is imported once the signals are ours: importing torch takes seconds, and a
# SIGTERM meanwhile must stop esperd cleanly, not kill it.
if TYPE_CHECKING:
    from esperd.config import Config
    from esperd.logs import LogLevel


class ExitCode(enum.IntEnum):
    """Why esperd exited (sysexits.h numbers where one fits)."""

    OK = 0  # a clean stop: SIGTERM/SIGINT at any time, before READY included
    ERROR = 1  # an unexpected error (its traceback is in the log)
    CONFIG = 2  # the config file is unreadable or invalid (check-config says why)
    # A port esperd must listen on is taken, the embedded nats-server cannot start, or (cluster mode)
    # the broker has no JetStream for the leases or the members disagree on the partition count.
    UNAVAILABLE = 69
    TASK_FAILED = 70  # a background task kept failing past its restart budget
    STATE_DIR = 73  # state_dir cannot be created or written


DEFAULT_SERVER = "nats://127.0.0.1:4222"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esperd", description="Tamiyo: the Esper strategic controller daemon"
    )
    parser.add_argument("--version", action="version", version=f"esperd {esperd.__version__}")
    parser.add_argument("--config", "-c", help="TOML config file (default: built-in defaults)")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the daemon (the default)")
    run.add_argument("--config", "-c", dest="run_config", help="TOML config file")
    check = sub.add_parser("check-config", help="validate a config file and print it resolved")
    check.add_argument("file")
    schema = sub.add_parser("schema", help="write the wire contracts' JSON Schemas")
    schema.add_argument("--check", action="store_true", help="exit 1 if the checked-in schemas drifted")
    from esperd.train.cli import add_arguments as add_train_arguments

    train = sub.add_parser(
        "train",
        help="train a policy offline (saved experience and/or the simulator)",
        description="Train a gnn or lstm policy with PPO or IMPALA from a saved experience buffer "
        "and/or against the simulator; writes best.safetensors, last.safetensors, metrics.jsonl "
        "and policy.toml into --out.",
    )
    add_train_arguments(train)
    sim = sub.add_parser("sim", help="simulator tools")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    calibrate = sim_sub.add_parser(
        "calibrate",
        help="fit the simulator's parameters to recorded real traces",
        description="Read `esperd record` traces (DIR/**/*.jsonl), fit the simulator's dynamics to "
        "them (host learning curve, what seeds did by layer kind and blueprint, blend drops, sizes, "
        "noise) and write the parameters as TOML for `esperd train --sim --sim-config FILE`. With "
        "--holdout, also print how far the default and the calibrated simulator are from those runs.",
    )
    calibrate.add_argument("--traces", required=True, metavar="DIR", help="trace files to fit")
    calibrate.add_argument("--out", required=True, metavar="FILE", help="TOML file to write")
    calibrate.add_argument("--holdout", metavar="DIR", help="held-out traces to measure the fit on")
    calibrate.add_argument(
        "--lever-traces",
        metavar="DIR",
        help="paired lever runs (record_traces.py --controllers lever-sweep) to fit the lever "
        "parameters on (default: those in --traces)",
    )
    calibrate.add_argument(
        "--lever-holdout", metavar="DIR", help="held-out paired lever runs to measure the lever fit on"
    )
    calibrate.add_argument("--seed", type=int, default=0, help="simulator seed for the search (0)")
    calibrate.add_argument(
        "--no-search",
        action="store_true",
        help="skip the grid searches: blend instability, lever parameters (faster)",
    )
    record = sub.add_parser(
        "record",
        help="record every run's messages as JSONL traces (one file per run)",
        description="Subscribe to <prefix>.*.* and write every topology, health, state, command and "
        "ack message, decoded to the contracts' JSON with its receive time, to DIR/<run>.jsonl. "
        "Runs until SIGINT/SIGTERM (or --duration).",
    )
    record.add_argument("--out", required=True, metavar="DIR", help="directory for the trace files")
    record.add_argument("--server", default="nats://127.0.0.1:4222", metavar="URL", help="NATS server URL")
    record.add_argument("--prefix", default="esper", help="subject prefix (esper)")
    record.add_argument(
        "--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (0: until signalled)"
    )
    watch = sub.add_parser(
        "watch",
        help="print commands, acks, rejections and rail blocks live, decoded, one line each",
        description="Subscribe to <prefix>.<run>.command, <prefix>.<run>.ack and esperd.rejected and "
        "print every message decoded (msgpack or JSON), one line each, until SIGINT/SIGTERM.",
    )
    watch.add_argument("--run", default="", metavar="R", help="only this run (default: every run)")
    add_server_argument(watch)
    watch.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"subject prefix ({DEFAULT_PREFIX})")
    watch.add_argument(
        "--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (0: until signalled)"
    )
    status = sub.add_parser(
        "status",
        help="print every running esperd's status (a hung one is listed, not waited for)",
        description="Find esperd instances ($SRV.PING.esperd) and ask each on esperd.status.<instance>; "
        "members of a cluster that do not answer are listed. One instance: its whole status; several: "
        "a line each. Exit 1 if no esperd answers or a cluster member does not.",
    )
    add_server_argument(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON answer (indented)")
    status.add_argument("--timeout", type=float, default=3.0, metavar="S", help="wait this long (3)")
    return parser


def add_server_argument(parser: argparse.ArgumentParser) -> None:
    """--server, defaulting to ESPERD_NATS_URL's first URL, else the local broker."""
    env = os.environ.get("ESPERD_NATS_URL", "")
    default = env.split(",")[0].strip() or DEFAULT_SERVER
    parser.add_argument("--server", default=default, metavar="URL", help=f"NATS server URL ({default})")


def main(argv: Sequence[str] | None = None) -> int:
    signals = Signals()
    signals.install()
    args = build_parser().parse_args(argv)
    if args.command in (None, "run"):
        return run_daemon(args, signals)
    signals.restore()  # the other commands keep Python's defaults (Ctrl-C stops a training run)
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Every command but the daemon itself."""
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "schema":
        from esperd_contracts.schema import main as schema_main

        return schema_main(["--check"] if args.check else [])
    if args.command == "sim":
        return _sim_calibrate(args)
    if args.command == "record":
        return asyncio.run(_record(args))
    if args.command == "watch":
        return asyncio.run(_watch(args))
    if args.command == "status":
        return asyncio.run(_status(args))
    from esperd.train.cli import main as train_main

    return train_main(args, getattr(args, "train_config", None) or args.config)


def run_daemon(args: argparse.Namespace, signals: Signals) -> int:
    """`esperd [run] --config FILE`: load the config and serve until a stop signal."""
    from esperd.config import ConfigError, load_config

    path = getattr(args, "run_config", None) or args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"esperd: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if signals.stop_requested:
        return ExitCode.OK  # stopped while starting up: nothing was started yet
    try:
        return run(config, signals, reload_config=lambda: load_config(path))
    finally:
        signals.ignore_from_now_on()


def check_config(path: str) -> int:
    """Print the resolved config (secrets masked) or the error; exit 0, 2 (invalid) or 73 (state_dir)."""
    import msgspec

    from esperd.config import ConfigError, load_config
    from esperd.ops.statedir import StateDirError, check_state_dir

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"esperd: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        check_state_dir(config.service.state_dir)
    except StateDirError as exc:
        print(f"esperd: {path}: {exc}", file=sys.stderr)
        return ExitCode.STATE_DIR
    shown = msgspec.to_builtins(config)
    for key in ("password", "token"):
        if shown["nats"].get(key):
            shown["nats"][key] = "***"
    print(msgspec.json.format(msgspec.json.encode(shown), indent=2).decode())
    print(f"esperd: {path} is valid", file=sys.stderr)
    return 0


def run(config: Config, signals: Signals, reload_config: Callable[[], Config] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit code says how it ended (`ExitCode`)."""
    from esperd.logs import configure_logging

    log_level = configure_logging(config.service.log_level, config.service.log_format)
    serve = _serve(config, signals, log_level, reload_config)
    if config.service.use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(serve)
    return asyncio.run(serve)


def _sim_calibrate(args: argparse.Namespace) -> int:
    """`esperd sim calibrate`: fit, write the TOML, optionally measure on held-out traces."""
    from esperd.sim.calibrate import CalibrationError, calibrate_main

    try:
        return calibrate_main(
            args.traces,
            args.out,
            holdout=args.holdout,
            seed=args.seed,
            search=not args.no_search,
            lever_traces=args.lever_traces,
            lever_holdout=args.lever_holdout,
        )
    except CalibrationError as exc:
        print(f"esperd sim calibrate: {exc}", file=sys.stderr)
        return 2


async def _record(args: argparse.Namespace) -> int:
    """`esperd record`: the trace tap until a signal or --duration; prints what it wrote."""
    import msgspec

    from esperd.ops.traces import record

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.duration > 0:
        loop.call_later(args.duration, stop.set)
    print(
        f"esperd: recording {args.prefix}.*.* from {args.server} into {args.out}", file=sys.stderr, flush=True
    )
    stats = await record(args.server, args.out, prefix=args.prefix, stop=stop)
    print(msgspec.json.encode(stats).decode(), flush=True)
    return 0


def _stop_on_signals(duration: float = 0.0) -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if duration > 0:
        loop.call_later(duration, stop.set)
    return stop


async def _watch(args: argparse.Namespace) -> int:
    """`esperd watch`: the lifecycle, one line per message, until a signal or --duration."""
    from esperd.cli.cliconn import UnreachableError
    from esperd.cli.watch import watch

    if args.run and not RUN_ID_PATTERN.fullmatch(args.run):
        print(f"esperd watch: --run {args.run!r} is not a run id ([A-Za-z0-9_-]{{1,64}})", file=sys.stderr)
        return 2
    stop = _stop_on_signals(args.duration)

    def ready(subjects: list[str]) -> None:
        print(
            f"esperd watch: {', '.join(subjects)} on {args.server} (Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )

    try:
        await watch(args.server, sys.stdout, stop, prefix=args.prefix, run=args.run, on_ready=ready)
    except UnreachableError as exc:
        print(f"esperd watch: {exc}", file=sys.stderr)
        return 1
    return 0


async def _status(args: argparse.Namespace) -> int:
    """`esperd status`: every instance's status; one instance pretty-printed (or indented JSON)."""
    import json

    import msgspec

    from esperd.cli.cliconn import UnreachableError, connect_for_cli
    from esperd.cli.statusquery import cluster_report, render
    from esperd.cli.statusview import render_status

    try:
        nc = await connect_for_cli(args.server, "esperd status", timeout_s=args.timeout)
    except UnreachableError as exc:
        print(f"esperd status: {exc}", file=sys.stderr)
        return 1
    try:
        report = await cluster_report(nc, timeout_s=args.timeout)
    finally:
        await nc.close()
    if not report.answered:
        print(
            f"esperd status: no esperd answers on esperd.status at {args.server} (is esperd running?)",
            file=sys.stderr,
        )
        return 1
    if len(report.members) == 1:
        status = report.members[0].status
        print(
            json.dumps(status, indent=2) if args.json else render_status(status or {}),
            end="\n" if args.json else "",
        )
        return 0
    print(json.dumps(msgspec.to_builtins(report), indent=2) if args.json else render(report))
    return 1 if report.missing else 0


async def _serve(
    config: Config, signals: Signals, log_level: LogLevel, reload_config: Callable[[], Config] | None
) -> int:
    import structlog

    from esperd.ops.cluster import ClusterError
    from esperd.ops.metrics import MetricsListenError
    from esperd.ops.natsserver import NatsServerError
    from esperd.ops.statedir import StateDirError
    from esperd.service import Service

    log = structlog.get_logger("esperd")
    loop = asyncio.get_running_loop()
    signals.attach(loop)
    try:
        if signals.stop_requested:
            return ExitCode.OK
        try:
            service = Service(config, reload_config=reload_config, log_level=log_level)
        except StateDirError as exc:
            log.error("could not start", error=str(exc), exit_code=int(ExitCode.STATE_DIR))
            return ExitCode.STATE_DIR
        signals.route(service.request_stop, service.request_reload)
        try:
            await service.run()
        except (NatsServerError, MetricsListenError, ClusterError) as exc:  # see ExitCode.UNAVAILABLE
            log.error("could not start", error=str(exc), exit_code=int(ExitCode.UNAVAILABLE))
            return ExitCode.UNAVAILABLE
        if service.failed_tasks:
            log.critical(
                "esperd exits non-zero: background tasks kept failing",
                tasks=service.failed_tasks,
                exit_code=int(ExitCode.TASK_FAILED),
            )
            return ExitCode.TASK_FAILED
        return ExitCode.OK
    finally:
        signals.detach(loop)


if __name__ == "__main__":
    sys.exit(main())
