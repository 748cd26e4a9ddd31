"""esperd's configuration: a TOML file decoded into typed msgspec Structs.

Every section and key has a default, so an empty file is a valid config. Unknown
keys are errors (a typo must not silently fall back to a default). A few values
can be overridden from the environment (see `ENV_OVERRIDES`), so credentials need
not live in the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from esperd.analyzer.config import AnalyzerConfig
from esperd.learn.config import LearnerConfig
from esperd.policy.config import PolicyConfig
from esperd.section import PositiveFloat, PositiveInt, Section
from esperd_contracts import DEFAULT_PREFIX

MAX_NATS_PAYLOAD = 64 * 1024 * 1024  # nats-server refuses a larger max_payload
Port = Annotated[int, Meta(ge=0, le=65535)]


class TlsConfig(Section, frozen=True):
    """TLS to the broker. `ca_file` verifies the server; `cert_file` + `key_file` identify us."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    hostname: str = ""  # server name to verify, when it differs from the URL's host

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file)


class NatsConfig(Section, frozen=True):
    """How to reach NATS, or run an embedded server."""

    servers: Annotated[tuple[str, ...], Meta(min_length=1)] = ("nats://127.0.0.1:4222",)
    embedded: bool = False
    embedded_host: str = "127.0.0.1"
    embedded_port: Port = 4222
    jetstream: bool = True  # embedded server only; stored under <state_dir>/jetstream
    user: str = ""
    password: str = ""
    token: str = ""
    credentials_file: str = ""  # a .creds file (JWT + nkey seed)
    nkey_seed_file: str = ""
    tls: TlsConfig = TlsConfig()
    subject_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")] = DEFAULT_PREFIX
    connect_timeout_s: PositiveFloat = 5.0
    reconnect_wait_s: PositiveFloat = 2.0
    ping_interval_s: PositiveFloat = 20.0
    max_pending_bytes: PositiveInt = 8 * 1024 * 1024  # before the client drops (and counts) messages
    name: str = "esperd"
    # How commands are encoded: auto = as the run's hosts last spoke (JSON for a run driven by
    # `nats pub`, msgpack for HostClient), or always msgpack, or always JSON.
    command_encoding: Literal["auto", "msgpack", "json"] = "auto"


class LimitsConfig(Section, frozen=True):
    """Bounds on one message. Generous by default; anything beyond is rejected.

    Bounds on the state esperd keeps (runs, nodes per run) are in `[analyzer]`.
    """

    # The embedded nats-server is started to carry messages this big (NATS's own cap is 64 MiB).
    max_payload_bytes: Annotated[int, Meta(gt=0, le=MAX_NATS_PAYLOAD)] = 4 * 1024 * 1024
    max_batch_signals: PositiveInt = 8192
    max_nodes: PositiveInt = 4096
    max_edges: PositiveInt = 65536
    max_metrics: PositiveInt = 128
    max_seeds: PositiveInt = 1024
    reject_log_interval_s: PositiveFloat = 10.0  # at most one log line per reason per window


class ServiceConfig(Section, frozen=True):
    """The process itself."""

    state_dir: str = "./state"
    device: str = "auto"  # torch device for policy and learner: auto (cuda if available) | cpu | cuda[:N]
    # torch intra-op threads; 0 = half the cores (at least 1). Small-batch inference gains
    # nothing from more, and oversubscribed cores make decision latency spike.
    torch_threads: Annotated[int, Meta(ge=0, le=1024)] = 0
    # CPython hands the GIL to a waiting thread only after this long (its default is 5 ms). The
    # policy worker waits for it while the event loop ingests or the learner's daemon side
    # (batch encoding, swaps) runs, and it waits again after every torch op that released it; a
    # shorter interval bounds each wait at a small cost in throughput. 0.2 ms kept decision p99
    # with a learner running within its target (1.2x idle) where 0.5 ms did not (figures in
    # benchmarks/RESULTS.md, learner).
    gil_switch_interval_ms: Annotated[float, Meta(gt=0.0, le=100.0)] = 0.2
    drain_timeout_s: PositiveFloat = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "console", "json"] = "auto"
    use_uvloop: bool = True
    status_interval_s: PositiveFloat = 60.0  # how often a summary line is logged


class MetricsConfig(Section, frozen=True):
    """Prometheus exposition over HTTP (`GET /metrics`)."""

    # host:port to listen on ("[::1]:9464" for IPv6); empty = no listener.
    listen: Annotated[str, Meta(pattern=r"^$|^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")] = ""


class SchedulerConfig(Section, frozen=True):
    """`[scheduler]` in the config file."""

    min_interval_s: Annotated[float, Meta(ge=0.0)] = 1.0  # per run, between two decisions
    cooldown_s: Annotated[float, Meta(ge=0.0)] = 30.0  # per layer, after a command
    ack_timeout_s: Annotated[float, Meta(gt=0.0)] = 60.0  # an unacked command frees its layer after this
    max_batch: Annotated[int, Meta(ge=1, le=4096)] = 64  # runs decided in one forward pass
    max_wait_ms: Annotated[float, Meta(ge=0.0, le=10_000.0)] = 1.0  # how long a due run waits for company
    max_pending: Annotated[int, Meta(ge=1)] = 4096  # due runs queued; beyond this, new ones are dropped
    decision_deadline_ms: Annotated[float, Meta(gt=0.0)] = 1_000.0  # a decision older than this is stale


class ClusterConfig(Section, frozen=True):
    """`[cluster]` in the config file."""

    enabled: bool = False
    # Also names this instance's status subject, `esperd.status.<instance_id>`. Empty: <hostname>-<pid>.
    instance_id: Annotated[str, Meta(pattern=r"^([A-Za-z0-9_-]{1,64})?$")] = ""
    heartbeat_s: Annotated[float, Meta(gt=0.0)] = 1.0  # how often membership and leases are renewed
    # The key-value bucket's TTL, set when the bucket is created: a member, and every lease it holds,
    # expires this long after its last renewal. An existing bucket keeps its own TTL.
    dead_after_s: Annotated[float, Meta(ge=0.5)] = 3.5
    settle_s: Annotated[float, Meta(ge=0.0)] = (
        0.5  # after announcing itself, wait this long before taking partitions
    )
    partitions: Annotated[int, Meta(ge=1, le=4096)] = 32  # units of ownership; runs hash to one
    bucket: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "esperd_cluster"
    # With the broker's partition mapping (README, "Splitting the traffic"): subscribe only to the
    # partitions held, on <mapped_prefix>.<partition>.<run>.<channel>. Empty: take every message.
    mapped_prefix: Annotated[str, Meta(pattern=r"^([A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)?$")] = ""

    def __post_init__(self) -> None:
        if self.mapped_prefix and not self.enabled:
            raise ValueError("cluster.mapped_prefix needs cluster.enabled: partitions are what instances own")
        if self.heartbeat_s * 3 > self.dead_after_s:
            # At least two renewals must fit in the part of the TTL a lease is used for.
            raise ValueError(
                f"cluster.heartbeat_s ({self.heartbeat_s}) must be at most a third of "
                f"cluster.dead_after_s ({self.dead_after_s})"
            )


class RailsConfig(Section, frozen=True):
    """`[rails]`: bounds every policy's commands must stay within (esperd.rails applies them).

    A blocked decision is never sent: it becomes the WAIT that was actually done, and is
    recorded for learning as such. Each rail is counted in status by name.
    """

    enabled: bool = True
    # The seed documents' decision thresholds (000, PolicyConfig): act only when the policy is
    # at least this sure of the op it chose (p(op | layer) for learned policies) ...
    confidence_threshold: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.7
    # ... and the layer it chose is at least this urgent (sigmoid of its priority logit).
    urgency_threshold: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.5
    # At most this many commands per run within any `command_window_s`. 30 a minute is far above
    # what a lifecycle needs (a seed takes 3 to 5 commands, each layer cools down for
    # scheduler.cooldown_s), and far below what a runaway policy sends (one per decision).
    max_commands_per_window: Annotated[int, Meta(ge=1, le=1_000_000)] = 30
    command_window_s: Annotated[float, Meta(gt=0.0, le=86_400.0)] = 60.0
    # Parameters seeds may add to a run, as a fraction of the host's own: GERMINATE is blocked
    # once what the host reports, plus what germinations in flight will add, plus the new seed
    # would exceed it. Half the host is a safety bound, not a tuning knob.
    param_budget: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    # A new seed's size, before the host reports it, as a fraction of its layer's parameters:
    # 0.6 is the largest blueprint of the reference catalogue (esperd.sim.catalog).
    seed_size_estimate: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.6
    # Live seeds (germinated, training, blending, probationary) per run, in flight included.
    max_active_seeds: Annotated[int, Meta(ge=1, le=4096)] = 4
    # No GERMINATE when the host says fewer epochs remain than a seed's lifecycle needs
    # (germination, dwell, blend, probation: 10 with the default heuristic): a seed still
    # blending when training ends is a half-trained module at partial weight. 0: off; hosts
    # that do not send total_epochs are never held back.
    min_epochs_left: Annotated[int, Meta(ge=0, le=1_000_000)] = 10
    # Live seeds across every run this instance decides, in flight included: a pool of seed
    # capacity the runs share (the accelerators that train seeds, say). 0: no pool. When more
    # runs in one batch want a seed than the pool has free, `[policy] selection` decides which
    # get one (esperd.rails.pool_objectives); the others wait.
    max_seeds_total: Annotated[int, Meta(ge=0, le=10_000_000)] = 0


class Config(Section, frozen=True):
    """The whole esperd configuration."""

    nats: NatsConfig = NatsConfig()
    limits: LimitsConfig = LimitsConfig()
    service: ServiceConfig = ServiceConfig()
    analyzer: AnalyzerConfig = AnalyzerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    policy: PolicyConfig = PolicyConfig()
    learner: LearnerConfig = LearnerConfig()
    cluster: ClusterConfig = ClusterConfig()
    metrics: MetricsConfig = MetricsConfig()
    rails: RailsConfig = RailsConfig()


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the value."""


#: environment variable -> (section, key); ESPERD_NATS_URL may list several URLs, comma-separated
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "ESPERD_NATS_URL": ("nats", "servers"),
    "ESPERD_NATS_USER": ("nats", "user"),
    "ESPERD_NATS_PASSWORD": ("nats", "password"),
    "ESPERD_NATS_TOKEN": ("nats", "token"),
    "ESPERD_NATS_CREDS": ("nats", "credentials_file"),
    "ESPERD_NATS_NKEY_SEED": ("nats", "nkey_seed_file"),
    "ESPERD_STATE_DIR": ("service", "state_dir"),
}


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, and validate a config file (None = defaults)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    apply_env_overrides(raw, os.environ if env is None else env)
    return config_from_dict(raw, source=str(path) if path else "<defaults>")


def apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Write ESPERD_* environment values into the raw config, in place."""
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if not value:
            continue
        parsed: Any = [s.strip() for s in value.split(",") if s.strip()] if key == "servers" else value
        table = raw.setdefault(section, {})
        if isinstance(table, dict):  # otherwise validation reports the bad section itself
            table[key] = parsed


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a raw mapping into a Config, naming the bad key and value on error."""
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, raw, source)) from None
    for url in config.nats.servers:
        problem = server_url_problem(url)
        if problem:
            raise ConfigError(f"{source}: bad value for `nats.servers` = {_mask_password(url)!r}: {problem}")
    websocket = {url.startswith(("ws://", "wss://")) for url in config.nats.servers}
    if len(websocket) > 1:
        raise ConfigError(f"{source}: `nats.servers` mixes websocket (ws, wss) and NATS (nats, tls) URLs")
    return config


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def server_url_problem(url: str) -> str | None:
    """Why nats-py could not use `url` as a server address, or None if it can.

    Accepted: `scheme://[user[:password]@]host[:port]` (scheme nats, tls, ws or wss) and, as
    nats-py allows, a bare `host[:port]`.
    """
    if not url or any(c.isspace() for c in url):
        return "empty, or contains whitespace"
    if "://" in url:
        scheme = url.split("://", 1)[0]
        if scheme not in NATS_SCHEMES:
            return f"scheme {scheme!r} is not one of {', '.join(NATS_SCHEMES)}"
        parts = urlsplit(url)
    elif "/" in url:
        return "not a server URL (want e.g. nats://127.0.0.1:4222)"
    else:
        parts = urlsplit(f"nats://{url}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "the port is not a number in 1-65535"
    if not parts.hostname:
        return "no host"
    if parts.scheme not in ("ws", "wss") and (parts.path not in ("", "/") or parts.query or parts.fragment):
        return "a NATS server URL has no path, query or fragment"
    return None


def _mask_password(url: str) -> str:
    parts = urlsplit(url) if "://" in url else None
    if parts is None or parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `(?P<key>[^`]+)`")


def _describe(exc: msgspec.ValidationError, raw: dict[str, Any], source: str) -> str:
    message = str(exc)
    match = _PATH.search(message)
    path = match.group("path") if match else ""
    detail = message[: match.start()] if match else message
    keys = [k for k in re.split(r"\.|\[|\]", path) if k]
    unknown = _UNKNOWN.search(detail)
    if unknown:
        key = ".".join([*keys, unknown.group("key")])
        return f"{source}: unknown key `{key}` (check the spelling; see examples/esperd.toml)"
    value = _lookup(raw, keys)
    dotted = ".".join(keys) or "<top level>"
    return f"{source}: bad value for `{dotted}` = {value!r}: {detail}"


def _lookup(raw: Any, keys: list[str]) -> Any:
    node = raw
    for key in keys:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def state_path(config: Config, *parts: str) -> Path:
    """A path under the state directory, created on demand."""
    base = Path(config.service.state_dir).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return base.joinpath(*parts)
