"""The scenario-to-policy taxonomy: loaded from ``configs/policies/safemt.yaml``, defined nowhere else."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAXONOMY_PATH = REPO_ROOT / "configs" / "policies" / "safemt.yaml"
ACTIONS = ("refuse", "caution")
UNKNOWN_CATEGORY = "unknown"


class TaxonomyError(ValueError):
    """The taxonomy file is malformed."""


@dataclass(frozen=True)
class Scenario:
    id: str
    label: str
    action: str
    policy: str


@dataclass(frozen=True)
class Taxonomy:
    version: str
    sha256: str
    scenarios: tuple[Scenario, ...]
    path: str

    @cached_property
    def by_id(self) -> dict[str, Scenario]:
        return {s.id: s for s in self.scenarios}

    @cached_property
    def by_label(self) -> dict[str, Scenario]:
        return {s.label: s for s in self.scenarios}

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.scenarios]

    def policy_for(self, category_id: str) -> str | None:
        """The policy text for a predicted category; ``None`` for ``unknown`` or an unlisted id."""
        scenario = self.by_id.get(category_id)
        return scenario.policy if scenario else None

    def provenance(self) -> dict[str, Any]:
        """What a trained or exported model records about the taxonomy it was built with."""
        return {"taxonomy_version": self.version, "taxonomy_sha256": self.sha256, "taxonomy_ids": self.ids}

    def matches(self, recorded: Mapping[str, Any]) -> bool:
        """Whether a model or dataset recorded with ``recorded`` (a ``provenance()``) fits this taxonomy.

        The moderator sees the category ids (in its prompt and its parser), never the policy texts,
        so policies may be edited freely: only the id list must be the same. Records without ids
        fall back to the exact file hash.
        """
        if recorded.get("taxonomy_ids") is not None:
            return list(recorded["taxonomy_ids"]) == self.ids
        return recorded.get("taxonomy_sha256") == self.sha256


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load and validate the taxonomy YAML; the content hash is of the file's exact bytes."""
    path = Path(path) if path is not None else DEFAULT_TAXONOMY_PATH
    if not path.is_file():
        raise TaxonomyError(f"{path}: taxonomy file not found")
    raw_bytes = path.read_bytes()
    data = yaml.safe_load(raw_bytes)
    if not isinstance(data, dict) or "version" not in data or "scenarios" not in data:
        raise TaxonomyError(f"{path}: expected a mapping with 'version' and 'scenarios'")
    scenarios = []
    for index, entry in enumerate(data["scenarios"]):
        missing = [k for k in ("id", "label", "action", "policy") if not entry.get(k)]
        if missing:
            raise TaxonomyError(f"{path}: scenario #{index} is missing {', '.join(missing)}")
        if entry["action"] not in ACTIONS:
            raise TaxonomyError(
                f"{path}: scenario {entry['id']!r} has action {entry['action']!r}, expected one of {ACTIONS}"
            )
        if entry["id"] == UNKNOWN_CATEGORY:
            raise TaxonomyError(f"{path}: {UNKNOWN_CATEGORY!r} is reserved for unparseable verdicts")
        scenarios.append(
            Scenario(str(entry["id"]), str(entry["label"]), str(entry["action"]), str(entry["policy"]).strip())
        )
    for field in ("id", "label"):
        values = [getattr(s, field) for s in scenarios]
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise TaxonomyError(f"{path}: duplicate scenario {field}s: {dupes}")
    return Taxonomy(
        version=str(data["version"]),
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        scenarios=tuple(scenarios),
        path=str(path),
    )
