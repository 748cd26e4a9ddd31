"""Round-trips of learner state through torch's safe checkpoint format, as the daemon saves it."""

from __future__ import annotations

import io
from typing import Any

import torch


def saved_and_loaded(policy: Any, learner: Any) -> dict[str, Any]:
    """The policy's weights and the learner's state, saved with torch.save and loaded back with
    weights_only=True (the safe format: no pickle of arbitrary objects)."""
    buffer = io.BytesIO()
    torch.save({"weights": policy.state_dict(), "learner": learner.state_dict()}, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded
