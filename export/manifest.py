"""The export manifest: the sha256 of every file, and ``verify`` (``python -m export verify <dir>``).

The checking core lives in ``moderator/manifest.py`` (the serving path verifies exports with it and
must not import the export stage); this module adds the export's own error types and file names.
Kept free of torch/transformers imports so verifying a directory is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moderator.contract import TAXONOMY_FILE  # noqa: F401  (re-exported)
from moderator.manifest import (  # noqa: F401  (re-exported for the export stage)
    MANIFEST_FILE,
    MANIFEST_SHA256_FIELD,
    MANIFEST_SHA256_PLACEHOLDER,
    PICKLE_SUFFIXES,
    ManifestError,
    check_sha256_hex,
    hash_directory,
    manifest_sha256,
    relative_files,
    sha256_file,
    verify_manifest,
    write_manifest,
)

MANIFEST_FORMAT = "safemt-moderator-export/1"
MODEL_CARD_FILE = "README.md"


class ExportError(RuntimeError):
    """The export was refused: bad input, or the result failed a check."""


class VerificationError(ExportError, ManifestError):
    """An export directory does not match its manifest."""

    def __init__(self, directory: Path, problems: list[str]):
        ManifestError.__init__(self, directory, problems)
        # The export CLI lists every finding, one per line.
        self.args = (f"{directory}: verification failed:\n" + "\n".join(f"  - {p}" for p in problems),)


def verify_export(directory: str | Path, expect_manifest_sha256: str | None = None) -> dict[str, Any]:
    """Check an export against its manifest; return the manifest, or raise ``VerificationError``.

    Every file is hashed (no cache): this is the explicit, thorough check. ``expect_manifest_sha256``
    pins the export: a ``manifest.json`` whose bytes hash to anything else is refused, naming both digests.
    """
    try:
        return verify_manifest(directory, use_cache=False, expect_manifest_sha256=expect_manifest_sha256)
    except ManifestError as exc:
        raise VerificationError(exc.directory, exc.problems) from None
