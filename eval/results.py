"""Rows and report assembly (a part of :class:`eval.loop.EvalRun`): ``rows.jsonl``, detection metrics, the report.

The unsharded run writes ``rows.jsonl`` (the judged rows of this config), ``report.{json,md}`` and
the plot (:func:`eval.report.write_report`) with each defence's detection metrics
(:func:`detection_results`) and each moderator's threshold; a shard writes no report and returns
:meth:`ReportStage.shard_summary` instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.config import EvalConfig
from eval.inputs import EvalSample, SplitRow
from eval.judge import check_judge_failures
from eval.progress import RunTally
from eval.thresholds import ThresholdChoice

if TYPE_CHECKING:
    from eval.loop import EvalRun
    from eval.workload import Shard

logger = logging.getLogger(__name__)


class ReportStage:
    """Writes the rows and the report, or a shard's summary."""

    config: EvalConfig
    out_dir: Path
    shard: Shard | None
    split_rows: list[SplitRow]
    thresholds: dict[str, ThresholdChoice]
    computed: dict[str, int]
    tally: RunTally
    cache_dir: Path
    judge_name: str
    max_judge_failure_share: float
    rows: Callable[[Sequence[EvalSample]], list[dict[str, Any]]]  # eval.judging.JudgingStage
    turns_to_detection_summary: Callable[[Sequence[EvalSample]], dict[str, Any] | None]  # eval.detection_stage

    def write_rows_and_report(self, samples: Sequence[EvalSample]) -> dict[str, Any]:
        """``rows.jsonl`` and the report; then the judge-failure gate (so a failed run still leaves both)."""
        from eval.report import write_report

        rows = self.rows(samples)
        with (self.out_dir / "rows.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        detection = detection_results(self, samples)
        # The configured K, as in eval.safety_index and the SafeMT definition: a length without a
        # labelled reply has no ASR, and then the SI is n/a with the reason (never a made-up 1.0).
        report = write_report(
            rows,
            self.out_dir,
            turns=self.config.turns,
            detection=detection or None,
            title=self.config.title,
            thresholds={label: choice.to_record() for label, choice in self.thresholds.items()},
            turns_to_detection=self.turns_to_detection_summary(samples),
        )
        # After the report, so a failed run still leaves its n/a SIs and outcome counts on disk.
        summary = check_judge_failures(rows, self.max_judge_failure_share, judge=self.judge_name)
        if summary.failed:
            logger.warning("%s", summary.describe())
        return report

    def shard_summary(self, samples: Sequence[EvalSample]) -> dict[str, Any]:
        """What a shard did (it writes no report: ``python -m eval.run`` without ``--shard`` merges them)."""
        assert self.shard is not None
        return {
            "shard": f"{self.shard.index}/{self.shard.count}",
            "samples": len(samples),
            "test_split_rows": len(self.split_rows),
            "computed": {
                stage: self.computed.get(stage, 0) for stage in ("decisions", "detections", "generations", "judgements")
            },
            "cache": str(self.cache_dir),
            "summary": self.tally.line(f"eval shard {self.shard.index}/{self.shard.count}"),
        }


def detection_results(run: EvalRun, samples: Sequence[EvalSample]) -> dict[str, dict[str, Any]]:
    """Per defence (``none`` excluded): detection metrics, unsafe = positive.

    Our moderator is scored on the prepared dataset's test split when ``detection_split`` is set;
    otherwise, and for the baseline guards always, on the evaluated samples: SafeMT dialogues (every
    length) are the positives, benign dialogues the negatives. The score is the defence's P(unsafe)
    when it gives one, else its flag. Category accuracy is computed for our moderator only (the
    guards' categories are their own codes, not SafeMT scenarios). ``data`` says which set was used.
    The moderator's flags (precision, recall, FPR) are at the run's threshold, ``run.thresholds``,
    which the report records once under ``thresholds``.
    """
    from eval.metrics import detection_metrics

    results = {}
    for defence in run.config.defences:
        if defence.kind == "none":
            continue
        split_rows = run._split_rows_for(defence)
        items: Sequence[EvalSample | SplitRow] = split_rows or samples
        decisions = [run.decision(defence, item) for item in items]
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
