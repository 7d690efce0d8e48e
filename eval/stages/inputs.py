"""The input stage: the samples and prepared split rows one eval process works on, and its input report.

:func:`load_inputs` reads the configured inputs (SafeMT, benign, the prepared test and validation
splits), restricts them to the held-out ids and to this process's :class:`eval.shard.Shard`, and
returns them as :class:`RunInputs`; :func:`write_input_report` writes the input accounting
(``quarantine.jsonl``, ``inputs.json``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.quarantine import Ledger
from eval.config import DefenceConfig, EvalConfig
from eval.samples import (
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
from eval.shard import Shard
from moderator.taxonomy import Taxonomy

logger = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """What one process evaluates: its samples and the prepared splits' rows (empty before :func:`load_inputs`)."""

    samples: list[EvalSample] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)  # what each input read, used and quarantined
    split: Any = None  # the prepared test split (a datasets.Dataset), when configured
    all_split_rows: list[SplitRow] = field(default_factory=list)  # the whole test split
    split_rows: list[SplitRow] = field(default_factory=list)  # this shard's part of it (all of it unsharded)
    threshold_split: Any = None  # the prepared validation split: the moderator's threshold
    threshold_rows: list[SplitRow] = field(default_factory=list)  # never sharded


def split_rows_for(defence: DefenceConfig, inputs: RunInputs) -> list[SplitRow]:
    """The test-split rows ``defence`` is scored on.

    The prepared rows hold the moderator's rendered prompt, not the raw dialogue: only our moderator
    can read them, so the baselines' detection metrics come from the eval samples.
    """
    return inputs.split_rows if defence.kind == "moderator" else []


def threshold_rows_for(defence: DefenceConfig, inputs: RunInputs) -> list[SplitRow]:
    """The validation rows ``defence``'s threshold is chosen on (the moderator's only)."""
    return inputs.threshold_rows if defence.kind == "moderator" else []


def load_inputs(
    config: EvalConfig, taxonomy: Taxonomy, out_dir: Path, shard: Shard | None, loaded: RunInputs | None = None
) -> RunInputs:
    """The samples and split rows of this run (or shard); ``loaded``: prepared splits read before are reused."""
    cfg = config
    loaded = loaded if loaded is not None else RunInputs()
    split, all_split_rows = loaded.split, loaded.all_split_rows
    threshold_split, threshold_rows = loaded.threshold_split, loaded.threshold_rows
    if cfg.detection_split and split is None:
        split, all_split_rows = load_detection_split(cfg.detection_split)
        threshold_split, threshold_rows = load_detection_split(cfg.detection_split, THRESHOLD_SPLIT)
        if not any(row.benign for row in threshold_rows):
            raise EvalDataError(
                f"{cfg.detection_split}: the {THRESHOLD_SPLIT} split has no benign (safe) row, so no decision "
                f"threshold can be chosen for target_fpr={cfg.target_fpr}"
            )
    ledger = Ledger()  # what each input read, used and quarantined (see write_input_report)
    held_out = None
    if cfg.restricted_to_split:
        # Only dialogues the moderator never trained on (every prefix row of an id counts).
        held_out = {row.dialogue_id for row in all_split_rows if not row.benign}
    samples = load_safemt_samples(
        cfg.safemt_dir,
        cfg.turns,
        cfg.limit,
        taxonomy,
        ledger=ledger,
        strict=cfg.strict,
        images_root=cfg.safemt_images_root,
        keep_ids=held_out,
    )
    if held_out is not None and not samples:
        raise EvalDataError(f"{cfg.safemt_dir}: no SafeMT id is in the test split of {cfg.detection_split}")
    if cfg.benign:
        limit = cfg.benign_limit if cfg.benign_limit is not None else cfg.limit
        samples += load_benign_samples(
            cfg.benign, limit, ledger=ledger, strict=cfg.strict, image_dir=out_dir / "benign_images"
        )
    split_rows = all_split_rows
    if shard is not None:
        # After the limits: the shards of a run split exactly the items the whole run evaluates.
        # The validation split is not sharded: each shard needs all of it to fix the run's threshold.
        samples = [s for s in samples if shard.holds(s.id)]
        split_rows = [r for r in all_split_rows if shard.holds(r.dialogue_id)]
    return RunInputs(samples, ledger, split, all_split_rows, split_rows, threshold_split, threshold_rows)


def write_input_report(ledger: Ledger, folder: Path) -> dict[str, dict[str, int]]:
    """``quarantine.jsonl`` (every bad input record: file, index, id, field, reason) and ``inputs.json``
    (per input: read = used + quarantined + not_selected, the last being good records left out by
    ``limit`` or the test-split restriction) in ``folder``; warns when anything was quarantined."""
    counts = {}
    for name in (SAFEMT_INPUT, BENIGN_INPUT):
        totals = ledger.totals(name)
        used, quarantined = totals["converted"], totals["quarantined"]
        not_selected = totals["read"] - used - quarantined
        counts[name] = {"read": totals["read"], "used": used, "quarantined": quarantined}
        counts[name]["not_selected"] = not_selected
    folder.mkdir(parents=True, exist_ok=True)
    ledger.write(folder / QUARANTINE_FILE)
    (folder / INPUTS_FILE).write_text(json.dumps(counts, indent=2) + "\n")
    if ledger.entries:
        logger.warning(
            "%d input record(s) quarantined, see %s",
            len(ledger.entries),
            folder / QUARANTINE_FILE,
        )
    return counts
