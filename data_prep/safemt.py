"""Read SafeMT in either published layout, one raw record at a time.

* GitHub layout: a folder with ``{1,2,4,6,8}_turn.json`` (any subset; a clone's ``Data/`` folder is found
  too) and ``images/<scenario>/...``. Each file is a JSON array of records; the file name gives the
  length, which every record is checked against.
* Hub layout (``HappyCorpse/SafeMT``): rows with ``id``, ``scenario``, ``image_rel_path``, ``dialogue`` as
  JSON text (and ``question``, which the schema requires). Loaded with ``datasets.load_dataset`` from a
  hub name, a local folder or a local parquet/json/jsonl file. How the hub copy marks a row's length is
  not documented: a ``turns`` (or ``turn``/``num_turns``/``n_turns``) column, else a split named like
  ``4_turn``, is checked against the dialogue; without either, the length is the number of user turns.
  Image paths are relative to ``safemt_images_root`` (default: the local file's folder, or a snapshot
  of the hub repository).

A file that is not valid UTF-8 or not valid JSON is quarantined as a whole (one entry naming the file,
the byte or line/column, and the record where parsing stopped): a damaged file, typically an
interrupted download, is re-fetched, not half-used.

GitHub-layout files are checked from their ``stat`` before any is opened: above ``safemt_max_file_mb``
is an error (a file is read whole), and so, for data prep (``require_lengths``), is a configured length
whose file is missing or not a regular file (a FIFO would block the read). They are opened non-blocking
and checked again on the open descriptor, so a file swapped in between is caught too.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.config import DEFAULT_MAX_FILE_MB, ConfigError
from data_prep.images import ImagePathError, resolve_inside
from data_prep.quarantine import Ledger
from moderator.contract import one_sentence
from moderator.manifest import file_kind
from moderator.schema import SAFEMT_FIELDS, TURN_COUNTS, RecordError, parse_safemt_record, safemt_turn_file

HUB_TURN_COLUMNS = ("turns", "turn", "num_turns", "n_turns")
_SPLIT_TURNS = re.compile(r"^(\d+)[_-]?turns?$")
_ID_IN_TEXT = re.compile(r'"id"\s*:\s*"([^"\\]*)"')
_WHITESPACE = re.compile(r"\s*")
_LOCAL_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass(frozen=True)
class RawRecord:
    file: str
    index: int
    raw: Any
    expected_turns: int | None  # the length the file/row says it has; None: infer from the dialogue


@dataclass(frozen=True)
class FileProblem:
    file: str
    id: str | None
    reason: str


@dataclass
class SafeMTSource:
    description: str
    images_root: Path
    layout: str  # "github" or "hub"
    _spec: str
    _turns: tuple[int, ...]
    _revision: str | None = None
    # Folders image links may lead into besides images_root: a hub snapshot's files link into the
    # cache's blob store.
    link_roots: tuple[Path, ...] = ()
    max_file_bytes: int | None = None  # GitHub layout: a larger <k>_turn.json is refused, never read

    @property
    def lengths(self) -> tuple[int, ...]:
        """The dialogue lengths read (``safemt_turns``, or the lengths present when it is null)."""
        return self._turns

    def records(self) -> Iterator[RawRecord | FileProblem]:
        if self.layout == "github":
            yield from _github_records(Path(self._spec), self._turns, self.max_file_bytes)
        else:
            yield from _hub_records(self._spec, self._revision)


def _max_bytes(max_file_mb: float | None) -> int | None:
    return None if max_file_mb is None else int(max_file_mb * 1_000_000)


def _too_large(path: Path | str, size: int, max_bytes: int) -> ConfigError:
    return ConfigError(
        f"{path} is {size / 1e6:.1f} MB, above safemt_max_file_mb {max_bytes / 1e6:g} (SafeMT's files are a "
        "few MB each and one is read whole): not read; raise safemt_max_file_mb if this file is right"
    )


def _check_length_file(folder: Path, k: int, required: bool, max_bytes: int | None) -> bool:
    """Whether ``<folder>/<k>_turn.json`` is there to read, from its ``stat`` only (never opened: a FIFO
    would block). ``required`` (a configured length): missing or not a regular file is an error."""
    path = safemt_turn_file(folder, k)
    try:
        info = path.stat()
    except FileNotFoundError:
        if not required:
            return False
        what = "is a link to a file that does not exist" if path.is_symlink() else "does not exist"
        raise ConfigError(
            f"safemt_turns includes {k} but {path} {what}: a configured length is never skipped; add the file "
            f"or leave {k} out of safemt_turns"
        ) from None
    except OSError as exc:  # e.g. a link loop, no permission on the folder
        if not required:
            return False
        raise ConfigError(f"safemt_turns includes {k} but {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        if not required:
            return False
        raise ConfigError(
            f"safemt_turns includes {k} but {path} is {file_kind(info.st_mode)}, not a regular file: not "
            f"opened; replace it with the JSON file or leave {k} out of safemt_turns"
        )
    if max_bytes is not None and info.st_size > max_bytes:
        raise _too_large(path, info.st_size, max_bytes)
    return True


def open_safemt(
    spec: str,
    turns: list[int] | None,
    images_root: str | None = None,
    revision: str | None = None,
    *,
    require_lengths: bool = False,
    max_file_mb: float | None = DEFAULT_MAX_FILE_MB,
) -> SafeMTSource:
    """Work out which layout ``spec`` is in and where its images are.

    ``turns`` None: every length whose file is there (GitHub layout), every length (hub layout).
    ``require_lengths`` (data prep): in the GitHub layout, a length in ``turns`` whose file is missing or
    not a regular file is a :class:`ConfigError` naming it; without it (the eval) such a length is
    skipped. A file above ``max_file_mb`` is a :class:`ConfigError` either way, checked before reading.
    """
    path = Path(spec)
    max_bytes = _max_bytes(max_file_mb)
    if path.is_dir():
        for folder in (path, path / "Data"):
            # Any <k>_turn.json entry (a FIFO, a dangling link) marks the layout; only regular files are read.
            if not any(os.path.lexists(safemt_turn_file(folder, k)) for k in TURN_COUNTS):
                continue
            present = [k for k in TURN_COUNTS if _check_length_file(folder, k, False, None)]
            turns_t = tuple(sorted(set(turns))) if turns is not None else tuple(present)
            if not turns_t:
                raise ConfigError(f"{folder}: no <k>_turn.json is a regular file")
            wanted = [k for k in turns_t if _check_length_file(folder, k, require_lengths, max_bytes)]
            if not wanted:
                raise ConfigError(f"{folder}: has {present}-turn files but safemt_turns is {list(turns_t)}")
            root = Path(images_root) if images_root else folder
            return SafeMTSource(
                f"{folder} (GitHub layout)", root.resolve(), "github", str(folder), turns_t, max_file_bytes=max_bytes
            )
        turns_t = tuple(sorted(set(turns))) if turns is not None else tuple(TURN_COUNTS)
        root = Path(images_root) if images_root else path
        return SafeMTSource(f"{path} (hub layout, local)", root.resolve(), "hub", str(path), turns_t)
    turns_t = tuple(sorted(set(turns))) if turns is not None else tuple(TURN_COUNTS)
    if path.is_file():
        if path.suffix.lower() not in _LOCAL_SUFFIXES:
            raise ConfigError(f"{path}: expected a folder or a {sorted(_LOCAL_SUFFIXES)} file")
        root = Path(images_root) if images_root else path.parent
        return SafeMTSource(f"{path} (hub layout, local)", root.resolve(), "hub", str(path), turns_t)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        link_roots: tuple[Path, ...] = ()
        if images_root:
            root = Path(images_root)
        else:  # images live in the dataset repository next to the data files
            from huggingface_hub import snapshot_download

            try:
                root = Path(snapshot_download(repo_id=spec, repo_type="dataset", revision=revision))
            except Exception as exc:  # offline, unknown repo, no access: all mean "not usable as given"
                raise ConfigError(
                    f"{spec!r} is no local folder or file, and fetching it from the hub failed: {exc}"
                ) from None
            if root.resolve().parent.name == "snapshots":  # <repo cache>/snapshots/<rev> -> <repo cache>/blobs
                link_roots = (root.resolve().parents[1] / "blobs",)
        return SafeMTSource(f"hub:{spec}", root.resolve(), "hub", spec, turns_t, revision, link_roots)
    raise ConfigError(f"SafeMT input {spec!r} is neither an existing folder or file nor a hub dataset name")


def _github_records(folder: Path, turns: tuple[int, ...], max_bytes: int | None) -> Iterator[RawRecord | FileProblem]:
    for k in turns:
        path = safemt_turn_file(folder, k)
        if _check_length_file(folder, k, False, None):  # open_safemt stopped on a configured one missing
            yield from read_json_array(path, k, max_bytes)


def read_file_bounded(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path``: opened non-blocking (a FIFO swapped in never blocks), checked
    on the descriptor, and never more than ``max_bytes`` read (:class:`ConfigError` beyond it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path} is {file_kind(info.st_mode)}, not a regular file: not read")
        if max_bytes is not None and info.st_size > max_bytes:
            raise _too_large(path, info.st_size, max_bytes)
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # grew after the check
        raise _too_large(path, len(data), max_bytes)
    return data


def read_json_array(
    path: Path, expected_turns: int | None, max_bytes: int | None = None
) -> Iterator[RawRecord | FileProblem]:
    """Yield the records of a JSON-array file, or one ``FileProblem`` if the file cannot be parsed.

    ``max_bytes``: a larger file is a :class:`ConfigError`, raised before it is read."""
    data = read_file_bounded(path, max_bytes)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield FileProblem(
            str(path),
            None,
            f"not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (line {line}); "
            "the whole file is quarantined",
        )
        return
    try:
        records = json.loads(text)
    except RecursionError:  # json's C decoder recurses per nesting level
        yield FileProblem(
            str(path),
            None,
            "JSON nested too deeply to read (arrays/objects inside each other); the whole file is quarantined",
        )
        return
    except json.JSONDecodeError as exc:
        index, record_id = locate_record(text, exc.pos)
        where = f"; parsing stopped in record #{index}" if index is not None else ""
        stripped = text.rstrip()
        truncated = "; the file ends before its closing ']' (truncated?)" if not stripped.endswith("]") else ""
        yield FileProblem(
            str(path),
            record_id,
            f"invalid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {_json_message(exc)}{where}"
            f"{truncated}; "
            "the whole file is quarantined",
        )
        return
    if not isinstance(records, list):
        yield FileProblem(str(path), None, f"expected a JSON array of records, got a {type(records).__name__}")
        return
    for index, raw in enumerate(records):
        yield RawRecord(str(path), index, raw, expected_turns)


def _json_message(exc: json.JSONDecodeError) -> str:
    # json's messages point at the position ("Unterminated string starting at"); say which.
    return f"{exc.msg} that position" if exc.msg.endswith(" at") else exc.msg


def locate_record(text: str, error_pos: int) -> tuple[int | None, str | None]:
    """Index (and id, if readable) of the array element in which a JSON error at ``error_pos`` lies."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        return None, None
    pos = _WHITESPACE.match(text, pos + 1).end()
    index = 0
    while pos < len(text):
        start = pos
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            end = None
        if end is None or end > error_pos:
            match = _ID_IN_TEXT.search(text, start, min(len(text), start + 4000))
            return index, match.group(1) if match else None
        pos = _WHITESPACE.match(text, end).end()
        if pos >= error_pos or not text.startswith(",", pos):
            return index, None
        pos = _WHITESPACE.match(text, pos + 1).end()
        index += 1
    return index, None


def _hub_records(spec: str, revision: str | None) -> Iterator[RawRecord | FileProblem]:
    import datasets

    path = Path(spec)
    if path.is_file() or path.is_dir():
        try:
            if path.is_file():
                splits = datasets.load_dataset(_LOCAL_SUFFIXES[path.suffix.lower()], data_files=str(path))
            else:
                splits = datasets.load_dataset(str(path))
        except Exception as exc:  # e.g. a folder with neither <k>_turn.json files nor data files
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"{path}: no SafeMT data: neither <k>_turn.json files (GitHub layout) nor a dataset datasets can "
                f"load (hub layout): {detail}"
            ) from None
        label = str(path)
    else:
        try:
            splits = datasets.load_dataset(spec, revision=revision)
        except Exception as exc:  # the hub copy's layout is not documented: say so instead of a traceback
            raise ConfigError(f"loading the hub dataset {spec!r} failed: {exc}") from None
        label = f"hub:{spec}"
    for split_name, split in splits.items():
        match = _SPLIT_TURNS.match(split_name)
        split_turns = int(match.group(1)) if match else None
        turn_column = next((c for c in HUB_TURN_COLUMNS if c in split.column_names), None)
        file = label if len(splits) == 1 and not label.startswith("hub:") else f"{label}[{split_name}]"
        for index, row in enumerate(split):
            expected = split_turns
            if turn_column is not None and row.get(turn_column) is not None:
                expected = row[turn_column]
            yield RawRecord(file, index, row, expected)


def _raw_id(raw: Any) -> str | None:
    value = raw.get("id") if isinstance(raw, Mapping) else None
    return value if isinstance(value, str) and value else None


def unreadable_reason(exc: BaseException) -> str:
    """The quarantine reason for a record whose content raised while it was read."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to read (arrays/objects inside each other)"
    return f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})"


def _unknown_fields(raw: Mapping[str, Any]) -> tuple[str, str] | None:
    """The GitHub release has exactly these keys; anything else means the format changed under us."""
    extra = sorted(set(raw) - set(SAFEMT_FIELDS))
    if extra:
        return extra[0], f"unexpected field(s) {extra}; a record has exactly {list(SAFEMT_FIELDS)}"
    if isinstance(raw["dialogue"], str):
        return "dialogue", (
            "a JSON string; the GitHub layout stores the dialogue as a list of {role, content} objects "
            "(JSON text is the hub layout's encoding)"
        )
    for index, message in enumerate(raw["dialogue"]):
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            return f"dialogue[{index}].{extra[0]}", f"unexpected field(s) {extra}; a message has exactly role, content"
    return None


def read_safemt(
    config: Any, taxonomy: Any, ledger: Ledger, *, require_lengths: bool = False
) -> tuple[list, dict[str, Any]]:
    """Validated SafeMT records with their image path; quarantines what fails (images are checked later).

    ``config`` needs ``safemt``, ``safemt_turns``, ``safemt_images_root`` and ``safemt_revision`` (a
    ``DataPrepConfig``, or the eval's equivalent): data prep and eval read SafeMT through this one function.
    ``require_lengths`` (data prep): a configured length without its file stops the read (``open_safemt``);
    the eval skips such a length (its K may name lengths a copy lacks).
    """
    source = open_safemt(
        config.safemt,
        config.safemt_turns,
        config.safemt_images_root,
        config.safemt_revision,
        require_lengths=require_lengths,
        max_file_mb=getattr(config, "safemt_max_file_mb", DEFAULT_MAX_FILE_MB),
    )
    wanted = set(source.lengths)
    seen: dict[tuple[str, int], dict[str, int]] = {}
    first_scenario: dict[str, tuple[str, str, int]] = {}  # id -> (scenario, file, index) first seen
    first_question: dict[str, tuple[str, str, str, int]] = {}  # id -> (intent, question, file, index)
    candidates = []
    skipped = 0
    for item in source.records():
        if isinstance(item, FileProblem):
            ledger.read["safemt"] += 1
            ledger.quarantine("safemt", item.file, None, item.id, "<file>", item.reason)
            continue
        raw_id = _raw_id(item.raw)
        expected = item.expected_turns
        if expected is not None:
            try:
                expected = int(expected)
            except (TypeError, ValueError, OverflowError):
                ledger.read["safemt"] += 1
                ledger.quarantine("safemt", item.file, item.index, raw_id, "turns", f"not an integer: {expected!r}")
                continue
            if expected not in wanted:
                skipped += 1
                continue
        try:
            record = parse_safemt_record(item.raw, taxonomy, expected_turns=expected)
        except RecordError as exc:
            ledger.read["safemt"] += 1
            ledger.quarantine("safemt", item.file, item.index, raw_id, exc.field, exc.reason)
            continue
        except Exception as exc:  # anything else about one record's content: quarantine it, go on with the rest
            ledger.read["safemt"] += 1
            ledger.quarantine("safemt", item.file, item.index, raw_id, "<record>", unreadable_reason(exc))
            continue
        if record.turns not in wanted:  # hub rows without a length column
            skipped += 1
            continue
        ledger.read["safemt"] += 1
        unknown = _unknown_fields(item.raw) if source.layout == "github" else None
        if unknown:
            field, reason = unknown
            ledger.quarantine("safemt", item.file, item.index, record.id, field, reason)
            continue
        first = seen.setdefault((item.file, record.turns), {}).get(record.id)
        if first is not None:
            reason = f"duplicate id among the {record.turns}-turn records (first at record #{first}); kept the first"
            ledger.quarantine("safemt", item.file, item.index, record.id, "id", reason)
            continue
        seen[(item.file, record.turns)][record.id] = item.index
        scenario, first_file, first_index = first_scenario.setdefault(
            record.id, (record.scenario, item.file, item.index)
        )
        if scenario != record.scenario:  # one query, one scenario: which label is right cannot be told here
            reason = (
                f"scenario {record.scenario!r} differs from {scenario!r} of the same id in {first_file} "
                f"(record #{first_index}); kept that one"
            )
            ledger.quarantine("safemt", item.file, item.index, record.id, "scenario", reason)
            continue
        # One query, one intent: the target's intent is the question with whitespace collapsed, so only a
        # difference that survives that trains a second intent for the id.
        intent, question, first_file, first_index = first_question.setdefault(
            record.id, (one_sentence(record.question), record.question, item.file, item.index)
        )
        if intent != one_sentence(record.question):
            reason = (
                f"question {record.question!r} differs from {question!r} of the same id in {first_file} "
                f"(record #{first_index}); kept that one (one id, one intent)"
            )
            ledger.quarantine("safemt", item.file, item.index, record.id, "question", reason)
            continue
        try:  # every link followed: a link inside images/ must not bring in a file from elsewhere
            resolve_inside(source.images_root, record.image_path, also_allowed=source.link_roots)
        except ImagePathError as exc:
            ledger.quarantine("safemt", item.file, item.index, record.id, "image_path", str(exc))
            continue
        # The path as named (normalised), not the link target: a hub snapshot's target is a hash-named blob.
        image = Path(os.path.normpath(source.images_root / record.image_path))
        candidates.append((item, record, str(image)))
    info = {
        "description": source.description,
        "images_root": str(source.images_root),
        "lengths": list(source.lengths),
        "skipped_lengths": skipped,
    }
    return candidates, info
