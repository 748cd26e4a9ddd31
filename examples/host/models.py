"""Host models made of Blocks: a layer esperd sees is one Block, optionally with a seed slot.

    DigitsCNN         stem -> block1 -> block2 (+ block1, a residual skip) -> pool -> block3
                      -> fc -> head; seed slots on stem, block1, block2, block3 (CNN family)
                      and fc (a linear layer: transformer-family seeds fit it).
    TinyTransformer   embed -> [x + attn1(x)] -> [x + mlp1(x)] -> [x + attn2(x)] -> [x + mlp2(x)]
                      -> head; pre-norm residual branches, seed slots on the four branches.

Residual adds sit outside the Blocks on purpose, so the torch.fx topology shows the
skip connections as edges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from contracts import Blueprint, family_for_layer_type
from examples.host.blueprints import ALL_SEEDS, SeedFactory
from examples.host.slot import SeedSlot


class Block(nn.Module):
    """One host layer: `host` module, then an optional seed slot on its output.

    `dead_fraction` is fault injection for demos and tests: that share of the layer's
    units (channels / features) is zeroed, like units that died during training.
    """

    def __init__(self, host: nn.Module, slot: SeedSlot | None = None) -> None:
        super().__init__()
        self.host = host
        self.slot = slot
        self.dead_fraction = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)
        if self.dead_fraction > 0.0:
            h = h * self._fault_mask(h)
        return self.slot(h) if self.slot is not None else h

    def _fault_mask(self, h: torch.Tensor) -> torch.Tensor:
        dim = 1 if h.dim() == 4 else -1  # channels of a conv map, features otherwise
        units = h.shape[dim]
        alive = torch.arange(units, device=h.device) >= round(self.dead_fraction * units)
        shape = [1] * h.dim()
        shape[dim] = units
        return alive.view(shape).to(h.dtype)

    def host_parameters(self) -> list[nn.Parameter]:
        return list(self.host.parameters())


@dataclass(frozen=True, slots=True)
class Layer:
    """A layer as esperd sees it: id, name, kind and the Block that computes it."""

    layer_id: int
    name: str
    layer_type: str
    block: Block

    @property
    def slot(self) -> SeedSlot | None:
        return self.block.slot


class HostModel(nn.Module):
    """Base of the reference hosts: `layers` in id order, seed slots, parameter counts."""

    layers: list[Layer]

    def _register_layers(self, specs: list[tuple[str, str, Block]]) -> None:
        self.layers = [Layer(i, name, kind, block) for i, (name, kind, block) in enumerate(specs)]

    @property
    def slots(self) -> list[SeedSlot]:
        return [layer.slot for layer in self.layers if layer.slot is not None]

    def layer(self, layer_id: int) -> Layer | None:
        return self.layers[layer_id] if 0 <= layer_id < len(self.layers) else None

    def layer_named(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {[layer.name for layer in self.layers]}")

    def seed_param_count(self) -> int:
        return sum(slot.seed_param_count() for slot in self.slots)

    def total_param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def host_param_count(self) -> int:
        return self.total_param_count() - self.seed_param_count()

    def host_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.block.host_parameters()]


def _slot(
    layer_id: int,
    name: str,
    layer_type: str,
    width: int,
    registry: Mapping[Blueprint, SeedFactory],
    cooldown: int,
) -> SeedSlot:
    family = family_for_layer_type(layer_type)
    return SeedSlot(layer_id, name, width, family, registry=registry, cooldown_epochs=cooldown)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(HostModel):
    """A small residual CNN for 8x8 digits (~37k parameters)."""

    def __init__(
        self,
        width: int = 16,
        classes: int = 10,
        *,
        registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS,
        cooldown_epochs: int = 2,
    ) -> None:
        super().__init__()
        w, slot = width, lambda i, n, kind, c: _slot(i, n, kind, c, registry, cooldown_epochs)
        self.stem = Block(_conv_bn_relu(1, w), slot(0, "stem", "conv", w))
        self.block1 = Block(_conv_bn_relu(w, 2 * w), slot(1, "block1", "conv", 2 * w))
        self.block2 = Block(_conv_bn_relu(2 * w, 2 * w), slot(2, "block2", "conv", 2 * w))
        self.pool = Block(nn.MaxPool2d(2))
        self.block3 = Block(_conv_bn_relu(2 * w, 4 * w), slot(4, "block3", "conv", 4 * w))
        self.fc = Block(nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU()), slot(5, "fc", "linear", 4 * w))
        self.head = Block(nn.Linear(4 * w, classes))
        self._register_layers([
            ("stem", "conv", self.stem), ("block1", "conv", self.block1), ("block2", "conv", self.block2),
            ("pool", "pool", self.pool), ("block3", "conv", self.block3), ("fc", "linear", self.fc),
            ("head", "linear", self.head),
        ])  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.block1(self.stem(x))
        x2 = self.block2(x1) + x1  # the residual skip: block1 -> pool bypasses block2
        x = self.block3(self.pool(x2))
        return self.head(self.fc(x.mean(dim=(2, 3))))


class Embedding(nn.Module):
    """Token plus learned position embedding."""

    def __init__(self, vocab: int, length: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.randn(length, dim) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokens(tokens) + self.positions[: tokens.shape[1]]


class AttentionBranch(nn.Module):
    """Pre-norm self-attention branch (the residual add is the caller's)."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.attn(h, h, h, need_weights=False)[0]


class MlpBranch(nn.Module):
    """Pre-norm MLP branch."""

    def __init__(self, dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PoolHead(nn.Module):
    """Final norm, mean over the sequence, linear classifier."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x).mean(dim=1))


class TinyTransformer(HostModel):
    """Two pre-norm transformer blocks over short token sequences (~20k parameters)."""

    def __init__(
        self,
        vocab: int = 8,
        length: int = 12,
        dim: int = 32,
        classes: int = 8,
        *,
        registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS,
        cooldown_epochs: int = 2,
    ) -> None:
        super().__init__()

        def slot(i: int, n: str, kind: str) -> SeedSlot:
            return _slot(i, n, kind, dim, registry, cooldown_epochs)

        self.embed = Block(Embedding(vocab, length, dim))
        self.attn1 = Block(AttentionBranch(dim), slot(1, "attn1", "attention"))
        self.mlp1 = Block(MlpBranch(dim), slot(2, "mlp1", "mlp"))
        self.attn2 = Block(AttentionBranch(dim), slot(3, "attn2", "attention"))
        self.mlp2 = Block(MlpBranch(dim), slot(4, "mlp2", "mlp"))
        self.head = Block(PoolHead(dim, classes))
        self._register_layers([
            ("embed", "embedding", self.embed),
            ("attn1", "attention", self.attn1), ("mlp1", "mlp", self.mlp1),
            ("attn2", "attention", self.attn2), ("mlp2", "mlp", self.mlp2),
            ("head", "linear", self.head),
        ])  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.attn1(x)
        x = x + self.mlp1(x)
        x = x + self.attn2(x)
        x = x + self.mlp2(x)
        return self.head(x)


def build_model(
    task: str,
    classes: int,
    *,
    width: int = 16,
    registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS,
    cooldown_epochs: int = 2,
) -> HostModel:
    """The reference model for `task` (digits | sequence); `width` is the CNN's stem channels."""
    if task == "digits":
        return DigitsCNN(width, classes, registry=registry, cooldown_epochs=cooldown_epochs)
    if task == "sequence":
        return TinyTransformer(classes=classes, registry=registry, cooldown_epochs=cooldown_epochs)
    raise ValueError(f"unknown task {task!r} (digits | sequence)")
