"""Structural checks on systemd/esperd.service, plus `systemd-analyze` where available."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_PATH = Path(__file__).resolve().parent.parent / "systemd" / "esperd.service"

# The daemon's default drain timeout in seconds: `drain_timeout_s` in
# esperd/config.py. TimeoutStopSec must stay above it or systemd SIGKILLs a
# draining daemon. Keep this in step with that default.
DEFAULT_DRAIN_TIMEOUT_S = 30.0

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Parse a unit file the way systemd reads it, closely enough for these tests.

    Keys may repeat; every assignment is kept in order. An empty assignment
    (``Key=``) resets the list, as it does in systemd. Backslash-newline
    continues a line; ``#`` and ``;`` start comment lines.
    """
    unit: Unit = {}
    section: str | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if pending:
            if line.startswith(("#", ";")):
                continue
            line = pending + " " + line
            pending = ""
        elif not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, {})
            continue
        assert section is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        key, value = key.strip(), value.strip()
        values = unit[section].setdefault(key, [])
        if value == "":
            values.clear()
            values.append("")
        else:
            if values == [""]:
                values.clear()
            values.append(value)
    assert not pending, "file ends in a line continuation"
    return unit


def parse_timespan(value: str) -> float:
    """Seconds in a systemd time span such as ``45``, ``45s``, ``1min 30s``."""
    units = {
        "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
        "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
        "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
        "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    }  # fmt: skip
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    for number, unit in parts:
        total += float(number) * units[unit or "s"]
    return total


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT_PATH.read_text())


def _one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def _is_true(value: str) -> bool:
    assert value.lower() in _TRUE | _FALSE, f"not a boolean: {value!r}"
    return value.lower() in _TRUE


def test_parser_semantics() -> None:
    u = parse_unit("[S]\n# c\nA=1\nA=2\nB=x\nB=\nC=a \\\n  b\n")
    assert u["S"]["A"] == ["1", "2"]
    assert u["S"]["B"] == [""]
    assert u["S"]["C"] == ["a b"]
    assert parse_timespan("45") == 45
    assert parse_timespan("1min 30s") == 90
    assert parse_timespan("500ms") == 0.5


def test_sections(unit: Unit) -> None:
    assert {"Unit", "Service", "Install"} <= unit.keys()
    assert _one(unit, "WantedBy", "Install") == "multi-user.target"


def test_notify_and_watchdog(unit: Unit) -> None:
    assert _one(unit, "Type") == "notify"
    assert _one(unit, "NotifyAccess") == "main"
    assert parse_timespan(_one(unit, "WatchdogSec")) > 0


def test_exec_start(unit: Unit) -> None:
    assert unit["Service"]["ExecStart"] == ["/usr/local/bin/esperd --config /etc/esperd/esperd.toml"]


def test_restart_policy(unit: Unit) -> None:
    assert _one(unit, "Restart") == "on-failure"
    assert parse_timespan(_one(unit, "RestartSec")) == 2


def test_stop_behaviour(unit: Unit) -> None:
    assert _one(unit, "KillSignal") == "SIGTERM"
    # SIGTERM to esperd only, so the embedded nats-server outlives the drain.
    assert _one(unit, "KillMode") == "mixed"
    assert parse_timespan(_one(unit, "TimeoutStopSec")) > DEFAULT_DRAIN_TIMEOUT_S


def test_dynamic_user_and_directories(unit: Unit) -> None:
    assert _is_true(_one(unit, "DynamicUser"))
    assert _one(unit, "StateDirectory") == "esperd"
    assert _one(unit, "ConfigurationDirectory") == "esperd"
    env = " ".join(unit["Service"].get("Environment", []))
    assert re.search(r"\bESPERD_STATE_DIR=%S/esperd\b", env)
    assert _one(unit, "UMask") == "0077"
    assert int(_one(unit, "LimitNOFILE")) >= 4096


@pytest.mark.parametrize(
    "key",
    [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
    ],
)
def test_hardening_booleans(unit: Unit, key: str) -> None:
    assert _is_true(_one(unit, key))


def test_hardening_values(unit: Unit) -> None:
    assert _one(unit, "ProtectSystem") == "strict"
    assert _one(unit, "SystemCallArchitectures") == "native"
    families = " ".join(unit["Service"]["RestrictAddressFamilies"]).split()
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Present and empty: no capabilities at all.
    assert unit["Service"]["CapabilityBoundingSet"] == [""]
    assert unit["Service"]["AmbientCapabilities"] == [""]


def test_syscall_filter(unit: Unit) -> None:
    filters = unit["Service"]["SystemCallFilter"]
    assert "@system-service" in filters
    denied = {tok for f in filters if f.startswith("~") for tok in f[1:].split()}
    assert "@privileged" in denied
    # PyTorch needs sched_setaffinity, mbind, set_mempolicy...: never deny @resources.
    assert "@resources" not in denied
    assert not any(tok in {"sched_setaffinity", "mbind", "set_mempolicy"} for tok in denied)


@pytest.mark.parametrize(
    "key",
    [
        "MemoryDenyWriteExecute",  # breaks PyTorch JIT / Triton / CUDA PTX JIT
        "PrivateDevices",  # hides /dev/nvidia* and /dev/dri
        "ProtectClock",  # on systemd < 253 implies a device allow-list that blocks GPUs
    ],
)
def test_gpu_breaking_options_off(unit: Unit, key: str) -> None:
    values = unit["Service"].get(key)
    assert values is None or not _is_true(values[-1])


def _unit_copy_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here."""
    text = UNIT_PATH.read_text()
    text, n = re.subn(r"^ExecStart=\S+", lambda _m: f"ExecStart={sys.executable}", text, flags=re.MULTILINE)
    assert n == 1
    path = tmp_path / "esperd.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    path = _unit_copy_for_verify(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SYSTEMD_LOG_LEVEL": "info"},
    )
    output = proc.stdout + proc.stderr
    ours = [ln for ln in output.splitlines() if str(path) in ln or "esperd" in ln]
    assert ours == [], output
    assert proc.returncode == 0, output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_security(tmp_path: Path) -> None:
    path = _unit_copy_for_verify(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SYSTEMD_COLORS": "0"},
    )
    match = re.search(r"Overall exposure level for esperd\.service:\s*([\d.]+)", proc.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported here (systemd < 250?): {proc.stderr}")
    # 2.0 when written; the scale is 0 (locked down) to 10 (unprotected).
    assert float(match.group(1)) <= 3.0, proc.stdout


def test_reload_sends_sighup_to_esperd_alone(unit: Unit) -> None:
    assert unit["Service"]["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
