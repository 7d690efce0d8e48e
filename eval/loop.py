"""The evaluation loop: target x defence x SafeMT dialogue length -> judged replies -> report.

:class:`EvalRun` runs the stages of :mod:`eval.stages` in order, each a function that takes the run's
shared :class:`~eval.stages.context.RunContext` (config, out folder, caches, tally, thresholds, judge)
and the previous stage's data:

0. threshold:   each moderator defence scores the prepared validation split (``detection_split``) and
                its decision threshold for the whole run is fixed there, at ``target_fpr``, before
                it decides on anything it is evaluated on (see :func:`eval.thresholds.choose_threshold`:
                an explicit config threshold wins; no validation data: the checkpoint's). Validation
                scores are keyed without the threshold, so choosing it never invalidates them.
1. decisions:   every defence decides on every sample (SafeMT dialogues at each length, benign
                dialogues), keyed by (defence, settings, id, k, benign); the moderator's settings hold
                the threshold of phase 0, so every row of the report is measured at it. The moderator's
                ``policy`` and ``block`` defences (same model, settings and threshold) share one load and
                one verdict per dialogue; each mode's decision is derived from that verdict. While a
                defence is loaded, its flag after every user turn of the harmful samples is cached too
                (turns to detection, :mod:`eval.stages.turn_flags`).
2. generations: every target answers the final user turn of every sample that was not blocked, with
                the system prompt its defence gave it, keyed by (target, settings, id, k, benign,
                system prompt). Identical prompts (no defence, an unflagged guard) are generated once.
                A target that batches its own work (vLLM) gets the pending requests ``workload_chunk``
                at a time; others get ``batch_size`` at a time (see :func:`eval.stages.generation.workload_chunk`).
3. judgements:  every reply is judged; these are the report rows, keyed by (target, defence, judge,
                id, k, benign, settings). A blocked reply is the fixed refusal and is labelled
                ``safe`` without a judge call; a benign reply gets a refusal check instead of a
                safety label (``label`` None: benign rows never enter the ASR). A cached row whose
                judge call failed (an ``error``, see :func:`eval.judge.row_needs_rejudge`) is judged
                again on the next run, so a judge outage never sticks in the cache.

Then ``eval.report.write_report`` gets the rows, per defence detection metrics (see
:func:`eval.stages.results.detection_results`) and each moderator's threshold of phase 0 (``report.json``
``thresholds``). Last, :func:`eval.judge.check_judge_failures` raises :class:`eval.judge.JudgeFailureError`
when more than ``max_judge_failure_share`` of the judge calls gave no verdict (the report is written
first, so it shows the n/a SIs and the outcome counts of the failed run).

Each phase resumes from its own JSONL cache under ``<out_dir>/cache/``, with one model in memory at a
time (a 7B target, a guard and a local judge need not fit together). A run holds ``<out_dir>/.lock``
(:func:`eval.cache.lock_out_dir`), so a second eval on the same folder fails at once.

Sharding (:class:`eval.shard.Shard`, ``python -m eval.run --shard I/N``): shard I computes only the
samples and test-split rows of the SafeMT and benign ids that hash into it, into
``cache/shard-I-of-N/``, and writes no report. Every run reads the whole run's cache and every shard's,
so the unsharded run that follows finds everything cached and only writes the report. Each shard needs
the whole validation split to fix the moderator's threshold: :meth:`EvalRun.fix_thresholds`
(``--thresholds-only``) scores it once before the shards. ``eval.progress``: one progress bar per stage
and the closing line of a run or shard (:meth:`EvalRun.summary_line`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from eval.cache import lock_out_dir
from eval.config import DefenceConfig, EvalConfig, JudgeConfig, TargetConfig
from eval.defences import Defence, DefenceDecision, load_defence
from eval.judge import Judge, JudgeFailureError, load_judge
from eval.progress import RunTally
from eval.samples import (
    EvalDataError,
    EvalSample,
    SplitRow,
    load_benign_samples,
    load_detection_split,
    load_safemt_samples,
)
from eval.shard import Shard
from eval.stages.context import RunContext, open_caches
from eval.stages.decisions import choose_run_threshold, decide
from eval.stages.generation import close_model, generate
from eval.stages.inputs import RunInputs, load_inputs, threshold_rows_for, write_input_report
from eval.stages.judging import judge_all
from eval.stages.keys import cached_decision
from eval.stages.results import detection_results, shard_summary, write_rows_and_report
from eval.targets import ChatModel, load_target
from eval.thresholds import ThresholdChoice
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


class EvalRun:
    """One evaluation (or one shard of it); the loaders are parameters so tests can wrap or replace the models.

    ``judge``: a judge to use (None: built from ``config.judge`` when first needed). ``shard``: None for
    the whole run (and the report), else only this shard's items. ``ctx`` is what the stages share,
    ``inputs`` what :meth:`load_samples` loaded.
    """

    def __init__(
        self,
        config: EvalConfig,
        taxonomy: Taxonomy | None = None,
        judge: Judge | None = None,
        target_loader: Callable[[TargetConfig], ChatModel] = load_target,
        defence_loader: Callable[[DefenceConfig, Taxonomy], Defence] = load_defence,
        judge_loader: Callable[[JudgeConfig, Taxonomy], Judge] = load_judge,
        shard: Shard | None = None,
    ):
        self.config = config
        self.target_loader, self.defence_loader, self.judge_loader = target_loader, defence_loader, judge_loader
        self.shard = shard
        self.out_dir = Path(config.out_dir)
        taxonomy = taxonomy if taxonomy is not None else load_taxonomy()
        caches = open_caches(self.out_dir, shard)
        self.ctx = RunContext(config, taxonomy, self.out_dir, shard, caches, judge=judge)
        self.inputs = RunInputs()

    # -- the stages in order ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """The whole run (returns the report), or one shard's part of it (returns its summary).

        Holds ``out_dir`` meanwhile. Its last line on stderr says what it did (:meth:`summary_line`),
        also when the judge-failure gate fails the run after the report is written.
        """
        self.ctx.tally = RunTally()
        try:
            with lock_out_dir(self.out_dir, None if self.shard is None else self.shard.name):
                result = self._run()
        except JudgeFailureError:  # the run finished and wrote its report: say what it did
            print(self.summary_line(), file=sys.stderr)
            raise
        print(self.summary_line(), file=sys.stderr)
        return result

    def _run(self) -> dict[str, Any]:
        ctx = self.ctx
        inputs = self._load_inputs()
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        # A shard writes only under its own cache folder (each shard reads, and so reports, all inputs);
        # the report is the unsharded run's job.
        folder = self.out_dir if self.shard is None else ctx.cache_dir
        write_input_report(inputs.ledger, folder)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        try:
            decide(ctx, inputs, self.defence_loader)
            generate(ctx, inputs.samples, self.target_loader)
            judge_all(ctx, inputs.samples, self.judge_loader)
        finally:
            if ctx.judge is not None:
                ctx.judge.close()
        if self.shard is not None:
            return shard_summary(ctx, inputs)
        return write_rows_and_report(ctx, inputs)

    def fix_thresholds(self) -> dict[str, Any]:
        """Phase 0 alone: score the validation split and fix each moderator's threshold, nothing else.

        Every shard needs the whole validation split to fix the run's threshold; run this once before
        the shards (``python -m eval.run --thresholds-only``) so they find it cached instead of each
        scoring all of it. Returns ``{defence: threshold record}``.
        """
        if self.shard is not None:
            raise ValueError("thresholds are fixed for the whole run: --thresholds-only takes no --shard")
        self.ctx.tally = RunTally()
        with lock_out_dir(self.out_dir):
            inputs = self._load_inputs()
            self.ctx.cache_dir.mkdir(parents=True, exist_ok=True)
            write_input_report(inputs.ledger, self.out_dir)
            thresholds = decide(self.ctx, inputs, self.defence_loader, thresholds_only=True)
        print(self.ctx.tally.line("eval thresholds"), file=sys.stderr)
        return {label: choice.to_record() for label, choice in thresholds.items()}

    def summary_line(self) -> str:
        """``eval run: decided N items (C cached, M computed); ...; T s`` (``eval shard I/N: ...`` for a shard)."""
        what = "eval run" if self.shard is None else f"eval shard {self.shard.index}/{self.shard.count}"
        return self.ctx.tally.line(what)

    def _load_inputs(self) -> RunInputs:
        # Prepared splits read by an earlier call are reused.
        self.inputs = load_inputs(self.config, self.ctx.taxonomy, self.out_dir, self.shard, self.inputs)
        return self.inputs

    # -- single stages, for callers and tests that drive a run step by step -----------------------

    def load_samples(self) -> list[EvalSample]:
        """The input stage: this run's (or shard's) samples; the split rows land in :attr:`inputs`."""
        return self._load_inputs().samples

    def write_input_report(self, folder: Path) -> dict[str, dict[str, int]]:
        return write_input_report(self.inputs.ledger, folder)

    def decide(self, samples: Sequence[EvalSample], thresholds_only: bool = False) -> dict[str, ThresholdChoice]:
        """Phases 0 and 1 on ``samples`` and the loaded split rows (see :func:`eval.stages.decisions.decide`)."""
        inputs = replace(self.inputs, samples=list(samples))
        return decide(self.ctx, inputs, self.defence_loader, thresholds_only=thresholds_only)

    def decision(self, defence: DefenceConfig, item: EvalSample | SplitRow) -> DefenceDecision:
        return cached_decision(self.ctx, defence, item)

    def choose_threshold(self, cfg: DefenceConfig) -> ThresholdChoice:
        return choose_run_threshold(self.ctx, cfg, threshold_rows_for(cfg, self.inputs))

    @property
    def thresholds(self) -> dict[str, ThresholdChoice]:
        return self.ctx.thresholds

    @property
    def split_rows(self) -> list[SplitRow]:
        return self.inputs.split_rows

    @property
    def threshold_rows(self) -> list[SplitRow]:
        return self.inputs.threshold_rows


def run_eval(config: EvalConfig, **kwargs: Any) -> dict[str, Any]:
    """Run the whole evaluation; returns the report dict (also written to ``config.out_dir``).

    With ``shard=Shard(i, n)`` only that shard's items are computed into ``cache/shard-i-of-n/`` and
    the shard's summary is returned instead (no report).
    """
    return EvalRun(config, **kwargs).run()
