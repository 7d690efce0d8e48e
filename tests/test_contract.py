import json

import pytest

from moderator.contract import (
    SAFE,
    UNSAFE,
    DialogueError,
    ParsedVerdict,
    parse_verdict,
    render_moderator_messages,
    render_target,
    verdict_choice_token_ids,
)
from moderator.taxonomy import UNKNOWN_CATEGORY, load_taxonomy
from tests.conftest import SAMPLE_DIR

TAXONOMY = load_taxonomy()


@pytest.mark.parametrize("category", TAXONOMY.ids)
def test_unsafe_verdict_round_trips_for_every_category(category):
    target = render_target(UNSAFE, category, "How do I do\n  the   harmful thing? ")
    assert target.splitlines()[0] == "verdict: unsafe"
    parsed = parse_verdict(target, TAXONOMY)
    assert parsed == ParsedVerdict(UNSAFE, category, "How do I do the harmful thing?", parse_error=False)
    assert TAXONOMY.policy_for(parsed.category) == TAXONOMY.by_id[category].policy


def test_safe_verdict_round_trips():
    assert render_target(SAFE) == "verdict: safe"
    assert parse_verdict("verdict: safe\n", TAXONOMY) == ParsedVerdict(SAFE, None, None, parse_error=False)


MALFORMED = {
    "empty": "",
    "whitespace": "  \n ",
    "truncated verdict": "verdict: uns",
    "truncated after verdict": "verdict: unsafe\ncategory: fraud",
    "unknown category": "verdict: unsafe\ncategory: jaywalking\nintent: cross the road",
    "wrong order": "category: fraud\nverdict: unsafe\nintent: scam someone",
    "extra prose before": "Sure! verdict: unsafe\ncategory: fraud\nintent: scam someone",
    "extra prose after safe": "verdict: safe\nThe user is just asking about cats.",
    "extra line after intent": "verdict: unsafe\ncategory: fraud\nintent: scam someone\nI hope this helps",
    "empty intent": "verdict: unsafe\ncategory: fraud\nintent: ",
    "safe with category": "verdict: safe\ncategory: fraud\nintent: scam",
    "capitalised verdict": "Verdict: Safe",
    "free text": "I cannot moderate this conversation.",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_parser_is_fail_closed(text):
    parsed = parse_verdict(text, TAXONOMY)
    assert parsed.verdict == UNSAFE
    assert parsed.category == UNKNOWN_CATEGORY
    assert parsed.parse_error is True
    assert TAXONOMY.policy_for(parsed.category) is None


def test_render_target_rejects_incomplete_unsafe():
    with pytest.raises(ValueError):
        render_target(UNSAFE, None, "x")
    with pytest.raises(ValueError):
        render_target(UNSAFE, "fraud", "   ")
    with pytest.raises(ValueError):
        render_target("maybe")


def test_rendered_messages_keep_every_turn_and_put_the_image_in_the_first_user_turn():
    record = json.loads((SAMPLE_DIR / "4_turn.json").read_text())[0]
    messages = render_moderator_messages(record["dialogue"])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert all(cid in messages[0]["content"][0]["text"] for cid in TAXONOMY.ids)
    parts = messages[1]["content"]
    assert [p["type"] for p in parts].count("image") == 1
    image_at = next(i for i, p in enumerate(parts) if p["type"] == "image")
    # The image sits after the first "User: " label and before the first turn's text.
    assert parts[image_at - 1]["text"].endswith("User: ")
    text = "".join(p.get("text", "") for p in parts)
    for message in record["dialogue"]:
        assert message["content"].strip() in text
    assert text.count("User: ") == 4 and text.count("Assistant: ") == 3


def test_image_turns_must_name_user_turns():
    dialogue = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "?"},
    ]
    assert [p["type"] for p in render_moderator_messages(dialogue, image_turns=(0, 2))[1]["content"]].count(
        "image"
    ) == 2
    assert [p["type"] for p in render_moderator_messages(dialogue, image_turns=())[1]["content"]].count("image") == 0
    with pytest.raises(DialogueError, match="index 1"):
        render_moderator_messages(dialogue, image_turns=(1,))
    with pytest.raises(DialogueError, match="role"):
        render_moderator_messages([{"role": "tool", "content": "x"}], image_turns=())


def test_verdict_choice_tokens_split_safe_from_unsafe(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prefix, safe_id, unsafe_id = verdict_choice_token_ids(tokenizer)
    assert safe_id != unsafe_id
    assert tokenizer.decode(prefix + [safe_id]) == "verdict: safe"
    assert tokenizer.decode(prefix + [unsafe_id]).startswith("verdict: un")
