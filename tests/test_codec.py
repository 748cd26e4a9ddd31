"""Codec: format selection, rejection reasons, and fuzzing (only CodecError ever escapes)."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from esperd_contracts import (
    JSON,
    MESSAGE_TYPES,
    MSGPACK,
    AckStatus,
    AdaptationCommand,
    Codec,
    CodecError,
    CommandAck,
    HealthBatch,
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
)
from esperd_contracts.messages import MAX_SIGNALS

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEALTH_JSON = b'{"kind":"health","layer_id":1,"health_score":0.2}'
TAGS = [cls.__struct_config__.tag for cls in MESSAGE_TYPES]


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def _health_mp(codec: Codec) -> bytes:
    return codec.encode(HealthSignal(layer_id=1, health_score=0.2))


def _reason(codec: Codec, data: bytes, content_type: str | None = None, **kw: Any) -> str:
    with pytest.raises(CodecError) as info:
        codec.decode(data, content_type, **kw)
    return info.value.reason


# ------------------------------------------------------------ format selection


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "APPLICATION/JSON",
        "application/json; charset=utf-8",
        " application/json ",
        "text/json",
    ],
)
def test_json_content_type_selects_json(codec: Codec, content_type: str) -> None:
    msg = codec.decode(HEALTH_JSON, content_type)
    assert isinstance(msg, HealthSignal)
    assert msg.health_score == 0.2


@pytest.mark.parametrize(
    "content_type",
    ["application/msgpack", "Application/MsgPack", "application/x-msgpack", "application/vnd.msgpack; v=1"],
)
def test_msgpack_content_type_selects_msgpack(codec: Codec, content_type: str) -> None:
    msg = codec.decode(_health_mp(codec), content_type)
    assert isinstance(msg, HealthSignal)
    assert msg.layer_id == 1


def test_content_type_wins_over_sniffing(codec: Codec) -> None:
    # JSON bytes declared msgpack are read as msgpack: `{` is a positive fixint there, not a message.
    assert _reason(codec, HEALTH_JSON, MSGPACK) == "malformed"
    # msgpack bytes declared JSON are not JSON.
    assert _reason(codec, _health_mp(codec), JSON) == "malformed"


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/octet-stream"])
def test_unknown_or_absent_content_type_falls_back_to_sniffing(
    codec: Codec, content_type: str | None
) -> None:
    assert isinstance(codec.decode(HEALTH_JSON, content_type), HealthSignal)
    assert isinstance(codec.decode(_health_mp(codec), content_type), HealthSignal)


@pytest.mark.parametrize("prefix", [b" ", b"\n", b"\r\n", b"\t \t", b"  \n  "])
def test_sniffing_skips_leading_whitespace(codec: Codec, prefix: bytes) -> None:
    msg = codec.decode(prefix + HEALTH_JSON)
    assert isinstance(msg, HealthSignal)
    assert msg.layer_id == 1


def test_sniffing_treats_leading_bracket_as_json(codec: Codec) -> None:
    # `[` means JSON; a JSON array is not a message (messages are JSON objects).
    with pytest.raises(CodecError) as info:
        codec.decode(b'["health",1,0.2]')
    assert info.value.reason == "malformed"
    assert "JSON" in info.value.detail or "object" in info.value.detail


def test_positional_msgpack_starts_with_an_array_header(codec: Codec) -> None:
    # Sniffing relies on this: a msgpack message never starts with `{`, `[` or whitespace.
    for cls in MESSAGE_TYPES:
        first = codec.encode(_minimal(cls))[0]
        assert 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def _minimal(cls: type) -> Any:
    if cls is AdaptationCommand:
        return AdaptationCommand(command_id="x", run_id="r", layer_id=0, op=Op.WAIT)
    if cls is HealthSignal:
        return HealthSignal(layer_id=0, health_score=0.0)
    if cls is CommandAck:
        return CommandAck(command_id="x", status=AckStatus.APPLIED)
    return cls()


# ------------------------------------------------------------ rejection reasons


@pytest.mark.parametrize(
    "data",
    [b"\xc1", b"\xc1\xc1\xc1", b"hello world", b"\x00", b"\xff\xfe\xfd", b"", b"   "],
    ids=["c1", "c1x3", "text", "zero", "ff", "empty", "spaces"],
)
def test_garbage_is_malformed(codec: Codec, data: bytes) -> None:
    assert _reason(codec, data) == "malformed"


@pytest.mark.parametrize("data", [b"{", b'{"kind":"health"', b'{"kind":"he', b"{]", b"{kind:1}", b"nope"])
def test_broken_json_is_malformed(codec: Codec, data: bytes) -> None:
    assert _reason(codec, data, JSON) == "malformed"


def test_every_truncation_of_msgpack_is_malformed(codec: Codec) -> None:
    msg = SystemStatePacket(
        epoch=3,
        metrics={"lr": 0.1},
        seeds=[SeedSlotState(layer_id=1, stage=SeedStage.TRAINING)],
        val_accuracy=0.5,
    )
    data = codec.encode(msg)
    reasons = {_reason(codec, data[:cut], MSGPACK) for cut in range(len(data))}
    assert reasons == {"malformed"}


def test_trailing_bytes_are_malformed(codec: Codec) -> None:
    assert _reason(codec, _health_mp(codec) + b"\x00") == "malformed"
    assert _reason(codec, HEALTH_JSON + b" x") == "malformed"


@pytest.mark.parametrize(
    "fields",
    [
        {"health_score": 1.5},
        {"health_score": -0.01},
        {"layer_id": -1},
        {"layer_id": 2**31},
        {"dead_neuron_ratio": 1.0001},
        {"avg_correlation": -1.5},
        {"error_count": -3},
        {"v": 0},
        {"v": 1_001},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_out_of_range_values_are_invalid(codec: Codec, fields: dict[str, Any]) -> None:
    payload = {"kind": "health", "layer_id": 1, "health_score": 0.2, **fields}
    with pytest.raises(CodecError) as info:
        codec.decode(json.dumps(payload).encode())
    assert info.value.reason == "invalid"
    field = next(iter(fields))
    assert f"$.{field}" in info.value.detail


def test_out_of_range_in_msgpack_is_invalid(codec: Codec) -> None:
    # Positional: ["health", layer_id, health_score, ...].
    assert _reason(codec, msgspec.msgpack.encode(["health", 1, 1.5])) == "invalid"
    assert _reason(codec, msgspec.msgpack.encode(["health", -1, 0.5])) == "invalid"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_floats_in_msgpack_are_invalid(codec: Codec, value: float) -> None:
    assert _reason(codec, msgspec.msgpack.encode(["health", 1, value])) == "invalid"
    signal = HealthSignal(layer_id=1, health_score=0.5)
    # An unbounded-looking field (blending_velocity: Finite) refuses them too.
    assert _reason(codec, _with_field(codec, signal, "blending_velocity", value)) == "invalid"
    assert _reason(codec, _with_field(codec, signal, "timestamp", value)) == "invalid"
    # Nested: a metric value and a seed slot's counterfactual.
    state = SystemStatePacket()
    assert _reason(codec, _with_field(codec, state, "metrics", {"lr": value})) == "invalid"
    seed = [0, "training", None, 0.0, 0, 0, value]
    assert _reason(codec, _with_field(codec, state, "seeds", [seed])) == "invalid"
    # The same packets with a finite value are accepted, so the rejection is about the value.
    accepted = codec.decode(_with_field(codec, state, "seeds", [seed[:-1] + [0.5]]))
    assert accepted.seeds[0].counterfactual == 0.5


def _with_field(codec: Codec, msg: Any, field: str, value: Any) -> bytes:
    """msgpack of `msg` with one positional field replaced by a raw value."""
    raw = msgspec.msgpack.decode(codec.encode(msg))
    raw[1 + type(msg).__struct_fields__.index(field)] = value
    return msgspec.msgpack.encode(raw)


def test_non_finite_floats_in_json(codec: Codec) -> None:
    # 1e999 parses as inf: a valid JSON number out of every range.
    assert _reason(codec, b'{"kind":"health","layer_id":1,"health_score":1e999}') == "invalid"
    assert _reason(codec, b'{"kind":"state","metrics":{"loss":-1e999}}') == "invalid"
    # NaN / Infinity are not JSON at all.
    assert _reason(codec, b'{"kind":"health","layer_id":1,"health_score":NaN}') == "malformed"
    assert _reason(codec, b'{"kind":"health","layer_id":1,"health_score":Infinity}') == "malformed"


@pytest.mark.parametrize(
    "data",
    [
        b'{"kind":"bogus","layer_id":1}',
        b'{"kind":"","layer_id":1}',
        b'{"kind":"HEALTH","layer_id":1,"health_score":0.2}',
        b'{"kind":3}',
        b'{"kind":null}',
    ],
)
def test_unknown_kind_json(codec: Codec, data: bytes) -> None:
    assert _reason(codec, data) == "unknown_kind"


@pytest.mark.parametrize("first", ["bogus", "", 3, None])
def test_unknown_kind_msgpack(codec: Codec, first: Any) -> None:
    assert _reason(codec, msgspec.msgpack.encode([first, 1, 0.2])) == "unknown_kind"


@pytest.mark.parametrize(
    "data",
    [b"{}", b'{"layer_id":1,"health_score":0.2}', b"\x90"],
    ids=["json-empty", "json-no-kind", "msgpack-empty-array"],
)
def test_missing_kind(codec: Codec, data: bytes) -> None:
    assert _reason(codec, data) == "unknown_kind"


def test_outbound_kind_is_unknown_to_inbound_decoding(codec: Codec) -> None:
    # Hosts may not send commands to esperd.
    cmd = AdaptationCommand(command_id="c1", run_id="r1", layer_id=1, op=Op.PRUNE)
    assert _reason(codec, codec.encode(cmd)) == "unknown_kind"
    assert _reason(codec, codec.encode_json(cmd)) == "unknown_kind"
    assert isinstance(codec.decode(codec.encode(cmd), inbound_only=False), AdaptationCommand)


def test_decode_command_rejects_other_kinds(codec: Codec) -> None:
    with pytest.raises(CodecError) as info:
        codec.decode_command(HEALTH_JSON)
    assert info.value.reason == "wrong_kind"


@pytest.mark.parametrize(
    "data",
    [
        b'{"kind":"health","layer_id":"1","health_score":0.2}',
        b'{"kind":"health","layer_id":1.5,"health_score":0.2}',
        b'{"kind":"health","layer_id":true,"health_score":0.2}',
        b'{"kind":"health","layer_id":1,"health_score":"0.2"}',
        b'{"kind":"health","layer_id":1,"health_score":0.2,"seed_stage":"sprouting"}',
        b'{"kind":"health","layer_id":1}',
        b'{"kind":"health_batch","signals":{"layer_id":1}}',
        b'{"kind":"health_batch","signals":[{"layer_id":1}]}',
        b'{"kind":"topology","edges":[[0]]}',
        b'{"kind":"topology","edges":[[0,1,2]]}',
        b'{"kind":"state","metrics":{"":1.0}}',
        b'{"kind":"state","seeds":[{"layer_id":1}]}',
        b'{"kind":"state","done":"yes"}',
        b'{"kind":"ack","command_id":"","status":"applied"}',
        b'{"kind":"ack","command_id":"c","status":"maybe"}',
    ],
)
def test_wrong_types_and_shapes_are_invalid(codec: Codec, data: bytes) -> None:
    assert _reason(codec, data) == "invalid"


def test_wrong_types_in_msgpack_are_invalid(codec: Codec) -> None:
    assert _reason(codec, msgspec.msgpack.encode(["health", "1", 0.2])) == "invalid"
    assert _reason(codec, msgspec.msgpack.encode(["health", 1, "0.2"])) == "invalid"
    # Required fields missing from the positional array.
    assert _reason(codec, msgspec.msgpack.encode(["health", 1])) == "invalid"


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(b"3", JSON), (b'"health"', JSON), (b"null", JSON), (b"[]", None), (b"[1,2]", None)],
)
def test_json_top_level_not_an_object_is_malformed(
    codec: Codec, data: bytes, content_type: str | None
) -> None:
    assert _reason(codec, data, content_type) == "malformed"


@pytest.mark.parametrize("value", [5, "health", None, {"kind": "health", "layer_id": 1, "health_score": 0.2}])
def test_msgpack_top_level_not_an_array_is_malformed(codec: Codec, value: Any) -> None:
    # A keyed msgpack map is not accepted: msgpack messages are positional.
    assert _reason(codec, msgspec.msgpack.encode(value)) == "malformed"


def test_oversize_payload_is_too_large() -> None:
    codec = Codec(max_payload_bytes=64)
    small = b'{"kind":"health","layer_id":1,"health_score":0.2}'
    assert isinstance(codec.decode(small), HealthSignal)
    at_limit = small + b" " * (64 - len(small))
    assert isinstance(codec.decode(at_limit), HealthSignal)
    assert _reason(codec, at_limit + b" ") == "too_large"
    big = codec.encode(HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.5) for i in range(10)]))
    assert len(big) > 64
    assert _reason(codec, big) == "too_large"


def test_oversize_batch_is_invalid(codec: Codec) -> None:
    signal = b'{"layer_id":0,"health_score":0}'
    data = b'{"kind":"health_batch","signals":[' + b",".join([signal] * (MAX_SIGNALS + 1)) + b"]}"
    assert _reason(codec, data) == "invalid"
    ok = b'{"kind":"health_batch","signals":[' + b",".join([signal] * 3) + b"]}"
    assert len(codec.decode(ok).signals) == 3


def test_deep_nesting_in_ignored_field_is_rejected_not_raised(codec: Codec) -> None:
    depth = 100_000
    data = b'{"kind":"health","layer_id":1,"health_score":0.2,"x":' + b"[" * depth + b"]" * depth + b"}"
    assert _reason(codec, data) == "malformed"


def test_codec_error_carries_reason_and_detail(codec: Codec) -> None:
    with pytest.raises(CodecError) as info:
        codec.decode(b'{"kind":"health","layer_id":1,"health_score":1.5}')
    err = info.value
    assert isinstance(err, ValueError)
    assert err.reason == "invalid"
    assert "health_score" in err.detail
    assert str(err).startswith("invalid: ")


# ------------------------------------------------------------------- fuzzing

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    sorted({name for cls in MESSAGE_TYPES for name in cls.__struct_fields__} | {"kind", "signals", "seeds"})
)
_kind_dicts = st.builds(
    lambda kind, fields: {"kind": kind, **fields},
    st.sampled_from(TAGS),
    st.dictionaries(_field_names | st.text(max_size=8), _values, max_size=6),
)
_kind_arrays = st.builds(
    lambda kind, rest: [kind, *rest], st.sampled_from(TAGS), st.lists(_values, max_size=8)
)
_content_types = st.sampled_from([None, JSON, MSGPACK, "text/plain"])


def _check_decode(codec: Codec, data: bytes, content_type: str | None) -> None:
    """Decoding either yields a message or raises CodecError; a message survives re-encoding."""
    try:
        msg = codec.decode(data, content_type, inbound_only=False)
    except CodecError as exc:
        assert exc.reason in {"too_large", "malformed", "invalid", "unknown_kind"}
        return
    assert isinstance(msg, MESSAGE_TYPES)
    # Whatever was accepted must be re-encodable in both forms and decode to the same value.
    again_mp = codec.decode(codec.encode(msg), inbound_only=False)
    again_json = codec.decode(codec.encode_json(msg), inbound_only=False)
    assert msgspec.structs.astuple(again_mp) == msgspec.structs.astuple(msg)
    assert msgspec.structs.astuple(again_json) == msgspec.structs.astuple(msg)


def _msgpack(value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except (OverflowError, TypeError, ValueError):
        assume(False)
        raise  # unreachable: assume(False) aborts the example


@FUZZ
@given(data=st.binary(max_size=256), content_type=_content_types)
def test_fuzz_random_bytes(data: bytes, content_type: str | None) -> None:
    _check_decode(Codec(), data, content_type)


@pytest.mark.slow
@FUZZ
@given(value=_values, content_type=_content_types)
def test_fuzz_random_json_values(value: Any, content_type: str | None) -> None:
    codec = Codec()
    _check_decode(codec, json.dumps(value).encode(), content_type)
    _check_decode(codec, _msgpack(value), content_type)


@pytest.mark.slow
@FUZZ
@given(value=_kind_dicts)
def test_fuzz_dicts_with_valid_kind(value: dict[str, Any]) -> None:
    codec = Codec()
    _check_decode(codec, json.dumps(value).encode(), None)
    _check_decode(codec, _msgpack(value), None)


@pytest.mark.slow
@FUZZ
@given(value=_kind_arrays)
def test_fuzz_positional_arrays_with_valid_kind(value: list[Any]) -> None:
    codec = Codec()
    _check_decode(codec, _msgpack(value), None)
    _check_decode(codec, json.dumps(value).encode(), None)


@FUZZ
@given(
    layer_id=st.integers(min_value=-5, max_value=2**31 + 5),
    score=st.floats(allow_nan=True, allow_infinity=True),
)
def test_fuzz_health_ranges(layer_id: int, score: float) -> None:
    # Accepted exactly when both fields are in range; otherwise "invalid".
    codec = Codec()
    data = msgspec.msgpack.encode(["health", 1, layer_id, score])  # [kind, v, layer_id, health_score]
    in_range = 0 <= layer_id <= 2**31 - 1 and 0.0 <= score <= 1.0
    if in_range:
        msg = codec.decode(data)
        assert (msg.layer_id, msg.health_score) == (layer_id, score)
    else:
        assert _reason(codec, data) == "invalid"
