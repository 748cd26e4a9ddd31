"""Which config changes a SIGHUP reload applies, and which wait for a restart."""

from __future__ import annotations

from esperd.config import config_from_dict
from esperd.ops.reload import apply_live, changed_keys, is_live, plan_reload

BASE = {
    "nats": {"servers": ["nats://127.0.0.1:4222"], "password": "old-secret"},
    "service": {"log_level": "info", "state_dir": "/tmp/s"},
    "policy": {"name": "gnn", "checkpoint": "/ckpt/a.safetensors"},
}


def with_changes(**sections: dict[str, object]) -> dict[str, object]:
    raw = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)  # type: ignore[union-attr]
    return raw


def test_nothing_changed_plans_nothing() -> None:
    config = config_from_dict(BASE)
    assert plan_reload(config, config_from_dict(BASE)).live == ()
    assert plan_reload(config, config_from_dict(BASE)).restart == ()


def test_live_and_restart_keys_are_split() -> None:
    old = config_from_dict(BASE)
    new = config_from_dict(
        with_changes(
            service={"log_level": "debug", "drain_timeout_s": 3.0},
            scheduler={"cooldown_s": 5.0},
            limits={"max_nodes": 64},
            policy={"checkpoint": "/ckpt/b.safetensors", "hidden_size": 64},
            nats={"password": "new-secret"},
            analyzer={"idle_ttl_s": 30.0},
        )
    )
    plan = plan_reload(old, new)
    assert plan.live == ("limits.max_nodes", "policy.checkpoint", "scheduler.cooldown_s", "service.log_level")
    assert plan.restart == (
        "analyzer.idle_ttl_s",
        "nats.password",
        "policy.hidden_size",
        "service.drain_timeout_s",
    )
    assert all("secret" not in key for key in plan.restart)  # names only, never values


def test_removing_the_checkpoint_needs_a_restart() -> None:
    old = config_from_dict(BASE)
    new = config_from_dict(with_changes(policy={"checkpoint": None}))
    assert plan_reload(old, new).restart == ("policy.checkpoint",)


def test_apply_live_takes_live_keys_only() -> None:
    old = config_from_dict(BASE)
    new = config_from_dict(
        with_changes(service={"log_level": "error", "drain_timeout_s": 3.0}, scheduler={"cooldown_s": 5.0})
    )
    running = apply_live(old, new)
    assert running.service.log_level == "error" and running.scheduler.cooldown_s == 5.0
    assert running.service.drain_timeout_s == old.service.drain_timeout_s
    assert changed_keys(running, new) == ["service.drain_timeout_s"]  # what still waits for a restart


def test_is_live() -> None:
    assert is_live("scheduler.max_batch") and is_live("limits.max_nodes")
    assert not is_live("limits.max_payload_bytes")  # the embedded broker's max_payload follows it
    assert is_live("service.log_level") and is_live("policy.checkpoint")
    assert not is_live("service.log_format") and not is_live("policy.name") and not is_live("schedulerx.y")
