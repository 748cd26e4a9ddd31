"""Which torch device `esperd train` runs on."""

from __future__ import annotations

import torch

from esperd.train.spec import TrainError


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when available, else the CPU; `cuda` without a GPU is a TrainError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainError(f"bad --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available (torch {torch.__version__})")
    return device
