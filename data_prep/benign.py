"""Benign multi-turn dialogues, so the moderator does not learn "everything is unsafe".

Sources (config ``benign``):

* ``chitchat``: the installed ``chitchat-dataset`` package (MIT; BYU-PCCL Chit Chat Challenge):
  7,168 real human-human conversations stored as message blocks by alternating senders. The first
  sender becomes ``user``, the other ``assistant``; the utterances of one block are joined by a space.
* a ``.jsonl``/``.json`` file of rows, read here so that a bad line is reported by its number;
* any other ``datasets`` source (parquet file, folder, hub name) loaded with ``load_dataset``.

A row holds a conversation in ``messages`` (``role``/``content``, content a string or typed parts with
``{"type": "image"}``) or ShareGPT/LLaVA-style ``conversations`` (``from``/``value`` with ``<image>``
markers), and optionally ``images`` (list) or ``image``: paths (relative to the file's folder),
``{"bytes", "path"}`` dicts or PIL images. System messages and empty assistant messages are dropped,
consecutive messages of one role merged, leading assistant messages dropped, and the dialogue is cut to end with a user turn, at the
lengths in ``benign_turns`` (evenly spread, so dialogue length says nothing about the label; by default
each dialogue at every length it reaches, all in one split like a SafeMT id).
Only the first image is kept (every example carries exactly one image, see ``data_prep/README.md``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.config import CHITCHAT, ConfigError
from data_prep.images import ImagePathError, resolve_inside
from data_prep.safemt import read_json_array
from moderator.schema import RecordError

IMAGE_MARKER = re.compile(r"\s*<image>\s*")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant"}
_ROLES.update({"model": "assistant", "system": "system"})


@dataclass(frozen=True)
class BenignCandidate:
    file: str
    index: int
    id: str | None
    raw: Any  # a row, a chitchat conversation, or a parse problem (str) for a line that is not JSON
    base_dir: Path | None  # what relative image paths are relative to
    problem_field: str | None = None


@dataclass
class BenignDialogue:
    id: str
    dialogue: list[dict[str, str]]
    image_turn: int  # index into ``dialogue`` of the user turn that carries the image
    source_image: Any = None  # the row's own first image (path, dict or PIL); None: take one from the pool
    dropped_empty: int = 0  # empty assistant messages left out
    dropped_images: int = 0  # images after the first, left out


def source_name(spec: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    if spec == CHITCHAT:
        return CHITCHAT
    path = Path(spec)
    return path.stem if path.exists() else spec.rstrip("/").split("/")[-1]


def iter_candidates(spec: str, split: str, seed: int | None) -> Iterator[BenignCandidate]:
    """Candidate rows in a deterministic, seed-shuffled order (callers stop once they have enough);
    ``seed=None``: in the source's own order (the eval reads a held-out file as written)."""
    if spec == CHITCHAT:
        yield from _chitchat(seed)
        return
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path)  # in file order a caller that stops early never reads the rest
        yield from rows if seed is None else _shuffled(list(rows), seed)
    elif path.is_file() and path.suffix.lower() == ".json":
        rows = []
        for item in read_json_array(path, None):
            if hasattr(item, "raw"):
                rows.append(BenignCandidate(item.file, item.index, _row_id(item.raw), item.raw, path.parent))
            else:
                rows.append(BenignCandidate(item.file, -1, item.id, item.reason, None, "<file>"))
        yield from _shuffled(rows, seed)
    else:
        yield from _datasets_rows(spec, split, seed)


def _order(count: int, seed: int | None) -> list[int]:
    order = list(range(count))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def _shuffled(rows: list[BenignCandidate], seed: int | None) -> Iterator[BenignCandidate]:
    for index in _order(len(rows), seed):
        yield rows[index]


def _row_id(raw: Any) -> str | None:
    value = raw.get("id") if isinstance(raw, dict) else None
    return str(value) if value not in (None, "") else None


def _chitchat(seed: int | None) -> Iterator[BenignCandidate]:
    import chitchat_dataset

    path = Path(chitchat_dataset.__file__).parent / "dataset.json"
    conversations = json.loads(path.read_text(encoding="utf-8"))
    keys = list(conversations)
    for index in _order(len(keys), seed):
        key = keys[index]
        yield BenignCandidate(str(path), index, f"chitchat_{key}", {"chitchat": conversations[key]}, None)


def _jsonl_rows(path: Path) -> Iterator[BenignCandidate]:
    with path.open("rb") as handle:
        for index, line_bytes in enumerate(handle):
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"line {index + 1} is not valid UTF-8 (byte offset {exc.start} in the line)"
                yield BenignCandidate(str(path), index, None, reason, None, "<line>")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = f"line {index + 1} is not valid JSON (column {exc.colno}): {exc.msg}"
                yield BenignCandidate(str(path), index, None, reason, None, "<line>")
                continue
            except RecursionError:
                reason = f"line {index + 1}: JSON nested too deeply to read"
                yield BenignCandidate(str(path), index, None, reason, None, "<line>")
                continue
            yield BenignCandidate(str(path), index, _row_id(row), row, path.parent)


def _datasets_rows(spec: str, split: str, seed: int | None) -> Iterator[BenignCandidate]:
    import datasets

    path = Path(spec)
    if path.is_file():
        builder = {".parquet": "parquet", ".csv": "csv"}.get(path.suffix.lower(), "json")
        data = datasets.load_dataset(builder, data_files=str(path), split="train")
        base_dir, label = path.parent, str(path)
    else:
        try:
            data = datasets.load_dataset(spec, split=split)
        except Exception as exc:  # offline, unknown name, no access
            raise ConfigError(f"benign source {spec!r} is no local file, and loading it failed: {exc}") from None
        base_dir, label = (path if path.is_dir() else None), (str(path) if path.is_dir() else f"hub:{spec}[{split}]")
    for column in ("images", "image"):  # keep image bytes/paths as they are; decoding is the image check's job
        feature = data.features.get(column)
        if isinstance(feature, datasets.Image):
            data = data.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List | datasets.Sequence) and isinstance(feature.feature, datasets.Image):
            data = data.cast_column(column, datasets.List(datasets.Image(decode=False)))
    for index in _order(len(data), seed):
        row = data[index]
        yield BenignCandidate(label, index, _row_id(row), row, base_dir)


def _chitchat_messages(conversation: dict) -> list[tuple[str, str, int]]:
    blocks = conversation.get("messages")
    if not isinstance(blocks, list) or not blocks:
        raise RecordError("messages", "expected a non-empty list of message blocks")
    senders: list[str] = []
    messages = []
    for index, block in enumerate(blocks):
        if not isinstance(block, list) or not block or not all(isinstance(u, dict) for u in block):
            raise RecordError(f"messages[{index}]", "expected a non-empty list of utterances")
        sender = block[0].get("sender")
        if sender not in senders:
            senders.append(sender)
        if len(senders) > 2:
            raise RecordError(f"messages[{index}].sender", "more than two senders in one conversation")
        text = " ".join(str(u.get("text", "")).strip() for u in block).strip()
        messages.append(("user" if sender == senders[0] else "assistant", text, 0))
    return messages


def _row_messages(row: dict) -> tuple[list[tuple[str, str, int]], list[Any]]:
    """(role, text, images-in-this-message) triples and the row's images, in order."""
    key = next((k for k in ("messages", "conversations", "conversation") if row.get(k) is not None), None)
    if key is None:
        raise RecordError("messages", "missing (expected 'messages' or 'conversations')")
    raw_messages = row[key]
    if isinstance(raw_messages, str):
        try:
            raw_messages = json.loads(raw_messages)
        except json.JSONDecodeError as exc:
            raise RecordError(key, f"not valid JSON: {exc}") from None
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RecordError(key, "expected a non-empty list of messages")
    messages = []
    for index, message in enumerate(raw_messages):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise RecordError(where, f"expected an object, got {type(message).__name__}")
        role = _ROLES.get(str(message.get("role", message.get("from", ""))).lower())
        if role is None:
            raise RecordError(f"{where}.role", f"unknown role {message.get('role', message.get('from'))!r}")
        content = message.get("content", message.get("value"))
        if isinstance(content, str):
            n_images = len(IMAGE_MARKER.findall(content))
            text = IMAGE_MARKER.sub(" ", content).strip()
        elif isinstance(content, list):
            texts, n_images = [], 0
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text") or ""))
                elif kind in ("image", "image_url"):
                    n_images += 1
                else:
                    raise RecordError(f"{where}.content", f"unsupported content part {part!r:.80}")
            text = "".join(texts).strip()
        else:
            raise RecordError(f"{where}.content", f"expected a string or a list of parts, got {type(content).__name__}")
        if role != "system":
            messages.append((role, text, n_images))
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    return messages, list(images or [])


def normalize(candidate: BenignCandidate) -> BenignDialogue:
    """Turn a candidate into a dialogue that alternates from user and ends with a user turn (full length)."""
    raw = candidate.raw
    if isinstance(raw, dict) and "chitchat" in raw:
        messages, images = _chitchat_messages(raw["chitchat"]), []
    elif isinstance(raw, dict):
        messages, images = _row_messages(raw)
    else:
        raise RecordError("<record>", f"expected a JSON object, got {type(raw).__name__}")
    # Real chit-chat has blank messages; an empty assistant message answers nothing, so it is dropped
    # and the user turns around it merge (empty user text is kept: SafeMT has it too).
    dropped = sum(1 for role, text, n in messages if role == "assistant" and not text and not n)
    messages = [m for m in messages if m[0] != "assistant" or m[1] or m[2]]
    merged: list[list] = []
    for role, text, n_images in messages:
        if merged and merged[-1][0] == role:
            merged[-1][1] = "\n".join(t for t in (merged[-1][1], text) if t)
            merged[-1][2] += n_images
        elif merged or role == "user":  # leading assistant messages have nothing to answer
            merged.append([role, text, n_images])
    if merged and merged[-1][0] == "assistant":  # the moderator judges the user's last turn
        merged.pop()
    if not merged:
        raise RecordError("messages", "no user turn")
    dialogue = [{"role": role, "content": text} for role, text, _ in merged]
    image_turn, source_image = 0, None
    if images:
        source_image = images[0]
        marked = [i for i, (role, _, n) in enumerate(merged) if n > 0 and role == "user"]
        image_turn = marked[0] if marked else 0  # no marker: before the first user message (TRL's convention)
    return BenignDialogue(
        id=candidate.id or "",
        dialogue=dialogue,
        image_turn=image_turn,
        source_image=source_image,
        dropped_empty=dropped,
        dropped_images=max(0, len(images) - 1),
    )


def read_candidate(candidate: BenignCandidate, source: str, seen_ids: set[str]) -> BenignDialogue:
    """A candidate as a dialogue with its id (``<source>_<index>`` when the row has none), or a
    ``RecordError`` naming the field for what data prep quarantines: a line or file that could not be
    parsed, a malformed row, an id already in ``seen_ids`` (the caller adds the ids it keeps)."""
    if candidate.problem_field:
        raise RecordError(candidate.problem_field, str(candidate.raw))
    try:
        dialogue = normalize(candidate)
    except RecordError:
        raise
    except Exception as exc:  # anything else about one row's content: that row is bad, not the run
        detail = "nested too deeply to read" if isinstance(exc, RecursionError) else f"{type(exc).__name__}: {exc}"
        raise RecordError("<record>", f"cannot be read ({detail[:200]})") from None
    dialogue.id = dialogue.id or f"{source}_{candidate.index}"
    if dialogue.id in seen_ids:
        raise RecordError("id", f"duplicate id {dialogue.id!r}")
    return dialogue


def cut_dialogue(dialogue: BenignDialogue, user_turns: int) -> BenignDialogue:
    """The dialogue up to and including its ``user_turns``-th user turn (the image moves to turn 0 if cut off)."""
    kept = dialogue.dialogue[: 2 * user_turns - 1]
    image_turn = dialogue.image_turn if dialogue.image_turn < len(kept) else 0
    return dataclasses.replace(dialogue, dialogue=kept, image_turn=image_turn)


def user_turns(dialogue: BenignDialogue) -> int:
    return (len(dialogue.dialogue) + 1) // 2


class LengthQuota:
    """Spread benign examples evenly over ``turn_choices`` user-turn lengths (length must not predict the label).

    A dialogue is cut to the longest open length it reaches (the scarce long dialogues fill the long
    lengths first), or to every open length it reaches, like SafeMT's one query at several lengths.
    """

    def __init__(self, total: int, turn_choices: list[int]):
        choices = sorted(set(turn_choices))
        self.open = {k: total // len(choices) + (1 if i < total % len(choices) else 0) for i, k in enumerate(choices)}

    def take(self, available_turns: int, every_length: bool) -> list[int]:
        """Lengths to cut a dialogue with ``available_turns`` user turns to: the longest open one, or all."""
        fitting = [k for k, left in self.open.items() if left > 0 and k <= available_turns]
        taken = fitting if every_length else fitting[-1:]
        for k in taken:
            self.open[k] -= 1
        return taken

    @property
    def done(self) -> bool:
        return not any(self.open.values())


def materialize_image(image: Any, base_dir: Path | None, target_stem: Path) -> str:
    """An absolute path for a row's own image: paths are resolved, bytes and PIL images written out."""
    if isinstance(image, str):
        if base_dir is None:
            raise RecordError(
                "images", f"image path {image!r} in a source without a folder (only image bytes are read)"
            )
        try:  # relative to the source's folder and inside it, links followed (absolute and ../ paths too)
            return str(resolve_inside(base_dir, image, what="benign source folder"))
        except ImagePathError as exc:
            raise RecordError("images", str(exc)) from None
    if isinstance(image, dict):
        if image.get("bytes"):
            data = image["bytes"]
            if not isinstance(data, bytes | bytearray):  # JSON has no bytes: a string here is not an image
                raise RecordError("images", f"image 'bytes' must be raw bytes, got {type(data).__name__}")
            suffix = Path(image.get("path") or "").suffix.lower() or ".img"
            target = target_stem.with_suffix(suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            return str(target.resolve())
        if image.get("path"):
            return materialize_image(image["path"], base_dir, target_stem)
        raise RecordError("images", "image entry has neither bytes nor path")
    if hasattr(image, "save"):  # a PIL image
        target = target_stem.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        target.write_bytes(buffer.getvalue())
        return str(target.resolve())
    raise RecordError("images", f"unsupported image value of type {type(image).__name__}")
