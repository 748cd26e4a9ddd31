"""Every wire example in README.md, examples/*.md and docs/*.md, judged twice.

The examples are read out of the Markdown files (see doc_examples.py), so a doc edit is
tested as written. Each must get the same verdict from the `jsonschema` package against
contracts/schema/ and from esperd, and that verdict must be the one the docs give.
"""

from __future__ import annotations

import pytest
from doc_examples import CHANNEL_KINDS, DOC_FILES, DocExample, EsperdJudge, SchemaJudge, doc_examples

EXAMPLES = doc_examples()


@pytest.fixture(scope="module")
def schema_judge() -> SchemaJudge:
    return SchemaJudge()


def test_the_docs_have_examples_of_every_inbound_kind_and_of_rejections() -> None:
    # Guards the extraction itself: a parser that finds nothing would pass every test below.
    files = {e.where.split(":")[0] for e in EXAMPLES}
    assert {"README.md", "examples/nats-cli.md"} <= files
    kinds = {kind for e in EXAMPLES if e.meant_valid for kind in CHANNEL_KINDS[e.channel]}
    assert {"topology", "health", "health_batch", "state", "ack"} <= kinds
    assert sum(not e.meant_valid for e in EXAMPLES) >= 3
    assert all(path.is_file() for path in DOC_FILES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_schema_and_esperd_agree_with_the_docs(example: DocExample, schema_judge: SchemaJudge) -> None:
    schema_errors = schema_judge.errors(example.payload, CHANNEL_KINDS[example.channel])
    refusal = EsperdJudge().refusal(example.subject, example.payload, example.content_type)
    if example.meant_valid:
        assert schema_errors == [], f"{example.where}: the published schema refuses a documented packet"
        assert refusal == "", f"{example.where}: esperd refuses a documented packet"
    else:
        assert schema_errors, f"{example.where}: the published schema accepts a documented rejection"
        assert refusal, f"{example.where}: esperd accepts a documented rejection"


def test_a_nested_signal_without_kind_is_valid_both_ways(schema_judge: SchemaJudge) -> None:
    # The README's health_batch example, in short: health_batch.json once required `kind`
    # on every nested signal although esperd never did.
    payload = b'{"kind":"health_batch","signals":[{"layer_id":0,"health_score":0.9}]}'
    assert schema_judge.valid(payload, ("health_batch",))
    assert EsperdJudge().valid("esper.r1.health", payload)
    wrong = b'{"kind":"health_batch","signals":[{"kind":"state","layer_id":0,"health_score":0.9}]}'
    assert not schema_judge.valid(wrong, ("health_batch",))
    assert not EsperdJudge().valid("esper.r1.health", wrong)


@pytest.mark.parametrize("number", ["1.0", "1e0", "10E-1"])
def test_an_integer_written_as_a_whole_float_is_valid_both_ways(
    number: str, schema_judge: SchemaJudge
) -> None:
    # JSON Schema counts 1.0 as an integer, so esperd must take it too.
    payload = f'{{"kind":"health","layer_id":{number},"health_score":0.5,"v":{number}}}'.encode()
    assert schema_judge.valid(payload, ("health",))
    assert EsperdJudge().valid("esper.r1.health", payload)
    fraction = b'{"kind":"health","layer_id":1.5,"health_score":0.5}'
    assert not schema_judge.valid(fraction, ("health",))
    assert not EsperdJudge().valid("esper.r1.health", fraction)
