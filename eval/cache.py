"""An append-only JSONL cache so an interrupted evaluation resumes without recomputation.

Each line is one JSON object; its key is the tuple of ``key_fields`` values. Results are appended
and flushed once per batch, so a crash loses at most the batch in flight. On reopening, a last line
cut off mid-write is dropped with a warning (and cut from the file so later appends stay valid);
a broken line anywhere else is an error naming the file and line, because that is not a crash
artefact and silently skipping it would hide lost results. A key seen twice keeps its last value,
which is how a recomputed record (see ``recompute`` in :func:`compute_missing`) replaces a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")
Key = tuple[Any, ...]


class CacheError(ValueError):
    """The cache file is damaged in a way that is not a truncated last write."""


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of the settings that decide a cached result (part of its key)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class JsonlCache:
    def __init__(self, path: str | Path, key_fields: Sequence[str]):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self._records: dict[Key, dict[str, Any]] = {}
        self._load()

    def key_of(self, record: Mapping[str, Any]) -> Key:
        missing = [f for f in self.key_fields if f not in record]
        if missing:
            raise KeyError(f"{self.path}: record lacks key field(s) {missing}: {dict(record)!r:.200}")
        return tuple(record[f] for f in self.key_fields)

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, start=1):
            is_last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
            if line.strip():
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                    key = self.key_of(record)
                except (ValueError, KeyError) as exc:
                    if not is_last:
                        raise CacheError(f"{self.path}:{number}: unreadable cache line ({exc})") from None
                    warnings.warn(
                        f"{self.path}:{number}: dropped a truncated last line (an interrupted write); "
                        "its item will be recomputed",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    with self.path.open("r+b") as handle:
                        handle.truncate(offset)
                    return
                self._records[key] = record
            offset += len(line) + 1

    def __contains__(self, key: Key) -> bool:
        return tuple(key) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: Key) -> dict[str, Any] | None:
        return self._records.get(tuple(key))

    def records(self) -> Iterator[dict[str, Any]]:
        return iter(self._records.values())

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records and flush them to disk (one call per batch)."""
        records = [dict(r) for r in records]
        if not records:
            return
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        keys = [self.key_of(r) for r in records]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        with self.path.open("a", encoding="utf-8") as handle:
            if needs_newline:
                handle.write("\n")
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for key, record in zip(keys, records, strict=True):
            self._records[key] = record


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def compute_missing(
    cache: JsonlCache,
    items: Sequence[Item],
    key: Callable[[Item], Key],
    compute_batch: Callable[[list[Item]], list[Mapping[str, Any]]],
    batch_size: int,
    desc: str = "",
    recompute: Callable[[Mapping[str, Any]], bool] | None = None,
) -> int:
    """Compute and cache the records of the items whose key is not cached yet; return how many.

    ``compute_batch`` gets up to ``batch_size`` items and returns one record per item (each
    record must carry the cache's key fields). Each batch is appended and flushed before the next
    starts, so an interruption keeps every finished batch. An item whose cached record makes
    ``recompute(record)`` true (e.g. a judge call that failed) is computed again; its new record is
    appended and supersedes the old one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    todo, seen = [], set()
    for item in items:
        item_key = tuple(key(item))
        if item_key in seen:
            continue
        cached = cache.get(item_key)
        if cached is None or (recompute is not None and recompute(cached)):
            todo.append(item)
            seen.add(item_key)
    done = 0
    with tqdm(total=len(todo), desc=desc or cache.path.name, unit="item", disable=not todo) as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            records = compute_batch(batch)
            if len(records) != len(batch):
                raise RuntimeError(f"{desc or 'compute_batch'}: got {len(records)} results for {len(batch)} items")
            for item, record in zip(batch, records, strict=True):
                if cache.key_of(record) != tuple(key(item)):
                    raise RuntimeError(f"{desc or 'compute_batch'}: result key {cache.key_of(record)} for {key(item)}")
            cache.append(records)
            done += len(batch)
            progress.update(len(batch))
    return done
