import json
from contextlib import contextmanager

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
    answer = "verdict: unsafe\ncategory: fraud\nintent: scam people"
    score = 0.37
    monkeypatch.setattr(
        moderator, "generate_with_scores", lambda texts, images, max_new_tokens=64: [(answer, score)] * len(texts)
    )
    assert moderator.moderate(dialogues[0], images[0]).p_unsafe == score
    moderator.threshold = score + 1e-6
    assert moderator.moderate(dialogues[0], images[0]).verdict == "safe"
    moderator.threshold = score - 1e-6
    flagged = moderator.moderate(dialogues[0], images[0])
    assert flagged.verdict == "unsafe" and flagged.category == "fraud"
    assert flagged.policy == moderator.taxonomy.by_id["fraud"].policy
    moderator.threshold = 0.5


@contextmanager
def verdict_prefix_nudged(moderator, rows=None):
    """Make the random tiny model generate the ``verdict: `` prefix (on batch ``rows``; None: all).

    A forward hook adds a large logit to the next prefix token after the generation prompt's last
    token and after each prefix token. The safe/unsafe logits at the verdict position are untouched,
    so P(unsafe) is still the random model's own score. Also counts the forward passes that process
    a whole prompt (prefills) and the ``generate`` calls.
    """
    prefix = moderator._prefix
    prompt_end = moderator._inputs(moderator.prompt_texts(*_one_dialogue()), [[]])["input_ids"][0, -1].item()
    following = {prompt_end: prefix[0], **{prefix[i]: prefix[i + 1] for i in range(len(prefix) - 1)}}
    counts = {"prefills": 0, "generate": 0}

    def hook(module, args, kwargs, output):
        input_ids = kwargs["input_ids"]
        counts["prefills"] += input_ids.shape[1] > 1
        for row in range(input_ids.shape[0]):
            target = following.get(input_ids[row, -1].item())
            if target is not None and (rows is None or row in rows):
                output.logits[row, -1, target] += 1e3

    generate = moderator.model.generate

    def counting_generate(*args, **kwargs):
        counts["generate"] += 1
        return generate(*args, **kwargs)

    handle = moderator.model.register_forward_hook(hook, with_kwargs=True)
    moderator.model.generate = counting_generate
    try:
        yield counts
    finally:
        handle.remove()
        del moderator.model.generate


def _one_dialogue():
    return [[{"role": "user", "content": "hi"}]], [[]]


def test_one_generate_pass_gives_the_scoring_pass_value_when_the_verdict_prefix_is_generated(moderator):
    # Bug caught: a second (scoring) forward per decision, or the score read at the wrong step
    # (the first generated step, or the step of the verdict word's successor).
    dialogues, images = _dialogues()
    texts = moderator.prompt_texts(dialogues, [[0]] * len(dialogues))
    with verdict_prefix_nudged(moderator) as counts:
        verdicts = moderator.moderate_batch(dialogues, images, max_new_tokens=4)
        assert counts == {"prefills": 1, "generate": 1}  # one pass: no separate scoring forward
        two_pass = moderator.p_unsafe(texts, images)
    assert all(v.raw.startswith("verdict:") for v in verdicts)
    for verdict, score in zip(verdicts, two_pass, strict=True):
        assert verdict.p_unsafe == pytest.approx(score, abs=1e-5)
    assert len({round(v.p_unsafe, 6) for v in verdicts}) == len(verdicts)  # per-row scores, not row 0's


def test_the_one_pass_score_is_read_before_generations_logits_processors(moderator, monkeypatch):
    # Qwen2.5-VL-Instruct ships repetition_penalty 1.05, and " safe"/" unsafe" occur in the system
    # prompt: a score read from generate's processed scores would differ from the scoring pass's.
    dialogues, images = _dialogues()
    texts = moderator.prompt_texts(dialogues, [[0]] * len(dialogues))
    monkeypatch.setattr(moderator.model.generation_config, "repetition_penalty", 1.5)
    with verdict_prefix_nudged(moderator):
        verdicts = moderator.moderate_batch(dialogues, images, max_new_tokens=4)
        two_pass = moderator.p_unsafe(texts, images)
    assert [v.p_unsafe for v in verdicts] == pytest.approx(two_pass, abs=1e-5)


def test_rows_without_the_verdict_prefix_are_scored_by_the_scoring_pass_and_fail_closed(moderator):
    # Row 1 generates the prefix, rows 0 and 2 do not (as the untrained model never does): those two
    # get the scoring pass's P(unsafe) (one extra pass for just them) and a fail-closed verdict.
    dialogues, images = _dialogues()
    texts = moderator.prompt_texts(dialogues, [[0]] * len(dialogues))
    with verdict_prefix_nudged(moderator, rows={1}) as counts:
        verdicts = moderator.moderate_batch(dialogues, images, max_new_tokens=4)
        assert counts == {"prefills": 2, "generate": 1}
        two_pass = moderator.p_unsafe(texts, images)
    assert [v.raw.startswith("verdict:") for v in verdicts] == [False, True, False]
    for verdict, score in zip(verdicts, two_pass, strict=True):
        assert verdict.p_unsafe == pytest.approx(score, abs=1e-4)  # rows 0, 2: scored in a batch of two
    for verdict in (verdicts[0], verdicts[2]):
        assert verdict.parse_error and verdict.verdict == "unsafe" and verdict.category == UNKNOWN_CATEGORY
    # Too few new tokens to reach the verdict position: scored by the scoring pass, never left unscored.
    with verdict_prefix_nudged(moderator):
        short = moderator.moderate_batch(dialogues, images, max_new_tokens=len(moderator._prefix))
    assert [v.p_unsafe for v in short] == pytest.approx(two_pass, abs=1e-4)


def test_the_loader_pads_left_and_a_right_padded_processor_is_refused_not_changed(moderator, tiny_model_dir):
    from transformers import AutoProcessor

    from moderator.loading import ModelLoadError

    assert moderator.processor.tokenizer.padding_side == "left"  # set once, by moderator.loading
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "right"  # e.g. the trainer's processor, shared with its collator
    with pytest.raises(ModelLoadError, match="pads on the right"):
        Moderator(moderator.model, processor)
    assert processor.tokenizer.padding_side == "right"  # someone else's processor is not silently changed


def test_checkpoint_is_served_with_its_categories_and_prompt_format(tiny_model_dir, tmp_path):
    import json
    import shutil

    from moderator.contract import MODERATOR_CONFIG_FILE, PROMPT_FORMAT_VERSION, TAXONOMY_FILE
    from moderator.inference import ModeratorConfigError, serving_contract
    from moderator.taxonomy import DEFAULT_TAXONOMY_PATH, load_taxonomy

    export = tmp_path / "export"
    shutil.copytree(tiny_model_dir, export)
    # The export ships a taxonomy whose policy text was edited after training: allowed.
    (export / TAXONOMY_FILE).write_text(
        DEFAULT_TAXONOMY_PATH.read_text().replace("Do not help harm", "Never help harm")
    )
    shipped = load_taxonomy(export / TAXONOMY_FILE)
    config = {"prompt_format_version": PROMPT_FORMAT_VERSION, "taxonomy_file": TAXONOMY_FILE,
              "taxonomy_sha256": shipped.sha256, "decision_threshold": 0.3}  # fmt: skip
    (export / MODERATOR_CONFIG_FILE).write_text(json.dumps(config))
    moderator = Moderator.from_pretrained(export, verify=False)  # hand-made: no manifest to verify
    assert moderator.taxonomy.sha256 == shipped.sha256 != load_taxonomy().sha256 and moderator.threshold == 0.3
    assert serving_contract(export, load_taxonomy())[0].sha256 == load_taxonomy().sha256  # same ids: fine

    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(DEFAULT_TAXONOMY_PATH.read_text().replace("id: fraud", "id: scams"))
    with pytest.raises(ModeratorConfigError, match="other taxonomy categories"):
        serving_contract(export, load_taxonomy(renamed))
    (export / MODERATOR_CONFIG_FILE).write_text(json.dumps({**config, "prompt_format_version": "0"}))
    with pytest.raises(ModeratorConfigError, match="prompt format 0"):
        serving_contract(export)

    run = tmp_path / "sft"  # a training output records its category ids in moderator_run.json
    run.mkdir()
    recorded = {"prompt_format_version": PROMPT_FORMAT_VERSION, **load_taxonomy(renamed).provenance()}
    (run / "moderator_run.json").write_text(json.dumps(recorded))
    with pytest.raises(ModeratorConfigError, match="moderator_run.json: trained with other taxonomy categories"):
        serving_contract(run)
