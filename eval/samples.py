"""The eval's samples: SafeMT and benign dialogues (read by data prep's readers) and the prepared splits' rows.

A bad input record is quarantined in a :class:`data_prep.quarantine.Ledger` as data prep does (or,
``strict``, raises :class:`EvalDataError` naming file, record and field). The prepared dataset's
``test`` split gives the moderator's detection metrics; its ``validation`` split fixes the threshold
(:data:`THRESHOLD_SPLIT`). Images are decoded once at load (``check_images``) and opened per batch
(:func:`open_images`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from data_prep.benign import BenignDialogue, iter_candidates, materialize_image, read_candidate, source_name
from data_prep.config import ConfigError, DataPrepConfig
from data_prep.images import check_image, check_images
from data_prep.quarantine import Ledger
from data_prep.safemt import read_safemt
from moderator.contract import SAFE, UNSAFE, DialogueError, prompt_of_prepared_row
from moderator.schema import RecordError, parse_row_id
from moderator.taxonomy import Taxonomy


class EvalDataError(ValueError):
    """An eval input is malformed; the message names the file, record and field."""


# Ledger input names, as data prep's quarantine.jsonl names them.
SAFEMT_INPUT, BENIGN_INPUT = "safemt", "benign"
BENIGN_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
QUARANTINE_FILE = "quarantine.jsonl"  # one line per bad input record: input, file, index, id, field, reason
INPUTS_FILE = "inputs.json"  # per input: read, used, quarantined, not_selected


@dataclass(frozen=True)
class EvalSample:
    id: str
    k: int  # user turns
    benign: bool
    dialogue: tuple[dict[str, str], ...]  # ends with the user turn the target answers
    image_path: Path | None  # shown with the first user turn
    question: str | None = None  # SafeMT's original harmful question
    scenario: str | None = None  # SafeMT scenario label
    category: str | None = None  # the scenario's taxonomy id

    @property
    def key(self) -> tuple[str, int, bool]:
        return (self.id, self.k, self.benign)


def _quarantine_failure(ledger: Ledger, input_name: str, what: str) -> EvalDataError | None:
    """``strict``: the error naming the first record ``input_name`` quarantined (None when nothing was)."""
    entries = [e for e in ledger.entries if e.input == input_name]
    if not entries:
        return None
    return EvalDataError(f"strict: {len(entries)} {what} record(s) quarantined; first: {entries[0].message}")


def load_safemt_samples(
    safemt_dir: str | Path,
    turns: Sequence[int],
    limit: int | None,
    taxonomy: Taxonomy,
    *,
    ledger: Ledger | None = None,
    strict: bool = False,
    images_root: str | None = None,
    keep_ids: Collection[str] | None = None,
) -> list[EvalSample]:
    """SafeMT dialogues of the lengths ``turns``, read by data prep's reader (GitHub or hub layout).

    A bad record (schema, duplicate id, an image path leaving ``images_root``, an image that is missing
    or does not decode) is quarantined in ``ledger`` as data prep does, unless ``strict``: then the first
    one raises :class:`EvalDataError` naming file, record and field. ``keep_ids``: only these ids (the
    held-out test split); ``limit``: the first N kept records of each length. A record read but not
    kept is counted in ``ledger.read`` only (read = used + quarantined + not selected).
    """
    ledger = ledger if ledger is not None else Ledger()
    spec = DataPrepConfig(safemt=str(safemt_dir), safemt_turns=list(turns), safemt_images_root=images_root)
    try:
        candidates, _ = read_safemt(spec, taxonomy, ledger)
    except ConfigError as exc:
        raise EvalDataError(f"safemt_dir: {exc}") from None
    chosen: dict[int, list[tuple[Any, Any, str]]] = {k: [] for k in turns}
    for item, record, image in candidates:
        kept = chosen[record.turns]
        if (keep_ids is None or record.id in keep_ids) and (limit is None or len(kept) < limit):
            kept.append((item, record, image))
    selected = [c for k in turns for c in chosen[k]]
    checks = check_images(image for _, _, image in selected)  # decoded now, not halfway through the run
    samples = []
    for item, record, image in selected:
        if checks[image].error:
            ledger.quarantine(SAFEMT_INPUT, item.file, item.index, record.id, "image_path", checks[image].error)
            continue
        ledger.converted[SAFEMT_INPUT] += 1
        samples.append(
            EvalSample(
                id=record.id,
                k=record.turns,
                benign=False,
                dialogue=record.dialogue,
                image_path=Path(image),
                question=record.question,
                scenario=record.scenario,
                category=taxonomy.by_label[record.scenario].id,
            )
        )
    if strict and (error := _quarantine_failure(ledger, SAFEMT_INPUT, "SafeMT")):
        raise error
    return samples


def load_benign_samples(
    path: str | Path,
    limit: int | None,
    *,
    ledger: Ledger | None = None,
    strict: bool = False,
    image_dir: Path | None = None,
) -> list[EvalSample]:
    """Benign dialogues in the source's order, read by data prep's benign reader; the first ``limit`` good ones.

    Usually data prep's ``benign_eval.jsonl`` (``{"id", "messages", "image"?}``, the image relative to
    the file's folder and required to stay inside it); any source data prep reads works. Data prep's
    normalisation applies (system messages dropped, trailing assistant turns dropped so the target
    answers the last user turn). A bad row is quarantined in ``ledger`` (or raises, ``strict``).
    ``image_dir``: where image bytes held in a row are written (without it such a row is quarantined).
    """
    ledger = ledger if ledger is not None else Ledger()
    spec = str(path)
    local = Path(spec)
    if (local.suffix.lower() in BENIGN_FILE_SUFFIXES or spec.startswith((".", "/"))) and not local.exists():
        raise EvalDataError(f"{path}: benign file not found")
    source = source_name(spec, None)
    seen: set[str] = set()
    samples: list[EvalSample] = []
    try:
        for candidate in iter_candidates(spec, "train", seed=None):
            if limit is not None and len(samples) >= limit:
                break
            ledger.read[BENIGN_INPUT] += 1
            index = candidate.index if candidate.index >= 0 else None
            try:
                dialogue = read_candidate(candidate, source, seen)
                image_path = _benign_image(dialogue, candidate.base_dir, image_dir)
            except RecordError as exc:
                ledger.quarantine(BENIGN_INPUT, candidate.file, index, candidate.id, exc.field, exc.reason)
                continue
            seen.add(dialogue.id)
            ledger.converted[BENIGN_INPUT] += 1
            k = (len(dialogue.dialogue) + 1) // 2
            samples.append(
                EvalSample(id=dialogue.id, k=k, benign=True, dialogue=tuple(dialogue.dialogue), image_path=image_path)
            )
    except ConfigError as exc:
        raise EvalDataError(f"benign: {exc}") from None
    if strict and (error := _quarantine_failure(ledger, BENIGN_INPUT, "benign")):
        raise error
    return samples


def _benign_image(dialogue: BenignDialogue, base_dir: Path | None, image_dir: Path | None) -> Path | None:
    """The dialogue's own image, resolved inside its source's folder and decoded once; None: it has none."""
    image = dialogue.source_image
    if image is None:
        return None
    written = (isinstance(image, dict) and image.get("bytes")) or hasattr(image, "save")  # not a path
    if written and image_dir is None:
        raise RecordError("images", "image bytes in the row, and no folder was given to write them to")
    stem = (image_dir or Path(".")) / hashlib.sha256(dialogue.id.encode()).hexdigest()[:16]
    path = materialize_image(image, base_dir, stem)
    check = check_image(path)
    if check.error:
        raise RecordError("images", check.error)
    return Path(path)


def open_images(samples: Sequence[EvalSample]) -> list[list[Any]]:
    """One image list per sample (empty without an image), decoded as RGB."""
    images = []
    for sample in samples:
        if sample.image_path is None:
            images.append([])
            continue
        with Image.open(sample.image_path) as image:
            images.append([image.convert("RGB")])
    return images


SPLIT_ID_PREFIX = "test-split:"  # keeps test-split decisions apart from eval samples in the cache
THRESHOLD_SPLIT = "validation"  # the decision threshold is chosen here, never on test


@dataclass(frozen=True)
class SplitRow:
    """One row of a prepared dataset split (detection metrics on test, the threshold on validation)."""

    index: int
    id: str
    k: int
    benign: bool
    category: str | None
    split: str = "test"
    group: str | None = None  # the dataset's split_group (the SafeMT or benign id); None: from the row id

    @property
    def key(self) -> tuple[str, int, bool]:
        prefix = SPLIT_ID_PREFIX if self.split == "test" else f"{self.split}-split:"
        return (prefix + self.id, self.k, self.benign)

    @property
    def dialogue_id(self) -> str:
        """The SafeMT (or benign) id this row was cut from: every prefix row of an id shares it."""
        return self.group if self.group is not None else parse_row_id(self.id)[0]


def load_detection_split(path: str | Path, split: str = "test") -> tuple[Any, list[SplitRow]]:
    """One split (``test`` by default) of a dataset written by ``data_prep.build`` and its rows' labels."""
    from data_prep.io import load_prepared  # imports datasets: only a run with a detection_split pays for it

    try:
        splits = load_prepared(path)
    except FileNotFoundError as exc:
        raise EvalDataError(f"detection_split: {exc}") from None
    if split not in splits:
        raise EvalDataError(f"{path}: the prepared dataset has no {split!r} split (has {sorted(splits)})")
    data = splits[split]
    missing = [c for c in ("messages", "images", "label", "category", "id", "turns") if c not in data.column_names]
    if missing:
        raise EvalDataError(f"{path}: {split} split lacks column(s) {missing}")
    rows = []
    # Column access reads only that column: the images are not decoded here.
    ids = data["id"]
    # data prep writes split_group (a row's SafeMT or benign id); older datasets: parse the row id.
    groups = data["split_group"] if "split_group" in data.column_names else [None] * len(ids)
    for index, (row_id, label, category, turns, group) in enumerate(
        zip(ids, data["label"], data["category"], data["turns"], groups, strict=True)
    ):
        if label not in (SAFE, UNSAFE):
            raise EvalDataError(
                f"{path}: {split} row {index} (id={row_id!r}): field 'label': {label!r} is not safe/unsafe"
            )
        if group is None:
            try:
                group = parse_row_id(row_id)[0]
            except ValueError as exc:
                raise EvalDataError(f"{path}: {split} row {index}: field 'id': {exc}") from None
        rows.append(SplitRow(index, row_id, int(turns), label == SAFE, category or None, split, group))
    return data, rows


def prompt_without_target(messages: list[dict[str, Any]], row_id: str) -> list[dict[str, Any]]:
    """A prepared row's messages without the target (assistant) turn: the moderator's rendered prompt."""
    try:
        return prompt_of_prepared_row(messages, row_id)
    except DialogueError as exc:
        raise EvalDataError(f"test split {exc}") from None
