"""The one-step decision (``answer="decision"``): the verdict and category of the full answer, no text decoded.

The tiny model has random weights, so it never writes the answer format by itself. ``format_followed``
makes it: a hook on its output layer raises the logits of the tokens the format allows next (the
``verdict: `` prefix, then *both* verdict words, ``<end>`` after ``safe``, ``\\ncategory:`` after
``unsafe``, then *every* category id's first token, the rest of the chosen id, ``intent: scam people``,
``<end>``). Where the format leaves a choice (safe or unsafe, which category), all allowed tokens get the
same boost, so the random model's own logits choose, and P(unsafe) is unchanged (the same shift on both
verdict words). Both paths read the same hooked layer, so the full answer and the decision are computed
from the same model.
"""

import dataclasses
import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from moderator.contract import DECISION, DECISION_WITH_INTENT, UNSAFE, render_target
from moderator.inference import CATEGORY_LEAF, FORCED_UNSAFE_PREFIX, Moderator
from tests.conftest import SAMPLE_DIR

BOOST = 50.0  # far above the tiny model's logits, small enough that float32 keeps their differences exact


@pytest.fixture(scope="module")
def moderator(tiny_model_dir):
    return Moderator.from_pretrained(tiny_model_dir, verify=False)


def _records(turns: int) -> list[dict]:
    return json.loads((SAMPLE_DIR / f"{turns}_turn.json").read_text())


def _dialogues(count: int) -> tuple[list[list[dict]], list[list[Image.Image]]]:
    records = (_records(1) + _records(2) + _records(4)) * 4
    assert len(records) >= count
    dialogues = [r["dialogue"] for r in records[:count]]
    images = [[Image.new("RGB", (56 + 28 * (i % 3), 56), (37 * i % 256, 90, 200))] for i in range(count)]
    return dialogues, images


@contextmanager
def format_followed(moderator, lean: float = 0.0, favour: tuple[int, ...] = (), bad_category: str | None = None):
    """The tiny model answers in the contract's format, its own logits choosing the verdict and category.

    ``lean`` is added to the ``unsafe`` logit (the random model leans to one word; this evens it out), 5 to
    the ``favour`` tokens wherever they are one of several allowed. ``bad_category``: the answer names this
    string, which is no category id, instead of one of the ids.
    Yields a log of every token sequence the language model ran (one list per forward call).
    """
    tokenizer = moderator.processor.tokenizer

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    header = moderator._inputs(moderator.prompt_texts([[{"role": "user", "content": "hi"}]], [[]]), [[]])
    header = header["input_ids"][0, -3:].tolist()  # the generation prompt's last tokens: "<|im_start|>assistant\n"
    prefix, safe, unsafe = moderator._prefix, moderator._safe_id, moderator._unsafe_id
    forced = ids(FORCED_UNSAFE_PREFIX)
    end = next(iter(moderator._end_ids))
    allowed: dict[tuple[int, ...], set[int]] = {}
    for j in range(len(prefix)):
        allowed[tuple(header + prefix[:j])] = {prefix[j]}
    allowed[tuple(header + prefix)] = {safe, unsafe}
    allowed[tuple(header + prefix + [safe])] = {end}
    for j in range(len(prefix) + 1, len(forced)):
        allowed[tuple(header + forced[:j])] = {forced[j]}
    for category in [bad_category] if bad_category else moderator.taxonomy.ids:
        rest = ids(render_target(UNSAFE, category, "scam people"))[len(forced) :] + [end]
        for j in range(len(rest)):
            allowed.setdefault(tuple(header + forced + rest[:j]), set()).add(rest[j])
    longest = max(len(k) for k in allowed)
    history: list[int] = []
    ran: list[list[int]] = []

    def on_model(module, args, kwargs):
        input_ids = kwargs["input_ids"]
        assert input_ids.shape[0] == 1, "format_followed scripts one row at a time"
        cache = kwargs.get("past_key_values")
        start = int(cache.get_seq_length()) if cache is not None else 0  # tokens the cache holds before this call
        del history[start:]
        history.extend(input_ids[0].tolist())
        ran.append(input_ids[0].tolist())

    def on_output_layer(module, args, output):
        positions = output.shape[1]
        for offset in range(positions):
            context = history[: len(history) - positions + offset + 1]
            for size in range(min(longest, len(context)), 0, -1):
                tokens = allowed.get(tuple(context[-size:]))
                if tokens:
                    output[0, offset, sorted(tokens)] += BOOST
                    if tokens == {safe, unsafe}:
                        output[0, offset, unsafe] += lean
                    elif len(tokens) > 1:
                        output[0, offset, sorted(tokens & set(favour))] += 5.0
                    break

    handles = [
        moderator.model.register_forward_pre_hook(on_model, with_kwargs=True),
        moderator._output_layer.register_forward_hook(on_output_layer),
    ]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


def even_lean(moderator) -> float:
    """The shift of the unsafe logit that puts the median P(unsafe) of the test dialogues at 0.5."""
    dialogues, images = _dialogues(12)
    with format_followed(moderator):
        scores = sorted(
            moderator.moderate(d, i, answer=DECISION).p_unsafe for d, i in zip(dialogues, images, strict=True)
        )
    median = (scores[5] + scores[6]) / 2
    return -math.log(median / (1 - median))


@pytest.fixture(scope="module")
def lean(moderator) -> float:
    return even_lean(moderator)


def test_the_scripted_model_writes_parseable_answers_of_both_kinds(moderator, lean):
    dialogues, images = _dialogues(12)
    with format_followed(moderator, lean):
        verdicts = [moderator.moderate(d, i) for d, i in zip(dialogues, images, strict=True)]
    assert not any(v.parse_error for v in verdicts), [v.raw for v in verdicts]
    assert {v.verdict for v in verdicts} == {"safe", "unsafe"}


def _intent_tokens(moderator) -> list[int]:
    tokenizer = moderator.processor.tokenizer
    target = tokenizer(render_target(UNSAFE, "fraud", "scam people"), add_special_tokens=False)["input_ids"]
    return target[-3:]  # the intent's last tokens ("... scam people")


def _contains(run: list[int], tokens: list[int]) -> bool:
    return any(run[i : i + len(tokens)] == tokens for i in range(len(run) - len(tokens) + 1))


@pytest.mark.parametrize("where", ["default", "below half", "above half"])
def test_the_decision_equals_the_full_answer_and_decodes_no_text(moderator, lean, monkeypatch, where):
    # Bugs caught: P(unsafe) read one position off (the prefix tokens run as input, not generated), the
    # category read before the forced "unsafe\ncategory:" ran, the fail-closed rule dropped, the flag rule
    # reimplemented (a threshold below 0.5 flags greedy-safe rows: their category comes from the forced
    # answer; above 0.5, greedy-unsafe rows under it must stay safe).
    dialogues, images = _dialogues(54 if where == "default" else 24)
    with format_followed(moderator, lean):
        scores = sorted(
            moderator.moderate(d, i, answer=DECISION).p_unsafe for d, i in zip(dialogues, images, strict=True)
        )
    threshold = {"default": 0.5, "below half": scores[len(scores) // 4], "above half": scores[3 * len(scores) // 4]}
    monkeypatch.setattr(moderator, "threshold", threshold[where])
    with format_followed(moderator, lean):
        full = [moderator.moderate(d, i, max_new_tokens=16) for d, i in zip(dialogues, images, strict=True)]
    calls = []
    decided = []
    for dialogue, imgs in zip(dialogues, images, strict=True):
        with format_followed(moderator, lean) as ran:
            decided.append(moderator.moderate(dialogue, imgs, answer=DECISION, max_new_tokens=16))
        calls.append(ran)
    flagged = [v.flagged for v in full]
    assert 0.2 <= sum(flagged) / len(flagged) <= 0.8, f"both verdicts must be common: {sum(flagged)} flagged"
    if where == "below half":  # greedy "verdict: safe" answers the score flags: the forced answer's category
        assert any(v.forced_raw and v.raw == "verdict: safe" for v in full)
    if where == "above half":
        assert any(not v.flagged and v.raw.startswith("verdict: unsafe") for v in full)
    intent = _intent_tokens(moderator)
    for reference, decision, ran in zip(full, decided, calls, strict=True):
        assert not reference.parse_error
        assert (decision.verdict, decision.category, decision.policy, decision.parse_error) == (
            reference.verdict,
            reference.category,
            reference.policy,
            False,
        )
        assert decision.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-5)
        assert decision.intent is None and decision.raw == decision.forced_raw == ""
        assert (decision.answer, decision.intent_generated) == (DECISION, False)
        # One forward pass for a safe decision, two for a flagged one (the ids' first tokens all differ) or
        # one whose greedy word is "unsafe" under the threshold; the intent is never among the tokens run.
        assert len(ran) == (2 if decision.flagged or reference.raw.startswith("verdict: unsafe") else 1)
        assert not any(_contains(run, intent) for run in ran)


def test_decision_with_intent_generates_the_intent_of_flagged_rows_only(moderator, lean):
    dialogues, images = _dialogues(12)
    for dialogue, imgs in zip(dialogues, images, strict=True):
        with format_followed(moderator, lean):
            reference = moderator.moderate(dialogue, imgs, max_new_tokens=24)
        with format_followed(moderator, lean) as ran:
            decision = moderator.moderate(dialogue, imgs, answer=DECISION_WITH_INTENT, max_new_tokens=24)
        assert (decision.verdict, decision.category, decision.intent) == (
            reference.verdict,
            reference.category,
            reference.intent,
        )
        assert decision.intent_generated is decision.flagged is reference.intent_generated
        if decision.flagged:
            assert decision.intent == "scam people" and decision.answer == DECISION_WITH_INTENT
            assert decision.forced_raw == FORCED_UNSAFE_PREFIX + f" {decision.category}\nintent: scam people"
        else:
            assert len(ran) == 1 and decision.forced_raw == ""


def test_an_untrained_model_fails_closed_on_both_paths(moderator):
    # The random model writes no format at all: both paths flag every row with parse_error.
    dialogues, images = _dialogues(6)
    full = moderator.moderate_batch(dialogues, images, max_new_tokens=8)
    decided = moderator.moderate_batch(dialogues, images, answer=DECISION)
    for reference, decision in zip(full, decided, strict=True):
        assert reference.parse_error and decision.parse_error
        assert (decision.verdict, decision.category) == (reference.verdict, reference.category) == ("unsafe", "unknown")
        assert decision.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-5)


def test_ids_sharing_their_first_tokens_are_told_apart_by_one_more_step(moderator, lean, tmp_path):
    # Bug caught: only the category position read, so "fraud" and "fraud_ring" (same first token) were one.
    import yaml

    from moderator.taxonomy import load_taxonomy

    data = yaml.safe_load(Path(load_taxonomy().path).read_text())
    ring = dict(data["scenarios"][4], id="fraud_ring", label="Fraud Ring")
    assert data["scenarios"][4]["id"] == "fraud"
    data["scenarios"].append(ring)
    (tmp_path / "taxonomy.yaml").write_text(yaml.safe_dump(data))
    forked = Moderator(moderator.model, moderator.processor, load_taxonomy(tmp_path / "taxonomy.yaml"))
    trie = forked.decision_tokens.category_trie
    fraud = forked.processor.tokenizer(" fraud", add_special_tokens=False)["input_ids"]
    assert len(fraud) == 1 and len(trie[fraud[0]]) == 2  # " fraud" then "\n" or "_ring..."
    ring = [t for t in trie[fraud[0]] if t != CATEGORY_LEAF and "\n" not in forked.processor.tokenizer.decode([t])]
    dialogues, images = _dialogues(16)
    seen = set()
    for index, (dialogue, imgs) in enumerate(zip(dialogues, images, strict=True)):
        favour = (*fraud, *ring) if index % 2 else fraud  # most rows flagged, as fraud; every other one leans to _ring
        with format_followed(forked, lean + 3.0, favour):
            reference = forked.moderate(dialogue, imgs, max_new_tokens=24)
        with format_followed(forked, lean + 3.0, favour) as ran:
            decision = forked.moderate(dialogue, imgs, answer=DECISION)
        assert (decision.verdict, decision.category) == (reference.verdict, reference.category)
        if decision.category in ("fraud", "fraud_ring"):
            seen.add(decision.category)
            assert len(ran) == 3  # the prefill, the forced prefix, the step that picks "\n" or "_ring"
    assert seen == {"fraud", "fraud_ring"}, f"the fork was walked to {seen} only"


def test_above_half_a_greedy_unsafe_answer_under_the_threshold_naming_no_category_flags_as_the_full_answer(
    moderator, lean, monkeypatch
):
    # Found on the trained SmolLM2 export (threshold 0.865): two rows scored 0.78-0.85 with the greedy
    # answer "verdict: unsafe\ncategory: cancer ..."; the full answer fails to parse and flags, the decision
    # said safe. It now reads the greedy category token of such rows and flags them too.
    dialogues, images = _dialogues(24)
    with format_followed(moderator, lean, bad_category="cancer"):
        scores = sorted(
            moderator.moderate(d, i, answer=DECISION).p_unsafe for d, i in zip(dialogues, images, strict=True)
        )
    monkeypatch.setattr(moderator, "threshold", scores[3 * len(scores) // 4])
    assert moderator.threshold > 0.5
    below = 0
    for dialogue, imgs in zip(dialogues, images, strict=True):
        with format_followed(moderator, lean, bad_category="cancer"):
            full = moderator.moderate(dialogue, imgs, max_new_tokens=16)
            decision = moderator.moderate(dialogue, imgs, answer=DECISION)
        assert decision.verdict == full.verdict, (full.raw, full.p_unsafe, decision)
        if 0.5 < full.p_unsafe < moderator.threshold:
            below += 1
            assert full.raw.startswith("verdict: unsafe\ncategory: cancer") and full.parse_error
            assert decision.parse_error and decision.category == "unknown"
    assert below, "no row scored between 0.5 and the threshold"


def test_the_equality_benchmark_counts_rows_and_names_each_disagreement(moderator, tmp_path, monkeypatch):
    from bench.decision_equality import compare_set

    dialogues, images = _dialogues(3)
    records = []
    for index, (dialogue, imgs) in enumerate(zip(dialogues, images, strict=True)):
        imgs[0].save(tmp_path / f"{index}.png")
        records.append({"id": f"r{index}", "dialogue": dialogue, "image": str(tmp_path / f"{index}.png")})
    result = compare_set(moderator, "tiny", records, max_new_tokens=4)
    # The untrained model writes no format: both paths fail closed on every row, and agree.
    assert (result.rows, result.flagged, result.verdicts_equal, result.parsed_flagged) == (3, 3, 3, 0)
    assert not result.disagreements

    real = moderator.moderate

    def decision_says_safe(dialogue, images, answer="full", **kwargs):
        verdict = real(dialogue, images, answer=answer, **kwargs)
        return dataclasses.replace(verdict, verdict="safe") if answer == DECISION else verdict

    monkeypatch.setattr(moderator, "moderate", decision_says_safe)
    result = compare_set(moderator, "tiny", records[:2], max_new_tokens=4)
    assert result.verdicts_equal == 0 and [line.split(":")[0] for line in result.disagreements] == ["r0", "r1"]
