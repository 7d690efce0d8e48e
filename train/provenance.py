"""What a training run records about itself: taxonomy, data fingerprint, commit, resolved config.

Secrets never reach these records: token/key-like fields and values are redacted.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moderator.artefacts import stats_sha256
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.taxonomy import REPO_ROOT, Taxonomy

# Either spelling of a field or flag: ``hub_token`` and ``--hub-token`` (TrlParser accepts both).
_SECRET_KEY = re.compile(r"(hub[_-]?token|api[_-]?key|secret|password|access[_-]?token|auth[_-]?token)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9_-]{8,}|wandb_[A-Za-z0-9]{8,})")
REDACTED = "<redacted>"


def redact(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        # A secret-named field goes whole; a token inside any other string is cut out of it.
        return REDACTED if _SECRET_KEY.search(key) else _SECRET_VALUE.sub(REDACTED, value)
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret-named flags (``--hub_token X``, ``--api_key=X``, and the dash
    spellings ``--hub-token X``, ``--wandb-api-key=X``) and token-like values redacted: W&B records the
    process's command line with each run."""
    out: list[str] = []
    redact_next = False
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if redact_next:
            out.append(REDACTED)
        elif arg.startswith("-") and equals and _SECRET_KEY.search(flag):
            out.append(f"{flag}={REDACTED}")
        else:
            out.append(_SECRET_VALUE.sub(REDACTED, arg))
        redact_next = arg.startswith("-") and not equals and bool(_SECRET_KEY.search(arg))
    return out


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def data_fingerprint(dataset_path: str | Path, datasets: Mapping[str, Any]) -> dict[str, Any]:
    """Fingerprints of the splits used, plus the sha256 of data prep's stats.json when present."""
    out: dict[str, Any] = {name: getattr(ds, "_fingerprint", None) for name, ds in datasets.items() if ds is not None}
    stats_digest = stats_sha256(dataset_path)
    if stats_digest is not None:
        out["stats_sha256"] = stats_digest
    out["rows"] = {name: len(ds) for name, ds in datasets.items() if ds is not None}
    return out


def _as_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config)


def run_provenance(
    taxonomy: Taxonomy,
    dataset_path: str | Path,
    datasets: Mapping[str, Any],
    image_bounds: tuple[int | None, int | None],
    *configs: Any,
) -> dict[str, Any]:
    """The run record (``moderator.artefacts.write_run_record``): what export and serving read of a run.

    ``image_bounds``: the (min, max) pixels the processor resized images to, recorded as a field of its own.
    """
    return redact(
        {
            **taxonomy.provenance(),
            "prompt_format_version": PROMPT_FORMAT_VERSION,
            "image_bounds": {"min_pixels": image_bounds[0], "max_pixels": image_bounds[1]},
            "data": data_fingerprint(dataset_path, datasets),
            "git": git_commit(),
            "config": {type(c).__name__: _as_dict(c) for c in configs},
        }
    )
