"""Enumerations shared by hosts and esperd. Wire values are lower-case strings."""

from __future__ import annotations

import enum


class SeedStage(enum.Enum):
    """Lifecycle stage of a seed slot."""

    DORMANT = "dormant"
    GERMINATED = "germinated"
    TRAINING = "training"
    BLENDING = "blending"
    PROBATIONARY = "probationary"
    FOSSILIZED = "fossilized"
    PRUNED = "pruned"


class Op(enum.Enum):
    """An adaptation operation. WAIT is a decision that publishes no command."""

    WAIT = "wait"
    GERMINATE = "germinate"
    ADVANCE = "advance"
    SET_ALPHA_TARGET = "set_alpha_target"
    FOSSILIZE = "fossilize"
    PRUNE = "prune"


class BlueprintFamily(enum.Enum):
    """Which kind of host layer a blueprint fits."""

    CNN = "cnn"
    TRANSFORMER = "transformer"


class Blueprint(enum.Enum):
    """Seed module architectures. The prefix names the family they fit."""

    CONV_LIGHT = "conv_light"
    CONV_HEAVY = "conv_heavy"
    DEPTHWISE = "depthwise"
    BOTTLENECK = "bottleneck"
    SQUEEZE_EXCITE = "squeeze_excite"
    CONV_NORM = "conv_norm"
    CONV_LORA = "conv_lora"
    DILATED = "dilated"
    ATTENTION = "attention"
    MLP = "mlp"
    MLP_SMALL = "mlp_small"
    LORA = "lora"
    LORA_LARGE = "lora_large"
    FLEX_ATTENTION = "flex_attention"
    TF_NORM = "tf_norm"
    GATED_MLP = "gated_mlp"

    @property
    def family(self) -> BlueprintFamily:
        return _TRANSFORMER_BLUEPRINTS_FAMILY.get(self, BlueprintFamily.CNN)


_TRANSFORMER_BLUEPRINTS_FAMILY = {
    bp: BlueprintFamily.TRANSFORMER
    for bp in (
        Blueprint.ATTENTION,
        Blueprint.MLP,
        Blueprint.MLP_SMALL,
        Blueprint.LORA,
        Blueprint.LORA_LARGE,
        Blueprint.FLEX_ATTENTION,
        Blueprint.TF_NORM,
        Blueprint.GATED_MLP,
    )
}


class BlendAlgorithm(enum.Enum):
    """How alpha ramps from 0 to 1 while a seed is blended in."""

    LINEAR = "linear"
    SIGMOID = "sigmoid"
    GATED = "gated"


class Tempo(enum.Enum):
    """Blend length; `epochs` is how many epochs BLENDING lasts."""

    FAST = "fast"
    STANDARD = "standard"
    SLOW = "slow"
    GLACIAL = "glacial"

    @property
    def epochs(self) -> int:
        return _TEMPO_EPOCHS[self]


_TEMPO_EPOCHS = {Tempo.FAST: 3, Tempo.STANDARD: 5, Tempo.SLOW: 8, Tempo.GLACIAL: 12}


class IsolationMode(enum.Enum):
    """Whether the host receives gradient through the seed path while the seed blends.

    Absent from a command (None), the host picks by topology: ISOLATED for CNN layers, SHARED
    (co-adaptation) for transformer layers, as the seed documents' default."""

    ISOLATED = "isolated"
    SHARED = "shared"


class AlphaSpeed(enum.Enum):
    """How fast SET_ALPHA_TARGET moves alpha to its target; `epochs` is how many epochs the move
    takes (0: at once, on the next step)."""

    INSTANT = "instant"
    FAST = "fast"
    STANDARD = "standard"
    SLOW = "slow"

    @property
    def epochs(self) -> int:
        return _ALPHA_SPEED_EPOCHS[self]


_ALPHA_SPEED_EPOCHS = {AlphaSpeed.INSTANT: 0, AlphaSpeed.FAST: 1, AlphaSpeed.STANDARD: 3, AlphaSpeed.SLOW: 5}


class AlphaCurve(enum.Enum):
    """The shape of SET_ALPHA_TARGET's move from the alpha in force to the target."""

    LINEAR = "linear"
    COSINE = "cosine"
    SIGMOID = "sigmoid"


class AckStatus(enum.Enum):
    """What a host did with a command."""

    APPLIED = "applied"
    REJECTED = "rejected"


class Channel(enum.Enum):
    """The last token of a run subject."""

    TOPOLOGY = "topology"
    HEALTH = "health"
    STATE = "state"
    COMMAND = "command"
    ACK = "ack"


_CNN_LAYER_TYPES = frozenset({"conv", "conv1d", "conv2d", "conv3d", "pool", "batchnorm", "residual"})
_TRANSFORMER_LAYER_TYPES = frozenset({"attention", "transformer", "mlp", "embedding", "layernorm", "ffn"})


def family_for_layer_type(layer_type: str) -> BlueprintFamily:
    """The blueprint family that fits a layer kind (CNN for convolutional, else transformer).

    Plain `linear` layers count as transformer family: MLP and LoRA seeds fit them.
    """
    kind = layer_type.lower()
    if kind in _CNN_LAYER_TYPES or kind.startswith("conv"):
        return BlueprintFamily.CNN
    return BlueprintFamily.TRANSFORMER


def blueprints_for(family: BlueprintFamily) -> tuple[Blueprint, ...]:
    """Blueprints of one family, in declaration order."""
    return tuple(bp for bp in Blueprint if bp.family is family)
