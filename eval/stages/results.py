"""Rows and report assembly: ``rows.jsonl``, detection metrics, the report; or a shard's summary.

The unsharded run writes ``rows.jsonl`` (the judged rows of this config), ``report.{json,md}`` and
the plot (:func:`eval.report.write_report`) with each defence's detection metrics
(:func:`detection_results`) and each moderator's threshold; a shard writes no report and returns
:func:`shard_summary` instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from eval.judge import check_judge_failures
from eval.metrics import detection_metrics
from eval.report import write_report
from eval.samples import EvalSample, SplitRow
from eval.stages.context import RunContext
from eval.stages.inputs import RunInputs, split_rows_for
from eval.stages.judging import report_rows
from eval.stages.keys import cached_decision, judge_name
from eval.stages.turn_flags import turns_to_detection_summary

logger = logging.getLogger(__name__)


def write_rows_and_report(ctx: RunContext, inputs: RunInputs) -> dict[str, Any]:
    """``rows.jsonl`` and the report; then the judge-failure gate (so a failed run still leaves both)."""
    samples = inputs.samples
    rows = report_rows(ctx, samples)
    with (ctx.out_dir / "rows.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    detection = detection_results(ctx, inputs)
    # The configured K, as in eval.safety_index and the SafeMT definition: a length without a
    # labelled reply has no ASR, and then the SI is n/a with the reason (never a made-up 1.0).
    report = write_report(
        rows,
        ctx.out_dir,
        turns=ctx.config.turns,
        detection=detection or None,
        title=ctx.config.title,
        thresholds={label: choice.to_record() for label, choice in ctx.thresholds.items()},
        turns_to_detection=turns_to_detection_summary(ctx, samples),
    )
    # After the report, so a failed run still leaves its n/a SIs and outcome counts on disk.
    share = float(ctx.config.max_judge_failure_share)  # EvalConfig, default 0.05
    summary = check_judge_failures(rows, share, judge=judge_name(ctx))
    if summary.failed:
        logger.warning("%s", summary.describe())
    return report


def shard_summary(ctx: RunContext, inputs: RunInputs) -> dict[str, Any]:
    """What a shard did (it writes no report: ``python -m eval.run`` without ``--shard`` merges them)."""
    shard = ctx.shard
    assert shard is not None
    computed = ctx.tally.computed
    return {
        "shard": f"{shard.index}/{shard.count}",
        "samples": len(inputs.samples),
        "test_split_rows": len(inputs.split_rows),
        "computed": {
            stage: computed.get(stage, 0) for stage in ("decisions", "detections", "generations", "judgements")
        },
        "cache": str(ctx.cache_dir),
        "summary": ctx.tally.line(f"eval shard {shard.index}/{shard.count}"),
    }


def detection_results(ctx: RunContext, inputs: RunInputs) -> dict[str, dict[str, Any]]:
    """Per defence (``none`` excluded): detection metrics, unsafe = positive (its decisions must be cached).

    Our moderator is scored on the prepared dataset's test split (:func:`split_rows_for`) when
    ``detection_split`` is set; otherwise, and for the baseline guards always, on the evaluated samples:
    SafeMT dialogues (every length) are the positives, benign dialogues the negatives. The score is the
    defence's P(unsafe) when it gives one, else its flag. Category accuracy is computed for our moderator
    only (the guards' categories are their own codes, not SafeMT scenarios). ``data`` says which set was
    used. The moderator's flags (precision, recall, FPR) are at the run's threshold, ``ctx.thresholds``,
    which the report records once under ``thresholds``.
    """
    results = {}
    for defence in ctx.config.defences:
        if defence.kind == "none":
            continue
        split_rows = split_rows_for(defence, inputs)
        items: Sequence[EvalSample | SplitRow] = split_rows or inputs.samples
        decisions = [cached_decision(ctx, defence, item) for item in items]
        y_true = [0 if item.benign else 1 for item in items]
        y_pred = [int(d.flagged) for d in decisions]
        y_score = [d.score if d.score is not None else float(d.flagged) for d in decisions]
        categories: dict[str, Any] = {}
        if defence.kind == "moderator":
            categories = {
                "category_true": [item.category or "" for item in items],
                "category_pred": [d.category or "" for d in decisions],
            }
        # Bootstrap over SafeMT (or benign) ids: every length and prefix row of an id is drawn together.
        ids = [item.dialogue_id if isinstance(item, SplitRow) else item.id for item in items]
        metrics = detection_metrics(y_true, y_score, y_pred, **categories, ids=ids)
        metrics["data"] = "test split" if split_rows else "eval samples"
        results[defence.label] = metrics
    return results
