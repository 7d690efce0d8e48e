"""Phases 0 and 1, defence decisions.

Phase 0: each moderator defence scores the prepared validation split and its threshold for the whole
run is fixed there (:func:`eval.thresholds.choose_threshold`), before it decides on anything it is
evaluated on. Phase 1: every defence decides on every sample and test-split row, each model loaded at
most once and only when something is missing; the moderator's ``policy`` and ``block`` defences share
one load and one verdict per dialogue. While a defence's model is loaded, its per-turn flags for turns
to detection are computed too (:mod:`eval.stages.turn_flags`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

from eval.cache import settings_digest
from eval.config import DefenceConfig
from eval.defences import Defence, ModeratorDefence, model_pass_settings
from eval.progress import stage_bar
from eval.samples import THRESHOLD_SPLIT, EvalSample, SplitRow, open_images, prompt_without_target
from eval.stages.context import RunContext
from eval.stages.inputs import RunInputs, split_rows_for, threshold_rows_for
from eval.stages.keys import cached_decision, decision_key
from eval.stages.turn_flags import compute_turn_flags, missing_turn_flags
from eval.thresholds import ThresholdChoice, choose_threshold
from moderator.taxonomy import Taxonomy

logger = logging.getLogger(__name__)

DefenceLoader = Callable[[DefenceConfig, Taxonomy], Defence]


# -- the run's threshold (phase 0) ------------------------------------------------------------------


def choose_run_threshold(ctx: RunContext, cfg: DefenceConfig, rows: Sequence[SplitRow]) -> ThresholdChoice:
    """The moderator's threshold for this run, from its cached decisions on the validation ``rows``.

    See :func:`eval.thresholds.choose_threshold`: an explicit config threshold wins; else the one that
    meets ``target_fpr`` on validation; without validation data, the checkpoint's.
    """
    choice = choose_threshold(
        cfg, [cached_decision(ctx, cfg, row) for row in rows], [row.benign for row in rows], ctx.config.target_fpr
    )
    if rows and choice.source == "manifest":
        logger.warning("%s: %s", cfg.label, choice.detail)
    logger.info("%s: decision threshold %s (%s: %s)", cfg.label, choice.threshold, choice.source, choice.detail)
    return choice


# -- phases 0 and 1 ---------------------------------------------------------------------------------


def defence_groups(defences: Sequence[DefenceConfig]) -> list[list[DefenceConfig]]:
    """The defences that share one model pass (a moderator's policy and block modes), in config order."""
    groups: dict[str, list[DefenceConfig]] = {}
    for cfg in defences:
        groups.setdefault(settings_digest(model_pass_settings(cfg)), []).append(cfg)
    return list(groups.values())


def _missing(ctx: RunContext, group: Sequence[DefenceConfig], items: Sequence[EvalSample | SplitRow]) -> list:
    cache = ctx.caches.decisions
    return [item for item in items if any(decision_key(ctx, cfg, item) not in cache for cfg in group)]


def decide(
    ctx: RunContext, inputs: RunInputs, defence_loader: DefenceLoader, thresholds_only: bool = False
) -> dict[str, ThresholdChoice]:
    """Phase 0 and 1 (``thresholds_only``: phase 0): each model is loaded at most once, only if needed.

    Defences that share a model pass (the moderator in ``policy`` and ``block`` mode) are decided
    together: the moderator reads each dialogue once and both modes' decisions come from that verdict.
    Returns each moderator defence's threshold (also kept in ``ctx.thresholds``: the decision keys hold it).
    """
    samples = inputs.samples
    for group in defence_groups(ctx.config.defences):
        first = group[0]
        defence: Defence | None = None
        try:
            validation_rows = threshold_rows_for(first, inputs)
            ctx.tally.need("decisions", len(validation_rows))
            validation = _missing(ctx, group, validation_rows)
            if validation:
                defence = defence_loader(first, ctx.taxonomy)
                with stage_bar(len(validation), f"score {_labels(group)} on {THRESHOLD_SPLIT} split") as progress:
                    _compute_decisions(ctx, inputs, group, defence, validation, progress)
            if first.kind == "moderator":
                # Before any decision the report shows: every one of them is made at this threshold.
                for cfg in group:
                    ctx.thresholds[cfg.label] = choose_run_threshold(ctx, cfg, threshold_rows_for(cfg, inputs))
            if thresholds_only:
                continue
            test_rows = split_rows_for(first, inputs)
            ctx.tally.need("decisions", len(samples) + len(test_rows))
            missing = _missing(ctx, group, samples)
            missing_test = _missing(ctx, group, test_rows)
            missing_turns = missing_turn_flags(ctx, group, samples)  # turns to detection
            if not missing and not missing_test and not missing_turns:
                continue
            if defence is None:
                defence = defence_loader(first, ctx.taxonomy)
            if first.kind == "moderator":
                defence.set_threshold(ctx.thresholds[first.label].threshold)
            # One bar per defence (group): its samples, then its test-split rows.
            with stage_bar(len(missing) + len(missing_test), f"decide {_labels(group)}") as progress:
                _compute_decisions(ctx, inputs, group, defence, missing, progress)
                _compute_decisions(ctx, inputs, group, defence, missing_test, progress)
            # While the model is loaded: its flag after every user turn of the harmful samples.
            with stage_bar(len(missing_turns), f"per-turn {_labels(group)}") as progress:
                compute_turn_flags(ctx, group, defence, missing_turns, progress)
        finally:
            if defence is not None:
                defence.close()
    return ctx.thresholds


def _compute_decisions(
    ctx: RunContext,
    inputs: RunInputs,
    group: Sequence[DefenceConfig],
    defence: Defence,
    items: Sequence[EvalSample | SplitRow],
    progress: Any,
) -> None:
    """Decide ``items`` (all missing for some defence of ``group``) a batch at a time, appending each batch.

    One kind of item per call: a batch of split rows reads one prepared dataset.
    """
    if not items:
        return
    batch_size = ctx.config.batch_size
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        if isinstance(items[0], SplitRow):
            records = _decide_split_rows(ctx, inputs, group, defence, batch)
        else:
            records = _decide_samples(ctx, group, defence, batch)
        ctx.caches.decisions.append(records)
        ctx.tally.add_computed("decisions", len(batch))
        progress.update(len(batch))


def decision_records(
    ctx: RunContext, cfg: DefenceConfig, batch: Sequence[EvalSample | SplitRow], decisions: Sequence[Any]
) -> list[dict]:
    """The decisions cache's records of ``cfg``'s ``decisions`` on ``batch`` (one per item)."""
    key_fields = ctx.caches.decisions.key_fields
    return [
        dict(zip(key_fields, decision_key(ctx, cfg, item), strict=True), **d.to_record())
        for item, d in zip(batch, decisions, strict=True)
    ]


def _group_records(
    ctx: RunContext, group: Sequence[DefenceConfig], defence: ModeratorDefence, batch: Sequence, verdicts: Sequence
) -> list[dict]:
    # One verdict per item; each defence of the group turns it into its own mode's decision.
    return list(
        chain.from_iterable(
            decision_records(ctx, cfg, batch, [defence.decision(v, cfg.mode) for v in verdicts]) for cfg in group
        )
    )


def _decide_samples(ctx: RunContext, group: Sequence[DefenceConfig], defence: Defence, batch: list[EvalSample]) -> list:
    dialogues, images = [s.dialogue for s in batch], open_images(batch)
    if isinstance(defence, ModeratorDefence):
        return _group_records(ctx, group, defence, batch, defence.verdicts(dialogues, images))
    (cfg,) = group  # a guard or none shares its pass with no other defence
    return decision_records(ctx, cfg, batch, defence.decide_batch(dialogues, images))


def _decide_split_rows(
    ctx: RunContext, inputs: RunInputs, group: Sequence[DefenceConfig], defence: Defence, batch: list[SplitRow]
) -> list:
    data = {"test": inputs.split, THRESHOLD_SPLIT: inputs.threshold_split}[batch[0].split]  # one split per batch
    rows = data.select([r.index for r in batch])
    prompts = [prompt_without_target(row["messages"], row["id"]) for row in rows]
    images = [[image.convert("RGB") for image in row["images"]] for row in rows]
    if isinstance(defence, ModeratorDefence):
        return _group_records(ctx, group, defence, batch, defence.verdicts_rendered(prompts, images))
    (cfg,) = group
    return decision_records(ctx, cfg, batch, defence.decide_rendered(prompts, images))


def _labels(group: Sequence[DefenceConfig]) -> str:
    return "+".join(cfg.label for cfg in group)
