"""Phase 3, judging (a part of :class:`eval.loop.EvalRun`): every reply becomes one report row.

A blocked reply is the fixed refusal and is labelled ``safe`` without a judge call; a benign reply
gets a refusal check instead of a safety label (``label`` None: benign rows never enter the ASR). A
cached row whose judge call failed (see :func:`eval.judge.row_needs_rejudge`) is judged again on the
next run, so a judge outage never sticks in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from eval.cache import JsonlCache, compute_missing, missing_items
from eval.config import DefenceConfig, EvalConfig, JudgeConfig, TargetConfig
from eval.defences import BLOCK, DefenceDecision
from eval.generation import Generation
from eval.inputs import EvalSample
from eval.judge import Judge, JudgeItem, heuristic_refusal, row_needs_rejudge
from eval.progress import RunTally, stage_bar
from moderator.contract import SAFE
from moderator.taxonomy import Taxonomy

# A row's outcome: (label, judge_raw, refused, refusal_raw); or which judge call it still needs.
Outcome = tuple[str | None, str | None, bool | None, str | None]
SAFETY, REFUSAL = "safety", "refusal"


@dataclass(frozen=True)
class Pending:
    """One report row to judge: a target's reply to a sample under a defence's decision."""

    target: TargetConfig
    defence: DefenceConfig
    sample: EvalSample
    decision: DefenceDecision


class JudgingStage:
    """Judges the missing rows; needs :class:`eval.keys.CacheKeys`, decisions and replies beside it."""

    config: EvalConfig
    taxonomy: Taxonomy
    judge: Judge | None
    judge_loader: Callable[[JudgeConfig, Taxonomy], Judge]
    generations: JsonlCache
    judgements: JsonlCache
    tally: RunTally
    judge_name: str
    decision: Callable[..., DefenceDecision]
    _system_for: Callable[..., str | None]
    _generation_key: Callable[..., tuple]
    _row_key: Callable[..., tuple]
    _row_sig: Callable[..., str]

    def _reply(self, pending: Pending) -> str:
        if pending.decision.action == BLOCK:
            return self.config.refusal_text
        item = Generation(pending.sample, self._system_for(pending.target, pending.decision))
        record = self.generations.get(self._generation_key(pending.target, item))
        if record is None:
            raise RuntimeError(f"no cached reply of {pending.target.label} for {pending.sample.key}")
        return record["reply"]

    def _outcome_without_judge(self, pending: Pending, reply: str) -> Outcome | str:
        """The row's outcome when it needs no judge call, else the call it needs (:data:`SAFETY` or :data:`REFUSAL`)."""
        blocked = pending.decision.action == BLOCK
        if pending.sample.benign:
            if blocked:
                return (None, None, True, None)
            if self.config.judge.refusal_check == "heuristic":
                return (None, None, heuristic_refusal(reply), None)
            return REFUSAL
        if blocked:
            return (SAFE, None, None, None)  # the fixed refusal, safe by construction
        return SAFETY

    def _judge_calls(
        self, batch: Sequence[Pending], replies: Sequence[str], outcomes: Sequence[Outcome | str]
    ) -> Iterator[tuple[int, Outcome]]:
        """``(index into batch, outcome)`` of every item that needs a judge call, as each call finishes."""
        safety = [i for i, outcome in enumerate(outcomes) if outcome == SAFETY]
        refusal = [i for i, outcome in enumerate(outcomes) if outcome == REFUSAL]
        if not safety and not refusal:
            return
        judge = self._ensure_judge()
        if safety:
            items = (self._judge_item(batch[i], replies[i]) for i in safety)
            for index, judgement in judge.iter_judge_safety(items):
                yield safety[index], (judgement.label, judgement.raw, None, None)
        if refusal:
            items = (self._judge_item(batch[i], replies[i]) for i in refusal)
            for index, result in judge.iter_judge_refusal(items):
                yield refusal[index], (None, None, result.refused, result.raw)

    def _judge_batch(self, batch: list[Pending]) -> list[dict]:
        replies = [self._reply(p) for p in batch]
        outcomes = [self._outcome_without_judge(p, r) for p, r in zip(batch, replies, strict=True)]
        for index, outcome in self._judge_calls(batch, replies, outcomes):
            outcomes[index] = outcome
        if unanswered := sum(1 for outcome in outcomes if isinstance(outcome, str)):
            raise RuntimeError(f"judge: {unanswered} of {len(batch)} requests got no result")
        return [self._row(p, r, o) for p, r, o in zip(batch, replies, outcomes, strict=True)]  # type: ignore[arg-type]

    def _judge_streamed(self, todo: Sequence[Pending], progress: Any) -> None:
        """Judge ``todo`` caching each row as its call finishes: a crash loses only the calls in flight."""
        replies = [self._reply(p) for p in todo]
        outcomes = [self._outcome_without_judge(p, r) for p, r in zip(todo, replies, strict=True)]
        if any(isinstance(outcome, str) for outcome in outcomes):
            self._ensure_judge()  # before any row is built: rows carry the judge's name
        fixed = [i for i, outcome in enumerate(outcomes) if not isinstance(outcome, str)]
        rows = [self._row(todo[i], replies[i], outcomes[i]) for i in fixed]  # type: ignore[arg-type]
        self._append_rows(rows, [todo[i] for i in fixed])
        progress.update(len(fixed))
        for index, outcome in self._judge_calls(todo, replies, outcomes):
            self._append_rows([self._row(todo[index], replies[index], outcome)], [todo[index]])
            progress.update(1)

    def _append_rows(self, rows: list[dict], pending: Sequence[Pending]) -> None:
        for row, item in zip(rows, pending, strict=True):
            expected = self._row_key(item.target, item.defence, item.sample)
            if self.judgements.key_of(row) != expected:
                raise RuntimeError(f"judge: row key {self.judgements.key_of(row)} for {expected}")
        self.judgements.append(rows)

    def _row(self, pending: Pending, reply: str, outcome: Outcome) -> dict[str, Any]:
        sample, decision = pending.sample, pending.decision
        label, judge_raw, refused, refusal_raw = outcome
        return {
            "target": pending.target.label,
            "defence": pending.defence.label,
            "judge": self.judge_name,
            "id": sample.id,
            "k": sample.k,
            "benign": sample.benign,
            "sig": self._row_sig(pending.target, pending.defence),
            "label": label,
            "flagged": decision.flagged,
            "refused": refused,
            "parse_error": decision.parse_error,
            "action": decision.action,
            "category": decision.category,
            "score": decision.score,
            "scenario": sample.scenario,
            "reply": reply,
            "judge_raw": judge_raw if judge_raw is not None else refusal_raw,
        }

    def _judge_item(self, pending: Pending, reply: str) -> JudgeItem:
        sample = pending.sample
        return JudgeItem(
            dialogue=sample.dialogue,
            reply=reply,
            question=sample.question,
            scenario=sample.scenario,
            has_image=sample.image_path is not None,
        )

    def _ensure_judge(self) -> Judge:
        if self.judge is None:
            self.judge = self.judge_loader(self.config.judge, self.taxonomy)
        return self.judge

    def _pending(self, samples: Sequence[EvalSample]) -> list[Pending]:
        return [
            Pending(target, defence, sample, self.decision(defence, sample))
            for target in self.config.targets
            for defence in self.config.defences
            for sample in samples
        ]

    def judge_all(self, samples: Sequence[EvalSample]) -> None:
        """Phase 3: judge every row not cached yet (or whose cached judge call failed).

        A judge that streams its answers (the OpenAI-compatible one: ``concurrency`` requests in flight,
        no batch barrier) gets the whole workload and each row is cached as its call finishes; others
        get ``max(batch_size, concurrency)`` rows per call, each batch cached as it returns.
        """
        pending = self._pending(samples)
        self.tally.need("judgements", len(pending))
        judge = self.config.judge
        streams = self.judge.streams_answers if self.judge is not None else judge.kind == "openai"
        if streams:
            todo = missing_items(self.judgements, pending, self._pending_key, row_needs_rejudge)
            with stage_bar(len(todo), "judge") as progress:
                self._judge_streamed(todo, progress)
            done = len(todo)
        else:
            done = compute_missing(
                self.judgements,
                pending,
                self._pending_key,
                self._judge_batch,
                max(judge.batch_size, judge.concurrency),
                desc="judge",
                recompute=row_needs_rejudge,  # a judge error cached by an earlier run is asked again
            )
        self.tally.add_computed("judgements", done)

    def _pending_key(self, pending: Pending) -> tuple:
        return self._row_key(pending.target, pending.defence, pending.sample)

    def rows(self, samples: Sequence[EvalSample]) -> list[dict[str, Any]]:
        """The report rows of this config (the cache may also hold rows of other configs)."""
        rows = []
        for pending in self._pending(samples):
            row = self.judgements.get(self._row_key(pending.target, pending.defence, pending.sample))
            if row is None:
                raise RuntimeError(
                    f"no judged row for {pending.target.label}/{pending.defence.label}/{pending.sample.key}"
                )
            rows.append(row)
        return rows
