"""The daemon's `[policy]` section that serves a checkpoint `esperd train` wrote (<out>/policy.toml)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from esperd.policy.config import PolicyConfig


def policy_section(
    config: PolicyConfig, architecture_fields: Sequence[str], deterministic: bool, checkpoint: Path
) -> str:
    """TOML text: the policy's name and shape-deciding fields, how it acts, and the checkpoint."""
    lines = [
        "# The daemon's [policy] section for the best checkpoint of this training run",
        "[policy]",
        f'name = "{config.name}"',
        *(f"{f} = {toml_value(getattr(config, f))}" for f in architecture_fields),
        f"deterministic = {toml_value(deterministic)}",
        f"checkpoint = {json.dumps(str(checkpoint.resolve()))}",
        "",
    ]
    return "\n".join(lines)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))
