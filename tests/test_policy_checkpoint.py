"""Checkpoints: safetensors round trip, refusal of bad files, serving fallback."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from structlog.testing import capture_logs

from esperd.analyzer.observation import BLENDS, BLUEPRINTS, LEVERS, TEMPOS
from esperd.policy import (
    CheckpointError,
    HeuristicPolicy,
    PolicyConfig,
    build_serving_policy,
    create_policy,
    load_policy_checkpoint,
    save_policy_checkpoint,
)
from esperd.policy.checkpoint import observation_schema, read_policy_checkpoint
from esperd.policy.config import stable_hash
from tests.support.observations import mixed_batch


def gnn(**overrides: object):
    return create_policy("gnn", PolicyConfig(**{"name": "gnn", "hidden_size": 64, **overrides}))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    policy = gnn(init_seed=1)
    policy.version = 12
    return save_policy_checkpoint(tmp_path / "gnn.safetensors", policy)


@pytest.mark.parametrize("name", ["gnn", "lstm"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    source = create_policy(name, PolicyConfig(name=name, hidden_size=64, init_seed=1))
    source.version = 5
    path = save_policy_checkpoint(tmp_path / "sub" / "p.safetensors", source)
    target = create_policy(name, PolicyConfig(name=name, hidden_size=64, init_seed=2))
    observations = mixed_batch([4, 9])
    assert not torch.allclose(source.act(observations, True).values, target.act(observations, True).values)
    info = load_policy_checkpoint(path, target)
    assert (info.policy, info.version, target.version) == (name, 5, 5)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key])
    source.forget([o.run_id for o in observations])
    target.forget([o.run_id for o in observations])
    torch.testing.assert_close(source.act(observations, True).values, target.act(observations, True).values)
    assert not list(tmp_path.glob("sub/*.tmp"))  # atomic write leaves no temp files


def test_heuristic_round_trip(tmp_path: Path) -> None:
    policy = HeuristicPolicy()
    path = save_policy_checkpoint(tmp_path / "h.safetensors", policy)
    assert load_policy_checkpoint(path, HeuristicPolicy()).version == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy_checkpoint(tmp_path / "nope.safetensors", gnn())


@pytest.mark.parametrize("damage", ["truncate", "random", "empty", "flip_header"])
def test_corrupt_file(saved: Path, damage: str) -> None:
    data = saved.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "random":
        data = (
            torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
            .to(torch.uint8)
            .numpy()
            .tobytes()
        )
    elif damage == "empty":
        data = b""
    else:
        data = data[:8] + b"#" * 16 + data[24:]
    saved.write_bytes(data)
    target = gnn(init_seed=5)
    before = target.state_dict()
    with pytest.raises(CheckpointError):
        load_policy_checkpoint(saved, target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched
    assert target.version == 0


def test_pickle_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": Exploit()}))
    with pytest.raises(CheckpointError):
        load_policy_checkpoint(path, gnn())
    assert not marker.exists()


def test_wrong_policy_name(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="for policy 'gnn', not 'lstm'"):
        load_policy_checkpoint(saved, create_policy("lstm", PolicyConfig(name="lstm", hidden_size=64)))


def test_wrong_architecture(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="architecture"):
        load_policy_checkpoint(saved, gnn(hidden_size=128))
    with pytest.raises(CheckpointError, match="architecture"):
        load_policy_checkpoint(saved, gnn(gnn_layers=2))
    with pytest.raises(CheckpointError, match="architecture"):
        load_policy_checkpoint(saved, gnn(residual=False))  # same shapes, different forward
    # Fields that do not shape this policy are not part of its architecture.
    assert load_policy_checkpoint(saved, gnn(lstm_hidden=64, dropout=0.3)).version == 12


def test_wrong_shapes_even_with_matching_metadata(saved: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["encoder.0.weight"] = torch.zeros(3, 3)
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata=metadata)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_policy_checkpoint(forged, gnn())


def test_non_finite_weights(saved: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["encoder.0.bias"][0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_policy_checkpoint(bad, gnn())


def test_foreign_safetensors_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="no esperd metadata"):
        load_policy_checkpoint(plain, gnn())
    other = tmp_path / "other.safetensors"
    save_file(
        {"w": torch.zeros(2)}, str(other), metadata={"esperd": json.dumps({"format": "something-else"})}
    )
    with pytest.raises(CheckpointError, match="not an esperd-policy"):
        load_policy_checkpoint(other, gnn())


def test_serving_policy_loads_configured_checkpoint(saved: Path) -> None:
    serving = build_serving_policy(PolicyConfig(name="gnn", hidden_size=64, checkpoint=str(saved)))
    assert not serving.fell_back and serving.error is None
    assert serving.policy.name == "gnn" and serving.policy.version == 12
    assert serving.checkpoint is not None and serving.checkpoint.version == 12


def test_serving_policy_without_checkpoint_is_fresh() -> None:
    serving = build_serving_policy(PolicyConfig(name="lstm", hidden_size=64))
    assert serving.policy.name == "lstm" and serving.checkpoint is None and not serving.fell_back


@pytest.mark.parametrize("problem", ["missing", "corrupt", "mismatched"])
def test_serving_policy_falls_back_on_bad_checkpoint(saved: Path, tmp_path: Path, problem: str) -> None:
    path = {"missing": tmp_path / "gone.safetensors", "corrupt": saved, "mismatched": saved}[problem]
    if problem == "corrupt":
        saved.write_bytes(saved.read_bytes()[:100])
    name = "lstm" if problem == "mismatched" else "gnn"
    config = PolicyConfig(name=name, hidden_size=64, checkpoint=str(path), fallback="heuristic")
    with capture_logs() as logs:
        serving = build_serving_policy(config)
    assert serving.fell_back and isinstance(serving.error, CheckpointError)
    assert isinstance(serving.policy, HeuristicPolicy)
    warning = [entry for entry in logs if entry["event"] == "policy.checkpoint_rejected"]
    assert warning and warning[0]["log_level"] == "warning" and warning[0]["fallback"] == "heuristic"
    assert serving.policy.act(mixed_batch([3])).decisions[0].policy == "heuristic"


@pytest.mark.parametrize("name", ["gnn", "lstm"])
def test_a_checkpoint_with_the_old_head_layout_is_refused_clearly(tmp_path: Path, name: str) -> None:
    # A checkpoint from before issue 16: five action columns (node, op, blueprint, blend, tempo),
    # so a node head of 30 outputs and a schema without the new levers. Serving it would sample
    # the new levers from weights that were never there; it must be refused, naming why.
    policy = create_policy(name, PolicyConfig(name=name, hidden_size=64, init_seed=1))
    path = save_policy_checkpoint(tmp_path / "new.safetensors", policy)
    metadata, tensors = read_policy_checkpoint(path)
    old_schema = {
        "node_features": observation_schema()["node_features"],
        "global_features": observation_schema()["global_features"],
        "ops": observation_schema()["ops"],
        "blueprints": [b.value for b in BLUEPRINTS],
        "blends": [b.value for b in BLENDS],
        "tempos": [t.value for t in TEMPOS],
    }
    head = "node_head.2"
    tensors[f"{head}.weight"] = tensors[f"{head}.weight"][:30].clone()
    tensors[f"{head}.bias"] = tensors[f"{head}.bias"][:30].clone()
    metadata["schema_hash"] = stable_hash(old_schema)
    metadata["shapes"] = {k: list(v.shape) for k, v in tensors.items()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"esperd": json.dumps(metadata)})
    target = create_policy(name, PolicyConfig(name=name, hidden_size=64, init_seed=2))
    before = target.state_dict()
    with pytest.raises(CheckpointError, match="head layout"):
        load_policy_checkpoint(old, target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched
    # Even with the new schema hash forged, the shapes do not fit.
    metadata["schema_hash"] = stable_hash(observation_schema())
    save_file(tensors, str(old), metadata={"esperd": json.dumps(metadata)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_policy_checkpoint(old, target)


def test_the_schema_names_every_lever_choice() -> None:
    levers = dict(observation_schema()["levers"])
    assert list(levers) == [name for name, _ in LEVERS]
    assert levers["isolation"] == ["default", "isolated", "shared"]
    assert levers["alpha_speed"] == ["instant", "fast", "standard", "slow"]
