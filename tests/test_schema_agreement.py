"""Property: the published JSON Schemas and esperd agree on every packet, valid or not.

Valid packets are generated from the schema files themselves (not from esperd's types);
invalid candidates are those packets with one part replaced, removed or added. For each,
the `jsonschema` package and esperd must give the same verdict.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from doc_examples import CHANNEL_KINDS, EsperdJudge, SchemaJudge, load_schemas
from hypothesis import HealthCheck, event, given, settings, strategies as st

# Hypothesis runs of hundreds of packets per kind: the full suite, not the fast tier
# (test_schema.py and test_doc_examples.py check the schemas there).
pytestmark = pytest.mark.slow

SCHEMAS = load_schemas()
KIND_CHANNEL = {kind: channel for channel, kinds in CHANNEL_KINDS.items() for kind in kinds}
#: What a mutation puts in place of a part: wrong types, out-of-range and borderline values.
JUNK = [
    "x",
    "",
    "a" * 300,
    "r1\n",
    -1,
    0,
    1,
    1.0,
    1.5,
    -0.5,
    2,
    2**31,
    2**62,
    2**63,
    2**70,
    1e300,
    1e301,
    -1e301,
    None,
    True,
    False,
    [],
    [0],
    [0, 1, 2],
    {},
    {"layer_id": 0},
    "dormant",
    "applied",
    "germinate",
    "teleport",
]
JUDGE = SchemaJudge()
ESPERD = EsperdJudge()  # one intake: its rate limiter keeps the rejection log short


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def instances(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under `schema` (the vocabulary contracts/schema/ uses)."""
    schema = _resolve(schema, root)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([instances(s, root) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "array":
        return _arrays(schema, root)
    if kind == "object":
        return _objects(schema, root)
    return _scalars(kind, schema)


def _scalars(kind: str | None, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = schema.get("minimum", -(2**63)), schema.get("maximum", 2**63 - 1)
        ints = st.integers(low, high)
        # JSON has one number type: 3.0 is an integer to JSON Schema, so it must be to esperd.
        return st.one_of(ints, st.integers(low, min(high, 2**53)).map(float))
    if kind == "number":
        low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
        exclude = "exclusiveMinimum" in schema
        return st.floats(low, high, exclude_min=exclude, allow_nan=False, allow_infinity=False)
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 16))
    raise NotImplementedError(f"schema vocabulary not covered: {sorted(schema)}")


def _arrays(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[list[Any]]:
    if "prefixItems" in schema:
        items = [instances(s, root) for s in schema["prefixItems"]]
        at_least = schema.get("minItems", len(items))
        return st.integers(at_least, len(items)).flatmap(lambda n: st.tuples(*items[:n]).map(list))
    return st.lists(instances(schema["items"], root), max_size=min(4, schema.get("maxItems", 4)))


def _objects(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    if "properties" not in schema:  # a map (metrics)
        names = schema.get("propertyNames", {})
        keys = st.text(min_size=names.get("minLength", 0), max_size=names.get("maxLength", 16))
        values = instances(schema["additionalProperties"], root)
        return st.dictionaries(keys, values, max_size=min(4, schema.get("maxProperties", 4)))
    required = set(schema.get("required", []))
    props = schema["properties"]
    return st.fixed_dictionaries(
        {k: instances(v, root) for k, v in props.items() if k in required},
        optional={k: instances(v, root) for k, v in props.items() if k not in required},
    )


def packets(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    root = SCHEMAS[kind]
    return instances(root, root)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document (dict keys and list indexes), the root included."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A valid packet with one part replaced, removed, or a key added: usually invalid."""
    doc = draw(packets(kind))
    path = draw(st.sampled_from(_paths(doc)))
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if not path:
        return draw(st.sampled_from(JUNK)) if action == "replace" else doc
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "replace":
        parent[last] = draw(st.sampled_from(JUNK))
    elif action == "remove":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][draw(st.sampled_from(["extra", "kind", "layer_id", "v"]))] = draw(st.sampled_from(JUNK))
    elif isinstance(parent[last], list):
        parent[last].append(draw(st.sampled_from(JUNK)))
    return doc


def assert_agreement(kind: str, doc: Any) -> bool:
    payload = json.dumps(doc).encode()
    schema_errors = JUDGE.errors(payload, CHANNEL_KINDS[KIND_CHANNEL[kind]])
    refusal = ESPERD.refusal(f"esper.r1.{KIND_CHANNEL[kind].value}", payload)
    assert bool(schema_errors) == bool(refusal), (
        f"disagreement on {payload[:400]!r}: schema says {schema_errors or 'valid'}, "
        f"esperd says {refusal or 'valid'}"
    )
    return not schema_errors


KINDS = sorted(SCHEMAS)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_packets_are_valid_both_ways(kind: str, data: st.DataObject) -> None:
    doc = data.draw(packets(kind))
    assert assert_agreement(kind, doc), f"the schema refuses what it generated: {doc}"


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_packets_get_one_verdict(kind: str, data: st.DataObject) -> None:
    valid = assert_agreement(kind, data.draw(mutated(kind)))
    event("valid" if valid else "invalid")


@pytest.mark.parametrize("kind", KINDS)
def test_mutations_do_produce_invalid_packets(kind: str) -> None:
    # The agreement above means little if every mutant stayed valid.
    verdicts = []

    @settings(max_examples=100, deadline=None, database=None)
    @given(doc=mutated(kind))
    def collect(doc: Any) -> None:
        verdicts.append(assert_agreement(kind, doc))

    collect()
    assert verdicts.count(False) >= 20, f"{kind}: only {verdicts.count(False)} of {len(verdicts)} invalid"


#: Every lever a command can carry (issue 16), and a value of each that both must accept.
LEVERS = {
    "dwell_epochs": 3,
    "isolation": "shared",
    "lr_multiplier": 2.0,
    "steepness": 0.5,
    "alpha_target": 0.25,
    "alpha_speed": "slow",
    "alpha_curve": "cosine",
}


def test_the_command_schema_carries_every_lever() -> None:
    properties = _resolve(SCHEMAS["command"], SCHEMAS["command"])["properties"]
    assert set(LEVERS) <= set(properties)
    command = {"kind": "command", "command_id": "c", "run_id": "r1", "layer_id": 1, "op": "germinate"}
    assert assert_agreement("command", {**command, **LEVERS})
    for lever, junk in [
        ("alpha_speed", "warp"),
        ("alpha_curve", "square"),
        ("alpha_speed", 3),
        ("isolation", "default"),
        ("dwell_epochs", -1),
        ("lr_multiplier", 0.0),
        ("alpha_target", 1.5),
    ]:
        assert not assert_agreement("command", {**command, **LEVERS, lever: junk}), lever


#: The lever telemetry (issue 16 item 3) and the milestone counterfactuals: one valid value each.
TELEMETRY = {
    "g2_headroom": -0.05,
    "gradient_stability": 0.01,
    "host_gradient_via_seed": 0.2,
    "coadaptation_delta": -0.5,
    "seed_loss_gradient": 0.3,
    "seed_weight_magnitude": 4.0,
    "lr_stability_ratio": 1.0,
    "alpha_variance": 0.02,
}
MILESTONES = (
    "counterfactual_alpha25",
    "counterfactual_alpha50",
    "counterfactual_alpha75",
    "counterfactual_alpha100",
)


def test_the_health_and_state_schemas_carry_the_lever_telemetry() -> None:
    for kind in ("health", "health_batch"):
        assert set(TELEMETRY) <= set(SCHEMAS[kind]["$defs"]["HealthSignal"]["properties"])
    signal = {"kind": "health", "layer_id": 2, "health_score": 0.5}
    assert assert_agreement("health", {**signal, **TELEMETRY})
    assert assert_agreement("health_batch", {"kind": "health_batch", "signals": [{**signal, **TELEMETRY}]})
    for name, junk in [
        ("gradient_stability", -0.1),
        ("host_gradient_via_seed", "x"),
        ("coadaptation_delta", -1.01),
        ("lr_stability_ratio", 1.5),
        ("seed_weight_magnitude", None),
        ("g2_headroom", 1e301),
    ]:
        assert not assert_agreement("health", {**signal, **TELEMETRY, name: junk}), name
    # The milestones sit at the end of a seed slot's array; null is "not reached yet".
    slot_items = SCHEMAS["state"]["$defs"]["SeedSlotState"]["prefixItems"]
    assert len(slot_items) >= len(MILESTONES)
    slot = [3, "blending", "conv_light", 0.5, 1, 100, 0.01, 0.02, 0, 0.001, None, -0.002, 0.0]
    assert assert_agreement("state", {"kind": "state", "seeds": [slot]})
    assert not assert_agreement("state", {"kind": "state", "seeds": [[*slot[:10], "x"]]})
