"""Policies register by name; one factory builds them from config.

torch.compile, when configured, wraps the bundle's inner nn.Module (never the
bundle, which is not a Module and holds Python-side state such as locks and
per-run memory).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

import torch

from esperd.policy.base import PolicyBundle
from esperd.policy.config import HeuristicConfig, PolicyConfig

__all__ = [
    "HeuristicConfig",
    "PolicyConfig",
    "UnknownPolicyError",
    "create_policy",
    "get_policy_class",
    "register_policy",
    "registered_policies",
]

#: name -> bundle class; a class is called as cls(config, device).
_REGISTRY: dict[str, type] = {}
_BUILTIN_MODULES = (
    "esperd.policy.heuristic",
    "esperd.policy.gnn",
    "esperd.policy.lstm",
    "esperd.policy.random",
)

T = TypeVar("T", bound=type)


class UnknownPolicyError(KeyError):
    """No policy is registered under that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def register_policy(name: str) -> Callable[[T], T]:
    """Class decorator: make a bundle class available to `create_policy(name, ...)`."""

    def decorator(cls: T) -> T:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"policy name {name!r} is already registered to {existing.__qualname__}")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def registered_policies() -> tuple[str, ...]:
    """Names `create_policy` accepts, sorted."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def get_policy_class(name: str) -> type:
    """The bundle class registered under `name`; UnknownPolicyError lists the known names."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownPolicyError(f"unknown policy {name!r}; registered policies: {known}") from None


def create_policy(
    name: str, config: PolicyConfig | None = None, device: torch.device | str = "cpu"
) -> PolicyBundle:
    """Build the policy `name` on `device`; compile its inner network when `config.compile`."""
    config = config if config is not None else PolicyConfig(name=name)
    bundle = get_policy_class(name)(config, torch.device(device))
    network = getattr(bundle, "network", None)
    if config.compile and network is not None:
        # dynamic=True: node and edge counts change with every batch.
        bundle.network = torch.compile(network, mode=config.compile_mode, dynamic=True)
    return bundle
