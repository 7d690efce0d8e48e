"""The evaluation loop: target x defence x SafeMT dialogue length -> judged replies -> report.

Phases, each resumable from its own JSONL cache under ``<out_dir>/cache/`` (one model in memory at a
time, so a 7B target, a guard and a local judge need not fit together). A run holds ``<out_dir>/.lock``
(:func:`eval.cache.lock_out_dir`), so a second eval on the same folder fails at once.

Sharding (:class:`Shard`, ``python -m eval.run --shard I/N``): shard I computes only the samples and
test-split rows of the SafeMT and benign ids that hash into it, into ``cache/shard-I-of-N/``, and
writes no report. Every run reads the whole run's cache and every shard's, so the unsharded run that
follows finds everything cached and only writes the report. Each shard needs the whole validation
split to fix the moderator's threshold: :meth:`EvalRun.fix_thresholds` (``--thresholds-only``) scores
it once before the shards.

0. threshold:   each moderator defence scores the prepared validation split (``detection_split``) and
                its decision threshold for the whole run is fixed there, at ``target_fpr``, before
                it decides on anything it is evaluated on (see :func:`eval.thresholds.choose_threshold`:
                an explicit config threshold wins; no validation data: the checkpoint's). Validation
                scores are keyed without the threshold, so choosing it never invalidates them.
1. decisions:   every defence decides on every sample (SafeMT dialogues at each length, benign
                dialogues), keyed by (defence, settings, id, k, benign); the moderator's settings hold
                the threshold of phase 0, so every row of the report is measured at it. The moderator's
                ``policy`` and ``block`` defences (same model, settings and threshold) share one load and
                one verdict per dialogue; each mode's decision is derived from that verdict.
2. generations: every target answers the final user turn of every sample that was not blocked, with
                the system prompt its defence gave it, keyed by (target, settings, id, k, benign,
                system prompt). Identical prompts (no defence, an unflagged guard) are generated once.
                A target that batches its own work (vLLM) gets the pending requests ``workload_chunk``
                at a time; others get ``batch_size`` at a time (see :meth:`EvalRun.generate`).
3. judgements:  every reply is judged; these are the report rows, keyed by (target, defence, judge,
                id, k, benign, settings). A blocked reply is the fixed refusal and is labelled
                ``safe`` without a judge call; a benign reply gets a refusal check instead of a
                safety label (``label`` None: benign rows never enter the ASR). A cached row whose
                judge call failed (an ``error``, see :func:`eval.judge.row_needs_rejudge`) is judged
                again on the next run, so a judge outage never sticks in the cache.

Then ``eval.report.write_report`` gets the rows, per defence detection metrics (see
:func:`detection_results`) and each moderator's threshold of phase 0 (``report.json`` ``thresholds``).
Last, :func:`eval.judge.check_judge_failures` raises :class:`eval.judge.JudgeFailureError` when more
than ``max_judge_failure_share`` of the judge calls gave no verdict (the report is written first, so
it shows the n/a SIs and the outcome counts of the failed run).

Where each stage lives (:class:`EvalRun` combines them and runs them in order):
``eval.inputs`` (readers, samples, split rows), ``eval.workload`` (:class:`Shard`, loading the run's
inputs), ``eval.keys`` (cache keys), ``eval.decisions`` (phases 0 and 1), ``eval.generation``
(phase 2), ``eval.judging`` (phase 3), ``eval.results`` (rows, detection metrics, the report) and
``eval.detection_stage`` (turns to detection: each detecting defence's flag after every user turn of
the harmful samples, computed in phase 1 while its model is loaded). ``eval.progress``: one progress
bar per stage and the closing line of a run or shard (:meth:`EvalRun.summary_line`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.quarantine import Ledger
from eval.cache import JsonlCache, lock_out_dir
from eval.config import DefenceConfig, EvalConfig, JudgeConfig, TargetConfig
from eval.decisions import DecisionStage
from eval.defences import Defence, load_defence
from eval.detection_stage import TURN_FLAGS_FILE, TURN_FLAGS_KEY, TurnDetectionStage
from eval.generation import GenerationStage, close_model
from eval.inputs import (
    EvalDataError,
    EvalSample,
    SplitRow,
    load_benign_samples,
    load_detection_split,
    load_safemt_samples,
)
from eval.judge import Judge, JudgeFailureError, load_judge
from eval.judging import JudgingStage
from eval.keys import CacheKeys
from eval.progress import RunTally
from eval.results import ReportStage, detection_results
from eval.targets import ChatModel, load_target
from eval.thresholds import ThresholdChoice
from eval.workload import InputStage, Shard
from moderator.taxonomy import Taxonomy, load_taxonomy

# Re-exported: the public names callers and tests import from eval.loop.
__all__ = [
    "EvalDataError",
    "EvalRun",
    "EvalSample",
    "Shard",
    "SplitRow",
    "close_model",
    "detection_results",
    "load_benign_samples",
    "load_detection_split",
    "load_safemt_samples",
    "run_eval",
]


@dataclass
class EvalRun(InputStage, CacheKeys, DecisionStage, TurnDetectionStage, GenerationStage, JudgingStage, ReportStage):
    """One evaluation; the loaders are parameters so tests can wrap or replace the models.

    Each stage is its own module (see the module docstring); this class holds their shared state (the
    config, the caches, the thresholds) and runs them in order.
    """

    config: EvalConfig
    taxonomy: Taxonomy = field(default_factory=load_taxonomy)
    judge: Judge | None = None  # None: built from config.judge when first needed
    target_loader: Callable[[TargetConfig], ChatModel] = load_target
    defence_loader: Callable[[DefenceConfig, Taxonomy], Defence] = load_defence
    judge_loader: Callable[[JudgeConfig, Taxonomy], Judge] = load_judge
    shard: Shard | None = None  # None: the whole run (and the report); else this shard's items only

    def __post_init__(self) -> None:
        self.split: Any = None  # the prepared test split (a datasets.Dataset), when configured
        self.all_split_rows: list[SplitRow] = []  # the whole test split (a shard's are in split_rows)
        self.split_rows: list[SplitRow] = []
        self.threshold_split: Any = None  # the prepared validation split: the moderator's threshold
        self.threshold_rows: list[SplitRow] = []
        # Per moderator defence: the threshold of the whole run, fixed by decide() before any attack decision.
        self.thresholds: dict[str, ThresholdChoice] = {}
        self._defence_sigs: dict[tuple[str, float | None], str] = {}
        self._score_sigs: dict[str, str] = {}
        self.tally = RunTally()  # per stage: items needed and computed, for the closing line
        self.ledger = Ledger()  # the inputs' accounting, filled by load_samples
        self.out_dir = Path(self.config.out_dir)
        self.decisions = self._open_cache("decisions.jsonl", ("defence", "sig", "id", "k", "benign"))
        self.generations = self._open_cache("generations.jsonl", ("target", "sig", "id", "k", "benign", "system_sig"))
        self.judgements = self._open_cache(
            "judgements.jsonl", ("target", "defence", "judge", "id", "k", "benign", "sig")
        )
        self.turn_flags = self._open_cache(TURN_FLAGS_FILE, TURN_FLAGS_KEY)

    @property
    def cache_dir(self) -> Path:
        """Where this process writes: ``cache/`` for a whole run, ``cache/shard-I-of-N/`` for a shard."""
        root = self.out_dir / "cache"
        return root if self.shard is None else root / f"shard-{self.shard.name}"

    def _open_cache(self, name: str, key_fields: Sequence[str]) -> JsonlCache:
        # The whole run's file and every shard's are read (a rerun with another N reuses them too); only
        # this process's own file is written, so concurrent shards never share one.
        root = self.out_dir / "cache"
        others = [root / name, *sorted(root.glob(f"shard-*/{name}"))]
        return JsonlCache(self.cache_dir / name, key_fields, read_also=others)

    @property
    def computed(self) -> dict[str, int]:
        """Items computed (not found cached) per stage."""
        return self.tally.computed

    def run(self) -> dict[str, Any]:
        """The whole run, or one shard's part of it (see :meth:`shard_summary`); holds ``out_dir`` meanwhile.

        Its last line on stderr says what it did (:meth:`summary_line`), also when the judge-failure gate
        fails the run after the report is written.
        """
        self.tally = RunTally()
        try:
            with lock_out_dir(self.out_dir, None if self.shard is None else self.shard.name):
                result = self._run()
        except JudgeFailureError:  # the run finished and wrote its report: say what it did
            print(self.summary_line(), file=sys.stderr)
            raise
        print(self.summary_line(), file=sys.stderr)
        return result

    def summary_line(self) -> str:
        """``eval run: decided N items (C cached, M computed); ...; T s`` (``eval shard I/N: ...`` for a shard)."""
        what = "eval run" if self.shard is None else f"eval shard {self.shard.index}/{self.shard.count}"
        return self.tally.line(what)

    def fix_thresholds(self) -> dict[str, Any]:
        """Phase 0 alone: score the validation split and fix each moderator's threshold, nothing else.

        Every shard needs the whole validation split to fix the run's threshold; run this once before
        the shards (``python -m eval.run --thresholds-only``) so they find it cached instead of each
        scoring all of it. Returns ``{defence: threshold record}``.
        """
        if self.shard is not None:
            raise ValueError("thresholds are fixed for the whole run: --thresholds-only takes no --shard")
        self.tally = RunTally()
        with lock_out_dir(self.out_dir):
            samples = self.load_samples()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.write_input_report(self.out_dir)
            self.decide(samples, thresholds_only=True)
        print(self.tally.line("eval thresholds"), file=sys.stderr)
        return {label: choice.to_record() for label, choice in self.thresholds.items()}

    def _compute(self, samples: Sequence[EvalSample]) -> None:
        try:
            self.decide(samples)
            self.generate(samples)
            self.judge_all(samples)
        finally:
            if self.judge is not None:
                self.judge.close()

    def _run(self) -> dict[str, Any]:
        samples = self.load_samples()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # A shard writes only under its own cache folder (each shard reads, and so reports, all inputs).
        self.write_input_report(self.out_dir if self.shard is None else self.cache_dir)
        config_json = json.dumps(self.config.to_dict(), indent=2) + "\n"
        if self.shard is not None:
            # A shard writes only under its own cache folder; the report is the unsharded run's job.
            (self.cache_dir / "config.json").write_text(config_json)
            self._compute(samples)
            return self.shard_summary(samples)
        (self.out_dir / "config.json").write_text(config_json)
        self._compute(samples)
        return self.write_rows_and_report(samples)

    @property
    def max_judge_failure_share(self) -> float:
        """The share of judge calls that may give no verdict before the run fails (``EvalConfig``, default 0.05)."""
        return float(self.config.max_judge_failure_share)


def run_eval(config: EvalConfig, **kwargs: Any) -> dict[str, Any]:
    """Run the whole evaluation; returns the report dict (also written to ``config.out_dir``).

    With ``shard=Shard(i, n)`` only that shard's items are computed into ``cache/shard-i-of-n/`` and
    the shard's summary is returned instead (no report).
    """
    return EvalRun(config, **kwargs).run()
