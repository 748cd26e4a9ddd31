"""The wire examples the documentation shows, pulled out of the Markdown files themselves.

Tests judge each one with an independent JSON Schema validator and with esperd, and
check the verdict the docs give: an example under a "rejection" heading is meant to be
refused, every other one to be accepted.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import referencing

from esperd.config import LimitsConfig
from esperd.intake import Accepted, Intake
from esperd_contracts import MESSAGE_TYPES, Channel, Codec, CodecError
from esperd_contracts.schema import SCHEMA_DIR, STATUS_FILE

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "examples").glob("*.md"), *(ROOT / "docs").glob("*.md")])
WIRE_KINDS = {cls.__struct_config__.tag for cls in MESSAGE_TYPES}
#: Which message kinds each channel carries (what the schemas are chosen by).
CHANNEL_KINDS = {
    Channel.TOPOLOGY: ("topology",),
    Channel.HEALTH: ("health", "health_batch"),
    Channel.STATE: ("state",),
    Channel.ACK: ("ack",),
    Channel.COMMAND: ("command",),
}
_KIND_CHANNEL = {kind: channel for channel, kinds in CHANNEL_KINDS.items() for kind in kinds}
_FENCE = re.compile(r"^\s*```")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+)$")


@dataclass(frozen=True)
class DocExample:
    """One wire message shown in the docs."""

    where: str  # file:line
    heading: str
    subject: str
    payload: bytes
    content_type: str | None
    meant_valid: bool

    @property
    def channel(self) -> Channel:
        return Channel(self.subject.rsplit(".", 1)[1])


def doc_examples(files: list[Path] = DOC_FILES) -> list[DocExample]:
    """Every `nats pub` payload, and every JSON line that is a wire message, in fenced blocks."""
    found: list[DocExample] = []
    for path in files:
        heading, in_block = "", False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _FENCE.match(line):
                in_block = not in_block
                continue
            match = _HEADING.match(line)
            if not in_block and match:
                heading = match.group("title").strip()
                continue
            if in_block:
                example = _parse_line(line.strip(), f"{path.relative_to(ROOT)}:{number}", heading)
                if example is not None:
                    found.append(example)
    return found


def documented_rejections(files: list[Path] = DOC_FILES) -> dict[str, int]:
    """The `rejected_by_reason: {...}` the docs promise after their rejection examples."""
    claim = re.compile(r"rejected_by_reason:\s*(?P<json>\{.*\})")
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            match = claim.search(line)
            if match:
                return dict(json.loads(match.group("json")))
    return {}


def _parse_line(line: str, where: str, heading: str) -> DocExample | None:
    meant_valid = "rejection" not in heading.lower()
    if line.startswith("nats pub "):
        return _parse_nats_pub(line, where, heading, meant_valid)
    if line.startswith("{"):
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind in WIRE_KINDS:
            subject = f"esper.r1.{_KIND_CHANNEL[kind].value}"
            return DocExample(where, heading, subject, line.encode(), None, meant_valid)
    return None


def _parse_nats_pub(line: str, where: str, heading: str, meant_valid: bool) -> DocExample:
    words = shlex.split(line, comments=True)[2:]
    content_type: str | None = None
    positional: list[str] = []
    while words:
        word = words.pop(0)
        if word in ("-H", "--header"):
            name, _, value = words.pop(0).partition(":")
            if name.strip().lower() == "content-type":
                content_type = value.strip()
        elif word.startswith("-"):
            continue  # a flag without a value (e.g. --count=N is one word)
        else:
            positional.append(word)
    if len(positional) != 2:
        raise ValueError(f"{where}: cannot read `nats pub SUBJECT PAYLOAD` in {line!r}")
    subject, payload = positional
    return DocExample(where, heading, subject, payload.encode(), content_type, meant_valid)


def load_schemas() -> dict[str, dict[str, Any]]:
    """Message kind -> its published JSON Schema, read from contracts/schema/ (the status reply's
    schema is there too, but it is no message)."""
    return {
        p.stem: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted(SCHEMA_DIR.glob("*.json"))
        if p.name != STATUS_FILE
    }


class SchemaJudge:
    """Verdicts of the `jsonschema` package against the published schemas, nothing of esperd's."""

    def __init__(self) -> None:
        self.validators = {}
        for kind, schema in load_schemas().items():
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            self.validators[kind] = cls(schema, registry=referencing.Registry())

    def errors(self, payload: bytes, kinds: tuple[str, ...]) -> list[str]:
        """Why the payload is not a valid message of any of `kinds` ([] if it is one)."""
        try:
            doc = json.loads(payload, parse_constant=_refuse_constant)
        except ValueError as exc:
            return [f"not JSON: {exc}"]
        problems = []
        for kind in kinds:
            error = jsonschema.exceptions.best_match(self.validators[kind].iter_errors(doc))
            if error is None:
                return []
            problems.append(f"{kind}: {error.message}")
        return problems

    def valid(self, payload: bytes, kinds: tuple[str, ...]) -> bool:
        return not self.errors(payload, kinds)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN/Infinity; JSON does not


class EsperdJudge:
    """esperd's own verdict: its intake (decoder, channel check, limits) for what hosts send,
    the host-side command decoder for commands."""

    def __init__(self, prefix: str = "esper") -> None:
        self.intake = Intake(LimitsConfig(), prefix)
        self.codec = Codec()

    def refusal(self, subject: str, payload: bytes, content_type: str | None = None) -> str:
        """Why esperd refuses the message ("" if it accepts it)."""
        if subject.endswith("." + Channel.COMMAND.value):
            try:
                self.codec.decode_command(payload, content_type)
            except CodecError as exc:
                return str(exc)
            return ""
        outcome = self.intake.accept(subject, payload, content_type)
        return "" if isinstance(outcome, Accepted) else f"{outcome.reason}: {outcome.detail}"

    def valid(self, subject: str, payload: bytes, content_type: str | None = None) -> bool:
        return not self.refusal(subject, payload, content_type)
