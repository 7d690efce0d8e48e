"""Validated dialogues -> training rows in the moderator contract (the columns the trainer reads)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from data_prep.forms import form_of
from moderator.contract import SAFE, UNSAFE, one_sentence, render_moderator_messages, render_target, target_message
from moderator.schema import SAFEMT_IMAGE_TURNS, SafeMTRecord, format_row_id
from moderator.taxonomy import Taxonomy

COLUMNS = (
    "messages",
    "images",
    "target",
    "label",
    "category",
    "scenario",
    "id",
    "turns",
    "source",
    "split_group",
    "intent",
    "form",
)


def make_row(
    *,
    dialogue: Sequence[dict[str, str]],
    image_turns: Sequence[int],
    images: Sequence[str],
    verdict: str,
    category: str,
    scenario: str,
    intent: str,
    id: str,
    source: str,
    split_group: str,
    taxonomy: Taxonomy,
) -> dict[str, Any]:
    target = render_target(verdict, category, intent) if verdict == UNSAFE else render_target(SAFE)
    messages = render_moderator_messages(dialogue, image_turns, taxonomy) + [target_message(target)]
    safe = verdict == SAFE
    return {
        "messages": messages,
        "images": list(images),
        "target": target,
        "label": verdict,
        "category": "" if safe else category,
        "scenario": scenario,
        "id": id,
        "turns": sum(1 for m in dialogue if m["role"] == "user"),
        "source": source,
        "split_group": split_group,
        "intent": "" if safe else one_sentence(intent),
        "form": form_of(dialogue),
    }


def safemt_rows(
    record: SafeMTRecord, image: str, taxonomy: Taxonomy, prefixes: bool = False, prefix_label: str = "inherit"
) -> list[dict[str, Any]]:
    """The full dialogue, plus (with ``prefixes``) the dialogue cut after each earlier user turn.

    A prefix keeps the record's id as ``split_group`` (so it lands in the same split) and gets the id
    :func:`moderator.schema.format_row_id` (``<id>@<k>of<n>``); its target is the full dialogue's (``inherit``) or ``safe``.
    """
    category = taxonomy.by_label[record.scenario].id
    common = dict(
        image_turns=SAFEMT_IMAGE_TURNS,
        images=[image],
        category=category,
        scenario=record.scenario,
        intent=record.question,
        source=record.source,
        split_group=record.id,
        taxonomy=taxonomy,
    )
    rows = [make_row(dialogue=record.dialogue, verdict=UNSAFE, id=record.id, **common)]
    if prefixes:
        total = record.turns
        for k in range(1, total):
            verdict = UNSAFE if prefix_label == "inherit" else SAFE
            rows.append(
                make_row(
                    dialogue=record.dialogue[: 2 * k - 1],
                    verdict=verdict,
                    id=format_row_id(record.id, k, total),
                    **common,
                )
            )
    return rows


def benign_row(
    dialogue: Sequence[dict[str, str]], image_turn: int, image: str, id: str, source: str, taxonomy: Taxonomy
) -> dict[str, Any]:
    return make_row(
        dialogue=dialogue,
        image_turns=[image_turn],
        images=[image],
        verdict=SAFE,
        category="",
        scenario="",
        intent="",
        id=id,
        source=source,
        split_group=id,
        taxonomy=taxonomy,
    )
