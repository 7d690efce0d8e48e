"""The SafeMT record schema, defined once.

A released record is ``{"id", "scenario", "image_path", "dialogue": [{"role", "content"}, ...],
"question"}``. N-turn means N user turns, so 2N-1 messages alternating user/assistant, starting
and ending with ``user``; the image belongs to the first user turn. The hub copy
(``HappyCorpse/SafeMT``) names the image field ``image_rel_path`` and stores ``dialogue`` as a JSON
string. Empty or near-empty user text (``""``, ``"image"``) is real benchmark content (the image
carries the turn) and is valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moderator.taxonomy import Taxonomy

TURN_COUNTS = (1, 2, 4, 6, 8)


def safemt_turn_file(folder: str | Path, turns: int) -> Path:
    """The GitHub release's file for ``turns``-turn dialogues: ``<folder>/<turns>_turn.json``."""
    return Path(folder) / f"{turns}_turn.json"


SAFEMT_FIELDS = ("id", "scenario", "image_path", "dialogue", "question")
HUB_IMAGE_FIELD = "image_rel_path"
ID_PATTERN = re.compile(r"^(?P<source>[a-z]+)_(?P<slug>[a-z_]+)_(?P<n>\d+)$")
# Image goes with the first user turn, which is message 0.
SAFEMT_IMAGE_TURNS = (0,)


# A prepared dataset's row id: a full SafeMT dialogue keeps the record's id; the prefix of it cut after
# its k-th of n user turns (data_prep.convert.safemt_rows) is "<id>@<k>of<n>".
ROW_ID_PATTERN = re.compile(r"^(?P<id>.+)@(?P<k>[1-9]\d*)of(?P<n>[1-9]\d*)$")


def format_row_id(record_id: str, k: int, n: int) -> str:
    """The row id of ``record_id``'s dialogue cut after user turn ``k`` of ``n`` (1 <= k < n)."""
    if "@" in record_id or not record_id:
        raise ValueError(f"record id {record_id!r}: a prefix row needs a non-empty id without '@'")
    if not 1 <= k < n:
        raise ValueError(f"record id {record_id!r}: a prefix cut needs 1 <= k < n, got k={k}, n={n}")
    return f"{record_id}@{k}of{n}"


def parse_row_id(row_id: str) -> tuple[str, int | None, int | None]:
    """``(record id, k, n)`` of a row id written by :func:`format_row_id`; ``(row_id, None, None)`` for a full
    dialogue (an id without ``@``). Raises ``ValueError`` naming the id when ``@`` is not ``@<k>of<n>``."""
    if "@" not in row_id:
        return row_id, None, None
    match = ROW_ID_PATTERN.match(row_id)
    if match is None or "@" in match["id"] or not int(match["k"]) < int(match["n"]):
        raise ValueError(f"row id {row_id!r}: expected '<id>' or '<id>@<k>of<n>' with 1 <= k < n")
    return match["id"], int(match["k"]), int(match["n"])


class RecordError(ValueError):
    """A record breaks the schema; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class SafeMTRecord:
    id: str
    scenario: str
    image_path: str
    dialogue: tuple[dict[str, str], ...]
    question: str

    @property
    def turns(self) -> int:
        return sum(1 for m in self.dialogue if m["role"] == "user")

    @property
    def source(self) -> str:
        """The id prefix naming where the query came from (``mllm``, ``mm``, ``jbv``, ``beaver``, ``guard``)."""
        return self.id.split("_", 1)[0]


def parse_safemt_record(raw: Any, taxonomy: Taxonomy, expected_turns: int | None = None) -> SafeMTRecord:
    """Validate one raw record (GitHub or hub layout) and return it; raise ``RecordError`` naming the field."""
    if not isinstance(raw, Mapping):
        raise RecordError("<record>", f"expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    if "image_path" not in raw and HUB_IMAGE_FIELD in raw:
        raw["image_path"] = raw.pop(HUB_IMAGE_FIELD)
    for field in SAFEMT_FIELDS:
        if field not in raw or raw[field] is None:
            raise RecordError(field, "missing")
    for field in ("id", "scenario", "image_path", "question"):
        if not isinstance(raw[field], str):
            raise RecordError(field, f"expected a string, got {type(raw[field]).__name__}")
    if not raw["id"].strip():
        raise RecordError("id", "empty")
    if "@" in raw["id"]:  # reserved: prepared rows name a dialogue's prefixes "<id>@<k>of<n>"
        raise RecordError("id", f"{raw['id']!r} contains '@', which row ids reserve for '<id>@<k>of<n>'")
    if raw["scenario"] not in taxonomy.by_label:
        raise RecordError("scenario", f"unknown scenario label {raw['scenario']!r}")
    if not raw["image_path"].strip():
        raise RecordError("image_path", "empty")
    if not raw["question"].strip():
        raise RecordError("question", "empty")
    dialogue = raw["dialogue"]
    if isinstance(dialogue, str):  # hub layout stores it as JSON text
        try:
            dialogue = json.loads(dialogue)
        except json.JSONDecodeError as exc:
            raise RecordError("dialogue", f"not valid JSON: {exc}") from None
    return SafeMTRecord(
        id=raw["id"],
        scenario=raw["scenario"],
        image_path=raw["image_path"],
        dialogue=tuple(validate_dialogue(dialogue, expected_turns)),
        question=raw["question"],
    )


def validate_dialogue(dialogue: Any, expected_turns: int | None) -> list[dict[str, str]]:
    """A SafeMT dialogue's messages, checked (roles alternate from a user turn, ends on a user turn);
    ``RecordError`` names the bad field. Used for records and for dialogues sent to the service."""
    if not isinstance(dialogue, list) or not dialogue:
        raise RecordError("dialogue", "expected a non-empty list of messages")
    messages = []
    for index, message in enumerate(dialogue):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise RecordError(f"dialogue[{index}]", "expected an object with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise RecordError(
                f"dialogue[{index}].content", f"expected a string, got {type(message['content']).__name__}"
            )
        expected_role = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected_role:
            raise RecordError(
                f"dialogue[{index}].role",
                f"got {message['role']!r}, expected {expected_role!r} (roles must alternate from user)",
            )
        if expected_role == "assistant" and not message["content"].strip():
            raise RecordError(f"dialogue[{index}].content", "empty assistant turn")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise RecordError("dialogue", "does not end with a user turn")
    user_turns = (len(messages) + 1) // 2
    if expected_turns is not None and user_turns != expected_turns:
        raise RecordError("dialogue", f"has {user_turns} user turns, file is for {expected_turns}")
    return messages
