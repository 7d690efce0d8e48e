"""Checking an exported moderator against its ``manifest.json`` (the sha256 of every file).

The export stage writes the manifest (``export/manifest.py`` re-uses this module); the serving path
(``Moderator.from_pretrained``) verifies it before reading any file of the export, so a flipped byte in
the weights, an edited threshold, an added pickle or a deleted manifest is refused, not served.

What is checked is what is used (no time-of-check/time-of-use gap): every file is opened once, without
following a link (a Hub snapshot's links into its own cache excepted) and without blocking on a FIFO.
A small file's bytes are read once, hashed, and those bytes are what the loader parses: they are
written into a private folder (``PendingVerification.materialize``) that the model, its processor, the
threshold and the taxonomy are loaded from. A large file (``BACKGROUND_MIN_BYTES`` or more: the
weights) stays open from the check on; the private folder links to that open file
(``/proc/self/fd/N``), so the hash and the load read the same inode even if the name is swapped for
another file. Anything that is not a regular file or a directory (a FIFO, a socket, a device) is
refused by name and never opened.

Pinning: the manifest names every file's sha256, so whoever can rewrite a file can rewrite the manifest
too. The sha256 of ``manifest.json`` itself (``manifest_sha256``: printed by ``python -m export``,
written in the model card) names one export and no other; ``expect_manifest_sha256`` refuses any other.
The model card names that digest: its entry in the manifest is the hash of the card with the digest
replaced by ``MANIFEST_SHA256_PLACEHOLDER`` (the files listed in ``manifest_sha256_written_in``), and
the digest it names must be this manifest's.

Cost: sha256 reads every byte once (0.65-0.8 GB/s on a busy 2-core VM; a 7B export is about 15 GB,
mostly one ``model.safetensors``: see bench/RESULTS.md). Two things keep it off the load time:
- the small files (configs, tokenizer, taxonomy, ``moderator_config.json``) are checked before any of
  them is used; the large weight files are hashed in a thread WHILE the model loads them (the same
  bytes, read from the same open file into the page cache), and the model is handed out only after
  their hashes matched. Loading safetensors runs no code, so a tampered file is loaded, never served;
- large files verified before are not hashed again while their stat (device, inode, size, mtime and
  ctime in ns) is unchanged: the shortcut git's index takes. Any write changes ctime, which no user can
  set back, so a modified file always misses. The record lives in the user's cache folder
  (``SAFEMT_HASH_CACHE`` names another file, ``off`` disables it), not in the export: whoever can write
  the export could otherwise forge it. A cache file (or its folder) that another user could write is
  ignored with a warning: a forged entry there would make tampered weights pass.
``python -m export verify`` hashes everything, uncached. Kept free of torch/transformers imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from moderator.artefacts import MANIFEST_FILE, SERVING_CONFIG_FILE, looks_like_export  # noqa: F401  (re-exported)
from moderator.contract import TAXONOMY_FILE

logger = logging.getLogger(__name__)

# Pickle-based weight/state formats: loading one can run arbitrary code, so an export never holds one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Serving fields the manifest (not hashed itself) must agree on with the hashed moderator_config.json.
SERVING_FIELDS = ("decision_threshold", "prompt_format_version", "taxonomy_sha256")
# Files (the model card) that name the manifest's own sha256: hashed with it replaced by this text.
MANIFEST_SHA256_FIELD = "manifest_sha256_written_in"
MANIFEST_SHA256_PLACEHOLDER = "<sha256 of manifest.json>"
HASH_CACHE_ENV = "SAFEMT_HASH_CACHE"
HASH_CACHE_MIN_BYTES = 1 << 20  # smaller files cost less to hash than to look up
HASH_CACHE_MAX_ENTRIES = 4096
# A file changed within this window may share its stat with the version hashed ("racy git"): not cached.
RACY_WINDOW_NS = 2_000_000_000
# Files this large are hashed while the model loads (see start_verification) and never read into memory;
# smaller ones are read once, checked, and handed to the loader as those bytes.
BACKGROUND_MIN_BYTES = 64 << 20
_READ_BUFFER = 1 << 23
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HEX_DIGEST_IN_TEXT = re.compile(rb"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
NO_MANIFEST_HINT = (
    "not an export made by `python -m export`; to load an unverified development checkpoint pass "
    "verify=False (--no-verify on the command line)"
)


class ManifestError(ValueError):
    """A directory does not match its manifest; ``problems`` lists every finding."""

    def __init__(self, directory: Path, problems: list[str], summary: str = f"does not match its {MANIFEST_FILE}"):
        self.directory = directory
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{directory}: {summary}: {problems[0]}{more}")


def check_sha256_hex(value: Any, where: str = "expect_manifest_sha256") -> str:
    """A sha256 hex digest, lower-cased; ``ValueError`` naming ``where`` for anything else."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text is None or not _SHA256_HEX.fullmatch(text):
        raise ValueError(f"{where}: expected 64 hex digits (a sha256), got {value!r}")
    return text


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in large unbuffered chunks (hashlib releases the GIL while it hashes)."""
    digest = hashlib.sha256()
    buffer = bytearray(_READ_BUFFER)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _pread(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # no pread (Windows): this descriptor is read by one thread only
    return os.read(fd, size)


def sha256_descriptor(fd: int) -> str:
    """sha256 of an open file from its start, by position (``pread``: the descriptor's offset is untouched)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := _pread(fd, _READ_BUFFER, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def write_manifest(export_dir: str | Path, manifest: Mapping[str, Any]) -> str:
    """Write an export's ``manifest.json`` (keys sorted); return its sha256, the digest that pins the export."""
    path = Path(export_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return manifest_sha256(export_dir)


def manifest_sha256(export_dir: str | Path) -> str:
    """The sha256 hex digest of an export's ``manifest.json`` bytes: the digest that pins the export."""
    path = Path(export_dir) / MANIFEST_FILE
    try:
        fd, _ = _open_regular(path, follow=False)
    except OSError as exc:
        raise ManifestError(Path(export_dir), [f"{MANIFEST_FILE}: cannot be read ({exc.strerror or exc})"]) from None
    try:
        return sha256_descriptor(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# What a directory holds, without opening anything


def file_kind(mode: int) -> str:
    """What a ``stat`` mode that is not a regular file is, for a message ("a FIFO", "a folder", ...)."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return f"file type {stat.S_IFMT(mode):o}"


def _walk(directory: Path) -> tuple[list[str], list[str]]:
    """``(files, refused)``: posix relative names of regular files and symlinks (never followed), and one
    problem per entry that is neither a file nor a directory (a FIFO, a socket, a device) or a folder that
    cannot be listed. Only ``lstat``: nothing is opened."""
    files: list[str] = []
    refused: list[str] = []

    def visit(folder: Path, prefix: str) -> None:
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as exc:
            refused.append(f"unreadable folder: {prefix or '.'} ({exc.strerror or exc})")
            return
        for entry in entries:
            name = prefix + entry.name
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                visit(Path(entry.path), name + "/")
            elif stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                files.append(name)
            else:
                refused.append(f"not a regular file or directory: {name} ({file_kind(mode)}), never opened")

    visit(directory, "")
    return sorted(files), refused


def relative_files(directory: Path) -> list[str]:
    """Posix relative names of the regular files and symlinks under ``directory`` (special files left out)."""
    return _walk(Path(directory))[0]


def special_file_problems(directory: str | Path) -> list[str]:
    """One problem per FIFO, socket or device under ``directory`` (never opened: a FIFO would block), or
    folder that cannot be listed."""
    return _walk(Path(directory))[1]


def refuse_special_files(directory: str | Path) -> None:
    """Raise ``ManifestError`` naming the first FIFO, socket or device under ``directory``."""
    problems = special_file_problems(directory)
    if problems:
        raise ManifestError(Path(directory), problems, summary="refused")


def hash_directory(directory: str | Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (posix relative paths), except the manifest itself."""
    directory = Path(directory)
    refuse_special_files(directory)
    return {name: sha256_file(directory / name) for name in relative_files(directory) if name != MANIFEST_FILE}


def _open_regular(path: Path, follow: bool) -> tuple[int, os.stat_result]:
    """An open descriptor of a regular file; ``OSError`` (ELOOP for a link when not ``follow``) otherwise.

    Opened non-blocking, so a FIFO swapped in after the directory was listed does not block; refused
    after ``fstat`` unless regular, before anything is read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, f"not a regular file ({file_kind(info.st_mode)})")
        return fd, info
    except BaseException:
        os.close(fd)
        raise


def _read_descriptor(fd: int, size: int) -> bytes:
    chunks, offset = [], 0
    while chunk := _pread(fd, max(size - offset, _READ_BUFFER), offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------------
# The hash cache


def hash_cache_path() -> Path | None:
    """Where verified hashes are remembered; None when ``SAFEMT_HASH_CACHE=off``."""
    configured = os.environ.get(HASH_CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "false", "no") else Path(configured)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "safemt-moderator" / "verified-sha256.json"


def _writable_by_others(info: os.stat_result, allow_sticky: bool) -> bool:
    if not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    return not (allow_sticky and info.st_mode & stat.S_ISVTX)


def _untrusted_cache(file_info: os.stat_result | None, folder: Path) -> str | None:
    """Why a cache file (or its folder) could hold entries someone else wrote; None when only this user could."""
    if not hasattr(os, "getuid"):
        return None  # no POSIX owners (Windows): nothing to compare
    uid = os.getuid()
    if file_info is not None:
        if not stat.S_ISREG(file_info.st_mode):
            return "it is not a regular file"
        if file_info.st_uid != uid:
            return f"it is owned by uid {file_info.st_uid}, not by this user (uid {uid})"
        if _writable_by_others(file_info, allow_sticky=False):
            return f"group or others can write it (mode {stat.S_IMODE(file_info.st_mode):o}; chmod 600 it)"
    try:
        folder_info = folder.stat()
    except OSError:
        return None  # no folder: nothing to read, and save() creates it private
    if folder_info.st_uid not in (uid, 0):
        return f"its folder {folder} is owned by uid {folder_info.st_uid}, not by this user (uid {uid}) or root"
    if _writable_by_others(folder_info, allow_sticky=True):
        return f"others can replace it: its folder {folder} is writable by group or others without the sticky bit"
    return None


class HashCache:
    """Remembered sha256 of large files, valid only while the file's stat is unchanged.

    Trusted only when this user alone could have written it: a cache file not owned by the current user,
    or writable by group or others (or in a folder others can write without the sticky bit), is ignored
    with a warning and not written to.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.changed = False
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            fd, info = _open_regular(path, follow=False)
        except FileNotFoundError:
            reason = _untrusted_cache(None, path.parent)
            if reason is not None:
                self._distrust(path, reason)
            return
        except OSError as exc:
            reason = _untrusted_cache(_lstat(path), path.parent) or f"it cannot be read ({exc.strerror or exc})"
            self._distrust(path, reason)
            return
        try:
            reason = _untrusted_cache(info, path.parent)
            if reason is not None:
                self._distrust(path, reason)
                return
            try:
                loaded = json.loads(_read_descriptor(fd, info.st_size).decode("utf-8"))
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}  # a broken cache only costs a re-hash
        finally:
            os.close(fd)

    def _distrust(self, path: Path, reason: str) -> None:
        logger.warning("%s: ignoring the hash cache (%s); every file is hashed", path, reason)
        self.path, self.entries = None, {}

    @staticmethod
    def _stamp(info: os.stat_result) -> list[int]:
        return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]

    def sha256(self, fd: int, key: str) -> str:
        """sha256 of the open file ``fd``, remembered under ``key`` (its resolved path) while its stat holds."""
        info = os.fstat(fd)
        if self.path is None or info.st_size < HASH_CACHE_MIN_BYTES:
            return sha256_descriptor(fd)
        entry = self.entries.get(key)
        if isinstance(entry, list) and len(entry) == 6 and entry[:5] == self._stamp(info):
            return str(entry[5])
        started = time.time_ns()
        digest = sha256_descriptor(fd)
        after = os.fstat(fd)
        # Cache only a file that did not change while it was read, and not a freshly written one.
        if self._stamp(after) == self._stamp(info) and started - max(info.st_mtime_ns, info.st_ctime_ns) > (
            RACY_WINDOW_NS
        ):
            self.entries.pop(key, None)
            self.entries[key] = [*self._stamp(info), digest]
            self.changed = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        entries = dict(list(self.entries.items())[-HASH_CACHE_MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".verified-", suffix=".json")
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(entries, out)
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)  # atomic: a concurrent reader sees the old or the new file
        except OSError:
            pass  # an unwritable cache only costs a re-hash next time


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# Verification


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _unlisted(name: str, files: Iterable[str]) -> bool:
    return name != MANIFEST_FILE and name not in files


def _parse_json(data: bytes, name: str) -> tuple[Any, str | None]:
    try:
        return json.loads(data.decode("utf-8")), None
    except ValueError as exc:
        return None, f"{name}: not valid JSON ({exc})"


class _Inspection:
    """Everything one verification read: the manifest and its digest, the small files' verified bytes, the
    large files' open descriptors (hashed now, or ``deferred``), and the problems found."""

    def __init__(self, directory: Path, cache: HashCache, link_root: Path | None) -> None:
        self.directory = directory
        self.cache = cache
        self.link_root = link_root.resolve() if link_root is not None else None
        self.manifest: dict[str, Any] | None = None
        self.manifest_bytes = b""
        self.manifest_sha256 = ""
        self.files: dict[str, bytes] = {}  # small files: the bytes that were hashed
        self.descriptors: dict[str, int] = {}  # large files: open from the check on
        self.deferred: list[tuple[str, str]] = []  # large files whose hash is left to a background thread
        self.problems: list[str] = []
        self.names_other_manifest: list[str] = []  # the card names another manifest: reported last

    def close(self) -> None:
        for fd in self.descriptors.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.descriptors = {}

    def _follows(self, name: str) -> bool:
        """Whether ``name`` may be a link: in a Hub snapshot, a link into that repo's own cache of blobs."""
        path = self.directory / name
        if self.link_root is None or not path.is_symlink():
            return False
        target = path.resolve()
        return target.is_relative_to(self.link_root)

    def _open(self, name: str) -> tuple[int, os.stat_result] | None:
        path = self.directory / name
        try:
            return _open_regular(path, follow=self._follows(name))
        except FileNotFoundError:
            self.problems.append(f"missing file: {name} (listed in the manifest)")
        except OSError as exc:
            if path.is_symlink() or exc.errno in (getattr(os, "ELOOP", -1), 0):
                self.problems.append(f"not a regular file: {name}")
            else:
                self.problems.append(f"unreadable file: {name} ({exc.strerror or exc})")
        return None

    def run(self, defer_min_bytes: int | None, expect_manifest_sha256: str | None, missing_hint: str) -> None:
        directory = self.directory
        if not directory.is_dir():
            self.problems.append(f"{directory}: not a directory")
            return
        present, refused = _walk(directory)
        self.problems += refused
        self.problems += [
            f"pickle file: {name} (exports hold safetensors only)" for name in present if _is_pickle(name)
        ]
        if MANIFEST_FILE not in present:
            self.problems.append(f"missing file: {MANIFEST_FILE} ({missing_hint})")
            return
        opened = self._open(MANIFEST_FILE)
        if opened is None:
            return
        fd, info = opened
        try:
            if info.st_size >= BACKGROUND_MIN_BYTES:
                self.problems.append(f"{MANIFEST_FILE}: {info.st_size} bytes, too large for a manifest")
                return
            self.manifest_bytes = _read_descriptor(fd, info.st_size)
        finally:
            os.close(fd)
        self.manifest_sha256 = hashlib.sha256(self.manifest_bytes).hexdigest()
        if expect_manifest_sha256 is not None and self.manifest_sha256 != expect_manifest_sha256:
            # The most severe finding, first and alone: this is not the export that was pinned.
            self.problems.insert(
                0,
                f"{MANIFEST_FILE} has sha256 {self.manifest_sha256}, but {expect_manifest_sha256} was pinned "
                "(expect_manifest_sha256): not the pinned export",
            )
            return
        manifest, error = _parse_json(self.manifest_bytes, MANIFEST_FILE)
        if error:
            self.problems.append(error)
            return
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not files:
            self.problems.append(f"{MANIFEST_FILE}: field 'files' must map each file to its sha256")
            return
        self.manifest = manifest
        written_in = manifest.get(MANIFEST_SHA256_FIELD) or []
        if not isinstance(written_in, list) or not all(isinstance(n, str) and n in files for n in written_in):
            self.problems.append(f"{MANIFEST_FILE}: field {MANIFEST_SHA256_FIELD!r} must list files of 'files'")
            return

        for name, expected in sorted(files.items()):
            if Path(name).is_absolute() or ".." in Path(name).parts or name == MANIFEST_FILE:
                self.problems.append(f"invalid entry in {MANIFEST_FILE}: {name!r}")
                continue
            if name not in present:
                if (directory / name).exists() or (directory / name).is_symlink():
                    self.problems.append(f"not a regular file: {name}")
                else:
                    self.problems.append(f"missing file: {name} (listed in the manifest)")
                continue
            opened = self._open(name)
            if opened is None:
                continue
            fd, info = opened
            if name in written_in and info.st_size >= BACKGROUND_MIN_BYTES:
                os.close(fd)
                self.problems.append(f"tampered file: {name} ({info.st_size} bytes, too large for a model card)")
                continue
            if info.st_size < BACKGROUND_MIN_BYTES:
                try:
                    data = _read_descriptor(fd, info.st_size)
                finally:
                    os.close(fd)
                self.files[name] = data
                if name in written_in:
                    self._check_naming_file(name, data, expected)
                else:
                    self.problems += self._mismatch(name, expected, hashlib.sha256(data).hexdigest())
                continue
            self.descriptors[name] = fd
            if defer_min_bytes is not None and info.st_size >= defer_min_bytes:
                self.deferred.append((name, expected))
            else:
                self.problems += self.hash_large(name, expected)
        self.problems += [f"unlisted file: {name} (not in the manifest)" for name in present if _unlisted(name, files)]
        if not self.problems:
            self.problems += self._config_disagreements()
        self.problems += self.names_other_manifest

    def _check_naming_file(self, name: str, data: bytes, expected: str) -> None:
        """A file that names the manifest's sha256 (the card): its entry is its hash with that digest replaced
        by the placeholder. Intact, it must name THIS manifest's digest (a later finding: an edited manifest
        is better explained by what changed in it)."""
        placeholder = MANIFEST_SHA256_PLACEHOLDER.encode()
        named = None
        if placeholder not in data:
            for candidate in dict.fromkeys(_HEX_DIGEST_IN_TEXT.findall(data)):
                if hashlib.sha256(data.replace(candidate, placeholder)).hexdigest() == expected:
                    named = candidate.decode()
                    break
        if named is None:
            self.problems.append(
                f"tampered file: {name} (its sha256, with the manifest digest it names left out, "
                f"is not the {expected} the manifest records)"
            )
        elif named != self.manifest_sha256:
            self.names_other_manifest.append(
                f"{name} names {MANIFEST_FILE} sha256 {named}, but {MANIFEST_FILE} has sha256 "
                f"{self.manifest_sha256}: the manifest was changed after the export"
            )

    @staticmethod
    def _mismatch(name: str, expected: str, actual: str) -> list[str]:
        return [] if actual == expected else [f"tampered file: {name} (sha256 {actual}, manifest records {expected})"]

    def hash_large(self, name: str, expected: str) -> list[str]:
        key = str((self.directory / name).resolve())
        return self._mismatch(name, expected, self.cache.sha256(self.descriptors[name], key))

    def _config_disagreements(self) -> list[str]:
        """The manifest is not hashed (it holds the hashes): its serving fields must agree with hashed files."""
        manifest = self.manifest or {}
        if SERVING_CONFIG_FILE not in self.files:
            return [f"missing file: {SERVING_CONFIG_FILE}"]
        config, error = _parse_json(self.files[SERVING_CONFIG_FILE], SERVING_CONFIG_FILE)
        if error:
            return [error]
        if not isinstance(config, dict):
            return [f"{SERVING_CONFIG_FILE}: expected a JSON object"]
        recorded = {
            "decision_threshold": manifest.get("decision_threshold"),
            "prompt_format_version": manifest.get("prompt_format_version"),
            "taxonomy_sha256": (manifest.get("taxonomy") or {}).get("sha256"),
        }
        problems = [
            f"{MANIFEST_FILE}: {key} is {recorded[key]!r} but {SERVING_CONFIG_FILE} says {config.get(key)!r}"
            for key in SERVING_FIELDS
            if config.get(key) != recorded[key]
        ]
        taxonomy_name = str(config.get("taxonomy_file", TAXONOMY_FILE))
        taxonomy = self.files.get(taxonomy_name)
        if taxonomy is not None and hashlib.sha256(taxonomy).hexdigest() != config.get("taxonomy_sha256"):
            problems.append(
                f"{Path(taxonomy_name).name}: sha256 differs from the taxonomy_sha256 in {SERVING_CONFIG_FILE}"
            )
        return problems


def _inspect(
    directory: Path,
    cache: HashCache,
    defer_min_bytes: int | None,
    *,
    expect_manifest_sha256: str | None = None,
    link_root: Path | None = None,
    missing_hint: str = "not an export made by `python -m export`",
) -> _Inspection:
    inspection = _Inspection(directory, cache, link_root)
    try:
        inspection.run(defer_min_bytes, expect_manifest_sha256, missing_hint)
    except BaseException:
        inspection.close()
        raise
    return inspection


def manifest_problems(
    directory: str | Path, *, use_cache: bool = False, expect_manifest_sha256: str | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """``(manifest, problems)`` for an export directory; no problems means it verifies.

    Refused, most severe first: a manifest other than the pinned one (``expect_manifest_sha256``), a FIFO,
    socket or device (never opened), a pickle file, an invalid manifest entry, a listed file whose hash
    changed (tampered) or that is gone, a file the manifest does not list, and a ``moderator_config.json``
    that disagrees with the manifest's threshold, prompt format or taxonomy.
    """
    if expect_manifest_sha256 is not None:
        expect_manifest_sha256 = check_sha256_hex(expect_manifest_sha256)
    cache = HashCache(hash_cache_path() if use_cache else None)
    inspection = _inspect(Path(directory), cache, None, expect_manifest_sha256=expect_manifest_sha256)
    inspection.close()
    cache.save()
    return inspection.manifest, inspection.problems


def verify_manifest(
    directory: str | Path, *, use_cache: bool = False, expect_manifest_sha256: str | None = None
) -> dict[str, Any]:
    """Check an export against its manifest; return the manifest or raise ``ManifestError``."""
    manifest, problems = manifest_problems(
        directory, use_cache=use_cache, expect_manifest_sha256=expect_manifest_sha256
    )
    if problems or manifest is None:
        raise ManifestError(Path(directory), problems or ["unreadable manifest"])
    return manifest


class PendingVerification:
    """A verified export for loading: the verified bytes of its small files, its large files held open and
    hashed in a thread while the model loads; ``result()`` raises on a mismatch.

    ``materialize()`` gives a private folder holding exactly what was verified, to load from.
    """

    def __init__(self, inspection: _Inspection):
        self.directory = inspection.directory
        self.manifest: dict[str, Any] = inspection.manifest or {}
        self.manifest_sha256 = inspection.manifest_sha256
        self._inspection = inspection
        self._problems: list[str] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(inspection.deferred,), name="safemt-manifest-verify", daemon=True
        )
        self._thread.start()

    @property
    def files(self) -> Mapping[str, bytes]:
        """The verified bytes of every small file (``manifest.json`` included), by posix relative name."""
        return {MANIFEST_FILE: self._inspection.manifest_bytes, **self._inspection.files}

    def _run(self, deferred: list[tuple[str, str]]) -> None:
        try:
            for name, expected in deferred:
                self._problems += self._inspection.hash_large(name, expected)
            self._inspection.cache.save()
        except BaseException as exc:  # re-raised in result(), on the caller's thread
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._problems:
            raise ManifestError(self.directory, self._problems)

    @contextlib.contextmanager
    def materialize(self) -> Iterator[Path]:
        """A private folder (mode 0700, removed on exit) holding what was verified: each small file as the
        bytes that were hashed, each large file as a link to the descriptor opened at the check
        (``/proc/self/fd/N``; where there is no such folder, a link to the file's path)."""
        private = Path(tempfile.mkdtemp(prefix="safemt-verified-"))
        try:
            for name, data in self.files.items():
                target = private / name
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
            by_descriptor = Path("/proc/self/fd").is_dir()
            for name, fd in self._inspection.descriptors.items():
                target = private / name
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                source = f"/proc/self/fd/{fd}" if by_descriptor else str((self.directory / name).resolve())
                os.symlink(source, target)
            yield private
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def close(self) -> None:
        """Wait for the background hashes, then close the large files' descriptors."""
        self._thread.join()
        self._inspection.close()


def start_verification(
    directory: str | Path,
    *,
    use_cache: bool = True,
    background_min_bytes: int | None = None,
    expect_manifest_sha256: str | None = None,
    link_root: str | Path | None = None,
) -> PendingVerification:
    """Verify an export for serving: everything except the large weight files now (raises ``ManifestError``),
    the weights' hashes in a background thread, overlapping the model load that reads the same bytes.

    The caller loads from ``materialize()`` (the bytes verified, not the files' current contents), and
    calls ``result()`` before it returns or uses the model, then ``close()``: loading safetensors runs no
    code, so a tampered file is only ever loaded, never served. Hashing then costs max(hash, load)
    instead of their sum. ``expect_manifest_sha256`` pins the export: any other ``manifest.json`` is
    refused, naming both digests. ``link_root``: links resolving inside it are followed (a Hub snapshot's
    files link into its repo's ``blobs`` folder); any other link is refused.
    """
    directory = Path(directory)
    if expect_manifest_sha256 is not None:
        expect_manifest_sha256 = check_sha256_hex(expect_manifest_sha256)
    cache = HashCache(hash_cache_path() if use_cache else None)
    if background_min_bytes is None:
        background_min_bytes = BACKGROUND_MIN_BYTES
    inspection = _inspect(
        directory,
        cache,
        background_min_bytes,
        expect_manifest_sha256=expect_manifest_sha256,
        link_root=Path(link_root) if link_root is not None else None,
        missing_hint=NO_MANIFEST_HINT,
    )
    if inspection.problems or inspection.manifest is None:
        inspection.close()
        cache.save()
        raise ManifestError(directory, inspection.problems or ["unreadable manifest"])
    return PendingVerification(inspection)
