"""esper wire contracts: messages, enums, lifecycle, subjects and codec.

Imports neither torch nor nats, so any training host can depend on it cheaply.
"""

from __future__ import annotations

from contracts.codec import JSON, MSGPACK, Codec, CodecError, is_json
from contracts.enums import (
    AckStatus,
    BlendAlgorithm,
    Blueprint,
    BlueprintFamily,
    Channel,
    IsolationMode,
    Op,
    SeedStage,
    Tempo,
    blueprints_for,
    family_for_layer_type,
)
from contracts.lifecycle import AUTOMATIC, LEGAL_OPS, TRANSITIONS, is_legal, next_stage
from contracts.messages import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    AdaptationCommand,
    AnyMessage,
    CommandAck,
    HardwareContext,
    HealthBatch,
    HealthSignal,
    Inbound,
    SeedSlotState,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
    kind_of,
)
from contracts.subjects import (
    DEFAULT_PREFIX,
    REJECTED_SUBJECT,
    STATUS_SUBJECT,
    SubjectError,
    parse_subject,
    run_subject,
    wildcard_subject,
)

__all__ = [
    "AUTOMATIC",
    "DEFAULT_PREFIX",
    "JSON",
    "LEGAL_OPS",
    "MESSAGE_TYPES",
    "MSGPACK",
    "REJECTED_SUBJECT",
    "SCHEMA_VERSION",
    "STATUS_SUBJECT",
    "TRANSITIONS",
    "AckStatus",
    "AdaptationCommand",
    "AnyMessage",
    "BlendAlgorithm",
    "Blueprint",
    "BlueprintFamily",
    "Channel",
    "Codec",
    "CodecError",
    "CommandAck",
    "HardwareContext",
    "HealthBatch",
    "HealthSignal",
    "Inbound",
    "IsolationMode",
    "Op",
    "SeedSlotState",
    "SeedStage",
    "SubjectError",
    "SystemStatePacket",
    "Tempo",
    "TopologyNode",
    "TopologyPacket",
    "blueprints_for",
    "family_for_layer_type",
    "is_json",
    "is_legal",
    "kind_of",
    "next_stage",
    "parse_subject",
    "run_subject",
    "wildcard_subject",
]
