"""An append-only JSONL cache so an interrupted evaluation resumes without recomputation.

Each line is one JSON object; its key is the tuple of ``key_fields`` values. Results are appended
and flushed once per batch, so a crash loses at most the batch in flight. On reopening, a last line
cut off mid-write is dropped with a warning (and cut from the file so later appends stay valid);
a broken line anywhere else is an error naming the file and line, because that is not a crash
artefact and silently skipping it would hide lost results. A key seen twice keeps its last value,
which is how a recomputed record (see ``recompute`` in :func:`compute_missing`) replaces a stale one.

A cache may also read other processes' files (``read_also``: the caches of an eval's shards), never
writing to them; its own file is read last, so its records win. :func:`lock_out_dir` keeps two evals
from writing one output folder at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from eval.progress import stage_bar

Item = TypeVar("Item")
Key = tuple[Any, ...]


class CacheError(ValueError):
    """The cache file is damaged in a way that is not a truncated last write."""


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of the settings that decide a cached result (part of its key)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class JsonlCache:
    def __init__(self, path: str | Path, key_fields: Sequence[str], read_also: Sequence[str | Path] = ()):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self._records: dict[Key, dict[str, Any]] = {}
        for other in read_also:
            if Path(other) != self.path:
                self._load(Path(other), owned=False)
        self._load(self.path, owned=True)

    def key_of(self, record: Mapping[str, Any]) -> Key:
        return self._key_in(record, self.path)

    def _key_in(self, record: Mapping[str, Any], path: Path) -> Key:
        missing = [f for f in self.key_fields if f not in record]
        if missing:
            raise KeyError(f"{path}: record lacks key field(s) {missing}: {dict(record)!r:.200}")
        return tuple(record[f] for f in self.key_fields)

    def _load(self, path: Path, owned: bool) -> None:
        if not path.exists():
            return
        data = path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, start=1):
            is_last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
            if line.strip():
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                    key = self._key_in(record, path)
                except (ValueError, KeyError) as exc:
                    if not is_last:
                        raise CacheError(f"{path}:{number}: unreadable cache line ({exc})") from None
                    warnings.warn(
                        f"{path}:{number}: dropped a truncated last line (an interrupted write"
                        + (
                            "); its item will be recomputed"
                            if owned
                            else ", or one still being written by another process)"
                        ),
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    if owned:  # another process's file is only read: it may be writing that line now
                        with path.open("r+b") as handle:
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


def missing_items(
    cache: JsonlCache,
    items: Iterable[Item],
    key: Callable[[Item], Key],
    recompute: Callable[[Mapping[str, Any]], bool] | None = None,
) -> list[Item]:
    """The items whose key is not cached (or whose cached record ``recompute`` rejects), first of each key."""
    todo, seen = [], set()
    for item in items:
        item_key = tuple(key(item))
        if item_key in seen:
            continue
        cached = cache.get(item_key)
        if cached is None or (recompute is not None and recompute(cached)):
            todo.append(item)
            seen.add(item_key)
    return todo


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
    todo = missing_items(cache, items, key, recompute)
    done = 0
    with stage_bar(len(todo), desc or cache.path.name) as progress:
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


class OutDirLockedError(RuntimeError):
    """Another process is writing the same eval output folder."""


def _try_lock(path: Path, mode: int) -> Any | None:
    handle = path.open("a+")
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "pid unknown"


def _write_pid(handle: Any) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()


@contextlib.contextmanager
def lock_out_dir(out_dir: str | Path, shard: str | None = None) -> Iterator[None]:
    """Hold ``out_dir`` for one eval; raise :class:`OutDirLockedError` at once if another process holds it.

    A whole run (``shard`` None) locks ``<out_dir>/.lock`` exclusively. A shard (``shard="I-of-N"``)
    holds ``.lock`` shared, so the shards of one run go together while a whole run waits for none of
    them, and ``.lock-shard-I-of-N`` exclusively, so one shard never runs twice. ``flock`` locks die
    with their process (kill -9 included), so a crash leaves nothing to clean up; the holder's pid is
    written into the file it holds for the error message. (On a network filesystem ``flock`` must be
    supported, e.g. Lustre mounted with ``flock``.)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = out_dir / ".lock"
    handles = []
    try:
        if shard is None:
            handle = _try_lock(main, fcntl.LOCK_EX)
            if handle is None:
                # Shards hold .lock shared and write their pids into their own lock files.
                holders = [f"shard {p.name[len('.lock-shard-') :]} {_holder(p)}" for p in _held_shard_locks(out_dir)]
                raise OutDirLockedError(
                    f"{out_dir}: another eval is writing this folder ({', '.join(holders) or _holder(main)}); "
                    "wait for it to finish or choose another out_dir"
                )
            handles.append(handle)
            _write_pid(handle)
        else:
            handle = _try_lock(main, fcntl.LOCK_SH)
            if handle is None:
                raise OutDirLockedError(
                    f"{out_dir}: a whole (unsharded) eval is writing this folder ({_holder(main)}); "
                    f"shard {shard} waits for it to finish"
                )
            handles.append(handle)
            shard_lock = out_dir / f".lock-shard-{shard}"
            handle = _try_lock(shard_lock, fcntl.LOCK_EX)
            if handle is None:
                raise OutDirLockedError(f"{out_dir}: shard {shard} is already running ({_holder(shard_lock)})")
            handles.append(handle)
            _write_pid(handle)
        yield
    finally:
        for handle in reversed(handles):
            with contextlib.suppress(OSError):
                handle.truncate(0)  # no stale pid for the next error message
            handle.close()  # closing releases the flock


def _held_shard_locks(out_dir: Path) -> list[Path]:
    held = []
    for path in sorted(out_dir.glob(".lock-shard-*")):
        handle = _try_lock(path, fcntl.LOCK_SH)
        if handle is None:
            held.append(path)
        else:
            handle.close()
    return held
