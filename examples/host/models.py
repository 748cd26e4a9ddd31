"""Host models made of Blocks: a layer esperd sees is one Block, optionally with a seed slot.

    DigitsCNN         stem -> block1 -> block2 (+ block1, a residual skip) -> pool -> block3
                      -> fc -> head; seed slots on stem, block1, block2, block3 (CNN family)
                      and fc (a linear layer: transformer-family seeds fit it).
    TinyTransformer   embed -> [x + attn1(x)] -> [x + mlp1(x)] -> [x + attn2(x)] -> [x + mlp2(x)]
                      -> head; pre-norm residual branches, seed slots on the branches (any
                      number of blocks; a mean-pooled or a per-position head).
    StudentMLP        fc1 -> fc2 -> ... -> head on feature vectors; seed slots on the hidden
                      layers (linear: transformer-family seeds fit them).

Residual adds sit outside the Blocks on purpose, so the torch.fx topology shows the
skip connections as edges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from esperd_contracts import Blueprint, family_for_layer_type
from esperd_examples.host.blueprints import ALL_SEEDS, SeedFactory
from esperd_examples.host.slot import SeedSlot


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
    """A small residual CNN for 8x8 digits (~37k parameters at width 16, ~9.7k at 8).

    `width` is the stem's channel count; block1 and block2 have twice, block3 and fc four
    times as many. A fractional width rounds each layer's channels, so parameter counts
    between two integer widths can be reached (`esperd_examples.host.tasks` solves for one).
    """

    def __init__(
        self,
        width: float = 16,
        classes: int = 10,
        *,
        registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS,
        cooldown_epochs: int = 2,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        w1, w2, w4 = (max(1, round(k * width)) for k in (1, 2, 4))

        def slot(i: int, n: str, kind: str, c: int) -> SeedSlot:
            return _slot(i, n, kind, c, registry, cooldown_epochs)

        self.stem = Block(_conv_bn_relu(1, w1), slot(0, "stem", "conv", w1))
        self.block1 = Block(_conv_bn_relu(w1, w2), slot(1, "block1", "conv", w2))
        self.block2 = Block(_conv_bn_relu(w2, w2), slot(2, "block2", "conv", w2))
        self.pool = Block(nn.MaxPool2d(2))
        self.block3 = Block(_conv_bn_relu(w2, w4), slot(4, "block3", "conv", w4))
        self.fc = Block(nn.Sequential(nn.Linear(w4, w4), nn.ReLU()), slot(5, "fc", "linear", w4))
        self.head = Block(nn.Linear(w4, classes))
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
    """Pre-norm MLP branch (`hidden` units; 2x `dim` by default)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden if hidden is not None else 2 * dim
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

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
    """Pre-norm transformer blocks over short token sequences (~20k parameters by default).

    `blocks` attention + MLP pairs (layers attn1, mlp1, attn2, mlp2, ...), each a seed slot.
    `per_token` classifies every position (logits [B, classes, T], the layout
    `F.cross_entropy` takes) instead of the mean-pooled sequence ([B, classes]).
    """

    def __init__(
        self,
        vocab: int = 8,
        length: int = 12,
        dim: int = 32,
        classes: int = 8,
        *,
        blocks: int = 2,
        heads: int = 4,
        mlp_hidden: int | None = None,
        per_token: bool = False,
        registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS,
        cooldown_epochs: int = 2,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        hidden = mlp_hidden if mlp_hidden is not None else 2 * dim

        def slot(i: int, n: str, kind: str) -> SeedSlot:
            return _slot(i, n, kind, dim, registry, cooldown_epochs)

        self.per_token = per_token
        self.embed = Block(Embedding(vocab, length, dim))
        specs: list[tuple[str, str, Block]] = [("embed", "embedding", self.embed)]
        self.branches = nn.ModuleList()
        for b in range(1, blocks + 1):
            attn = Block(AttentionBranch(dim, heads), slot(len(specs), f"attn{b}", "attention"))
            specs.append((f"attn{b}", "attention", attn))
            mlp = Block(MlpBranch(dim, hidden=hidden), slot(len(specs), f"mlp{b}", "mlp"))
            specs.append((f"mlp{b}", "mlp", mlp))
            self.branches.extend([attn, mlp])
        self.head = Block(TokenHead(dim, classes) if per_token else PoolHead(dim, classes))
        specs.append(("head", "linear", self.head))
        self._register_layers(specs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for branch in self.branches:
            x = x + branch(x)
        out = self.head(x)
        return out.transpose(1, 2) if self.per_token else out


class TokenHead(nn.Module):
    """Final norm and a linear classifier at every position ([B, T, classes])."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class StudentMLP(HostModel):
    """A plain ReLU MLP on feature vectors: fc1 .. fcN (seed slots, linear kind), then head.

    `widths` are the hidden layers' sizes, so one layer can be made the narrow one.
    """

    def __init__(
        self,
        features: int,
        widths: Sequence[int],
        classes: int,
        *,
        registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS,
        cooldown_epochs: int = 2,
    ) -> None:
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"hidden widths must be positive, got {list(widths)}")
        self.hidden = nn.ModuleList()
        specs: list[tuple[str, str, Block]] = []
        previous = features
        for i, width in enumerate(widths):
            name = f"fc{i + 1}"
            layer = nn.Sequential(nn.Linear(previous, width), nn.ReLU())
            block = Block(layer, _slot(i, name, "linear", width, registry, cooldown_epochs))
            self.hidden.append(block)
            specs.append((name, "linear", block))
            previous = width
        self.head = Block(nn.Linear(previous, classes))
        specs.append(("head", "linear", self.head))
        self._register_layers(specs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.hidden:
            x = block(x)
        return self.head(x)


def build_model(
    task: str,
    classes: int,
    *,
    width: float = 16,
    depth: int | None = None,
    registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS,
    cooldown_epochs: int = 2,
) -> HostModel:
    """The reference model for `task`; `width` and `depth` mean, per task:

    digits    DigitsCNN, `width` stem channels (fractional: rounded per layer); fixed depth.
    sequence  TinyTransformer (d=32, two blocks) for majority tokens; width and depth ignored.
    sort      TinyTransformer, per-position head: d = `width` rounded to a multiple of its two
              heads, MLP hidden round(2 x width); `depth` blocks (default 2).
    teacher   StudentMLP on 8 features: `depth` hidden layers (default 3) of round(width) units.
    """
    kw = {"registry": registry, "cooldown_epochs": cooldown_epochs}
    if task == "digits":
        return DigitsCNN(width, classes, **kw)
    if task == "sequence":
        return TinyTransformer(classes=classes, **kw)
    if task == "sort":
        heads = 2
        dim = heads * max(1, round(width / heads))
        return TinyTransformer(
            vocab=classes,
            length=8,
            dim=dim,
            classes=classes,
            blocks=depth if depth is not None else 2,
            heads=heads,
            mlp_hidden=max(1, round(2 * width)),
            per_token=True,
            **kw,
        )
    if task == "teacher":
        layers = depth if depth is not None else 3
        return StudentMLP(8, [max(1, round(width))] * layers, classes, **kw)
    raise ValueError(f"unknown task {task!r} (digits | sequence | sort | teacher)")
