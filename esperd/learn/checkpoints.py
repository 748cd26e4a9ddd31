"""The learner's checkpoint files in the state directory's `learner/`: the serving policy
(policy.safetensors), the updater's optimizer state and counters (learner.pt) and the buffer
(buffer.safetensors)."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import torch

from esperd.learn.buffers import ReplayBuffer, RolloutBuffer
from esperd.policy.base import PolicyBundle
from esperd.policy.checkpoint import CheckpointError, load_policy_checkpoint, save_policy_checkpoint


class SavedLearner(msgspec.Struct, kw_only=True):
    """What a checkpoint holds apart from the buffer, read and checked but not yet applied."""

    policy: PolicyBundle
    algo: dict[str, Any]  # the updater's optimizer state and counters (the worker imports it)
    updates: int
    samples: int


def learner_dir(state_dir: Path) -> Path:
    return state_dir / "learner"


def buffer_file(state_dir: Path) -> Path:
    return learner_dir(state_dir) / "buffer.safetensors"


def save(
    state_dir: Path,
    serving: PolicyBundle,
    algo: dict[str, Any] | None,
    status: object,
    buffer: RolloutBuffer | ReplayBuffer,
) -> Path:
    """Write the checkpoint; with `algo` None the old learner.pt stays. Returns its directory."""
    directory = learner_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    save_policy_checkpoint(directory / "policy.safetensors", serving)
    if algo is not None:
        tmp = directory / "learner.pt.tmp"
        torch.save({"algo": algo, "status": msgspec.to_builtins(status)}, tmp)
        tmp.replace(directory / "learner.pt")
    buffer.save(buffer_file(state_dir))
    return directory


def read(state_dir: Path, make_policy: Callable[[], PolicyBundle], algorithm: str) -> SavedLearner | None:
    """The saved policy and updater state; None when there is no checkpoint. Raises
    CheckpointError (or torch's and safetensors' errors) when it is unusable."""
    directory = learner_dir(state_dir)
    policy_file = directory / "policy.safetensors"
    if not policy_file.exists():
        return None
    restored = make_policy()
    load_policy_checkpoint(policy_file, restored)
    # weights_only: tensors and plain containers; a pickle that would run code is refused.
    try:
        extra = torch.load(directory / "learner.pt", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text explains how to load the file anyway (by allowlisting what it would
        # call) and carries terminal escapes: log only what was refused, not that advice.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        parts = [p.strip() for p in re.split(r"\n\s*\n|WeightsUnpickler error:", text) if p.strip()]
        parts = [p for p in parts if not p.startswith("Check the documentation")]
        reason = parts[-1].split(" Please use")[0] if parts else "not plain tensors and containers"
        raise CheckpointError(
            f"{directory / 'learner.pt'} refused by the weights-only loader (nothing in it was run): {reason}"
        ) from None
    if not isinstance(extra, dict) or not isinstance(extra.get("algo"), dict):
        raise CheckpointError("learner.pt holds no learner state")
    prior = extra.get("status") or {}
    saved_for = extra["algo"].get("algorithm", algorithm)
    if saved_for != algorithm:
        raise CheckpointError(f"learner state is for {saved_for!r}, not {algorithm!r}")
    return SavedLearner(
        policy=restored,
        algo=extra["algo"],
        updates=int(prior.get("updates", 0)),
        samples=int(prior.get("samples", 0)),
    )
