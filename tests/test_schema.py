"""Exported JSON Schemas: checked-in files match the code, and say what they describe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from esperd_contracts import MESSAGE_TYPES, schema as schema_mod
from esperd_contracts.status import Status

KINDS = [cls.__struct_config__.tag for cls in MESSAGE_TYPES]


def test_checked_in_schemas_match_the_code() -> None:
    # Fails when a message changes without `python -m esperd_contracts.schema` being rerun.
    expected = schema_mod.generate()
    on_disk = sorted(p.name for p in schema_mod.SCHEMA_DIR.glob("*.json"))
    assert on_disk == sorted(expected), "schema files missing or stale"
    assert schema_mod.drifted() == [], "run `python -m esperd_contracts.schema`"


def _state_schema() -> dict:
    return json.loads(schema_mod.generate()["state.json"])


def test_drift_ignores_docstring_layout_and_alternative_order(tmp_path: Path) -> None:
    # msgspec 0.22 keeps a docstring's indentation ("...\n    to keep..."), 0.23 strips it, and
    # releases before 0.22 list anyOf alternatives in another order: none of that is drift.
    schema_mod.write(tmp_path)
    doc = _state_schema()
    slot = doc["$defs"]["SeedSlotState"]
    slot["description"] = slot["description"].replace(" to keep", "\n    to keep  ")
    hardware = doc["$defs"]["SystemStatePacket"]["properties"]["hardware"]
    hardware["anyOf"].reverse()
    (tmp_path / "state.json").write_text(json.dumps(doc, indent=4), encoding="utf-8")
    assert schema_mod.drifted(tmp_path) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["$defs"]["SeedSlotState"].update(description="Something else entirely."),
        lambda d: d["$defs"]["SystemStatePacket"]["properties"]["val_accuracy"].update(maximum=2.0),
        lambda d: d["$defs"]["SystemStatePacket"]["required"].append("epoch"),
        lambda d: d["$defs"]["SystemStatePacket"]["properties"]["hardware"]["anyOf"].pop(),
    ],
    ids=["description-text", "bound", "required", "alternative"],
)
def test_drift_catches_changes_of_meaning(tmp_path: Path, change) -> None:
    schema_mod.write(tmp_path)
    doc = _state_schema()
    change(doc)
    (tmp_path / "state.json").write_text(json.dumps(doc), encoding="utf-8")
    assert schema_mod.drifted(tmp_path) == ["state.json"]


def test_generated_descriptions_are_single_spaced() -> None:
    for text in schema_mod.generate().values():
        for line in text.splitlines():
            if '"description"' in line:
                assert "\\n" not in line and "  " not in line.split('"description": ', 1)[1], line


def test_one_file_per_kind_and_one_for_the_status() -> None:
    assert sorted(schema_mod.generate()) == sorted([*(f"{kind}.json" for kind in KINDS), "status.json"])
    design_kinds = {"health", "health_batch", "state", "topology", "command", "ack"}
    assert set(schema_mod.generate()) == {f"{kind}.json" for kind in design_kinds} | {"status.json"}


def test_status_schema_describes_every_section() -> None:
    doc = json.loads(schema_mod.generate()["status.json"])
    assert doc["$schema"] == schema_mod.JSON_SCHEMA_DIALECT and doc["$ref"] == "#/$defs/Status"
    body = doc["$defs"]["Status"]
    assert set(body["properties"]) == set(Status.__struct_fields__)
    for section in ("scheduler", "nats", "learner", "cluster", "run_table", "tasks", "reload", "decisions"):
        assert section in body["properties"]
    # A section's own fields are in its definition: the learner's breaker state among them.
    assert "breaker" in doc["$defs"]["LearnerStatus"]["properties"]


def test_generation_is_deterministic() -> None:
    first, second = schema_mod.generate(), schema_mod.generate()
    assert first == second
    for text in first.values():
        assert text.endswith("}\n")
        # Sorted keys with indent 2: re-dumping reproduces the text exactly.
        assert json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n" == text


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_schema_content(cls: type[msgspec.Struct]) -> None:
    kind = cls.__struct_config__.tag
    doc = json.loads(schema_mod.generate()[f"{kind}.json"])
    assert doc["$schema"] == schema_mod.JSON_SCHEMA_DIALECT
    assert doc["$ref"] == f"#/$defs/{cls.__name__}"
    body = doc["$defs"][cls.__name__]
    assert body["properties"]["kind"] == {"enum": [kind]}
    assert set(body["properties"]) == {"kind", *cls.__struct_fields__}
    required = {f.name for f in msgspec.structs.fields(cls) if f.required}
    assert set(body["required"]) == {"kind"} | required
    # The note on the msgpack form, with the positional wire order.
    assert "msgpack form is positional" in doc["description"]
    assert f'["{kind}", {", ".join(cls.__struct_fields__)}]' in doc["description"]


def test_health_schema_keeps_constraints() -> None:
    doc = json.loads(schema_mod.generate()["health.json"])
    props = doc["$defs"]["HealthSignal"]["properties"]
    assert (props["health_score"]["minimum"], props["health_score"]["maximum"]) == (0.0, 1.0)
    assert props["layer_id"]["minimum"] == 0
    assert doc["$defs"]["HealthSignal"]["required"] == ["kind", "layer_id", "health_score"]


def test_check_passes_on_fresh_files_and_names_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert schema_mod.main(["--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(schema_mod.generate())
    assert schema_mod.main(["--check", "--dir", str(tmp_path)]) == 0

    (tmp_path / "health.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "ack.json").unlink()
    (tmp_path / "gone.json").write_text("{}\n", encoding="utf-8")
    capsys.readouterr()
    assert schema_mod.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    for name in ("health.json", "ack.json", "gone.json"):
        assert name in err
    assert "state.json" not in err
    assert schema_mod.drifted(tmp_path) == ["ack.json", "gone.json", "health.json"]

    # Writing again repairs everything, stale files included.
    assert schema_mod.main(["--dir", str(tmp_path)]) == 0
    assert schema_mod.drifted(tmp_path) == []


def test_module_entry_point_check() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "esperd_contracts.schema", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout
