"""Phases 0 and 1, defence decisions (a part of :class:`eval.loop.EvalRun`).

Phase 0: each moderator defence scores the prepared validation split and its threshold for the whole
run is fixed there (:func:`eval.thresholds.choose_threshold`), before it decides on anything it is
evaluated on. Phase 1: every defence decides on every sample and test-split row, each model loaded at
most once and only when something is missing; the moderator's ``policy`` and ``block`` defences share
one load and one verdict per dialogue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

from eval.cache import JsonlCache, settings_digest
from eval.config import DefenceConfig, EvalConfig
from eval.defences import (
    Defence,
    DefenceDecision,
    ModeratorDefence,
    model_pass_settings,
)
from eval.inputs import THRESHOLD_SPLIT, EvalSample, SplitRow, open_images, prompt_without_target
from eval.progress import RunTally, stage_bar
from eval.thresholds import ThresholdChoice, choose_threshold
from moderator.taxonomy import Taxonomy

logger = logging.getLogger(__name__)


class DecisionStage:
    """Decides every sample and split row per defence; needs :class:`eval.keys.CacheKeys` beside it."""

    config: EvalConfig
    taxonomy: Taxonomy
    decisions: JsonlCache
    defence_loader: Callable[[DefenceConfig, Taxonomy], Defence]
    thresholds: dict[str, ThresholdChoice]
    split: Any
    split_rows: list[SplitRow]
    threshold_split: Any
    threshold_rows: list[SplitRow]
    tally: RunTally
    _decision_key: Callable[..., tuple]
    missing_turn_flags: Callable[..., list[EvalSample]]  # eval.detection_stage.TurnDetectionStage
    compute_turn_flags: Callable[..., None]

    def _split_rows_for(self, defence: DefenceConfig) -> list[SplitRow]:
        # The prepared rows hold the moderator's rendered prompt, not the raw dialogue: only our
        # moderator can read them, so the baselines' detection metrics come from the eval samples.
        return self.split_rows if defence.kind == "moderator" else []

    def _threshold_rows_for(self, defence: DefenceConfig) -> list[SplitRow]:
        return self.threshold_rows if defence.kind == "moderator" else []

    def _defence_groups(self) -> list[list[DefenceConfig]]:
        """The defences that share one model pass (a moderator's policy and block modes), in config order."""
        groups: dict[str, list[DefenceConfig]] = {}
        for cfg in self.config.defences:
            groups.setdefault(settings_digest(model_pass_settings(cfg)), []).append(cfg)
        return list(groups.values())

    def _missing(self, group: Sequence[DefenceConfig], items: Sequence[EvalSample | SplitRow]) -> list:
        return [item for item in items if any(self._decision_key(cfg, item) not in self.decisions for cfg in group)]

    def decide(self, samples: Sequence[EvalSample], thresholds_only: bool = False) -> None:
        """Phase 0 and 1 (``thresholds_only``: phase 0): each model is loaded at most once, only if needed.

        Defences that share a model pass (the moderator in ``policy`` and ``block`` mode) are decided
        together: the moderator reads each dialogue once and both modes' decisions come from that verdict.
        """
        for group in self._defence_groups():
            first = group[0]
            defence: Defence | None = None
            try:
                self.tally.need("decisions", len(self._threshold_rows_for(first)))
                validation = self._missing(group, self._threshold_rows_for(first))
                if validation:
                    defence = self.defence_loader(first, self.taxonomy)
                    with stage_bar(len(validation), f"score {_labels(group)} on {THRESHOLD_SPLIT} split") as progress:
                        self._compute_decisions(group, defence, validation, progress)
                if first.kind == "moderator":
                    # Before any decision the report shows: every one of them is made at this threshold.
                    for cfg in group:
                        self.thresholds[cfg.label] = self.choose_threshold(cfg)
                if thresholds_only:
                    continue
                self.tally.need("decisions", len(samples) + len(self._split_rows_for(first)))
                missing = self._missing(group, samples)
                missing_test = self._missing(group, self._split_rows_for(first))
                missing_turns = self.missing_turn_flags(group, samples)  # turns to detection
                if not missing and not missing_test and not missing_turns:
                    continue
                if defence is None:
                    defence = self.defence_loader(first, self.taxonomy)
                if first.kind == "moderator":
                    defence.set_threshold(self.thresholds[first.label].threshold)
                # One bar per defence (group): its samples, then its test-split rows.
                with stage_bar(len(missing) + len(missing_test), f"decide {_labels(group)}") as progress:
                    self._compute_decisions(group, defence, missing, progress)
                    self._compute_decisions(group, defence, missing_test, progress)
                # While the model is loaded: its flag after every user turn of the harmful samples.
                with stage_bar(len(missing_turns), f"per-turn {_labels(group)}") as progress:
                    self.compute_turn_flags(group, defence, missing_turns, progress)
            finally:
                if defence is not None:
                    defence.close()

    def _compute_decisions(
        self, group: Sequence[DefenceConfig], defence: Defence, items: Sequence[EvalSample | SplitRow], progress: Any
    ) -> None:
        """Decide ``items`` (all missing for some defence of ``group``) a batch at a time, appending each batch.

        One kind of item per call: a batch of split rows reads one prepared dataset.
        """
        if not items:
            return
        decide = self._decide_split_rows if isinstance(items[0], SplitRow) else self._decide_samples
        batch_size = self.config.batch_size
        for start in range(0, len(items), batch_size):
            batch = list(items[start : start + batch_size])
            self.decisions.append(decide(group, defence, batch))
            self.tally.add_computed("decisions", len(batch))
            progress.update(len(batch))

    def choose_threshold(self, cfg: DefenceConfig) -> ThresholdChoice:
        """The moderator's threshold for this run, from its cached validation decisions (see ``choose_threshold``)."""
        rows = self._threshold_rows_for(cfg)
        choice = choose_threshold(
            cfg, [self.decision(cfg, row) for row in rows], [row.benign for row in rows], self.config.target_fpr
        )
        if rows and choice.source == "manifest":
            logger.warning("%s: %s", cfg.label, choice.detail)
        logger.info("%s: decision threshold %s (%s: %s)", cfg.label, choice.threshold, choice.source, choice.detail)
        return choice

    def _decision_records(self, cfg: DefenceConfig, batch: Sequence[EvalSample | SplitRow], decisions) -> list[dict]:
        return [
            dict(zip(self.decisions.key_fields, self._decision_key(cfg, item), strict=True), **d.to_record())
            for item, d in zip(batch, decisions, strict=True)
        ]

    def _group_records(self, group: Sequence[DefenceConfig], defence: Defence, batch, verdicts) -> list[dict]:
        # One verdict per item; each defence of the group turns it into its own mode's decision.
        return list(
            chain.from_iterable(
                self._decision_records(cfg, batch, [defence.decision(v, cfg.mode) for v in verdicts]) for cfg in group
            )
        )

    def _decide_samples(self, group: Sequence[DefenceConfig], defence: Defence, batch: list[EvalSample]) -> list:
        dialogues, images = [s.dialogue for s in batch], open_images(batch)
        if isinstance(defence, ModeratorDefence):
            return self._group_records(group, defence, batch, defence.verdicts(dialogues, images))
        (cfg,) = group  # a guard or none shares its pass with no other defence
        return self._decision_records(cfg, batch, defence.decide_batch(dialogues, images))

    def _decide_split_rows(self, group: Sequence[DefenceConfig], defence: Defence, batch: list[SplitRow]) -> list:
        data = {"test": self.split, THRESHOLD_SPLIT: self.threshold_split}[batch[0].split]  # one split per batch
        rows = data.select([r.index for r in batch])
        prompts = [prompt_without_target(row["messages"], row["id"]) for row in rows]
        images = [[image.convert("RGB") for image in row["images"]] for row in rows]
        if isinstance(defence, ModeratorDefence):
            return self._group_records(group, defence, batch, defence.verdicts_rendered(prompts, images))
        (cfg,) = group
        return self._decision_records(cfg, batch, defence.decide_rendered(prompts, images))

    def decision(self, defence: DefenceConfig, item: EvalSample | SplitRow) -> DefenceDecision:
        record = self.decisions.get(self._decision_key(defence, item))
        if record is None:
            raise RuntimeError(f"no cached decision of {defence.label} for {item.key}")
        return DefenceDecision.from_record(record)


def _labels(group: Sequence[DefenceConfig]) -> str:
    return "+".join(cfg.label for cfg in group)
