"""Wire messages: round trips in both encodings, defaults, and DESIGN.md's hand-typed JSON."""

from __future__ import annotations

import msgspec
import pytest

from esperd_contracts import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    AckStatus,
    AdaptationCommand,
    AlphaCurve,
    AlphaSpeed,
    BlendAlgorithm,
    Blueprint,
    Codec,
    CodecError,
    CommandAck,
    HardwareContext,
    HealthBatch,
    HealthSignal,
    IsolationMode,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    Tempo,
    TopologyNode,
    TopologyPacket,
)

# Every field set to a non-default value, so a field that fails to travel is noticed.
FULL: dict[type[msgspec.Struct], msgspec.Struct] = {
    TopologyPacket: TopologyPacket(
        nodes=[
            TopologyNode(layer_id=0, name="stem", layer_type="conv2d", params=1_792, seed_slots=2),
            TopologyNode(layer_id=1, name="block1", layer_type="residual", params=73_856, seed_slots=1),
            TopologyNode(layer_id=2, name="head", layer_type="linear", params=5_130, seed_slots=0),
        ],
        edges=[(0, 1), (1, 2), (0, 2)],
        topology_version=4,
        timestamp=1_732_540_800.25,
        v=2,
    ),
    HealthSignal: HealthSignal(
        layer_id=7,
        health_score=0.42,
        seed_id=3,
        activation_variance=0.031,
        dead_neuron_ratio=0.12,
        avg_correlation=-0.35,
        execution_latency_us=182.5,
        error_count=2,
        active_seeds=1,
        total_seeds=4,
        timestamp=1_732_540_801.5,
        gradient_norm=0.87,
        seed_gradient_ratio=0.4,
        seed_stage=SeedStage.BLENDING,
        alpha=0.6,
        epochs_in_stage=3,
        blending_velocity=-0.05,
        g2_headroom=0.3,
        gradient_stability=0.02,
        host_gradient_via_seed=0.15,
        coadaptation_delta=-0.25,
        seed_loss_gradient=0.6,
        seed_weight_magnitude=3.5,
        lr_stability_ratio=0.75,
        alpha_variance=0.01,
        v=2,
    ),
    HealthBatch: HealthBatch(
        signals=[
            HealthSignal(layer_id=0, health_score=0.9, seed_stage=SeedStage.TRAINING, alpha=0.0),
            HealthSignal(layer_id=1, health_score=0.25, dead_neuron_ratio=0.4, error_count=1),
        ],
        timestamp=1_732_540_802.0,
        v=3,
    ),
    SystemStatePacket: SystemStatePacket(
        epoch=12,
        global_step=4_680,
        train_loss=0.84,
        train_accuracy=0.71,
        val_loss=0.97,
        val_accuracy=0.66,
        metrics={"lr": 0.05, "grad_norm": 1.8, "ece": 0.04},
        hardware=HardwareContext(
            device="cuda:0",
            gpu_utilization=0.93,
            gpu_memory_gb=11.2,
            cpu_utilization=0.2,
            host_memory_gb=18.5,
        ),
        seeds=[
            SeedSlotState(
                layer_id=2,
                stage=SeedStage.BLENDING,
                blueprint=Blueprint.CONV_LIGHT,
                alpha=0.4,
                epochs_in_stage=2,
                params=18_496,
                counterfactual=0.012,
                total_improvement=0.019,
                seed_id=1,
                counterfactual_alpha25=0.004,
                counterfactual_alpha50=-0.002,
                counterfactual_alpha75=0.011,
                counterfactual_alpha100=0.0,
            ),
            SeedSlotState(layer_id=5, stage=SeedStage.TRAINING, blueprint=Blueprint.LORA, params=4_096),
        ],
        host_params=11_173_962,
        total_params=11_192_458,
        timestamp=1_732_540_803.0,
        done=True,
        total_epochs=48,
        val_samples=1_797,
        v=2,
    ),
    AdaptationCommand: AdaptationCommand(
        command_id="c-0001",
        run_id="r1",
        layer_id=3,
        op=Op.GERMINATE,
        confidence=0.81,
        urgency=0.6,
        policy="gnn",
        policy_version=17,
        issued_at=1_732_540_804.0,
        seed_id=2,
        blueprint=Blueprint.CONV_HEAVY,
        blend=BlendAlgorithm.SIGMOID,
        tempo=Tempo.STANDARD,
        dwell_epochs=2,
        isolation=IsolationMode.ISOLATED,
        lr_multiplier=0.5,
        steepness=8.0,
        alpha_target=0.75,
        reason="layer 3 health 0.2 < 0.3",
        epoch=41,
        alpha_speed=AlphaSpeed.SLOW,
        alpha_curve=AlphaCurve.COSINE,
        max_seed_params=40_000,
        v=2,
    ),
    CommandAck: CommandAck(
        command_id="c-0001",
        status=AckStatus.REJECTED,
        reason="slot busy",
        layer_id=3,
        timestamp=1_732_540_805.0,
        v=2,
    ),
}

# Only the fields without defaults.
MINIMAL: dict[type[msgspec.Struct], msgspec.Struct] = {
    TopologyPacket: TopologyPacket(),
    HealthSignal: HealthSignal(layer_id=0, health_score=0.0),
    HealthBatch: HealthBatch(),
    SystemStatePacket: SystemStatePacket(),
    AdaptationCommand: AdaptationCommand(command_id="x", run_id="r", layer_id=0, op=Op.WAIT),
    CommandAck: CommandAck(command_id="x", status=AckStatus.APPLIED),
}

CASES = [
    pytest.param(table[cls], id=f"{cls.__name__}-{label}")
    for label, table in (("full", FULL), ("minimal", MINIMAL))
    for cls in MESSAGE_TYPES
]


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def _kind(msg: msgspec.Struct) -> str:
    return msg.__struct_config__.tag


def test_every_message_type_has_examples() -> None:
    # A new message type must come with round-trip examples.
    assert set(FULL) == set(MESSAGE_TYPES)
    assert set(MINIMAL) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_full_examples_set_every_field(cls: type[msgspec.Struct]) -> None:
    # "Fully populated" must stay true when fields are added to the messages.
    msg = FULL[cls]
    defaults = {}
    for f in msgspec.structs.fields(cls):
        if f.default is not msgspec.NODEFAULT:
            defaults[f.name] = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            defaults[f.name] = f.default_factory()
    left_default = [name for name, value in defaults.items() if getattr(msg, name) == value]
    assert left_default == []


@pytest.mark.parametrize("msg", CASES)
def test_msgpack_round_trip(codec: Codec, msg: msgspec.Struct) -> None:
    data = codec.encode(msg)
    decoded = codec.decode(data, inbound_only=False)
    # Decoded msgpack objects are positional subclasses: compare by value and isinstance.
    assert isinstance(decoded, type(msg))
    assert msgspec.structs.astuple(decoded) == msgspec.structs.astuple(msg)
    assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(msg)


@pytest.mark.parametrize("msg", CASES)
def test_msgpack_round_trip_with_content_type(codec: Codec, msg: msgspec.Struct) -> None:
    decoded = codec.decode(codec.encode(msg), "application/msgpack", inbound_only=False)
    assert isinstance(decoded, type(msg))
    assert msgspec.structs.astuple(decoded) == msgspec.structs.astuple(msg)


@pytest.mark.parametrize("msg", CASES)
def test_json_round_trip(codec: Codec, msg: msgspec.Struct) -> None:
    data = codec.encode_json(msg)
    decoded = codec.decode(data, inbound_only=False)
    assert type(decoded) is type(msg)
    assert decoded == msg
    decoded_ct = codec.decode(data, "application/json", inbound_only=False)
    assert decoded_ct == msg


@pytest.mark.parametrize("msg", CASES)
def test_reencoding_across_forms(codec: Codec, msg: msgspec.Struct) -> None:
    # A message decoded from msgpack (a positional subclass) must still encode as keyed JSON.
    from_mp = codec.decode(codec.encode(msg), inbound_only=False)
    as_json = codec.encode_json(from_mp)
    assert msgspec.json.decode(as_json)["kind"] == _kind(msg)
    assert codec.decode(as_json, inbound_only=False) == msg
    from_json = codec.decode(codec.encode_json(msg), inbound_only=False)
    again = codec.decode(codec.encode(from_json), inbound_only=False)
    assert msgspec.structs.astuple(again) == msgspec.structs.astuple(msg)


@pytest.mark.parametrize("msg", CASES)
def test_msgpack_is_positional_with_kind_first(codec: Codec, msg: msgspec.Struct) -> None:
    raw = msgspec.msgpack.decode(codec.encode(msg))
    assert isinstance(raw, list)
    assert raw[0] == _kind(msg)
    assert len(raw) == 1 + len(type(msg).__struct_fields__)


@pytest.mark.parametrize("msg", CASES)
def test_json_is_keyed_with_kind(codec: Codec, msg: msgspec.Struct) -> None:
    raw = msgspec.json.decode(codec.encode_json(msg))
    assert isinstance(raw, dict)
    assert raw["kind"] == _kind(msg)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_minimal_json_omits_defaults(codec: Codec, cls: type[msgspec.Struct]) -> None:
    raw = msgspec.json.decode(codec.encode_json(MINIMAL[cls]))
    required = {f.name for f in msgspec.structs.fields(cls) if f.required}
    assert set(raw) == {"kind"} | required


def test_outbound_command_round_trips_via_decode_command(codec: Codec) -> None:
    cmd = FULL[AdaptationCommand]
    for data in (codec.encode(cmd), codec.encode_json(cmd)):
        decoded = codec.decode_command(data)
        assert isinstance(decoded, AdaptationCommand)
        assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(cmd)


def test_enums_are_lower_case_strings_on_the_wire(codec: Codec) -> None:
    raw = msgspec.json.decode(codec.encode_json(FULL[AdaptationCommand]))
    assert raw["op"] == "germinate"
    assert raw["blend"] == "sigmoid"
    assert raw["tempo"] == "standard"
    assert raw["blueprint"] == "conv_heavy"
    assert raw["isolation"] == "isolated"


def test_schema_version_defaults_to_one() -> None:
    assert SCHEMA_VERSION == 1
    for msg in MINIMAL.values():
        assert msg.v == 1


def test_seed_slot_state_is_an_array_in_json(codec: Codec) -> None:
    raw = msgspec.json.decode(codec.encode_json(FULL[SystemStatePacket]))
    # Field order is the wire order: layer_id, stage, blueprint, alpha, epochs_in_stage, params, ...
    assert raw["seeds"][1][:6] == [5, "training", "lora", 0.0, 0, 4096]


# --------------------------------------------------------------- DESIGN.md examples

# Copied verbatim from /work/shared/DESIGN.md ("Hand-typed JSON that must always be accepted").
DESIGN_EXAMPLES = """\
esper.r1.topology  {"kind":"topology","nodes":[{"layer_id":0,"name":"stem","layer_type":"conv"},{"layer_id":1,"name":"block1","layer_type":"conv"},{"layer_id":2,"name":"head","layer_type":"linear"}],"edges":[[0,1],[1,2],[0,2]]}
esper.r1.health    {"kind":"health","layer_id":1,"health_score":0.2}
esper.r1.health    {"kind":"health_batch","signals":[{"layer_id":0,"health_score":0.9},{"layer_id":1,"health_score":0.25}]}
esper.r1.state     {"kind":"state","epoch":3,"val_accuracy":0.61,"val_loss":1.2}
esper.r1.ack       {"kind":"ack","command_id":"…","status":"applied"}
"""  # noqa: E501 - verbatim, must not be wrapped

DESIGN_INLINE_HEALTH = '{"kind":"health","layer_id":3,"health_score":0.2}'


def _design_lines() -> list[tuple[str, bytes]]:
    out = []
    for line in DESIGN_EXAMPLES.splitlines():
        subject, payload = line.split(None, 1)
        out.append((subject, payload.strip().encode()))
    return out


def test_design_examples_decode(codec: Codec) -> None:
    decoded = [codec.decode(payload) for _, payload in _design_lines()]
    topo, health, batch, state, ack = decoded

    assert isinstance(topo, TopologyPacket)
    assert [(n.layer_id, n.name, n.layer_type) for n in topo.nodes] == [
        (0, "stem", "conv"),
        (1, "block1", "conv"),
        (2, "head", "linear"),
    ]
    assert topo.edges == [(0, 1), (1, 2), (0, 2)]

    assert isinstance(health, HealthSignal)
    assert (health.layer_id, health.health_score) == (1, 0.2)

    assert isinstance(batch, HealthBatch)
    assert [(s.layer_id, s.health_score) for s in batch.signals] == [(0, 0.9), (1, 0.25)]

    assert isinstance(state, SystemStatePacket)
    assert (state.epoch, state.val_accuracy, state.val_loss, state.done) == (3, 0.61, 1.2, False)

    assert isinstance(ack, CommandAck)
    assert ack.command_id == "…"
    assert ack.status is AckStatus.APPLIED


def test_design_examples_decode_with_json_content_type(codec: Codec) -> None:
    for _, payload in _design_lines():
        msg = codec.decode(payload, "application/json")
        assert msg.v == 1


def test_design_example_subjects_match_kinds(codec: Codec) -> None:
    # The channel each example is published on accepts the kind it carries.
    channel_kinds = {
        "topology": {"topology"},
        "health": {"health", "health_batch"},
        "state": {"state"},
        "ack": {"ack"},
    }
    for subject, payload in _design_lines():
        channel = subject.rsplit(".", 1)[1]
        assert _kind(codec.decode(payload)) in channel_kinds[channel]


def test_design_inline_health_example(codec: Codec) -> None:
    msg = codec.decode(DESIGN_INLINE_HEALTH.encode())
    assert isinstance(msg, HealthSignal)
    assert (msg.layer_id, msg.health_score, msg.seed_stage) == (3, 0.2, SeedStage.DORMANT)


# --------------------------------------------------------------- older hosts (issue 16)

#: Lever telemetry appended to HealthSignal in issue 16, and the milestone counterfactuals
#: appended to SeedSlotState: a host written before them sends neither.
LEVER_TELEMETRY = (
    "g2_headroom",
    "gradient_stability",
    "host_gradient_via_seed",
    "coadaptation_delta",
    "seed_loss_gradient",
    "seed_weight_magnitude",
    "lr_stability_ratio",
    "alpha_variance",
)
MILESTONES = (
    "counterfactual_alpha25",
    "counterfactual_alpha50",
    "counterfactual_alpha75",
    "counterfactual_alpha100",
)


def test_the_lever_telemetry_is_appended_last() -> None:
    assert HealthSignal.__struct_fields__[-len(LEVER_TELEMETRY) :] == LEVER_TELEMETRY
    assert SeedSlotState.__struct_fields__[-len(MILESTONES) :] == MILESTONES


def test_an_older_hosts_positional_packets_still_decode(codec: Codec) -> None:
    # What a host built before the lever telemetry sends: the arrays end before the new fields.
    signal = FULL[HealthSignal]
    old_signal = ["health", *msgspec.structs.astuple(signal)[: -len(LEVER_TELEMETRY)]]
    decoded = codec.decode(msgspec.msgpack.encode(old_signal))
    assert isinstance(decoded, HealthSignal) and decoded.blending_velocity == signal.blending_velocity
    assert all(getattr(decoded, name) == 0.0 for name in LEVER_TELEMETRY)
    slot = FULL[SystemStatePacket].seeds[0]  # type: ignore[attr-defined]
    old_slot = list(msgspec.structs.astuple(slot)[: -len(MILESTONES)])
    state = ["state", 1, 12, 4_680, 0.8, 0.7, 0.9, 0.6, {}, None, [old_slot]]
    packet = codec.decode(msgspec.msgpack.encode(state))
    assert isinstance(packet, SystemStatePacket) and packet.seeds[0].seed_id == slot.seed_id
    assert all(getattr(packet.seeds[0], name) is None for name in MILESTONES)
    # The keyed JSON form too, seed slots being arrays there as well.
    as_json = msgspec.json.encode({"kind": "state", "seeds": [old_slot]})
    assert codec.decode(as_json).seeds[0].counterfactual_alpha50 is None  # type: ignore[attr-defined]


def test_new_hosts_lever_telemetry_is_range_checked(codec: Codec) -> None:
    base = {"kind": "health", "layer_id": 1, "health_score": 0.5}
    for name, bad in [
        ("seed_weight_magnitude", -1.0),
        ("coadaptation_delta", 1.5),
        ("lr_stability_ratio", 2.0),
        ("alpha_variance", 1e301),  # beyond the finite range, as inf and nan are
        ("g2_headroom", -1e301),
    ]:
        with pytest.raises(CodecError):
            codec.decode(msgspec.json.encode({**base, name: bad}))
    assert codec.decode(msgspec.json.encode({**base, "g2_headroom": -0.1})).g2_headroom == -0.1  # type: ignore[union-attr]
