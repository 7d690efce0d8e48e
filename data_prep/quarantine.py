"""Accounting for bad input: every item read is either converted or quarantined with where and why."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class QuarantineEntry:
    input: str  # "safemt" or "benign"
    file: str
    index: int | None  # position of the record in its file (None: the whole file)
    id: str | None
    field: str
    reason: str

    @property
    def message(self) -> str:
        where = f"record #{self.index}" if self.index is not None else "whole file"
        ident = f" (id {self.id!r})" if self.id else ""
        return f"{self.file}: {where}{ident}: field {self.field!r}: {self.reason}"

    def to_json(self) -> dict:
        return {**asdict(self), "message": self.message}


class Ledger:
    """Counts items read and converted per input, and collects quarantined ones."""

    def __init__(self) -> None:
        self.read: Counter[str] = Counter()
        self.converted: Counter[str] = Counter()
        self.entries: list[QuarantineEntry] = []

    def quarantine(
        self, input: str, file: str | Path, index: int | None, id: str | None, field: str, reason: str
    ) -> None:
        self.entries.append(QuarantineEntry(input, str(file), index, id, field, reason))

    def quarantined(self, input: str | None = None) -> int:
        return sum(1 for e in self.entries if input is None or e.input == input)

    def totals(self, input: str | None = None) -> dict[str, int]:
        read = self.read[input] if input else sum(self.read.values())
        converted = self.converted[input] if input else sum(self.converted.values())
        return {"read": read, "converted": converted, "quarantined": self.quarantined(input)}

    def write(self, path: Path) -> None:
        entries = sorted(self.entries, key=lambda e: (e.input, e.file, -1 if e.index is None else e.index))
        with path.open("w", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(entry.to_json(), ensure_ascii=False) + "\n")
