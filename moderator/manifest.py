"""Checking an exported moderator against its ``manifest.json`` (the sha256 of every file).

The export stage writes the manifest (``export/manifest.py`` re-uses this module); the serving path
(``Moderator.from_pretrained``) verifies it before reading any file of the export, so a flipped byte in
the weights, an edited threshold, an added pickle or a deleted manifest is refused, not served.

Cost: sha256 reads every byte once (0.65-0.8 GB/s on a busy 2-core VM; a 7B export is about 15 GB,
mostly one ``model.safetensors``: see bench/RESULTS.md). Two things keep it off the load time:
- the small files (configs, tokenizer, taxonomy, ``moderator_config.json``) are checked before any of
  them is read; the large weight files are hashed in a thread WHILE the model loads them (the same
  bytes, read once from disk into the page cache), and the model is handed out only after their
  hashes matched. Loading safetensors runs no code, so a tampered file is loaded, never served;
- files of 1 MiB or more verified before are not hashed again while their stat (device, inode, size,
  mtime and ctime in ns) is unchanged: the shortcut git's index takes. Any write changes ctime, which
  no user can set back, so a modified file always misses. The record lives in the user's cache
  folder (``SAFEMT_HASH_CACHE`` names another file, ``off`` disables it), not in the export: whoever
  can write the export could otherwise forge it, and whoever can write the user's cache can already
  replace the Hugging Face models cached next to it.
``python -m export verify`` hashes everything, uncached. Kept free of torch/transformers imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moderator.contract import MODERATOR_CONFIG_FILE, TAXONOMY_FILE

MANIFEST_FILE = "manifest.json"
# Pickle-based weight/state formats: loading one can run arbitrary code, so an export never holds one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Serving fields the manifest (not hashed itself) must agree on with the hashed moderator_config.json.
SERVING_FIELDS = ("decision_threshold", "prompt_format_version", "taxonomy_sha256")
HASH_CACHE_ENV = "SAFEMT_HASH_CACHE"
HASH_CACHE_MIN_BYTES = 1 << 20  # smaller files cost less to hash than to look up
HASH_CACHE_MAX_ENTRIES = 4096
# A file changed within this window may share its stat with the version hashed ("racy git"): not cached.
RACY_WINDOW_NS = 2_000_000_000
# Files this large are hashed while the model loads (see start_verification); smaller ones first.
BACKGROUND_MIN_BYTES = 64 << 20
_READ_BUFFER = 1 << 23


class ManifestError(ValueError):
    """A directory does not match its manifest; ``problems`` lists every finding."""

    def __init__(self, directory: Path, problems: list[str]):
        self.directory = directory
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{directory}: does not match its {MANIFEST_FILE}: {problems[0]}{more}")


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in large unbuffered chunks (hashlib releases the GIL while it hashes)."""
    digest = hashlib.sha256()
    buffer = bytearray(_READ_BUFFER)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def relative_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())


def hash_directory(directory: str | Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (posix relative paths), except the manifest itself."""
    directory = Path(directory)
    return {name: sha256_file(directory / name) for name in relative_files(directory) if name != MANIFEST_FILE}


def hash_cache_path() -> Path | None:
    """Where verified hashes are remembered; None when ``SAFEMT_HASH_CACHE=off``."""
    configured = os.environ.get(HASH_CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "false", "no") else Path(configured)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "safemt-moderator" / "verified-sha256.json"


class HashCache:
    """Remembered sha256 of large files, valid only while the file's stat is unchanged."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.changed = False
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}  # a broken cache only costs a re-hash

    @staticmethod
    def _stamp(stat: os.stat_result) -> list[int]:
        return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        if self.path is None or stat.st_size < HASH_CACHE_MIN_BYTES:
            return sha256_file(path)
        key = str(path.resolve())
        entry = self.entries.get(key)
        if isinstance(entry, list) and len(entry) == 6 and entry[:5] == self._stamp(stat):
            return str(entry[5])
        started = time.time_ns()
        digest = sha256_file(path)
        after = path.stat()
        # Cache only a file that did not change while it was read, and not a freshly written one.
        if self._stamp(after) == self._stamp(stat) and started - max(stat.st_mtime_ns, stat.st_ctime_ns) > (
            RACY_WINDOW_NS
        ):
            self.entries.pop(key, None)
            self.entries[key] = [*self._stamp(stat), digest]
            self.changed = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        entries = dict(list(self.entries.items())[-HASH_CACHE_MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".verified-", suffix=".json")
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(entries, out)
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)  # atomic: a concurrent reader sees the old or the new file
        except OSError:
            pass  # an unwritable cache only costs a re-hash next time


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name}: not valid JSON ({exc})"


def manifest_problems(directory: str | Path, *, use_cache: bool = False) -> tuple[dict[str, Any] | None, list[str]]:
    """``(manifest, problems)`` for an export directory; no problems means it verifies.

    Refused, most severe first: a pickle file, an invalid manifest entry, a listed file whose hash
    changed (tampered) or that is gone, a file the manifest does not list, and a
    ``moderator_config.json`` that disagrees with the manifest's threshold, prompt format or taxonomy.
    """
    cache = HashCache(hash_cache_path() if use_cache else None)
    manifest, problems, _ = _inspect(Path(directory), cache, defer_min_bytes=None)
    cache.save()
    return manifest, problems


def _inspect(
    directory: Path, cache: HashCache, defer_min_bytes: int | None
) -> tuple[dict[str, Any] | None, list[str], list[tuple[str, str]]]:
    """Every check, except hashing the files of ``defer_min_bytes`` or more: returned as (name, sha256) to do."""
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        return None, [f"{directory}: not a directory"], []
    present = relative_files(directory)
    problems = [f"pickle file: {name} (exports hold safetensors only)" for name in present if _is_pickle(name)]
    if not manifest_path.is_file():
        return None, [*problems, f"missing file: {MANIFEST_FILE} (not an export made by `python -m export`)"], []
    manifest, error = _read_json(manifest_path)
    if error:
        return None, [*problems, error], []
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return None, [*problems, f"{MANIFEST_FILE}: field 'files' must map each file to its sha256"], []

    deferred: list[tuple[str, str]] = []
    for name, expected in sorted(files.items()):
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts or name == MANIFEST_FILE:
            problems.append(f"invalid entry in {MANIFEST_FILE}: {name!r}")
        elif path.is_symlink() or (path.exists() and not path.is_file()):
            problems.append(f"not a regular file: {name}")
        elif not path.exists():
            problems.append(f"missing file: {name} (listed in the manifest)")
        elif defer_min_bytes is not None and path.stat().st_size >= defer_min_bytes:
            deferred.append((name, expected))
        else:
            problems += _hash_mismatch(directory, name, expected, cache)
    problems += [f"unlisted file: {name} (not in the manifest)" for name in present if _unlisted(name, files)]
    if not problems:
        problems += _config_disagreements(directory, manifest, cache)
    return manifest, problems, deferred


def _hash_mismatch(directory: Path, name: str, expected: str, cache: HashCache) -> list[str]:
    actual = cache.sha256(directory / name)
    return [] if actual == expected else [f"tampered file: {name} (sha256 {actual}, manifest records {expected})"]


def verify_manifest(directory: str | Path, *, use_cache: bool = False) -> dict[str, Any]:
    """Check an export against its manifest; return the manifest or raise ``ManifestError``."""
    manifest, problems = manifest_problems(directory, use_cache=use_cache)
    if problems or manifest is None:
        raise ManifestError(Path(directory), problems or ["unreadable manifest"])
    return manifest


class PendingVerification:
    """The large files' hashes, computed in a thread while the model loads; ``result()`` raises on a mismatch."""

    def __init__(self, directory: Path, deferred: list[tuple[str, str]], cache: HashCache):
        self.directory = directory
        self._problems: list[str] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(deferred, cache), name="safemt-manifest-verify", daemon=True
        )
        self._thread.start()

    def _run(self, deferred: list[tuple[str, str]], cache: HashCache) -> None:
        try:
            for name, expected in deferred:
                self._problems += _hash_mismatch(self.directory, name, expected, cache)
            cache.save()
        except BaseException as exc:  # re-raised in result(), on the caller's thread
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._problems:
            raise ManifestError(self.directory, self._problems)


def start_verification(
    directory: str | Path, *, use_cache: bool = True, background_min_bytes: int | None = None
) -> PendingVerification:
    """Verify an export for serving: everything except the large weight files now (raises ``ManifestError``),
    the weights' hashes in a background thread, overlapping the model load that reads the same bytes.

    The caller reads the (verified) small files, loads the weights, and calls ``result()`` before it
    returns or uses the model: loading safetensors runs no code, so a tampered file is only ever loaded,
    never served. Hashing then costs max(hash, load) instead of their sum.
    """
    directory = Path(directory)
    cache = HashCache(hash_cache_path() if use_cache else None)
    if background_min_bytes is None:
        background_min_bytes = BACKGROUND_MIN_BYTES
    manifest, problems, deferred = _inspect(directory, cache, defer_min_bytes=background_min_bytes)
    if problems or manifest is None:
        cache.save()
        raise ManifestError(directory, problems or ["unreadable manifest"])
    return PendingVerification(directory, deferred, cache)


def looks_like_export(directory: str | Path) -> bool:
    """Whether a directory is (or was) an export: exports, not training outputs, ship these files."""
    directory = Path(directory)
    return (directory / MANIFEST_FILE).is_file() or (directory / MODERATOR_CONFIG_FILE).is_file()


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _unlisted(name: str, files: Iterable[str]) -> bool:
    return name != MANIFEST_FILE and name not in files


def _config_disagreements(directory: Path, manifest: Mapping[str, Any], cache: HashCache) -> list[str]:
    """The manifest is not hashed (it holds the hashes): its serving fields must agree with hashed files."""
    config_path = directory / MODERATOR_CONFIG_FILE
    if not config_path.is_file():
        return [f"missing file: {MODERATOR_CONFIG_FILE}"]
    config, error = _read_json(config_path)
    if error:
        return [error]
    if not isinstance(config, dict):
        return [f"{MODERATOR_CONFIG_FILE}: expected a JSON object"]
    recorded = {
        "decision_threshold": manifest.get("decision_threshold"),
        "prompt_format_version": manifest.get("prompt_format_version"),
        "taxonomy_sha256": (manifest.get("taxonomy") or {}).get("sha256"),
    }
    problems = [
        f"{MANIFEST_FILE}: {key} is {recorded[key]!r} but {MODERATOR_CONFIG_FILE} says {config.get(key)!r}"
        for key in SERVING_FIELDS
        if config.get(key) != recorded[key]
    ]
    taxonomy_file = directory / str(config.get("taxonomy_file", TAXONOMY_FILE))
    if taxonomy_file.is_file() and cache.sha256(taxonomy_file) != config.get("taxonomy_sha256"):
        problems.append(f"{taxonomy_file.name}: sha256 differs from the taxonomy_sha256 in {MODERATOR_CONFIG_FILE}")
    return problems
