import json
import math
from contextlib import contextmanager

import pytest
from PIL import Image

from moderator.inference import Moderator
from moderator.taxonomy import UNKNOWN_CATEGORY
from tests.conftest import SAMPLE_DIR


@pytest.fixture(scope="module")
def moderator(tiny_model_dir):
    return Moderator.from_pretrained(tiny_model_dir, verify=False)  # a checkpoint, not an export


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


@pytest.mark.parametrize("bad_score", [float("nan"), float("-inf")])
def test_a_non_finite_score_flags_whatever_the_answer_says(moderator, monkeypatch, bad_score):
    # Issue 21, defect 10: P(unsafe) = NaN with the answer `verdict: safe` returned safe (NaN >= t is False).
    dialogues, images = _dialogues()
    real = moderator._generate_scored

    def broken_scores(*args, **kwargs):
        raws, scores, out, pairs = real(*args, **kwargs)
        return ["verdict: safe"] * len(raws), [bad_score] * len(scores), out, pairs

    monkeypatch.setattr(moderator, "_generate_scored", broken_scores)
    verdicts = [
        *moderator.moderate_batch([dialogues[0]], [images[0]], max_new_tokens=4),
        *moderator.moderate_turns(dialogues[0], images[0], max_new_tokens=4, answer="full"),  # the cached path
    ]
    for verdict in verdicts:
        assert verdict.verdict == "unsafe" and verdict.flagged, verdict  # fail-closed
        assert verdict.category == UNKNOWN_CATEGORY and verdict.raw == "verdict: safe"

    # The decision (no text): the verdict position's logits are not finite.
    real_forward = moderator._forward_logits

    def broken_logits(*args, **kwargs):
        rows, cache = real_forward(*args, **kwargs)
        if rows.shape[0] == len(moderator._prefix) + 2:  # the prefill: its row k is the verdict position
            rows[len(moderator._prefix)] = bad_score
        return rows, cache

    monkeypatch.setattr(moderator, "_forward_logits", broken_logits)
    for verdict in moderator.moderate_turns(dialogues[0], images[0]):
        assert verdict.flagged and verdict.answer == "decision" and math.isnan(verdict.p_unsafe), verdict


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

    from moderator.artefacts import SERVING_CONFIG_FILE as MODERATOR_CONFIG_FILE
    from moderator.contract import PROMPT_FORMAT_VERSION, TAXONOMY_FILE
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


@contextmanager
def answers_scripted(moderator, unsafe_rows=(), forced_category="fraud"):
    """Make the random tiny model answer ``verdict: safe`` (``verdict: unsafe`` with category ``fraud`` on
    batch ``unsafe_rows`` of a greedy generate), and continue the forced ``verdict: unsafe\\ncategory:``
    with `` <forced_category>\\nintent: scam people``.

    A forward hook adds a large logit to the scripted next token, chosen by the longest match of the
    row's tokens so far against each script's trigger and answer. P(unsafe) is read from the output
    layer before the hook, so the scores are still the random model's. Records each ``generate``
    call's batch size.
    """
    from moderator.contract import SAFE, UNSAFE, render_target
    from moderator.inference import FORCED_UNSAFE_PREFIX

    tokenizer = moderator.processor.tokenizer

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    prompt_end = moderator._inputs(moderator.prompt_texts(*_one_dialogue()), [[]])["input_ids"][0, -1].item()
    forced = ids(FORCED_UNSAFE_PREFIX)
    forced_answer = ids(render_target(UNSAFE, forced_category, "scam people"))
    assert forced_answer[: len(forced)] == forced
    safe = ([prompt_end], ids(render_target(SAFE)) + [eos])
    unsafe = ([prompt_end], ids(render_target(UNSAFE, "fraud", "scam people")) + [eos])
    continuation = (forced[-2:], forced_answer[len(forced) :] + [eos])
    history: dict[int, list[int]] = {}
    batch_sizes: list[int] = []

    def hook(module, args, kwargs, output):
        input_ids = kwargs["input_ids"]
        for row in range(input_ids.shape[0]):
            if input_ids.shape[1] > 1:  # a prefill: the row's tokens start over
                history[row] = input_ids[row].tolist()
            else:
                history.setdefault(row, []).append(input_ids[row, -1].item())
            # ``unsafe_rows`` index the first generate's batch; later calls hold other rows.
            greedy = unsafe if row in unsafe_rows and len(batch_sizes) == 1 else safe
            matches = [
                (len(trigger) + k, answer[k])
                for trigger, answer in (greedy, continuation)
                for k in range(len(answer))
                if history[row][-(len(trigger) + k) :] == trigger + answer[:k]
            ]
            if matches:
                output.logits[row, -1, max(matches)[1]] += 1e3

    generate = moderator.model.generate

    def counting_generate(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    handle = moderator.model.register_forward_hook(hook, with_kwargs=True)
    moderator.model.generate = counting_generate
    try:
        yield batch_sizes
    finally:
        handle.remove()
        del moderator.model.generate


def test_the_forced_prefix_is_the_contracts_unsafe_target_up_to_the_categorys_own_token(moderator):
    # Bug caught: forcing "category: " with its space, a lone space token the trained model never saw
    # before a category (its targets tokenize the space into the category's first token, " fraud").
    from moderator.contract import UNSAFE, VERDICT_PREFIX, render_target
    from moderator.inference import FORCED_UNSAFE_PREFIX

    tokenizer = moderator.processor.tokenizer
    forced = tokenizer(FORCED_UNSAFE_PREFIX, add_special_tokens=False)["input_ids"]
    assert FORCED_UNSAFE_PREFIX.startswith(VERDICT_PREFIX + UNSAFE + "\n")
    for category in moderator.taxonomy.ids:
        target = tokenizer(render_target(UNSAFE, category, "an intent"), add_special_tokens=False)["input_ids"]
        assert target[: len(forced)] == forced and len(target) > len(forced)


def test_a_score_flagged_safe_answer_takes_category_and_intent_from_the_forced_unsafe_answer(moderator, monkeypatch):
    # Bug caught (real-weights efficacy run): with a threshold below 0.5 the score flags dialogues whose
    # greedy answer says "verdict: safe"; they got category "unknown", no intent and no policy.
    from moderator.inference import FORCED_UNSAFE_PREFIX

    dialogues, images = _dialogues()
    with answers_scripted(moderator):
        scores = [v.p_unsafe for v in moderator.moderate_batch(dialogues, images, max_new_tokens=24)]
    low, said_safe, said_unsafe = sorted(range(len(scores)), key=scores.__getitem__)
    monkeypatch.setattr(moderator, "threshold", (scores[low] + scores[said_safe]) / 2)
    with answers_scripted(moderator, unsafe_rows={said_unsafe}) as batch_sizes:
        verdicts = moderator.moderate_batch(dialogues, images, max_new_tokens=24)
    assert batch_sizes == [3, 1]  # only the disagreeing row pays a second generate
    fraud_policy = moderator.taxonomy.by_id["fraud"].policy
    forced = verdicts[said_safe]
    assert forced.raw == "verdict: safe" and forced.forced_raw == FORCED_UNSAFE_PREFIX + " fraud\nintent: scam people"
    assert (forced.verdict, forced.category, forced.intent, forced.policy) == (
        "unsafe",
        "fraud",
        "scam people",
        fraud_policy,
    )
    assert not forced.parse_error and forced.p_unsafe == scores[said_safe]
    by_text = verdicts[said_unsafe]  # flagged by score and text alike: as before, no forced answer
    assert (by_text.category, by_text.intent, by_text.policy, by_text.forced_raw) == (
        "fraud",
        "scam people",
        fraud_policy,
        "",
    )
    assert verdicts[low].verdict == "safe" and verdicts[low].category is None and verdicts[low].forced_raw == ""

    with answers_scripted(moderator, forced_category="not_a_category") as batch_sizes:
        unknown = moderator.moderate(dialogues[said_safe], images[said_safe])
    assert batch_sizes == [1, 1] and unknown.forced_raw.startswith(FORCED_UNSAFE_PREFIX + " not_a_category")
    assert (unknown.verdict, unknown.category, unknown.intent, unknown.policy) == (
        "unsafe",
        UNKNOWN_CATEGORY,
        None,
        None,
    )
    assert not unknown.parse_error
