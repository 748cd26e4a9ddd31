"""What a SIGHUP reload applies to a running daemon, and what only a restart can.

Pure: compares the running config with the one just read, key by key. The service does the
applying (esperd.service.Service.reload).
"""

from __future__ import annotations

from typing import Any

import msgspec

from esperd.config import Config

#: Dotted keys (or section prefixes ending in ".") a running daemon takes over on reload.
LIVE_KEYS = ("service.log_level", "policy.checkpoint", "scheduler.", "limits.")
#: Exceptions: the embedded broker's max_payload is derived from this one when it starts.
RESTART_KEYS = ("limits.max_payload_bytes",)


class ReloadPlan(msgspec.Struct, frozen=True):
    """The keys that differ, split into those applied now and those waiting for a restart."""

    live: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()


def is_live(key: str) -> bool:
    """Whether a reload applies this dotted key."""
    if key in RESTART_KEYS:
        return False
    return any(key == live or (live.endswith(".") and key.startswith(live)) for live in LIVE_KEYS)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ (lists compare as a whole), sorted."""
    changed: list[str] = []
    _diff(msgspec.to_builtins(old), msgspec.to_builtins(new), "", changed)
    return sorted(changed)


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Split the differences between the running config and the new one.

    Removing `policy.checkpoint` needs a restart: there is no file to swap in, and fresh random
    weights are never what a running daemon should switch to.
    """
    live, restart = [], []
    for key in changed_keys(running, new):
        if is_live(key) and not (key == "policy.checkpoint" and not new.policy.checkpoint):
            live.append(key)
        else:
            restart.append(key)
    return ReloadPlan(tuple(live), tuple(restart))


def apply_live(running: Config, new: Config) -> Config:
    """The running config with the live keys taken from `new` (the rest stays as started)."""
    return msgspec.structs.replace(
        running,
        limits=new.limits,
        scheduler=new.scheduler,
        service=msgspec.structs.replace(running.service, log_level=new.service.log_level),
        policy=msgspec.structs.replace(
            running.policy, checkpoint=new.policy.checkpoint or running.policy.checkpoint
        ),
    )


def _diff(old: Any, new: Any, prefix: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() | new.keys():
            _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key, out)
    elif old != new:
        out.append(prefix)
