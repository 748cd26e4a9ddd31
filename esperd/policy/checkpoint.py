"""Policy weights on disk: safetensors (no pickle, nothing executed on load) + JSON metadata.

The metadata names the policy, its version, the architecture (shape-deciding
config fields) and the observation schema (feature and action names); a file whose
metadata, keys or shapes do not match the policy it is loaded into is refused with
CheckpointError, as is a missing, truncated or corrupt file, or non-finite weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esperd.analyzer.observation import GLOBAL_FEATURES, LEVERS, NODE_FEATURES, OPS
from esperd.policy.base import PolicyBundle
from esperd.policy.config import PolicyConfig, stable_hash
from esperd.policy.registry import create_policy

FORMAT = "esperd-policy"
FORMAT_VERSION = 1
_METADATA_KEY = "esperd"

log = structlog.get_logger()


class CheckpointError(Exception):
    """A checkpoint could not be used: missing, unreadable, corrupt, or for another policy."""


def _choice_name(choice: object) -> str:
    value = getattr(choice, "value", choice)
    return "default" if value is None else str(value)


def observation_schema() -> dict[str, Any]:
    """The names a policy's weights are tied to: feature columns, and the action heads' layout
    (ops, and every lever's choices in order)."""
    return {
        "node_features": list(NODE_FEATURES),
        "global_features": list(GLOBAL_FEATURES),
        "ops": [o.value for o in OPS],
        "levers": [[name, [_choice_name(c) for c in choices]] for name, choices in LEVERS],
    }


def policy_architecture(policy: PolicyBundle) -> dict[str, Any]:
    """The policy's name and the config fields that decide its weight shapes and forward semantics."""
    config: PolicyConfig | None = getattr(policy, "config", None)
    fields: tuple[str, ...] = getattr(policy, "architecture_fields", ())
    return {"name": policy.name, **{f: getattr(config, f) for f in fields if config is not None}}


def checkpoint_metadata(policy: PolicyBundle) -> dict[str, Any]:
    """What is stored next to the weights."""
    architecture = policy_architecture(policy)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "policy": policy.name,
        "version": policy.version,
        "architecture": architecture,
        "architecture_hash": stable_hash(architecture),
        "schema_hash": stable_hash(observation_schema()),
        "shapes": {k: list(v.shape) for k, v in policy.state_dict().items()},
        "saved_at": time.time(),
    }


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    path: Path
    policy: str
    version: int
    metadata: dict[str, Any]


def save_policy_checkpoint(path: str | os.PathLike[str], policy: PolicyBundle) -> Path:
    """Write the policy's weights and metadata atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in policy.state_dict().items()}
    metadata = {_METADATA_KEY: json.dumps(checkpoint_metadata(policy), sort_keys=True)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_policy_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors on CPU) from a checkpoint file; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(_METADATA_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises several types for truncated / garbage files
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if raw is None:
        raise CheckpointError(f"checkpoint {path} has no esperd metadata (not an esperd policy checkpoint)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an {FORMAT} checkpoint")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {metadata.get('format_version')!r}, want {FORMAT_VERSION}"
        )
    return metadata, tensors


def load_policy_checkpoint(path: str | os.PathLike[str], policy: PolicyBundle) -> CheckpointInfo:
    """Load a checkpoint into `policy` (weights and version), or raise CheckpointError unchanged."""
    metadata, tensors = read_policy_checkpoint(path)
    _check_compatible(Path(path), metadata, tensors, policy)
    version = metadata.get("version")
    if not isinstance(version, int) or version < 0:
        raise CheckpointError(f"checkpoint {path} has an invalid version {version!r}")
    try:
        policy.load_state_dict(tensors, version=version)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit policy {policy.name!r}: {exc}") from exc
    return CheckpointInfo(path=Path(path), policy=policy.name, version=version, metadata=metadata)


def _check_compatible(
    path: Path, metadata: dict[str, Any], tensors: dict[str, torch.Tensor], policy: PolicyBundle
) -> None:
    expected = checkpoint_metadata(policy)
    if metadata.get("policy") != policy.name:
        raise CheckpointError(
            f"checkpoint {path} is for policy {metadata.get('policy')!r}, not {policy.name!r}"
        )
    if metadata.get("schema_hash") != expected["schema_hash"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on a different observation schema or head layout "
            "(feature columns, ops or levers changed since): it cannot be served, retrain it"
        )
    if metadata.get("architecture_hash") != expected["architecture_hash"]:
        raise CheckpointError(
            f"checkpoint {path} architecture {metadata.get('architecture')} "
            f"!= configured {expected['architecture']}"
        )
    want = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != have:
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
        raise CheckpointError(
            f"checkpoint {path} does not fit policy {policy.name!r}: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}"
        )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path} has non-finite values in {key}")


def checkpoint_digest(path: str | os.PathLike[str] | None) -> str:
    """The SHA-256 of a checkpoint file's bytes ("" for no path or an unreadable file): a reload
    compares it to tell a replaced file from an unchanged one."""
    if not path:
        return ""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ServingPolicy:
    """The policy to serve, and why it is not the configured one if it is not."""

    policy: PolicyBundle
    checkpoint: CheckpointInfo | None = None  # what was loaded, if anything
    error: CheckpointError | None = None  # why the configured policy was replaced by the fallback

    @property
    def fell_back(self) -> bool:
        return self.error is not None


def build_serving_policy(config: PolicyConfig, device: torch.device | str = "cpu") -> ServingPolicy:
    """The configured policy with `config.checkpoint` loaded; on CheckpointError, the fallback.

    Errors other than CheckpointError (unknown policy name, bad device) propagate:
    they are configuration mistakes, not a bad file.
    """
    policy = create_policy(config.name, config, device)
    if not config.checkpoint:
        return ServingPolicy(policy)
    try:
        info = load_policy_checkpoint(config.checkpoint, policy)
    except CheckpointError as exc:
        log.warning(
            "policy.checkpoint_rejected",
            policy=config.name,
            checkpoint=config.checkpoint,
            fallback=config.fallback,
            error=str(exc),
        )
        return ServingPolicy(create_policy(config.fallback, config, device), error=exc)
    log.info("policy.checkpoint_loaded", policy=config.name, checkpoint=str(info.path), version=info.version)
    return ServingPolicy(policy, checkpoint=info)
