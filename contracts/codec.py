"""Encode and decode wire messages.

msgpack on the wire is positional: each top-level message is an array whose first
element is its `kind` tag, then its fields in declaration order. That keeps a state
packet under 300 bytes. JSON is keyed, so a person can type it. Decoded messages are
always instances of the classes in `esperd_contracts.messages`, whichever form arrived.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, Union, overload

import msgspec

from esperd_contracts.messages import (
    MESSAGE_TYPES,
    AdaptationCommand,
    AnyMessage,
    CommandAck,
    HealthBatch,
    HealthSignal,
    Inbound,
    SystemStatePacket,
    TopologyPacket,
    kind_of,
)

MSGPACK = "application/msgpack"
JSON = "application/json"
CONTENT_TYPE_HEADER = "Content-Type"


class CodecError(ValueError):
    """A payload that cannot be turned into a valid message. `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _positional_twin(cls: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """A subclass of `cls` that msgpack encodes as a tagged array; isinstance(twin, cls) holds."""
    tag = cls.__struct_config__.tag
    return type(cls.__name__, (cls,), {"__module__": cls.__module__}, array_like=True, tag=tag)


_TWINS: dict[type[msgspec.Struct], type[msgspec.Struct]] = {
    cls: _positional_twin(cls) for cls in MESSAGE_TYPES
}
_ORIGINALS: dict[type[msgspec.Struct], type[msgspec.Struct]] = {twin: cls for cls, twin in _TWINS.items()}
_INBOUND = (TopologyPacket, HealthSignal, HealthBatch, SystemStatePacket, CommandAck)


def _union(types: tuple[type, ...]) -> Any:
    return Union[types]  # noqa: UP007 - a runtime union of a tuple of types


class Codec:
    """Encoders and decoders built once and reused; safe to share within one thread."""

    def __init__(self, max_payload_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_payload_bytes = max_payload_bytes
        self._mp_encoder = msgspec.msgpack.Encoder()
        self._json_encoder = msgspec.json.Encoder()
        inbound, every = _union(_INBOUND), _union(MESSAGE_TYPES)
        self._inbound_type, self._every_type = inbound, every
        # (JSON?, inbound only?) -> decode. The msgpack twins subclass the messages, so what
        # each returns is an AnyMessage (an Inbound where inbound only).
        self._decoders: dict[tuple[bool, bool], Callable[[bytes], AnyMessage]] = {
            (False, True): msgspec.msgpack.Decoder(_union(tuple(_TWINS[c] for c in _INBOUND))).decode,
            (False, False): msgspec.msgpack.Decoder(_union(tuple(_TWINS.values()))).decode,
            (True, True): msgspec.json.Decoder(inbound).decode,
            (True, False): msgspec.json.Decoder(every).decode,
        }

    # ---------------------------------------------------------------- encode

    def encode(self, msg: AnyMessage) -> bytes:
        """msgpack bytes of a message (positional form)."""
        tag = msg.__struct_config__.tag
        return self._mp_encoder.encode((tag, *msgspec.structs.astuple(msg)))

    def encode_json(self, msg: AnyMessage) -> bytes:
        """JSON bytes of a message (keyed form)."""
        original = _ORIGINALS.get(type(msg))
        if original is None:
            return self._json_encoder.encode(msg)
        # Decoded from msgpack: the twin is array_like and would encode as a JSON array.
        return self._json_encoder.encode(original(**msgspec.structs.asdict(msg)))

    # ---------------------------------------------------------------- decode

    @overload
    def decode(
        self, data: bytes, content_type: str | None = None, *, inbound_only: Literal[True] = True
    ) -> Inbound: ...

    @overload
    def decode(self, data: bytes, content_type: str | None = None, *, inbound_only: bool) -> AnyMessage: ...

    def decode(
        self, data: bytes, content_type: str | None = None, *, inbound_only: bool = True
    ) -> AnyMessage:
        """Decode msgpack or JSON (by content type, else by sniffing). Raises CodecError."""
        if len(data) > self.max_payload_bytes:
            raise CodecError("too_large", f"{len(data)} bytes > {self.max_payload_bytes}")
        as_json = is_json(data, content_type)
        try:
            return self._decoders[as_json, inbound_only](data)
        except msgspec.ValidationError as exc:
            if as_json and _INT_GOT_FLOAT.search(str(exc)):
                return self._decode_json_integral_floats(data, inbound_only)
            raise CodecError(_validation_reason(str(exc)), str(exc)) from None
        except msgspec.DecodeError as exc:
            raise CodecError("malformed", f"{'JSON' if as_json else 'msgpack'}: {exc}") from None
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # msgspec raises these for a few pathological inputs (e.g. deep nesting).
            raise CodecError("malformed", f"{type(exc).__name__}: {exc}") from None

    def _decode_json_integral_floats(self, data: bytes, inbound_only: bool) -> AnyMessage:
        """Decode JSON whose integer fields may be written as integral floats (`3.0`, `1e2`).

        JSON does not tell 3 from 3.0, and JSON Schema counts 3.0 as an integer, so esperd
        accepts it as the published schemas do. The slow path: taken only after the fast
        decoder refused a float where an int belongs.
        """
        target = self._inbound_type if inbound_only else self._every_type
        try:
            message: AnyMessage = msgspec.convert(_integral_floats_as_ints(msgspec.json.decode(data)), target)
            return message
        except msgspec.ValidationError as exc:
            raise CodecError(_validation_reason(str(exc)), str(exc)) from None
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise CodecError("malformed", f"{type(exc).__name__}: {exc}") from None

    def decode_command(self, data: bytes, content_type: str | None = None) -> AdaptationCommand:
        """Decode a command (the host side of the wire)."""
        msg = self.decode(data, content_type, inbound_only=False)
        if not isinstance(msg, AdaptationCommand):
            raise CodecError("wrong_kind", f"expected command, got {kind_of(msg)}")
        return msg


# How msgspec refuses a float where an int belongs (`3.0` included): "Expected `int`, got
# `float`", or "Expected `int | null`, ..." for an optional one.
_INT_GOT_FLOAT = re.compile(r"^Expected `[^`]*\bint\b[^`]*`, got `float`")


def _integral_floats_as_ints(node: Any) -> Any:
    """`node` (decoded JSON) with every float that is a whole number turned into an int.

    Float fields take ints unchanged, so only integer fields see a difference.
    """
    if isinstance(node, float):
        return int(node) if node.is_integer() else node
    if isinstance(node, list):
        return [_integral_floats_as_ints(v) for v in node]
    if isinstance(node, dict):
        return {k: _integral_floats_as_ints(v) for k, v in node.items()}
    return node


def is_json(data: bytes, content_type: str | None) -> bool:
    """Whether a payload is JSON: by its Content-Type, else by a leading `{` or `[`."""
    if content_type:
        ct = content_type.split(";", 1)[0].strip().lower()
        if ct in (JSON, "text/json"):
            return True
        if ct in (MSGPACK, "application/x-msgpack", "application/vnd.msgpack"):
            return False
    first = data.lstrip()[:1]
    return first in (b"{", b"[")


def _validation_reason(message: str) -> str:
    if "`$.kind`" in message or "`$[0]`" in message or "missing required field `kind`" in message:
        return "unknown_kind"
    if message == "Expected `array` of at least length 1, got 0":
        return "unknown_kind"  # an empty msgpack array: the positional form of a missing `kind`
    if " - at `" not in message and ("got `" in message and "of at least length" not in message):
        return "malformed"  # the top level is not a message at all (a number, a string, ...)
    return "invalid"
