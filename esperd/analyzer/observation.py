"""What the analyzer hands the policy: one run's graph as arrays.

This module is the contract between `esperd.analyzer` (which fills it) and
`esperd.policy` (which reads it). Arrays are numpy so the analyzer needs no torch;
the policy turns them into tensors without copying (`torch.from_numpy`).

Action space (factored, one decision per run per step):
  node      which layer's seed slot (index into the node arrays), chosen by priority;
  op        an `Op` for that node (WAIT means publish nothing);
  levers    indices into the choice tuples below (LEVERS names them, in action-row order):
            blueprint, blend, tempo, dwell, isolation, lr multiplier with GERMINATE, and
            steepness with GERMINATE and a sigmoid blend; alpha target, speed and curve with
            SET_ALPHA_TARGET. A lever means nothing with any other op: it is 0 in the action row,
            and its log-probability is not counted.
One actionable seed slot per layer (seed_id 0) in wire contract v1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import msgspec
import numpy as np

from esperd_contracts import (
    AlphaCurve,
    AlphaSpeed,
    BlendAlgorithm,
    Blueprint,
    IsolationMode,
    Op,
    SeedStage,
    Tempo,
)

OPS: tuple[Op, ...] = tuple(Op)
BLUEPRINTS: tuple[Blueprint, ...] = tuple(Blueprint)
BLENDS: tuple[BlendAlgorithm, ...] = tuple(BlendAlgorithm)
TEMPOS: tuple[Tempo, ...] = tuple(Tempo)
STAGES: tuple[SeedStage, ...] = tuple(SeedStage)
#: The GERMINATE levers the seed documents add (004), as the wire values each index stands for.
DWELLS: tuple[int, ...] = (1, 2, 3, 5)  # epochs in TRAINING before the host blends by itself
# None: the host's default (by the layer's family, see IsolationMode).
ISOLATIONS: tuple[IsolationMode | None, ...] = (None, IsolationMode.ISOLATED, IsolationMode.SHARED)
LR_MULTIPLIERS: tuple[float, ...] = (0.5, 1.0, 2.0)
STEEPNESSES: tuple[float, ...] = (0.5, 1.0, 2.0)  # of the sigmoid blend
#: SET_ALPHA_TARGET's levers (003's alpha heads).
ALPHA_TARGETS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
ALPHA_SPEEDS: tuple[AlphaSpeed, ...] = tuple(AlphaSpeed)
ALPHA_CURVES: tuple[AlphaCurve, ...] = tuple(AlphaCurve)

#: Every lever of the action row after node and op: (name, its choices), in action-row order.
LEVERS: tuple[tuple[str, tuple[object, ...]], ...] = (
    ("blueprint", BLUEPRINTS),
    ("blend", BLENDS),
    ("tempo", TEMPOS),
    ("dwell", DWELLS),
    ("isolation", ISOLATIONS),
    ("lr_multiplier", LR_MULTIPLIERS),
    ("steepness", STEEPNESSES),
    ("alpha_target", ALPHA_TARGETS),
    ("alpha_speed", ALPHA_SPEEDS),
    ("alpha_curve", ALPHA_CURVES),
)
#: Levers sampled with GERMINATE; STEEPNESS only when the blend is also sigmoid.
GERMINATE_LEVERS: tuple[str, ...] = ("blueprint", "blend", "tempo", "dwell", "isolation", "lr_multiplier")
SIGMOID_LEVERS: tuple[str, ...] = ("steepness",)
#: Levers sampled with SET_ALPHA_TARGET.
ALPHA_LEVERS: tuple[str, ...] = ("alpha_target", "alpha_speed", "alpha_curve")
#: The levers issue 16 added: a policy may leave any of them to the host (PolicyConfig.levers).
OPTIONAL_LEVERS: tuple[str, ...] = (
    "dwell",
    "isolation",
    "lr_multiplier",
    "steepness",
    "alpha_target",
    "alpha_speed",
    "alpha_curve",
)

OP_INDEX = {op: i for i, op in enumerate(OPS)}
BLUEPRINT_INDEX = {bp: i for i, bp in enumerate(BLUEPRINTS)}
BLEND_INDEX = {b: i for i, b in enumerate(BLENDS)}
TEMPO_INDEX = {t: i for i, t in enumerate(TEMPOS)}
STAGE_INDEX = {s: i for i, s in enumerate(STAGES)}
#: Columns of an action row: node, op, then each lever's choice index.
ACTION_FIELDS: tuple[str, ...] = ("node", "op", *(name for name, _ in LEVERS))
ACTION_WIDTH = len(ACTION_FIELDS)
LEVER_COLUMN = {name: 2 + i for i, (name, _) in enumerate(LEVERS)}  # in an action row, after node and op
DWELL_INDEX = {d: i for i, d in enumerate(DWELLS)}
ISOLATION_INDEX = {m: i for i, m in enumerate(ISOLATIONS)}
LR_INDEX = {m: i for i, m in enumerate(LR_MULTIPLIERS)}
STEEPNESS_INDEX = {k: i for i, k in enumerate(STEEPNESSES)}
ALPHA_TARGET_INDEX = {a: i for i, a in enumerate(ALPHA_TARGETS)}
ALPHA_SPEED_INDEX = {a: i for i, a in enumerate(ALPHA_SPEEDS)}
ALPHA_CURVE_INDEX = {a: i for i, a in enumerate(ALPHA_CURVES)}

#: Layer kinds the observation tells apart (one-hot node features), from the wire's free-form
#: `layer_type`; see `layer_kind`.
LAYER_KINDS: tuple[str, ...] = ("conv", "linear", "attention", "mlp", "embedding", "norm", "pool", "other")
LAYER_KIND_INDEX = {kind: i for i, kind in enumerate(LAYER_KINDS)}
_KIND_OF_TYPE = {
    "linear": "linear",
    "dense": "linear",
    "fc": "linear",
    "attention": "attention",
    "self_attention": "attention",
    "transformer": "attention",
    "mlp": "mlp",
    "ffn": "mlp",
    "feedforward": "mlp",
    "embedding": "embedding",
    "layernorm": "norm",
    "batchnorm": "norm",
    "norm": "norm",
    "rmsnorm": "norm",
    "pool": "pool",
    "residual": "conv",
}


def layer_kind(layer_type: str) -> str:
    """The LAYER_KINDS entry of a wire `layer_type` (conv*, linear, attention, mlp, ...; else other)."""
    kind = layer_type.lower()
    if kind.startswith("conv"):
        return "conv"
    return _KIND_OF_TYPE.get(kind, "other")


#: Per-node feature columns, in order. All roughly in [-1, 1] or [0, 1].
NODE_FEATURES: tuple[str, ...] = (
    "health",  # latest health score
    "health_ewma",
    "health_trend",  # least-squares slope per signal over the window, clipped to [-1, 1]
    "activation_variance",  # log1p-scaled
    "dead_neuron_ratio",
    "avg_correlation",
    "latency_ms",  # log1p of milliseconds
    "error_rate",  # min(error_count / 10, 1)
    "seed_utilization",  # active / max(total, 1)
    "is_problematic",
    "needs_attention",
    "in_cluster",  # member of a problem cluster of size >= 2
    "gradient_norm",  # log1p-scaled
    "seed_gradient_ratio",  # clipped to [0, 1]
    "alpha",
    "epochs_in_stage",  # / 12, clipped
    "blending_velocity",
    "log_params",  # log10(params + 1) / 10
    "family_cnn",  # 1 for CNN-family layers, 0 for transformer-family
    "counterfactual",  # seed's latest counterfactual contribution (accuracy units), clipped
    "total_improvement",  # since germination, clipped
    "staleness",  # seconds since the last signal / 60, clipped to [0, 1]
    *(f"stage_{s.value}" for s in STAGES),  # one-hot of the slot's stage
    *(f"kind_{kind}" for kind in LAYER_KINDS),  # one-hot of the layer's kind
    # The counterfactual in units of its standard error (mean over the epochs on probation over
    # the error from the validation size and the epoch-to-epoch spread), / 4, clipped: |z| >= 2
    # (0.5 here) is a contribution that is more than noise. 0 outside probation.
    "counterfactual_z",
    # 004's lever telemetry (issue 16; the health signal's fields of the same names, defined in
    # esperd_contracts.HealthSignal). Norms and variances are squashed as x / (1 + x) into [0, 1).
    "g2_headroom",  # clipped to [-1, 1]
    "gradient_stability",  # squashed
    "host_gradient_via_seed",  # squashed
    "coadaptation_delta",  # a cosine, in [-1, 1]
    "seed_loss_gradient",  # squashed
    "seed_weight_magnitude",  # squashed
    "lr_stability_ratio",  # in [0, 1]; 0 without a seed
    "alpha_variance",  # squashed
    # The state packet's counterfactuals at alpha 25/50/75/100 % (accuracy units), clipped; 0
    # until the blend reaches the milestone.
    "counterfactual_alpha25",
    "counterfactual_alpha50",
    "counterfactual_alpha75",
    "counterfactual_alpha100",
    # Seed document 001's per-layer analysis (issue 16 item 5; esperd.analyzer.analysis defines
    # each): performance trends, stability, readiness for a germination, topology context.
    "latency_variance",  # squared coefficient of variation of the latency, clipped to [0, 1]
    "throughput_trend",  # EWMA of the relative change in throughput per signal, clipped
    "stability",  # in (0, 1]
    "readiness",  # in [0, 1]; 0 where GERMINATE is not legal now
    "depth",  # longest path from an input / 32, clipped
    "position",  # depth / the deepest layer's depth
    "upstream_health",  # mean health of the direct predecessors (default health without any)
    "downstream_health",  # ... of the direct successors
    # Seed document 004's base features (issue 16 item 4): which blueprint occupies the slot
    # (one-hot over BLUEPRINTS; all 0 for an empty slot), from state packets and applied GERMINATEs.
    *(f"blueprint_{bp.value}" for bp in BLUEPRINTS),
)
#: The lever telemetry columns, in the order of NODE_FEATURES (and of HealthSignal's fields).
LEVER_TELEMETRY: tuple[str, ...] = (
    "g2_headroom",
    "gradient_stability",
    "host_gradient_via_seed",
    "coadaptation_delta",
    "seed_loss_gradient",
    "seed_weight_magnitude",
    "lr_stability_ratio",
    "alpha_variance",
)
#: The milestone counterfactual columns (SeedSlotState's fields of the same names).
MILESTONE_FEATURES: tuple[str, ...] = (
    "counterfactual_alpha25",
    "counterfactual_alpha50",
    "counterfactual_alpha75",
    "counterfactual_alpha100",
)
#: Scale of the `counterfactual_z` feature.
COUNTERFACTUAL_Z_SCALE = 4.0
NODE_FEATURE_INDEX = {name: i for i, name in enumerate(NODE_FEATURES)}

#: Global (per-run) feature columns, in order.
GLOBAL_FEATURES: tuple[str, ...] = (
    "epoch",  # / 100, clipped
    "train_loss",  # log1p
    "val_loss",  # log1p
    "train_accuracy",
    "val_accuracy",
    "val_accuracy_delta",  # change since the previous state packet
    "plateau_epochs",  # epochs without val improvement / 10, clipped
    "overall_health",  # seed-count-weighted mean health
    "problematic_fraction",
    "cluster_count",  # / 10, clipped
    "param_growth",  # total_params / host_params - 1, clipped to [0, 1]
    "active_seed_fraction",
    "log_nodes",  # log10(n_nodes + 1) / 4
    "inferred_topology",  # 1 while no TopologyPacket has arrived
    "budget_known",  # 1 when the host reports its planned total epochs
    "epochs_remaining",  # epochs still to train after this packet / 50, clipped; 1 when unknown
    # Seed document 004's base features (issue 16 item 4), from the state packets.
    "global_step",  # log10(global_step + 1) / 7, clipped
    "loss_delta",  # val loss change since the previous packet, clipped to [-1, 1]
    "best_val_accuracy",  # the best so far (0 before any packet)
    "best_val_loss",  # log1p of the lowest so far (0 before any packet)
    # The last HISTORY packets' val loss (log1p) and val accuracy, newest first, 0 where fewer.
    *(f"loss_history_{k}" for k in range(5)),
    *(f"accuracy_history_{k}" for k in range(5)),
    # The packet's free-form `metrics` map, hashed by key (crc32 % METRIC_BUCKETS) into buckets:
    # each the mean of its keys' sign(v) * log1p(|v|) / 10, clipped to [-1, 1] (0 when empty). A
    # host's keys are fixed, so each lands in the same bucket every packet.
    *(f"metric_bucket_{k}" for k in range(8)),
    "metrics_count",  # keys in the map / 16, clipped
    # The packet's `hardware`, where given: 1 when it is, and its utilizations and memory sizes
    # (memory as log1p(GB) / 7, clipped).
    "hardware_known",
    "gpu_utilization",
    "gpu_memory",
    "cpu_utilization",
    "host_memory",
)
#: How many past packets the loss and accuracy histories hold, and how many metric buckets.
HISTORY = 5
METRIC_BUCKETS = 8
#: Scale of the `epochs_remaining` feature (a policy inverts it to whole epochs).
EPOCHS_REMAINING_SCALE = 50.0
GLOBAL_FEATURE_INDEX = {name: i for i, name in enumerate(GLOBAL_FEATURES)}


class Observation(msgspec.Struct, frozen=True):
    """One run's state, ready for a policy. Shapes: N nodes, E edges, E' = E + N."""

    run_id: str
    topology_version: int  # bumps whenever the graph (and so the GCN adjacency) changes
    layer_ids: np.ndarray  # int64 [N]; node i is layer layer_ids[i]
    node_features: np.ndarray  # float32 [N, len(NODE_FEATURES)]
    edge_index: np.ndarray  # int64 [2, E], node indices (not layer ids), directed src -> dst
    gcn_edge_index: np.ndarray  # int64 [2, E'], symmetrized with self loops
    gcn_edge_weight: np.ndarray  # float32 [E'], D^-1/2 (A + I) D^-1/2, cached per topology version
    global_features: np.ndarray  # float32 [len(GLOBAL_FEATURES)]
    op_mask: np.ndarray  # bool [N, len(OPS)]; WAIT always True; legal ops by stage and layer kind
    blueprint_mask: np.ndarray  # bool [N, len(BLUEPRINTS)]; blueprints fitting the layer's family
    stages: np.ndarray  # int64 [N], index into STAGES
    epoch: int = 0
    timestamp: float = 0.0

    @property
    def num_nodes(self) -> int:
        return int(self.layer_ids.shape[0])


def epochs_left(obs: Observation) -> int | None:
    """Whole epochs the run trains after this observation, read back from its features (capped at
    EPOCHS_REMAINING_SCALE); None when the host does not say how long it trains."""
    g = obs.global_features
    if g.size <= GLOBAL_FEATURE_INDEX["epochs_remaining"] or g[GLOBAL_FEATURE_INDEX["budget_known"]] < 0.5:
        return None
    return round(float(g[GLOBAL_FEATURE_INDEX["epochs_remaining"]]) * EPOCHS_REMAINING_SCALE)


def counted_levers(op: Op, blend: int) -> tuple[str, ...]:
    """The levers an action with `op` (and blend index `blend`) samples: the only ones whose
    choice means anything, is sent, and counts in its log-probability."""
    if op is Op.GERMINATE:
        sigmoid = blend == BLEND_INDEX[BlendAlgorithm.SIGMOID]
        return GERMINATE_LEVERS + SIGMOID_LEVERS if sigmoid else GERMINATE_LEVERS
    if op is Op.SET_ALPHA_TARGET:
        return ALPHA_LEVERS
    return ()


class LeverFields(TypedDict, total=False):
    """The lever fields of a command (AdaptationCommand's and Decision's names)."""

    blueprint: Blueprint
    blend: BlendAlgorithm
    tempo: Tempo
    dwell_epochs: int
    isolation: IsolationMode | None
    lr_multiplier: float
    steepness: float
    alpha_target: float
    alpha_speed: AlphaSpeed
    alpha_curve: AlphaCurve


def lever_values(op: Op, row: Sequence[int], levers: frozenset[str] | None = None) -> LeverFields:
    """The wire fields (AdaptationCommand names) an action row with `op` carries: the levers the
    op samples, at the choices the row's indices name. `levers`: the optional levers the policy
    sets (None: all); the others are left out (the host's default), but for SET_ALPHA_TARGET's
    target, which a host needs: without the lever it is 1.0, a full blend."""
    on = OPTIONAL_LEVERS if levers is None else levers
    col = LEVER_COLUMN
    if op is Op.GERMINATE:
        out: LeverFields = {
            "blueprint": BLUEPRINTS[row[col["blueprint"]]],
            "blend": BLENDS[row[col["blend"]]],
            "tempo": TEMPOS[row[col["tempo"]]],
        }
        if "dwell" in on:
            out["dwell_epochs"] = DWELLS[row[col["dwell"]]]
        if "isolation" in on:
            out["isolation"] = ISOLATIONS[row[col["isolation"]]]
        if "lr_multiplier" in on:
            out["lr_multiplier"] = LR_MULTIPLIERS[row[col["lr_multiplier"]]]
        if "steepness" in on and "steepness" in counted_levers(op, row[col["blend"]]):
            out["steepness"] = STEEPNESSES[row[col["steepness"]]]
        return out
    if op is Op.SET_ALPHA_TARGET:
        out = {"alpha_target": ALPHA_TARGETS[row[col["alpha_target"]]] if "alpha_target" in on else 1.0}
        if "alpha_speed" in on:
            out["alpha_speed"] = ALPHA_SPEEDS[row[col["alpha_speed"]]]
        if "alpha_curve" in on:
            out["alpha_curve"] = ALPHA_CURVES[row[col["alpha_curve"]]]
        return out
    return {}
