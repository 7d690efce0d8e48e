"""Matched negatives and more harm, in every form (issue 20): so that form predicts nothing and harm does.

Two kinds of rows are added to a data-prep build (``configs/data/*.yaml``: ``matched_benign``,
``extra_harmful``):

* **benign twins**: every unsafe row gets one benign row in the same form, with the same dialogue up to its
  final user turn, the same image and the same split, whose final request is a real benign question
  (chatterbot-corpus topical Q&A; for a scenario with a caution subject, a question on that subject:
  money, health, law, politics). A SafeMT 4-turn build-up keeps its build-up; only what is finally asked
  changes. So per length and form the labels are balanced by construction.
* **harmful prompts from other sources** (AdvBench, Do-Not-Answer; HarmBench stays out as the
  out-of-distribution test), mapped to the taxonomy (:func:`data_prep.sources.taxonomy_category`; prompts
  that fit no scenario are counted and left out), each used once, at one length and form: a single
  question or a framed one at 1 turn, a lead-in build-up (chatterbot Q&A exchanges) or the few-shot
  injection at 2+ turns. Each gets its benign twin too.

Items listed in ``matched_exclude`` (a JSON file ``{"exclude": [source ids]}``, e.g. the efficacy
benchmark's held-out test items) are never used. Every source record read is converted or counted with its
reason in ``stats.json`` (``matched.sources``).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.config import ConfigError
from data_prep.forms import (
    FEW_SHOT,
    FRAMED,
    LEAD_IN,
    SINGLE,
    benign_twin,
    form_of,
    stable_hash,
    usable_as_request,
    wrap_in_form,
)
from data_prep.sources import (
    HARMFUL_READERS,
    SCENARIO_TOPICS,
    SourceError,
    SourceTally,
    TopicalItem,
    read_chatterbot,
    taxonomy_category,
)

EXTRA_HARMFUL_SOURCES = ("advbench", "donotanswer")  # harmbench: out-of-distribution test only
TWIN_SUFFIX = "~benign"  # a twin's row id: "<unsafe row id>~benign" ('@' is reserved for prefixes)
# Forms of extra harmful prompts: 1 turn alternates single/framed; longer dialogues are mostly lead-in
# build-ups with every fourth a few-shot injection (SafeMT's own mix leans the same way).
MULTI_TURN_CYCLE = (LEAD_IN, LEAD_IN, LEAD_IN, FEW_SHOT)
ONE_TURN_CYCLE = (SINGLE, FRAMED)


def read_exclusions(path: str | None) -> set[str]:
    """The source ids listed in ``path`` (``{"exclude": [...]}``); one ConfigError line naming the file."""
    if not path:
        return set()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"matched_exclude {path}: cannot read ({exc})") from None
    ids = data.get("exclude") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConfigError(f'matched_exclude {path}: expected {{"exclude": [source ids as strings]}}')
    return set(ids)


class QuestionPool:
    """Benign chatterbot questions for final requests and their (question, answer) exchanges for lead-ins.

    Picks are deterministic for a key and spread over the pool (the least used question of the wanted
    subject first), so twins do not all ask the same few questions.
    """

    def __init__(self, items: Sequence[TopicalItem], seed: int):
        usable = [i for i in items if not i.persona and i.question.endswith("?") and usable_as_request(i.question)]
        if not usable:
            raise ConfigError("matched_benign: chatterbot-corpus gave no usable benign questions")
        order = list(usable)
        random.Random(f"{seed}:matched-questions").shuffle(order)
        self.items = order
        self.by_topic: dict[str | None, list[TopicalItem]] = {}
        for item in order:
            self.by_topic.setdefault(item.topic, []).append(item)
        self.uses: Counter[str] = Counter()
        self.lead_items = [i for i in items if not i.persona and i.answer.strip()]

    def question(self, key: str, scenario: str | None) -> TopicalItem:
        topic = SCENARIO_TOPICS.get(scenario or "")
        candidates = self.by_topic.get(topic) if topic else None
        candidates = candidates or self.items
        start = stable_hash("q:" + key) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        chosen = min(rotated, key=lambda i: self.uses[i.id])  # first of the least used, from a keyed start
        self.uses[chosen.id] += 1
        return chosen

    def lead_pairs(self, key: str, count: int) -> list[tuple[str, str]]:
        """``count`` (question, answer) exchanges, fixed by ``key``."""
        pool = self.lead_items
        start = stable_hash("lead:" + key) % len(pool)
        step = 1 + stable_hash("step:" + key) % 7
        picked = [pool[(start + n * step) % len(pool)] for n in range(count)]
        return [(item.question, item.answer) for item in picked]


@dataclass
class MatchedRow:
    """A dialogue to add, before it becomes a training row (``data_prep.convert.make_row``)."""

    dialogue: list[dict[str, str]]
    verdict: str  # "unsafe" or "safe"
    category: str  # taxonomy id ("" for safe)
    intent: str
    id: str
    source: str
    split_group: str
    image_turn: int = 0


@dataclass
class MatchedSources:
    """What the matched rows were built from, for stats.json."""

    tallies: dict[str, SourceTally] = field(default_factory=dict)
    twins: Counter = field(default_factory=Counter)  # source of the unsafe row -> twins built

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": {name: tally.to_dict() for name, tally in sorted(self.tallies.items())},
            "twins_by_unsafe_source": dict(sorted(self.twins.items())),
        }


def load_pool(exclude: set[str], seed: int, sources: MatchedSources) -> QuestionPool:
    tally = sources.tallies.setdefault("chatterbot", SourceTally())
    try:
        items = read_chatterbot(tally)
    except SourceError as exc:
        raise ConfigError(str(exc)) from None
    kept = [i for i in items if i.id not in exclude]
    tally.skipped["held out (matched_exclude)"] += len(items) - len(kept)
    tally.converted["benign question pool"] += len(kept)
    return QuestionPool(kept, seed)


def twin_of(row: MatchedRow, pool: QuestionPool, sources: MatchedSources) -> MatchedRow:
    """The benign twin of an unsafe dialogue (see the module docstring)."""
    item = pool.question(row.id, row.category)
    sources.twins[row.source] += 1
    return MatchedRow(
        dialogue=benign_twin(row.dialogue, item.question, row.id),
        verdict="safe",
        category="",
        intent="",
        id=row.id + TWIN_SUFFIX,
        source=f"matched:{item.id}",
        split_group=row.split_group,
        image_turn=row.image_turn,
    )


def extra_harmful_rows(
    names: Sequence[str],
    per_length: int,
    lengths: Sequence[int],
    pool: QuestionPool,
    exclude: set[str],
    seed: int,
    sources: MatchedSources,
) -> list[MatchedRow]:
    """``per_length`` harmful prompts per dialogue length, from ``names`` in turn, each wrapped in a form."""
    unknown = sorted(set(names) - set(EXTRA_HARMFUL_SOURCES))
    if unknown:
        raise ConfigError(
            f"extra_harmful {unknown}: expected some of {list(EXTRA_HARMFUL_SOURCES)} (HarmBench is the OOD test)"
        )
    queues: list[list] = []
    for name in names:
        tally = sources.tallies.setdefault(name, SourceTally())
        try:
            prompts = HARMFUL_READERS[name](tally)
        except SourceError as exc:
            raise ConfigError(str(exc)) from None
        usable = []
        for prompt in prompts:
            if prompt.id in exclude:
                tally.skipped["held out (matched_exclude)"] += 1
            elif (category := taxonomy_category(prompt)) is None:
                tally.skipped["fits no taxonomy scenario"] += 1
            else:
                usable.append((prompt, category, name))
        random.Random(f"{seed}:extra:{name}").shuffle(usable)
        queues.append(usable)
    rows: list[MatchedRow] = []
    turn = 0
    for k in sorted(set(lengths)):
        cycle = ONE_TURN_CYCLE if k == 1 else MULTI_TURN_CYCLE
        for n in range(per_length):
            live = [queues[(turn + j) % len(queues)] for j in range(len(queues))]
            queue = next((q for q in live if q), None)
            turn += 1
            if queue is None:
                break  # every source used up: fewer rows, reported in stats
            prompt, category, name = queue.pop(0)
            form = cycle[(n // len(queues)) % len(cycle)]  # every source gets every form
            if form == FEW_SHOT and k < 2:
                form = LEAD_IN
            leads = pool.lead_pairs(prompt.id, k - 1)
            dialogue = wrap_in_form(prompt.text, form, k, leads, prompt.id)
            assert form_of(dialogue) == form, (prompt.id, form)
            sources.tallies[name].converted[f"{k}-turn {form}"] += 1
            rows.append(MatchedRow(dialogue, "unsafe", category, prompt.text, f"{prompt.id}:{k}turn", name, prompt.id))
    for name, queue in zip(names, queues, strict=True):
        sources.tallies[name].skipped["not needed (over extra_harmful_per_length)"] += len(queue)
    return rows


def label_balance(rows: Sequence[dict[str, Any]], splits: Sequence[str]) -> dict[str, Any]:
    """Label counts and unsafe share per (length, form), per source, per split: what stats.json shows."""
    cells: dict[tuple[int, str], Counter] = {}
    by_source: dict[str, Counter] = {}
    by_split: dict[str, dict[tuple[int, str], Counter]] = {}
    for row, split in zip(rows, splits, strict=True):
        key = (row["turns"], row["form"])
        cells.setdefault(key, Counter())[row["label"]] += 1
        source = row["source"].split(":", 1)[0] if row["source"].startswith("matched:") else row["source"]
        by_source.setdefault(source, Counter())[row["label"]] += 1
        by_split.setdefault(split, {}).setdefault(key, Counter())[row["label"]] += 1

    def share(counts: Counter) -> dict[str, Any]:
        total = counts["unsafe"] + counts["safe"]
        return {
            "unsafe": counts["unsafe"],
            "safe": counts["safe"],
            "unsafe_share": round(counts["unsafe"] / total, 4) if total else None,
        }

    return {
        "by_length_form": [{"turns": k, "form": f, **share(c)} for (k, f), c in sorted(cells.items())],
        "by_source": {s: share(c) for s, c in sorted(by_source.items())},
        "by_split": {
            split: [{"turns": k, "form": f, **share(c)} for (k, f), c in sorted(table.items())]
            for split, table in sorted(by_split.items())
        },
    }


def imbalanced_cells(balance: dict[str, Any], bound: float) -> list[str]:
    """Cells whose unsafe share is further than ``bound`` from 0.5, as readable lines."""
    return [
        f"{c['turns']}-turn {c['form']}: {c['unsafe']} unsafe / {c['safe']} safe (unsafe share {c['unsafe_share']:.2f})"
        for c in balance["by_length_form"]
        if c["unsafe_share"] is not None and abs(c["unsafe_share"] - 0.5) > bound
    ]
