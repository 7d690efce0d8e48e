import json

import pytest
from PIL import Image

from moderator.inference import Moderator
from moderator.taxonomy import UNKNOWN_CATEGORY
from tests.conftest import SAMPLE_DIR


@pytest.fixture(scope="module")
def moderator(tiny_model_dir):
    return Moderator.from_pretrained(tiny_model_dir)


def _dialogues():
    records = (
        json.loads((SAMPLE_DIR / "4_turn.json").read_text())[:2]
        + json.loads((SAMPLE_DIR / "1_turn.json").read_text())[5:6]
    )
    images = [[Image.new("RGB", (56 + 28 * i, 56), (40 * i, 90, 200))] for i in range(len(records))]
    return [r["dialogue"] for r in records], images


def test_batched_scores_and_generations_match_one_at_a_time(moderator):
    # Dialogues of different lengths force padding; right padding would corrupt batched outputs.
    dialogues, images = _dialogues()
    batched = moderator.moderate_batch(dialogues, images, max_new_tokens=8)
    for dialogue, imgs, verdict in zip(dialogues, images, batched, strict=True):
        single = moderator.moderate_batch([dialogue], [imgs], max_new_tokens=8)[0]
        assert single.p_unsafe == pytest.approx(verdict.p_unsafe, abs=1e-4)
        assert single.raw == verdict.raw


def test_untrained_output_is_fail_closed_and_scores_are_probabilities(moderator):
    dialogues, images = _dialogues()
    verdict = moderator.moderate(dialogues[0], images[0])
    assert 0.0 <= verdict.p_unsafe <= 1.0
    # Random weights do not produce the verdict format: the moderator must flag, not pass.
    assert verdict.parse_error and verdict.verdict == "unsafe" and verdict.category == UNKNOWN_CATEGORY
    assert verdict.policy is None


def test_threshold_decides_when_the_answer_parses(moderator, monkeypatch):
    dialogues, images = _dialogues()
    monkeypatch.setattr(
        moderator,
        "generate",
        lambda texts, images, max_new_tokens=64: ["verdict: unsafe\ncategory: fraud\nintent: scam people"] * len(texts),
    )
    score = moderator.moderate(dialogues[0], images[0]).p_unsafe
    moderator.threshold = score + 1e-6
    assert moderator.moderate(dialogues[0], images[0]).verdict == "safe"
    moderator.threshold = score - 1e-6
    flagged = moderator.moderate(dialogues[0], images[0])
    assert flagged.verdict == "unsafe" and flagged.category == "fraud"
    assert flagged.policy == moderator.taxonomy.by_id["fraud"].policy
    moderator.threshold = 0.5
