import json

import pytest

from moderator.schema import RecordError, format_row_id, parse_row_id, parse_safemt_record
from moderator.taxonomy import load_taxonomy
from tests.conftest import SAMPLE_DIR

TAXONOMY = load_taxonomy()


@pytest.mark.parametrize("turns", [1, 2, 4])
def test_every_real_sample_record_is_valid(turns):
    records = json.loads((SAMPLE_DIR / f"{turns}_turn.json").read_text())
    parsed = [parse_safemt_record(r, TAXONOMY, expected_turns=turns) for r in records]
    assert len(parsed) == 52
    assert all(p.turns == turns and len(p.dialogue) == 2 * turns - 1 for p in parsed)
    assert {p.source for p in parsed} == {"mllm", "mm", "jbv", "beaver", "guard"}


def test_hub_layout_is_read():
    raw = json.loads((SAMPLE_DIR / "2_turn.json").read_text())[3]
    hub = {
        "id": raw["id"],
        "scenario": raw["scenario"],
        "image_rel_path": raw["image_path"],
        "dialogue": json.dumps(raw["dialogue"]),
        "question": raw["question"],
    }
    parsed = parse_safemt_record(hub, TAXONOMY, expected_turns=2)
    assert parsed.image_path == raw["image_path"] and list(parsed.dialogue) == raw["dialogue"]


def _record():
    return json.loads((SAMPLE_DIR / "2_turn.json").read_text())[0]


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("question"), "question"),
        (lambda r: r.update(scenario="Jaywalking"), "scenario"),
        (lambda r: r["dialogue"][1].update(role="user"), "dialogue[1].role"),
        (lambda r: r["dialogue"].pop(), "dialogue"),
        (lambda r: r["dialogue"][0].update(content=None), "dialogue[0].content"),
        (lambda r: r.update(dialogue="[not json"), "dialogue"),
        (lambda r: r.update(id=7), "id"),
        (lambda r: r.update(id="mllm_fraud_1@1of2"), "id"),  # '@' is reserved for prefix row ids
    ],
)
def test_broken_records_name_the_field(mutate, field):
    record = _record()
    mutate(record)
    with pytest.raises(RecordError) as info:
        parse_safemt_record(record, TAXONOMY, expected_turns=2)
    assert info.value.field == field


def test_empty_user_text_is_real_content_not_an_error():
    record = _record()
    record["dialogue"][0]["content"] = ""
    assert parse_safemt_record(record, TAXONOMY).dialogue[0]["content"] == ""


def test_row_ids_round_trip_through_the_one_format():
    assert format_row_id("mllm_economic_harm_1", 2, 4) == "mllm_economic_harm_1@2of4"
    assert parse_row_id(format_row_id("jbv_fraud_42", 3, 8)) == ("jbv_fraud_42", 3, 8)
    assert parse_row_id("jbv_fraud_42") == ("jbv_fraud_42", None, None)  # a full dialogue keeps its id


@pytest.mark.parametrize("row_id", ["a@", "a@2of", "a@xof4", "a@4of4", "a@0of4", "a@b@1of2", "@1of2", "a@1of2x"])
def test_a_malformed_row_id_is_an_error_naming_it(row_id):
    with pytest.raises(ValueError, match=rf"row id {row_id!r}"):
        parse_row_id(row_id)


@pytest.mark.parametrize("record_id, k, n", [("a@b", 1, 2), ("", 1, 2), ("a", 2, 2), ("a", 0, 3)])
def test_a_prefix_row_id_that_could_not_be_parsed_back_is_refused(record_id, k, n):
    with pytest.raises(ValueError):
        format_row_id(record_id, k, n)
