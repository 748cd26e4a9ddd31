"""The simulator's fixed tables: layer kinds, blueprint sizes and hidden qualities, tempo/blend risks.

Everything here is hidden from the policy except what the wire carries (layer kinds and
sizes in the topology, blueprint family through the masks). The tables are what makes
decisions matter: which layers a seed can help, which blueprint helps most for its size,
and how much blending speed costs in stability.
"""

from __future__ import annotations

import numpy as np

from esperd.analyzer.observation import BLENDS, BLUEPRINTS, TEMPOS
from esperd.sim.config import ARCHITECTURES, KINDS
from esperd_contracts import BlendAlgorithm, Blueprint, BlueprintFamily, Tempo, family_for_layer_type

KIND_INDEX = {kind: i for i, kind in enumerate(KINDS)}
CONV, POOL, ATTENTION, MLP, EMBEDDING, LINEAR = range(len(KINDS))

#: Kinds a seed can repair (the only ones that ever get a capacity deficit).
HELPABLE = np.array([True, False, True, True, False, False])
KIND_FAMILY_CNN = np.array([family_for_layer_type(k) is BlueprintFamily.CNN for k in KINDS])
#: Parameter ranges per kind (host layer sizes).
KIND_PARAMS: dict[int, tuple[int, int]] = {
    CONV: (12_000, 80_000),
    POOL: (0, 0),
    ATTENTION: (30_000, 70_000),
    MLP: (60_000, 140_000),
    EMBEDDING: (20_000, 60_000),
    LINEAR: (5_000, 20_000),
}
#: Seeds on tiny or parameter-free layers are sized against at least this many parameters.
MIN_SEED_REFERENCE = 16_000

# ---------------------------------------------------------------- blueprints

#: Seed parameters as a fraction of the layer's, per blueprint (in BLUEPRINTS order).
_PARAM_RATIO = {
    Blueprint.CONV_LIGHT: 0.10,
    Blueprint.CONV_HEAVY: 0.60,
    Blueprint.DEPTHWISE: 0.06,
    Blueprint.BOTTLENECK: 0.20,
    Blueprint.SQUEEZE_EXCITE: 0.04,
    Blueprint.CONV_NORM: 0.01,
    Blueprint.CONV_LORA: 0.05,
    Blueprint.DILATED: 0.30,
    Blueprint.ATTENTION: 0.20,
    Blueprint.MLP: 0.60,
    Blueprint.MLP_SMALL: 0.15,
    Blueprint.LORA: 0.04,
    Blueprint.LORA_LARGE: 0.15,
    Blueprint.FLEX_ATTENTION: 0.40,
    Blueprint.TF_NORM: 0.01,
    Blueprint.GATED_MLP: 0.50,
}
#: Mean repair quality (fraction of a layer's deficit a mature seed recovers) on conv,
#: attention and mlp layers. Hidden from the policy; each layer adds its own noise.
#: The declaration-order favourites (CONV_LIGHT, ATTENTION) are mediocre on purpose.
_AFFINITY = {  # (conv, attention, mlp)
    Blueprint.CONV_LIGHT: (0.50, 0.0, 0.0),
    Blueprint.CONV_HEAVY: (0.90, 0.0, 0.0),
    Blueprint.DEPTHWISE: (0.75, 0.0, 0.0),
    Blueprint.BOTTLENECK: (0.85, 0.0, 0.0),
    Blueprint.SQUEEZE_EXCITE: (0.55, 0.0, 0.0),
    Blueprint.CONV_NORM: (0.15, 0.0, 0.0),
    Blueprint.CONV_LORA: (0.60, 0.0, 0.0),
    Blueprint.DILATED: (0.70, 0.0, 0.0),
    Blueprint.ATTENTION: (0.0, 0.60, 0.35),
    Blueprint.MLP: (0.0, 0.40, 0.85),
    Blueprint.MLP_SMALL: (0.0, 0.35, 0.60),
    Blueprint.LORA: (0.0, 0.70, 0.65),
    Blueprint.LORA_LARGE: (0.0, 0.80, 0.75),
    Blueprint.FLEX_ATTENTION: (0.0, 0.85, 0.30),
    Blueprint.TF_NORM: (0.0, 0.20, 0.20),
    Blueprint.GATED_MLP: (0.0, 0.35, 0.90),
}

PARAM_RATIO = np.array([_PARAM_RATIO[bp] for bp in BLUEPRINTS])
BLUEPRINT_FAMILY_CNN = np.array([bp.family is BlueprintFamily.CNN for bp in BLUEPRINTS])
#: [kind, blueprint] mean quality; 0 for kinds a seed cannot repair.
AFFINITY = np.zeros((len(KINDS), len(BLUEPRINTS)))
for _j, _bp in enumerate(BLUEPRINTS):
    AFFINITY[CONV, _j], AFFINITY[ATTENTION, _j], AFFINITY[MLP, _j] = _AFFINITY[_bp]
AFFINITY.flags.writeable = False
#: A seed on a layer it cannot repair interferes: accuracy cost at full alpha, plus this per unit ratio.
INTERFERENCE_BASE = 0.006
INTERFERENCE_PER_RATIO = 0.02

# ---------------------------------------------------------------- tempo and blend

#: BLENDING epochs per tempo (TEMPOS order).
TEMPO_EPOCHS = np.array([t.epochs for t in TEMPOS])
#: Chance per blending epoch that the blend destabilizes training, before size/maturity factors.
_SPIKE_RATE = {Tempo.FAST: 0.25, Tempo.STANDARD: 0.08, Tempo.SLOW: 0.025, Tempo.GLACIAL: 0.01}
SPIKE_RATE = np.array([_SPIKE_RATE[t] for t in TEMPOS])
#: Smoother blends destabilize less; a gate costs parameters.
_BLEND_RISK = {BlendAlgorithm.LINEAR: 1.0, BlendAlgorithm.SIGMOID: 0.75, BlendAlgorithm.GATED: 0.5}
BLEND_RISK = np.array([_BLEND_RISK[b] for b in BLENDS])
GATE_PARAM_RATIO = 0.02
LINEAR_BLEND, SIGMOID_BLEND, GATED_BLEND = (BLENDS.index(b) for b in BlendAlgorithm)
#: Seed size at which the size factor of instability is 1 (bigger seeds are riskier).
SPIKE_SIZE_REFERENCE = 0.15
#: An alpha jump of 1 (ADVANCE or SET_ALPHA_TARGET mid-blend) destabilizes with this chance times size.
JUMP_SPIKE_RATE = 0.6


def size_factor(ratio: np.ndarray) -> np.ndarray:
    """Instability multiplier for seeds of this relative size, in [0.25, 3]."""
    return np.clip(ratio / SPIKE_SIZE_REFERENCE, 0.25, 3.0)


def sigmoid_shape(progress: np.ndarray, steepness: np.ndarray | float = 1.0) -> np.ndarray:
    """The host's S-curve with steepness k (examples/host/blending.py), rescaled to hit 0 and 1."""
    p = np.clip(progress, 0.0, 1.0)
    k = np.asarray(steepness, dtype=float)
    s = 1.0 / (1.0 + np.exp(-(p - 0.5) * 12.0 * k))
    s0, s1 = 1.0 / (1.0 + np.exp(6.0 * k)), 1.0 / (1.0 + np.exp(-6.0 * k))
    return np.asarray((s - s0) / (s1 - s0))


def blend_alpha(blend: np.ndarray, progress: np.ndarray, steepness: np.ndarray | float = 1.0) -> np.ndarray:
    """Alpha after `progress` (epochs in blend / tempo epochs, in [0, 1]) of each blend schedule.

    linear ramps evenly; sigmoid follows the host's S-curve (steepness k, 1 by default), rescaled
    to hit 0 and 1 exactly; gated behaves like a smoothstep (the gate opens as the seed proves
    itself).
    """
    p = np.clip(progress, 0.0, 1.0)
    sigmoid = sigmoid_shape(p, steepness)
    smooth = p * p * (3.0 - 2.0 * p)
    return np.where(blend == SIGMOID_BLEND, sigmoid, np.where(blend == GATED_BLEND, smooth, p))


def peak_slope(steepness: np.ndarray | float) -> np.ndarray:
    """The sigmoid shape's steepest slope (at progress 1/2): 12k/4 over the rescaling span."""
    k = np.asarray(steepness, dtype=float)
    return np.asarray(3.0 * k / (1.0 / (1.0 + np.exp(-6.0 * k)) - 1.0 / (1.0 + np.exp(6.0 * k))))


#: SET_ALPHA_TARGET curves (observation.ALPHA_CURVES order: linear, cosine, sigmoid).
LINEAR_CURVE, COSINE_CURVE, SIGMOID_CURVE = range(3)


def alpha_curve(curve: np.ndarray, progress: np.ndarray, steepness: np.ndarray | float = 1.0) -> np.ndarray:
    """Fraction of a SET_ALPHA_TARGET move done after `progress` of it: linear, cosine
    ((1 - cos(pi p)) / 2) or the sigmoid shape at the seed's steepness (the host's curves)."""
    p = np.clip(progress, 0.0, 1.0)
    cosine = (1.0 - np.cos(np.pi * p)) / 2.0
    return np.where(
        curve == SIGMOID_CURVE, sigmoid_shape(p, steepness), np.where(curve == COSINE_CURVE, cosine, p)
    )


# ---------------------------------------------------------------- architectures


def build_architecture(
    arch: str, num_layers: int, rng: np.random.Generator
) -> tuple[list[int], list[tuple[int, int]]]:
    """Layer kinds and directed edges (chain plus residual skips) of a host with `num_layers` layers.

    cnn: conv stem, conv blocks, pool, linear head; transformer: embedding, alternating
    attention/mlp, linear head; hybrid: conv stem and blocks, then attention/mlp, linear head;
    mlp: a stack of linear layers.
    Every block gets a skip edge around it, so skips always exist.
    """
    body = num_layers - 2  # minus stem/embedding and head
    if arch == "cnn":
        kinds = [CONV] + [CONV] * (body - 1) + [POOL, LINEAR]
    elif arch == "transformer":
        kinds = [EMBEDDING] + [ATTENTION if i % 2 == 0 else MLP for i in range(body)] + [LINEAR]
    elif arch == "hybrid":
        convs = max(1, body // 2)
        kinds = (
            [CONV]
            + [CONV] * convs
            + [ATTENTION if i % 2 == 0 else MLP for i in range(body - convs)]
            + [LINEAR]
        )
    elif arch == "mlp":
        kinds = [LINEAR] * num_layers
    else:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    n = len(kinds)
    edges = [(i, i + 1) for i in range(n - 1)]
    # Residual connections around blocks: from a block's input to the layer after it.
    edges += [
        (i - 1, i + 1) for i in range(1, n - 1) if kinds[i] in (CONV, ATTENTION, MLP, LINEAR) and i % 2 == 1
    ]
    if rng.random() < 0.5 and n >= 5:  # some hosts also have a long skip (e.g. a U-Net-like bridge)
        edges.append((1, n - 2))
    return kinds, sorted(set(edges))
