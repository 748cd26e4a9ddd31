"""Registry, factory, config validation, torch.compile wiring."""

from __future__ import annotations

import msgspec
import pytest
import torch

from esperd.policy import (
    GNNPolicy,
    HeuristicPolicy,
    LSTMPolicy,
    PolicyBundle,
    PolicyConfig,
    UnknownPolicyError,
    create_policy,
    get_policy_class,
    register_policy,
    registered_policies,
)
from esperd.policy.registry import _REGISTRY
from tests.support.observations import mixed_batch


def test_builtin_policies_are_registered() -> None:
    assert {"heuristic", "gnn", "lstm"} <= set(registered_policies())
    assert get_policy_class("gnn") is GNNPolicy
    assert get_policy_class("lstm") is LSTMPolicy
    assert get_policy_class("heuristic") is HeuristicPolicy


@pytest.mark.parametrize("name", ["heuristic", "gnn", "lstm"])
def test_create_policy_builds_a_bundle(name: str) -> None:
    policy = create_policy(name, PolicyConfig(name=name), "cpu")
    assert isinstance(policy, PolicyBundle)
    assert policy.name == name and policy.device == torch.device("cpu")
    assert isinstance(policy.version, int)
    result = policy.act(mixed_batch([3, 5]))
    assert len(result.decisions) == 2 and all(d.policy == name for d in result.decisions)


def test_unknown_name_lists_registered_policies() -> None:
    with pytest.raises(UnknownPolicyError) as info:
        create_policy("transformer-xl", PolicyConfig())
    message = str(info.value)
    assert "transformer-xl" in message
    for name in ("gnn", "heuristic", "lstm"):
        assert name in message


def test_register_custom_policy_and_reject_name_clash() -> None:
    @register_policy("test-constant")
    class Constant(HeuristicPolicy):
        pass

    try:
        assert isinstance(create_policy("test-constant"), Constant)
        assert Constant.name == "test-constant"
        with pytest.raises(ValueError, match="already registered"):

            @register_policy("test-constant")
            class Other(HeuristicPolicy):
                pass
    finally:
        _REGISTRY.pop("test-constant", None)


def test_same_init_seed_gives_same_weights() -> None:
    a = create_policy("gnn", PolicyConfig(name="gnn", init_seed=3)).state_dict()
    b = create_policy("gnn", PolicyConfig(name="gnn", init_seed=3)).state_dict()
    c = create_policy("gnn", PolicyConfig(name="gnn", init_seed=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow  # imports torch.compile's dynamo and inductor
def test_compile_wraps_the_inner_network_not_the_bundle() -> None:
    policy = create_policy("gnn", PolicyConfig(name="gnn", compile=True))
    assert isinstance(policy, GNNPolicy)  # the bundle is untouched
    assert isinstance(policy.network, torch._dynamo.eval_frame.OptimizedModule)
    assert policy.network._orig_mod is policy.base_network
    assert not any(k.startswith("_orig_mod") for k in policy.state_dict())
    plain = create_policy("gnn", PolicyConfig(name="gnn"))
    assert not isinstance(plain.network, torch._dynamo.eval_frame.OptimizedModule)
    heuristic = create_policy("heuristic", PolicyConfig(compile=True))
    assert heuristic.network is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_forward_matches_eager() -> None:
    # Slow on CPU (~30 s cold: inductor compiles C++), but it is the only proof that the
    # compiled path serves the same decisions, so it runs in CI too.
    observations = mixed_batch([3, 8, 12])
    compiled = create_policy("gnn", PolicyConfig(name="gnn", compile=True)).act(
        observations, deterministic=True
    )
    eager = create_policy("gnn", PolicyConfig(name="gnn")).act(observations, deterministic=True)
    assert torch.equal(compiled.actions, eager.actions)
    torch.testing.assert_close(compiled.log_probs, eager.log_probs, atol=1e-5, rtol=1e-5)


def test_network_may_only_be_replaced_by_a_wrapper() -> None:
    policy = create_policy("gnn", PolicyConfig(name="gnn"))
    with pytest.raises(ValueError, match="same module"):
        policy.network = torch.nn.Linear(2, 2)


def test_config_ranges_are_enforced() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        PolicyConfig(hidden_size=32)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"hidden_size": 512}, PolicyConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"hiden_size": 128}, PolicyConfig)  # typo: unknown field
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"heuristic": {"confidence_threshold": 1.5}}, PolicyConfig)
    with pytest.raises(msgspec.ValidationError):  # the observation cannot tell more than 12 epochs
        msgspec.convert({"heuristic": {"train_dwell_epochs": 13}}, PolicyConfig)


def test_config_decodes_from_a_toml_table() -> None:
    table = {
        "name": "gnn",
        "hidden_size": 256,
        "gnn_layers": 4,
        "compile": True,
        "checkpoint": "/var/lib/esperd/policy.safetensors",
        "heuristic": {"blend": "gated", "tempo": "slow", "min_epoch": 5},
    }
    config = msgspec.convert(table, PolicyConfig)
    assert (config.name, config.hidden_size, config.gnn_layers, config.compile) == ("gnn", 256, 4, True)
    assert config.heuristic.blend.value == "gated" and config.heuristic.tempo.epochs == 8
    assert config.fallback == "heuristic" and config.dropout == 0.1
