"""Phase 3, judging (a part of :class:`eval.loop.EvalRun`): every reply becomes one report row.

A blocked reply is the fixed refusal and is labelled ``safe`` without a judge call; a benign reply
gets a refusal check instead of a safety label (``label`` None: benign rows never enter the ASR). A
cached row whose judge call failed (see :func:`eval.judge.row_needs_rejudge`) is judged again on the
next run, so a judge outage never sticks in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eval.cache import JsonlCache, compute_missing
from eval.config import DefenceConfig, EvalConfig, JudgeConfig, TargetConfig
from eval.defences import BLOCK, DefenceDecision
from eval.generation import Generation
from eval.inputs import EvalSample
from eval.judge import Judge, JudgeItem, heuristic_refusal, row_needs_rejudge
from moderator.contract import SAFE
from moderator.taxonomy import Taxonomy


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
    computed: dict[str, int]
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

    def _judge_batch(self, batch: list[Pending]) -> list[dict]:
        replies = [self._reply(p) for p in batch]
        labels: dict[int, tuple[str | None, str | None]] = {}
        refusals: dict[int, tuple[bool | None, str | None]] = {}
        to_judge, to_check = [], []
        for index, (pending, reply) in enumerate(zip(batch, replies, strict=True)):
            blocked = pending.decision.action == BLOCK
            if pending.sample.benign:
                if blocked:
                    refusals[index] = (True, None)
                elif self.config.judge.refusal_check == "heuristic":
                    refusals[index] = (heuristic_refusal(reply), None)
                else:
                    to_check.append(index)
                labels[index] = (None, None)
            else:
                if blocked:
                    labels[index] = (SAFE, None)  # the fixed refusal, safe by construction
                else:
                    to_judge.append(index)
                refusals[index] = (None, None)
        judge = self._ensure_judge() if (to_judge or to_check) else None
        if to_judge:
            items = [self._judge_item(batch[i], replies[i]) for i in to_judge]
            for index, judgement in zip(to_judge, judge.judge_safety(items), strict=True):
                labels[index] = (judgement.label, judgement.raw)
        if to_check:
            items = [self._judge_item(batch[i], replies[i]) for i in to_check]
            for index, result in zip(to_check, judge.judge_refusal(items), strict=True):
                refusals[index] = (result.refused, result.raw)
        rows = []
        for index, (pending, reply) in enumerate(zip(batch, replies, strict=True)):
            sample, decision = pending.sample, pending.decision
            label, judge_raw = labels[index]
            refused, refusal_raw = refusals[index]
            rows.append(
                {
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
            )
        return rows

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
        pending = self._pending(samples)
        judge = self.config.judge
        # An API judge keeps `concurrency` requests in flight within a chunk (a finished one frees its
        # worker at once); chunks of 8x that keep the wait for the slowest request at a chunk's end rare,
        # while a kill loses at most one chunk of judge calls.
        batch_size = max(judge.batch_size, judge.concurrency * (8 if judge.kind == "openai" else 1))
        self.computed["judgements"] = compute_missing(
            self.judgements,
            pending,
            lambda p: self._row_key(p.target, p.defence, p.sample),
            self._judge_batch,
            batch_size,
            desc="judge",
            recompute=row_needs_rejudge,  # a judge error cached by an earlier run is asked again
        )

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
