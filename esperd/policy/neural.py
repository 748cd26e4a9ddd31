"""Shared plumbing of the learnable bundles: collate, forward, distribution, decisions.

Subclasses build the inner network and say how to run it on a GraphBatch; this
class owns locking, eval-mode serving, inference_mode, and the act/evaluate
contract (evaluate(obs, act.actions, act.hidden).log_probs == act.log_probs).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from esperd.analyzer.observation import Observation
from esperd.policy.base import ACTION_WIDTH, ActResult, EvalResult, decisions_from_lists
from esperd.policy.batch import (
    GraphBatch,
    PackedGraphs,
    TopologyCache,
    collate,
    lever_held_choices,
    lever_logits_mask,
)
from esperd.policy.config import PolicyConfig
from esperd.policy.heads import FactoredDistribution, SampledActions, counted_lever_mask, sample_actions


def unwrap(module: nn.Module) -> nn.Module:
    """The original module behind a torch.compile wrapper (or the module itself)."""
    return getattr(module, "_orig_mod", module)


def layer_init(layer: nn.Linear, std: float = 2**0.5) -> nn.Linear:
    """Orthogonal weights, zero bias (CleanRL's init: small std for policy heads)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def covering_sequences(sequences: Sequence[Sequence[int]], count: int) -> list[list[int]]:
    """`sequences` (checked: indices in range, each at most once), plus every index of
    range(count) they leave out as a sequence of its own."""
    seen = [False] * count
    out = []
    for seq in sequences:
        if not seq:
            continue
        for i in seq:
            if not 0 <= i < count or seen[i]:
                raise ValueError(f"sequences must name each step in [0, {count}) at most once; got {i}")
            seen[i] = True
        out.append([int(i) for i in seq])
    out += [[i] for i, taken in enumerate(seen) if not taken]
    return out


class _EvalMode:
    """Eval mode for the block; nothing to do (no module walk) when already in eval mode.
    A class rather than a contextlib generator: it is entered on every act."""

    __slots__ = ("module", "was_training")

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.was_training = self.module.training
        if self.was_training:
            self.module.eval()

    def __exit__(self, *exc: object) -> None:
        if self.was_training:
            self.module.train(True)


class NeuralPolicyBundle:
    """Base of the torch policies. Subclasses implement `_build_network` and `_forward`."""

    name: str = ""
    is_learnable = True
    is_recurrent = False
    runs_inline = False  # a forward pass must not stall ingest: it runs on the policy thread
    #: PolicyConfig fields that decide weight shapes / forward semantics (checked on checkpoint load).
    architecture_fields: tuple[str, ...] = ()
    #: Whether `_forward` reads `batch.adjacency` (collate skips building it otherwise).
    uses_adjacency = False

    def __init__(self, config: PolicyConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self._version = 0
        self._lock = threading.RLock()
        with torch.random.fork_rng(devices=[]):
            if config.init_seed is not None:
                torch.manual_seed(config.init_seed)
            network = self._build_network(config)
        self._network: nn.Module = network.to(self.device).eval()
        self._base_network = self._network  # the network setter only accepts wrappers of it
        self.levers = frozenset(config.levers)
        self._lever_mask = lever_logits_mask(self.levers)
        # act's single-run batches reuse what collate derives from a run's topology.
        self._topologies = TopologyCache(
            self.device, adjacency=self.uses_adjacency, lever_mask=self._lever_mask
        )

    # ------------------------------------------------------------ subclass API

    def _build_network(self, config: PolicyConfig) -> nn.Module:
        raise NotImplementedError

    def _forward(
        self, batch: GraphBatch, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(node head outputs [N_total, NODE_HEAD_DIM], values [B], new hidden or None)."""
        raise NotImplementedError

    def _forward_sequences(
        self, batch: GraphBatch, hidden: torch.Tensor | None, sequences: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(node head outputs, values) of steps unrolled along `sequences` (recurrent policies; a
        feed-forward one has nothing to unroll: each step on its own)."""
        node_out, values, _ = self._forward(batch, hidden)
        return node_out, values

    def _hidden_for_act(
        self, observations: Sequence[Observation], hidden: torch.Tensor | None
    ) -> torch.Tensor | None:
        return None

    def _hidden_for_evaluate(self, batch_size: int, hidden: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def _remember(self, observations: Sequence[Observation], hidden: torch.Tensor | None) -> None:
        pass

    # ------------------------------------------------------------ properties

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        self._version = int(value)

    @property
    def network(self) -> nn.Module:
        """The inner network, possibly torch.compile'd. The factory may replace it."""
        return self._network

    @network.setter
    def network(self, module: nn.Module) -> None:
        if unwrap(module) is not unwrap(self._network):
            raise ValueError("network may only be replaced by a wrapper of the same module")
        self._network = module

    @property
    def base_network(self) -> nn.Module:
        """The uncompiled module (owner of the parameters and the state dict keys)."""
        return self._base_network

    # ------------------------------------------------------------ serving

    def act(
        self,
        observations: Sequence[Observation],
        deterministic: bool = False,
        hidden: torch.Tensor | None = None,
    ) -> ActResult:
        """One decision per observation, from one forward pass over the whole batch."""
        with self._lock:
            version = self._version
            batch = collate(
                observations,
                self.device,
                adjacency=self.uses_adjacency,
                cache=self._topologies,
                lever_mask=self._lever_mask,
            )
            with _EvalMode(self.base_network), torch.inference_mode():
                hidden_in = self._hidden_for_act(observations, hidden)
                node_out, values, hidden_out = self._forward(batch, hidden_in)
            self._remember(observations, hidden_out)
        # Outside inference_mode, so the results are normal tensors that callers (recorder,
        # learner) may use in autograd.
        sampled = sample_actions(batch, node_out, deterministic)
        return self._act_result(observations, sampled, values, version, hidden_in)

    def _act_result(
        self,
        observations: Sequence[Observation],
        sampled: SampledActions,
        values: torch.Tensor,
        version: int,
        hidden_in: torch.Tensor | None,
    ) -> ActResult:
        """act's tensors and Decisions from what it sampled: one tensor for the four float
        columns, whose float32 values the Decisions carry (so they say exactly what the
        tensors say), and one for the actions."""
        scores = torch.tensor(
            [sampled.log_probs, sampled.confidences, sampled.urgencies, values.tolist()], dtype=torch.float32
        )
        log_probs, confidences, urgencies, value_list = scores.tolist()
        log_prob_t, confidence_t, urgency_t, value_t = scores.unbind()
        return ActResult(
            actions=torch.tensor(sampled.actions, dtype=torch.int64),
            log_probs=log_prob_t,
            values=value_t,
            confidences=confidence_t,
            urgencies=urgency_t,
            decisions=decisions_from_lists(
                observations,
                sampled.actions,
                confidences=confidences,
                urgencies=urgencies,
                log_probs=log_probs,
                values=value_list,
                policy=self.name,
                version=version,
                levers=self.levers,
            ),
            hidden=None if hidden_in is None else hidden_in.to("cpu", copy=True),
        )

    # ------------------------------------------------------------ learning

    def pack(self, observations: Sequence[Observation]) -> PackedGraphs:
        """The observations collated once, for `evaluate` on `select`ions of them (a learner's
        minibatches, each then a few index operations instead of a collate)."""
        return PackedGraphs(
            observations, self.device, adjacency=self.uses_adjacency, lever_mask=self._lever_mask
        )

    def evaluate(
        self,
        observations: Sequence[Observation] | GraphBatch,
        actions: torch.Tensor,
        hidden: torch.Tensor | None = None,
        sequences: Sequence[Sequence[int]] | None = None,
    ) -> EvalResult:
        """log p(actions), values and entropy, with gradients, in the network's current mode.

        `observations` may come collated already (a `pack(...).select(...)`, or `collate` with
        this policy's lever mask). `sequences` (recurrent policies): lists of indices into
        `observations` that are consecutive steps of one run, in order; each is unrolled from
        the `hidden` of its first step (backpropagation through time), and a step in none of
        them replays on its own."""
        if isinstance(observations, GraphBatch):
            batch = observations
        else:
            batch = collate(
                observations,
                self.device,
                adjacency=self.uses_adjacency,
                lever_mask=self._lever_mask,
                training=torch.is_grad_enabled(),
            )
        size = batch.num_graphs
        actions = actions.to(self.device, torch.int64)
        if actions.shape != (size, ACTION_WIDTH):
            raise ValueError(f"actions must be [B, {ACTION_WIDTH}] for B={size}, got {tuple(actions.shape)}")
        with self._lock:
            hidden_in = self._hidden_for_evaluate(size, hidden)
            if sequences is None or not self.is_recurrent:
                node_out, values, _ = self._forward(batch, hidden_in)
            else:
                node_out, values = self._forward_sequences(
                    batch, hidden_in, covering_sequences(sequences, size)
                )
        dist = FactoredDistribution(batch, node_out)
        return EvalResult(log_probs=dist.log_prob(actions), values=values, entropy=dist.entropy())

    def distribution(
        self, observations: Sequence[Observation], hidden: torch.Tensor | None = None
    ) -> FactoredDistribution:
        """The action distribution for a batch, without sampling or touching recurrent state."""
        batch = self._collate(observations)
        with self._lock:
            node_out, _, _ = self._forward(batch, self._hidden_for_evaluate(len(observations), hidden))
        return FactoredDistribution(batch, node_out)

    def held_levers(self, actions: torch.Tensor) -> torch.Tensor:
        """Action rows with every lever this policy leaves to the host set to the choice its head
        is held at, where the row's op samples it (another policy's actions, made learnable)."""
        held = lever_held_choices(self.levers)
        if not held:
            return actions
        out = actions.clone()
        counted = counted_lever_mask(out)
        for column, choice in held.items():
            lever = column - 2  # levers follow node and op
            out[:, column] = torch.where(counted[:, lever], choice, out[:, column])
        return out

    def _collate(self, observations: Sequence[Observation]) -> GraphBatch:
        return collate(observations, self.device, adjacency=self.uses_adjacency, lever_mask=self._lever_mask)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached snapshot of the weights (uncompiled key names)."""
        with self._lock:
            return {k: v.detach().clone() for k, v in self.base_network.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> None:
        """Replace the weights (strict), and the version if given, atomically w.r.t. act."""
        with self._lock:
            self.base_network.load_state_dict(dict(state), strict=True)
            if version is not None:
                self._version = int(version)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.base_network.parameters()

    def train(self, mode: bool = True) -> NeuralPolicyBundle:
        """Train mode (dropout on) for `evaluate`; `act` always runs in eval mode."""
        with self._lock:
            self._network.train(mode)
        return self

    def eval(self) -> NeuralPolicyBundle:
        return self.train(False)

    def forget(self, run_ids: Sequence[str]) -> None:
        """Drop the runs' cached topology (a feed-forward policy has no other per-run memory)."""
        with self._lock:
            self._topologies.forget(run_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self._version}, device={self.device})"
