"""The export manifest: the sha256 of every file, and ``verify`` (``python -m export verify <dir>``).

Kept free of torch/transformers imports so verifying a directory is fast.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moderator.contract import MODERATOR_CONFIG_FILE, TAXONOMY_FILE  # noqa: F401  (re-exported)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "safemt-moderator-export/1"
MODEL_CARD_FILE = "README.md"
EVAL_REPORT_FILE = "eval_report.json"
# Pickle-based weight/state formats: loading one can run arbitrary code, so an export never holds one.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


class ExportError(RuntimeError):
    """The export was refused: bad input, or the result failed a check."""


class VerificationError(ExportError):
    """An export directory does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def relative_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())


def hash_directory(directory: str | Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (posix relative paths), except the manifest itself."""
    directory = Path(directory)
    return {name: sha256_file(directory / name) for name in relative_files(directory) if name != MANIFEST_FILE}


def verify_export(directory: str | Path) -> dict[str, Any]:
    """Check an export against its manifest; return the manifest, or raise ``VerificationError``.

    Refused: a listed file whose hash changed (tampered), a listed file that is gone (incomplete), a
    file the manifest does not list (extended), a pickle file, and a ``moderator_config.json`` that
    disagrees with the manifest's threshold, prompt format or taxonomy.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise VerificationError(f"{directory}: not a directory")
    if not manifest_path.is_file():
        raise VerificationError(f"{manifest_path}: missing; not an export made by `python -m export`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{manifest_path}: not valid JSON ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise VerificationError(f"{manifest_path}: field 'files' must map each file to its sha256")

    problems = []
    for name, expected in sorted(files.items()):
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts or name == MANIFEST_FILE:
            problems.append(f"invalid entry in manifest: {name!r}")
        elif path.is_symlink() or (path.exists() and not path.is_file()):
            problems.append(f"not a regular file: {name}")
        elif not path.exists():
            problems.append(f"missing file: {name} (listed in the manifest)")
        else:
            actual = sha256_file(path)
            if actual != expected:
                problems.append(f"tampered file: {name} (sha256 {actual}, manifest records {expected})")
    for name in relative_files(directory):
        if name != MANIFEST_FILE and name not in files:
            problems.append(f"unlisted file: {name} (not in the manifest)")
    for name in relative_files(directory):
        if name.lower().endswith(PICKLE_SUFFIXES):
            problems.append(f"pickle file: {name} (exports hold safetensors only)")
    if not problems:
        problems += _config_disagreements(directory, manifest)
    if problems:
        raise VerificationError(f"{directory}: verification failed:\n" + "\n".join(f"  - {p}" for p in problems))
    return manifest


def _config_disagreements(directory: Path, manifest: Mapping[str, Any]) -> list[str]:
    """The manifest is not hashed (it holds the hashes): its serving fields must agree with hashed files."""
    config_path = directory / MODERATOR_CONFIG_FILE
    if not config_path.is_file():
        return [f"missing file: {MODERATOR_CONFIG_FILE}"]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{MODERATOR_CONFIG_FILE}: not valid JSON ({exc})"]
    if not isinstance(config, dict):
        return [f"{MODERATOR_CONFIG_FILE}: expected a JSON object"]
    problems = []
    checks = {
        "decision_threshold": manifest.get("decision_threshold"),
        "prompt_format_version": manifest.get("prompt_format_version"),
        "taxonomy_sha256": (manifest.get("taxonomy") or {}).get("sha256"),
    }
    for key, value in checks.items():
        if config.get(key) != value:
            problems.append(f"{MANIFEST_FILE}: {key} is {value!r} but {MODERATOR_CONFIG_FILE} says {config.get(key)!r}")
    taxonomy_file = directory / str(config.get("taxonomy_file", TAXONOMY_FILE))
    if taxonomy_file.is_file() and sha256_file(taxonomy_file) != config.get("taxonomy_sha256"):
        problems.append(f"{taxonomy_file.name}: sha256 differs from the taxonomy_sha256 in {MODERATOR_CONFIG_FILE}")
    return problems
