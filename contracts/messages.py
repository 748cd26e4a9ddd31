"""Wire messages (Esper's "Leyline"). msgspec Structs tagged by `kind`.

Every field a person typing JSON could not know has a default, so
`{"kind":"health","layer_id":3,"health_score":0.2}` is a whole message.
Ranges are enforced at decode time; non-finite floats are out of every range.
The static bounds here are hard caps; esperd applies tighter configured limits.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from esperd_contracts.enums import (
    AckStatus,
    AlphaCurve,
    AlphaSpeed,
    BlendAlgorithm,
    Blueprint,
    IsolationMode,
    Op,
    SeedStage,
    Tempo,
)

SCHEMA_VERSION = 1

# Hard caps: a message beyond these is rejected whatever esperd's config says.
MAX_NODES = 65_536
MAX_EDGES = 262_144
MAX_SIGNALS = 65_536
MAX_METRICS = 256
MAX_SEEDS = 4_096
MAX_NAME = 256
MAX_REASON = 1_024

_BIG = 1e300  # NaN and +-inf fall outside [-_BIG, _BIG], which is how they are refused.

Finite = Annotated[float, Meta(ge=-_BIG, le=_BIG)]
NonNeg = Annotated[float, Meta(ge=0.0, le=_BIG)]
Unit = Annotated[float, Meta(ge=0.0, le=1.0)]
Correlation = Annotated[float, Meta(ge=-1.0, le=1.0)]
Id = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Count = Annotated[int, Meta(ge=0, le=2**62)]
Name = Annotated[str, Meta(max_length=MAX_NAME)]
Reason = Annotated[str, Meta(max_length=MAX_REASON)]
MetricKey = Annotated[str, Meta(min_length=1, max_length=64)]
Version = Annotated[int, Meta(ge=1, le=1_000)]
CommandId = Annotated[str, Meta(min_length=1, max_length=64)]
RunId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


# Definitions of the lever telemetry (seed document 004; issue 16), shown in the JSON Schemas.
G2_THRESHOLD = 0.10  # 004's G2 gate: DEFAULT_GRADIENT_RATIO_THRESHOLD
G2_HEADROOM = (
    "004's g2_gate_headroom: seed_gradient_ratio minus the G2 gate's threshold (0.10); "
    "negative while the seed's gradient is below it."
)
GRADIENT_STABILITY = (
    "004's training_gradient_stability: the variance of the seed's gradient norm (L2 over its "
    "parameters) across its recent measurements (the reference host: its last 16 probed steps "
    "since germination). Large: an erratic seed, which a longer dwell may settle."
)
HOST_GRADIENT_VIA_SEED = (
    "004's host_gradient_norm_via_seed: the L2 norm of the loss gradient that reaches the layer's "
    "output through the seed's path; 0 while the seed's input is detached (isolated)."
)
COADAPTATION_DELTA = (
    "004's co-adaptation signal per step, to first order (its '(acc with coadapt) - (acc without)' "
    "needs two trainings): the cosine between the gradient reaching the layer's output through the "
    "seed's path and the one reaching it directly, in [-1, 1]. Positive: the seed pulls the host "
    "the way the loss does; negative: it interferes; 0 when isolated."
)
SEED_LOSS_GRADIENT = (
    "004's seed_loss_gradient: |d(loss)/d(seed params)|, the L2 norm over the seed's parameters."
)
SEED_WEIGHT_MAGNITUDE = "004's seed_weight_magnitude: the L2 norm of the seed's parameters (a gate included)."
LR_STABILITY_RATIO = (
    "004's lr_stability_ratio: epochs without a gradient explosion / epochs the seed trained, "
    "an explosion being a non-finite seed gradient norm or one above 10x the median of its "
    "earlier ones. 1: a steady seed; 0: no seed (unknown)."
)
ALPHA_VARIANCE = (
    "004's alpha_variance: the variance of the effective blend weight across the batch's samples "
    "(a GATED blend varies per sample; 0 for schedule-only blends and outside a blend)."
)
MILESTONE = (
    "004's contribution at alpha milestones: the counterfactual with alpha at {}% (validation "
    "accuracy with the seed at that alpha minus with alpha 0), measured once, when the blend first "
    "reaches it. Absent (null): not reached yet."
)


class _Message(msgspec.Struct, tag_field="kind", omit_defaults=True, kw_only=True):
    """Base of every wire message. `v` is the schema version of its kind (absent means 1).

    Subclasses are kw_only too, so `v` stays the first field of the positional msgpack
    form and new fields (always with defaults) are appended at the end: an older
    host's shorter array still decodes.
    """

    v: Version = SCHEMA_VERSION


# ----------------------------------------------------------------- topology


class TopologyNode(msgspec.Struct, omit_defaults=True):
    """One layer of the host model."""

    layer_id: Id
    name: Name = ""
    layer_type: Name = "linear"
    params: Count = 0
    seed_slots: Annotated[int, Meta(ge=0, le=MAX_SEEDS)] = 1


class TopologyPacket(_Message, tag="topology", kw_only=True):
    """The host model's layer graph; `edges` are directed (src, dst) pairs, skips included."""

    nodes: Annotated[list[TopologyNode], Meta(max_length=MAX_NODES)] = []
    edges: Annotated[list[tuple[Id, Id]], Meta(max_length=MAX_EDGES)] = []
    topology_version: Count = 0
    timestamp: NonNeg = 0.0


# ------------------------------------------------------------------- health


class HealthSignal(_Message, tag="health", kw_only=True):
    """Health of one layer (and its seed slot) at one moment."""

    layer_id: Id
    health_score: Unit
    seed_id: Id = 0
    activation_variance: NonNeg = 0.0
    dead_neuron_ratio: Unit = 0.0
    avg_correlation: Correlation = 0.0
    execution_latency_us: NonNeg = 0.0
    error_count: Count = 0
    active_seeds: Count = 0
    total_seeds: Count = 0
    timestamp: NonNeg = 0.0
    # Enhanced telemetry (levers document).
    gradient_norm: NonNeg = 0.0
    seed_gradient_ratio: NonNeg = 0.0
    seed_stage: SeedStage = SeedStage.DORMANT
    alpha: Unit = 0.0
    epochs_in_stage: Count = 0
    blending_velocity: Finite = 0.0
    # Lever telemetry (issue 16, seed document 004), appended with defaults so older hosts still
    # decode; each about slot `seed_id`'s seed, 0 where there is none or the host does not measure
    # it. The definitions travel in the JSON Schema as the fields' descriptions.
    g2_headroom: Annotated[Finite, Meta(description=G2_HEADROOM)] = 0.0
    gradient_stability: Annotated[NonNeg, Meta(description=GRADIENT_STABILITY)] = 0.0
    host_gradient_via_seed: Annotated[NonNeg, Meta(description=HOST_GRADIENT_VIA_SEED)] = 0.0
    coadaptation_delta: Annotated[Correlation, Meta(description=COADAPTATION_DELTA)] = 0.0
    seed_loss_gradient: Annotated[NonNeg, Meta(description=SEED_LOSS_GRADIENT)] = 0.0
    seed_weight_magnitude: Annotated[NonNeg, Meta(description=SEED_WEIGHT_MAGNITUDE)] = 0.0
    lr_stability_ratio: Annotated[Unit, Meta(description=LR_STABILITY_RATIO)] = 0.0
    alpha_variance: Annotated[NonNeg, Meta(description=ALPHA_VARIANCE)] = 0.0


class HealthBatch(_Message, tag="health_batch", kw_only=True):
    """Many layers' health in one message (one per training step)."""

    signals: Annotated[list[HealthSignal], Meta(max_length=MAX_SIGNALS)] = []
    timestamp: NonNeg = 0.0


# -------------------------------------------------------------------- state


class HardwareContext(msgspec.Struct, omit_defaults=True):
    """Where the host trains; all optional."""

    device: Name = ""
    gpu_utilization: Unit = 0.0
    gpu_memory_gb: NonNeg = 0.0
    cpu_utilization: Unit = 0.0
    host_memory_gb: NonNeg = 0.0


class SeedSlotState(msgspec.Struct, omit_defaults=True, array_like=True):
    """One seed slot's state. Encoded as an array (field order is the wire order)
    to keep state packets small: hosts write these, people rarely type them."""

    layer_id: Id
    stage: SeedStage = SeedStage.DORMANT
    blueprint: Blueprint | None = None
    alpha: Unit = 0.0
    epochs_in_stage: Count = 0
    params: Count = 0
    counterfactual: Finite = 0.0
    total_improvement: Finite = 0.0
    seed_id: Id = 0
    # Appended (issue 16): 004's "contribution at alpha milestones".
    counterfactual_alpha25: Annotated[Finite, Meta(description=MILESTONE.format(25))] | None = None
    counterfactual_alpha50: Annotated[Finite, Meta(description=MILESTONE.format(50))] | None = None
    counterfactual_alpha75: Annotated[Finite, Meta(description=MILESTONE.format(75))] | None = None
    counterfactual_alpha100: Annotated[Finite, Meta(description=MILESTONE.format(100))] | None = None


class SystemStatePacket(_Message, tag="state", kw_only=True):
    """The run's training state, once per epoch (or more often)."""

    epoch: Count = 0
    global_step: Count = 0
    train_loss: NonNeg = 0.0
    train_accuracy: Unit = 0.0
    val_loss: NonNeg = 0.0
    val_accuracy: Unit = 0.0
    metrics: Annotated[dict[MetricKey, Finite], Meta(max_length=MAX_METRICS)] = {}
    hardware: HardwareContext | None = None
    seeds: Annotated[list[SeedSlotState], Meta(max_length=MAX_SEEDS)] = []
    host_params: Count = 0
    total_params: Count = 0
    timestamp: NonNeg = 0.0
    done: bool = False
    # Appended in v1 (optional; 0 means unknown). The training budget: after the packet for
    # `epoch` (counted from 0) the run trains `total_epochs - epoch - 1` more epochs, so esperd
    # does not start a seed that cannot finish its lifecycle.
    total_epochs: Count = 0
    # How many samples `val_accuracy` and the seeds' counterfactuals are measured on: it sets
    # how large a difference must be before esperd treats it as more than noise.
    val_samples: Count = 0


# ---------------------------------------------------------------- commands


class AdaptationCommand(_Message, tag="command", kw_only=True):
    """A decision esperd publishes to `esper.<run>.command`."""

    command_id: CommandId
    run_id: RunId
    layer_id: Id
    op: Op
    confidence: Unit = 0.0
    urgency: Unit = 0.0
    policy: Name = ""
    policy_version: Count = 0
    issued_at: NonNeg = 0.0
    seed_id: Id = 0
    # GERMINATE levers (absent: the host's default). `dwell_epochs`: epochs in TRAINING after
    # which the host starts blending by itself (absent: it waits for ADVANCE); `isolation`: see
    # IsolationMode; `lr_multiplier`: the seed's LR relative to the host's; `steepness`: of the
    # sigmoid blend (and of a sigmoid alpha curve later), only meaningful with blend "sigmoid".
    blueprint: Blueprint | None = None
    blend: BlendAlgorithm | None = None
    tempo: Tempo | None = None
    dwell_epochs: Annotated[int, Meta(ge=0, le=1_000)] | None = None
    isolation: IsolationMode | None = None
    lr_multiplier: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    steepness: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    # SET_ALPHA_TARGET: where alpha goes (required), and how: `alpha_speed` and `alpha_curve`
    # (appended below; absent: over the rest of the blend's tempo, along the blend's own shape).
    alpha_target: Unit | None = None
    reason: Reason = ""
    # Ownership epoch (a fencing token): which lease the sending instance held on the run when it
    # decided. Epochs only grow; a host ignores a command older than the newest it has seen for its
    # run (an instance that lost the run while frozen). 0: sent without a lease (a single instance).
    epoch: Count = 0
    # SET_ALPHA_TARGET levers, appended (see alpha_target above).
    alpha_speed: AlphaSpeed | None = None
    alpha_curve: AlphaCurve | None = None
    # GERMINATE, appended: the most parameters the new seed may add (what is left of esperd's
    # parameter budget for the run, `[rails] param_budget`). Only the host knows a blueprint's
    # size on its layer, so it enforces this: a seed that would be larger is rejected, with its
    # size in the reason. 0: no limit.
    max_seed_params: Count = 0


class CommandAck(_Message, tag="ack", kw_only=True):
    """A host's answer to a command."""

    command_id: CommandId
    status: AckStatus
    reason: Reason = ""
    layer_id: Id | None = None
    timestamp: NonNeg = 0.0


#: Everything a host may send to esperd.
Inbound = TopologyPacket | HealthSignal | HealthBatch | SystemStatePacket | CommandAck
#: Every wire message.
AnyMessage = TopologyPacket | HealthSignal | HealthBatch | SystemStatePacket | AdaptationCommand | CommandAck


def kind_of(message: msgspec.Struct | type[msgspec.Struct]) -> str:
    """The `kind` tag a message (or message class) carries on the wire, e.g. "health"."""
    tag = message.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{message!r} has no string tag")
    return tag


MESSAGE_TYPES: tuple[type[_Message], ...] = (
    TopologyPacket,
    HealthSignal,
    HealthBatch,
    SystemStatePacket,
    AdaptationCommand,
    CommandAck,
)
