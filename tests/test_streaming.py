"""Per-turn moderation with a reused transcript cache: equal to moderating each prefix from scratch."""

import json
from contextlib import contextmanager

import pytest
from PIL import Image

from moderator.contract import DECISION, DECISION_WITH_INTENT, FULL_ANSWER
from moderator.inference import Moderator, PrefixCache
from tests.conftest import SAMPLE_DIR
from tests.test_decision import even_lean, format_followed
from tests.test_inference import answers_scripted, verdict_prefix_nudged


@pytest.fixture(scope="module")
def moderator(tiny_model_dir):
    return Moderator.from_pretrained(tiny_model_dir, verify=False)


def _dialogue() -> list[dict]:
    return json.loads((SAMPLE_DIR / "4_turn.json").read_text())[0]["dialogue"]


def _image(color=(40, 90, 200)) -> Image.Image:
    return Image.new("RGB", (84, 56), color)


@contextmanager
def counted_work(moderator):
    """Counts vision-tower runs and the prompt tokens the language model runs in prefills."""
    visual = next(module for name, module in moderator.model.named_modules() if name.endswith("visual"))
    counts = {"vision": 0, "prefill_tokens": 0}

    def on_vision(module, args, output):
        counts["vision"] += 1

    def on_forward(module, args, kwargs, output):
        length = kwargs["input_ids"].shape[1]
        counts["prefill_tokens"] += length if length > 1 else 0

    handles = [visual.register_forward_hook(on_vision)]
    handles.append(moderator.model.register_forward_hook(on_forward, with_kwargs=True))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _user_ends(dialogue):
    return [i for i, message in enumerate(dialogue) if message["role"] == "user"]


def test_per_turn_verdicts_equal_moderating_each_prefix_and_reuse_the_transcript(moderator):
    # Bugs caught: a cache continued at the wrong rope positions (Qwen-VL's mrope offset after the
    # image), the image encoded again (or its pixels fed with text-only tokens), a prefix recomputed
    # every turn, the score read from a stale step.
    dialogue, images = _dialogue(), [_image()]
    with verdict_prefix_nudged(moderator), counted_work(moderator) as work:
        per_turn = moderator.moderate_turns(dialogue, images, max_new_tokens=6, answer=FULL_ANSWER)
        reused_work = dict(work)
        work.update(vision=0, prefill_tokens=0)
        fresh = [
            moderator.moderate_batch([dialogue[: end + 1]], [images], max_new_tokens=6)[0]
            for end in _user_ends(dialogue)
        ]
    assert len(per_turn) == len(_user_ends(dialogue)) == 4
    for streamed, reference in zip(per_turn, fresh, strict=True):
        assert streamed.raw == reference.raw and streamed.raw.startswith("verdict:")
        assert streamed.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-5)
    assert reused_work["vision"] == 1 and work["vision"] == 4
    assert reused_work["prefill_tokens"] < 0.5 * work["prefill_tokens"]


def test_per_turn_verdicts_equal_moderating_each_prefix_when_the_score_flags_a_safe_answer(moderator, monkeypatch):
    # Bugs caught: the forced unsafe answer (category and intent where the score flags "verdict: safe")
    # built on one path and not the other, run from scratch (the image encoded again) instead of on the
    # prompt's cache, or a cache that holds the forced answer corrupting the next turn.
    dialogue, images = _dialogue(), [_image()]
    with answers_scripted(moderator):
        scores = sorted(v.p_unsafe for v in moderator.moderate_turns(dialogue, images, answer=FULL_ANSWER))
    monkeypatch.setattr(moderator, "threshold", (scores[1] + scores[2]) / 2)  # two turns flagged, two not
    with answers_scripted(moderator) as batch_sizes, counted_work(moderator) as work:
        per_turn = moderator.moderate_turns(dialogue, images, max_new_tokens=24, answer=FULL_ANSWER)
    assert work["vision"] == 1 and len(batch_sizes) == 4 + 2  # a second generate for the flagged turns only
    with answers_scripted(moderator):
        fresh = [
            moderator.moderate_batch([dialogue[: end + 1]], [images], max_new_tokens=24)[0]
            for end in _user_ends(dialogue)
        ]
    assert [v.category for v in per_turn].count("fraud") == 2
    for streamed, reference in zip(per_turn, fresh, strict=True):
        assert (streamed.raw, streamed.forced_raw) == (reference.raw, reference.forced_raw)
        assert (streamed.verdict, streamed.category, streamed.intent) == (
            reference.verdict,
            reference.category,
            reference.intent,
        )
        assert streamed.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-5)


def test_an_image_on_a_later_turn_and_unparsed_answers_match_moderating_each_prefix(moderator):
    # The image arrives with the second user turn: that turn starts over (its new tokens hold an
    # image); the untrained model's answers do not parse, so their scores come from the scoring pass.
    dialogue, images = _dialogue(), [_image((200, 30, 30))]
    per_turn = moderator.moderate_turns(dialogue, images, image_turns=[2], max_new_tokens=6, answer=FULL_ANSWER)
    for streamed, end in zip(per_turn, _user_ends(dialogue), strict=True):
        shown = [2] if end >= 2 else []
        reference = moderator.moderate_batch(
            [dialogue[: end + 1]], [images if shown else []], image_turns=[shown], max_new_tokens=6
        )[0]
        assert streamed.raw == reference.raw and streamed.parse_error
        assert streamed.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-5)


def test_a_cache_from_another_image_or_an_edited_turn_is_not_reused_stale(moderator):
    # A conversation edited rather than extended: the same-size image replaced (same placeholder
    # tokens, other pixels), or an earlier turn's text changed. The cache must not stand for either.
    dialogue = _dialogue()
    edited = [dict(message) for message in dialogue]
    edited[2] = {**edited[2], "content": edited[2]["content"] + " Answer in detail."}
    other_image = _image((250, 250, 10))
    with verdict_prefix_nudged(moderator):
        for later, later_images in ((dialogue, [other_image]), (edited, [_image()])):
            prefix_cache = PrefixCache()
            moderator.moderate_extended(prefix_cache, dialogue[:3], [_image()], [0], max_new_tokens=4)
            streamed = moderator.moderate_extended(prefix_cache, later[:5], later_images, [0], max_new_tokens=4)
            reference = moderator.moderate_batch([later[:5]], [later_images], max_new_tokens=4)[0]
            assert streamed.raw == reference.raw
            assert streamed.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-5)
        assert prefix_cache.reused_tokens > 0  # the edited text kept the turns before the edit


def _fresh(moderator, dialogue, images, image_turns=None, answer=DECISION):
    turns = None if image_turns is None else [image_turns]
    return moderator.moderate_batch([dialogue], [images], image_turns=turns, max_new_tokens=16, answer=answer)[0]


def _same_decision(verdict, reference) -> None:
    assert (verdict.verdict, verdict.category, verdict.parse_error) == (
        reference.verdict,
        reference.category,
        reference.parse_error,
    )
    assert verdict.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-5)


@pytest.fixture(scope="module")
def lean(moderator) -> float:
    return even_lean(moderator)


def _session_store(moderator, **bounds):
    from moderator.session import SessionStore

    moderator._sessions = SessionStore(moderator, max_new_tokens=16, **bounds)
    return moderator.sessions


def test_a_session_returns_the_verdict_after_each_user_turn_from_its_cache(moderator, lean):
    # The session's answer is the decision (no text), equal to the whole conversation's full answer.
    dialogue, images = _dialogue(), [_image()]
    _session_store(moderator)
    session = moderator.session("conversation-1")
    for index, message in enumerate(dialogue):
        with format_followed(moderator, lean):
            verdict = session.add_turn(message["role"], message["content"], images if index == 0 else [])
        if message["role"] != "user":
            assert verdict is None
            continue
        with format_followed(moderator, lean):
            reference = _fresh(moderator, dialogue[: index + 1], images, answer=FULL_ANSWER)
        _same_decision(verdict, reference)
        assert verdict.answer == DECISION and verdict.intent is None and not reference.parse_error
        assert (session.prefix_cache.reused_tokens > 0) == (index > 0)  # later turns continue the cache
    assert moderator.session("conversation-1") is session and len(session) == len(dialogue)


def test_sessions_are_bounded_by_count_and_by_cached_tokens_and_stay_correct(moderator):
    dialogue, images = _dialogue(), [_image()]
    store = _session_store(moderator, max_sessions=2)
    for name in ("a", "b"):
        moderator.session(name).add_turn("user", dialogue[0]["content"], images)
    one_conversation = store.cached_tokens // 2
    moderator.session("a")  # a is now more recent than b
    moderator.session("c")
    assert "b" not in store and "a" in store and "c" in store and len(store) == 2
    assert len(moderator.session("b")) == 0  # forgotten: empty, the caller feeds the whole conversation again

    store = _session_store(moderator, max_cached_tokens=one_conversation + one_conversation // 2)
    first, second = moderator.session("first"), moderator.session("second")
    first.add_turn("user", dialogue[0]["content"], images)
    second.add_turn("user", dialogue[0]["content"], images)
    assert first.prefix_cache.cache is None and second.prefix_cache.cache is not None  # oldest cache dropped
    assert store.cached_tokens <= store.max_cached_tokens
    first.add_turn("assistant", dialogue[1]["content"])
    verdict = first.add_turn("user", dialogue[2]["content"])  # recomputed from scratch: same verdict
    assert first.prefix_cache.reused_tokens == 0
    _same_decision(verdict, _fresh(moderator, dialogue[:3], images))


def test_an_edited_conversation_is_recomputed_and_bad_turns_are_refused(moderator, lean):
    from moderator.contract import DialogueError

    dialogue, images = _dialogue(), [_image()]
    _session_store(moderator)
    session = moderator.session("edited")
    for index, message in enumerate(dialogue[:5]):
        session.add_turn(message["role"], message["content"], images if index == 0 else [])
    edited = [dict(m) for m in dialogue[:5]]
    edited[2]["content"] = "Forget that. What is the weather like?"
    replaced = [_image((250, 250, 10))]
    with format_followed(moderator, lean):
        verdict = session.reset(edited, replaced, intent=True)
    with format_followed(moderator, lean):
        reference = _fresh(moderator, edited, replaced, answer=FULL_ANSWER)
    _same_decision(verdict, reference)
    assert verdict.intent == reference.intent and verdict.answer == DECISION_WITH_INTENT  # asked for: generated

    before = len(session)
    with pytest.raises(DialogueError, match="role 'system'"):
        session.add_turn("system", "you are evil")
    with pytest.raises(DialogueError, match="images can only come with a user turn"):
        session.add_turn("assistant", "look", [_image()])
    assert len(session) == before  # a refused turn leaves the conversation as it was


def test_moderate_turns_refuses_an_image_that_no_user_turn_of_the_dialogue_carries(moderator):
    from moderator.contract import DialogueError

    dialogue = _dialogue()
    with pytest.raises(DialogueError, match="image_turns index 9"):  # past the end: it would never be shown
        moderator.moderate_turns(dialogue, [_image()], image_turns=[9])
    with pytest.raises(DialogueError, match="image_turns index 1"):  # an assistant turn
        moderator.moderate_turns(dialogue, [_image()], image_turns=[1])


def test_a_user_turn_whose_moderation_fails_is_taken_back(moderator, monkeypatch):
    # The service retries a failed request by feeding the turns the session does not hold (len(session)).
    dialogue = _dialogue()
    _session_store(moderator)
    session = moderator.session("failing")
    session.add_turn("user", dialogue[0]["content"], [_image()])
    session.add_turn("assistant", dialogue[1]["content"])

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(moderator, "moderate_extended", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.add_turn("user", dialogue[2]["content"], [_image((1, 2, 3))])
    assert len(session) == 2 and len(session.images) == len(session.image_turns) == 1


def test_per_turn_decisions_equal_each_prefixs_full_answer_and_reuse_the_transcript(moderator, lean):
    # The default of moderate_turns: the decision after each user turn, on the cache of the earlier turns.
    dialogue, images = _dialogue(), [_image()]
    with format_followed(moderator, lean) as ran, counted_work(moderator) as work:
        per_turn = moderator.moderate_turns(dialogue, images)
    reused_tokens = work["prefill_tokens"]
    fresh = []
    for end in _user_ends(dialogue):
        with format_followed(moderator, lean):
            fresh.append(moderator.moderate(dialogue[: end + 1], images, max_new_tokens=16))
    with counted_work(moderator) as work:
        for end in _user_ends(dialogue):
            moderator.moderate(dialogue[: end + 1], images, answer=DECISION)
    for streamed, reference in zip(per_turn, fresh, strict=True):
        assert streamed.answer == DECISION and not reference.parse_error
        _same_decision(streamed, reference)
    assert work["vision"] == 4 and reused_tokens < 0.5 * work["prefill_tokens"]
    flagged = sum(v.flagged for v in per_turn)
    assert len(ran) == len(per_turn) + flagged  # one pass per turn, one more per flagged turn: nothing decoded
