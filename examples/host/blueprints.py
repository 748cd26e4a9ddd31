"""Seed modules: one small nn.Module per `esperd_contracts.Blueprint`.

A seed maps a host layer's output to a tensor of the same shape; the slot adds it as
`host + alpha * seed(host)`. CNN-family seeds take [B, C, H, W]; transformer-family
seeds take [..., D] (attention ones treat a [B, D] input as a length-1 sequence), so
they also fit plain linear layers, as the contracts' `family_for_layer_type` says.
Low-rank and gated seeds start at zero output (LoRA-style init) so that switching
them on cannot disturb the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from esperd_contracts import Blueprint

SeedFactory = Callable[[int], nn.Module]


class UnsupportedBlueprint(ValueError):
    """A blueprint this host has no module for."""


# ------------------------------------------------------------------ CNN family


def _conv(cin: int, cout: int, kernel: int = 3, **kwargs: object) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, padding=kwargs.pop("padding", kernel // 2), **kwargs)  # type: ignore[arg-type]


class SqueezeExcite(nn.Module):
    """Channel re-weighting: x * tanh(MLP(avgpool(x))); tanh so it can add or remove."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tanh(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * scale[:, :, None, None]


def _low_rank_conv(channels: int, rank: int = 4) -> nn.Module:
    down = nn.Conv2d(channels, rank, 1, bias=False)
    up = nn.Conv2d(rank, channels, 1, bias=False)
    nn.init.zeros_(up.weight)
    return nn.Sequential(down, up)


def _bottleneck(channels: int) -> nn.Module:
    hidden = max(channels // 4, 1)
    return nn.Sequential(
        _conv(channels, hidden, 1), nn.ReLU(), _conv(hidden, hidden, 3), nn.ReLU(), _conv(hidden, channels, 1)
    )


CNN_SEEDS: dict[Blueprint, SeedFactory] = {
    Blueprint.CONV_LIGHT: lambda c: _conv(c, c, 3, bias=False),
    Blueprint.CONV_HEAVY: lambda c: nn.Sequential(_conv(c, c), nn.BatchNorm2d(c), nn.ReLU(), _conv(c, c)),
    Blueprint.DEPTHWISE: lambda c: nn.Sequential(_conv(c, c, 3, groups=c, bias=False), _conv(c, c, 1)),
    Blueprint.BOTTLENECK: _bottleneck,
    Blueprint.SQUEEZE_EXCITE: SqueezeExcite,
    Blueprint.CONV_NORM: lambda c: nn.Sequential(_conv(c, c, 3, bias=False), nn.BatchNorm2d(c)),
    Blueprint.CONV_LORA: _low_rank_conv,
    Blueprint.DILATED: lambda c: _conv(c, c, 3, padding=2, dilation=2),
}

# ---------------------------------------------------------- transformer family


def _as_sequence(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """[B, D] -> ([B, 1, D], True); [B, T, D] unchanged."""
    return (x.unsqueeze(1), True) if x.dim() == 2 else (x, False)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention over the sequence (a [B, D] input is one token)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, _heads(dim), batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, squeezed = _as_sequence(x)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return out.squeeze(1) if squeezed else out


class SdpaAttention(nn.Module):
    """FLEX_ATTENTION's stand-in: fused QKV + F.scaled_dot_product_attention (no score mod)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = _heads(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, squeezed = _as_sequence(x)
        b, t, d = seq.shape
        q, k, v = self.qkv(seq).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        y = self.out(y)
        return y.squeeze(1) if squeezed else y


class LowRank(nn.Module):
    """LoRA: x -> B(A x), B initialised to zero."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, min(rank, dim), bias=False)
        self.up = nn.Linear(min(rank, dim), dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class GatedMlp(nn.Module):
    """SwiGLU: W3 (silu(W1 x) * W2 x)."""

    def __init__(self, dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, expansion * dim)
        self.w2 = nn.Linear(dim, expansion * dim)
        self.w3 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def _heads(dim: int) -> int:
    return next(h for h in (4, 2, 1) if dim % h == 0)


def _mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


TRANSFORMER_SEEDS: dict[Blueprint, SeedFactory] = {
    Blueprint.ATTENTION: SelfAttention,
    Blueprint.FLEX_ATTENTION: SdpaAttention,
    Blueprint.MLP: lambda d: _mlp(d, 4 * d),
    Blueprint.MLP_SMALL: lambda d: _mlp(d, max(d // 2, 4)),
    Blueprint.LORA: lambda d: LowRank(d, 8),
    Blueprint.LORA_LARGE: lambda d: LowRank(d, 32),
    Blueprint.TF_NORM: nn.LayerNorm,
    Blueprint.GATED_MLP: GatedMlp,
}

#: Every blueprint this host implements (all sixteen of the contracts).
ALL_SEEDS: Mapping[Blueprint, SeedFactory] = {**CNN_SEEDS, **TRANSFORMER_SEEDS}


def build_seed(
    blueprint: Blueprint, width: int, registry: Mapping[Blueprint, SeedFactory] = ALL_SEEDS
) -> nn.Module:
    """A fresh seed module of `width` channels/features; UnsupportedBlueprint if not in `registry`."""
    factory = registry.get(blueprint)
    if factory is None:
        raise UnsupportedBlueprint(f"blueprint {blueprint.value} is not implemented by this host")
    return factory(width)


class Gate(nn.Module):
    """GATED blending's learned gate: per-sample alpha factor in (0, 1) from pooled features."""

    def __init__(self, width: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(width // reduction, 1)
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] | [B, T, D] | [B, D] -> a gate broadcastable against x."""
        if x.dim() == 4:
            return self.net(x.mean(dim=(2, 3)))[:, :, None, None]
        if x.dim() == 3:
            return self.net(x.mean(dim=1))[:, None, :]
        return self.net(x)
