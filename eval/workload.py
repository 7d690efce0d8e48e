"""What one eval process works on: its shard of the ids, the samples it loads, and its input report.

:class:`Shard` splits a run by SafeMT id (every length of an id, its prepared test rows and a benign
id's rows in one shard). :class:`InputStage` is the part of :class:`eval.loop.EvalRun` that loads the
configured inputs (SafeMT, benign, the prepared test and validation splits) and writes the input
accounting (``quarantine.jsonl``, ``inputs.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.quarantine import Ledger
from eval.config import EvalConfig
from eval.inputs import (
    BENIGN_INPUT,
    INPUTS_FILE,
    QUARANTINE_FILE,
    SAFEMT_INPUT,
    THRESHOLD_SPLIT,
    EvalDataError,
    EvalSample,
    SplitRow,
    load_benign_samples,
    load_detection_split,
    load_safemt_samples,
)
from moderator.taxonomy import Taxonomy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the SafeMT ids whose stable hash falls in it.

    Every length of an id, its prepared test rows (its prefixes too) and a benign id's rows go to the
    same shard, so the shards of one run split its work without overlap and their caches merge.
    """

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 0 <= I < N, e.g. ``--shard 3/8``."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard: expected I/N (e.g. 0/8), got {text!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard: expected 0 <= I < N, got {text!r}")
        return cls(index, count)

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def holds(self, sample_id: str) -> bool:
        # sha256, not hash(): the same split in every process and Python version.
        return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") % self.count == self.index


class InputStage:
    """Loads the run's inputs (a part of :class:`eval.loop.EvalRun`, which sets these attributes)."""

    config: EvalConfig
    taxonomy: Taxonomy
    shard: Shard | None
    out_dir: Path
    ledger: Ledger
    split: Any
    all_split_rows: list[SplitRow]
    split_rows: list[SplitRow]
    threshold_split: Any
    threshold_rows: list[SplitRow]

    def load_samples(self) -> list[EvalSample]:
        cfg = self.config
        if cfg.detection_split and self.split is None:
            self.split, self.all_split_rows = load_detection_split(cfg.detection_split)
            self.threshold_split, self.threshold_rows = load_detection_split(cfg.detection_split, THRESHOLD_SPLIT)
            if not any(row.benign for row in self.threshold_rows):
                raise EvalDataError(
                    f"{cfg.detection_split}: the {THRESHOLD_SPLIT} split has no benign (safe) row, so no decision "
                    f"threshold can be chosen for target_fpr={cfg.target_fpr}"
                )
        self.ledger = Ledger()  # what each input read, used and quarantined (see write_input_report)
        held_out = None
        if cfg.restricted_to_split:
            # Only dialogues the moderator never trained on (every prefix row of an id counts).
            held_out = {row.dialogue_id for row in self.all_split_rows if not row.benign}
        samples = load_safemt_samples(
            cfg.safemt_dir,
            cfg.turns,
            cfg.limit,
            self.taxonomy,
            ledger=self.ledger,
            strict=cfg.strict,
            images_root=cfg.safemt_images_root,
            keep_ids=held_out,
        )
        if held_out is not None and not samples:
            raise EvalDataError(f"{cfg.safemt_dir}: no SafeMT id is in the test split of {cfg.detection_split}")
        if cfg.benign:
            limit = cfg.benign_limit if cfg.benign_limit is not None else cfg.limit
            samples += load_benign_samples(
                cfg.benign, limit, ledger=self.ledger, strict=cfg.strict, image_dir=self.out_dir / "benign_images"
            )
        self.split_rows = self.all_split_rows
        if self.shard is not None:
            # After the limits: the shards of a run split exactly the items the whole run evaluates.
            # The validation split is not sharded: each shard needs all of it to fix the run's threshold.
            samples = [s for s in samples if self.shard.holds(s.id)]
            self.split_rows = [r for r in self.all_split_rows if self.shard.holds(r.dialogue_id)]
        return samples

    def write_input_report(self, folder: Path) -> dict[str, dict[str, int]]:
        """``quarantine.jsonl`` (every bad input record: file, index, id, field, reason) and ``inputs.json``
        (per input: read = used + quarantined + not_selected, the last being good records left out by
        ``limit`` or the test-split restriction) in ``folder``; warns when anything was quarantined."""
        counts = {}
        for name in (SAFEMT_INPUT, BENIGN_INPUT):
            totals = self.ledger.totals(name)
            used, quarantined = totals["converted"], totals["quarantined"]
            not_selected = totals["read"] - used - quarantined
            counts[name] = {"read": totals["read"], "used": used, "quarantined": quarantined}
            counts[name]["not_selected"] = not_selected
        folder.mkdir(parents=True, exist_ok=True)
        self.ledger.write(folder / QUARANTINE_FILE)
        (folder / INPUTS_FILE).write_text(json.dumps(counts, indent=2) + "\n")
        if self.ledger.entries:
            logger.warning(
                "%d input record(s) quarantined, see %s",
                len(self.ledger.entries),
                folder / QUARANTINE_FILE,
            )
        return counts
