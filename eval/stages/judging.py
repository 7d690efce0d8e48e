"""Phase 3, judging: every reply becomes one report row.

A blocked reply is the fixed refusal and is labelled ``safe`` without a judge call; a benign reply
gets a refusal check instead of a safety label (``label`` None: benign rows never enter the ASR). A
cached row whose judge call failed (see :func:`eval.judge.row_needs_rejudge`) is judged again on the
next run, so a judge outage never sticks in the cache. The judge is built (``ctx.judge``) only when a
row first needs a judge call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from eval.cache import compute_missing, missing_items
from eval.config import DefenceConfig, JudgeConfig, TargetConfig
from eval.defences import BLOCK, DefenceDecision
from eval.judge import Judge, JudgeItem, heuristic_refusal, judge_kind, row_needs_rejudge
from eval.progress import stage_bar
from eval.samples import EvalSample
from eval.stages.context import RunContext
from eval.stages.generation import system_for
from eval.stages.keys import cached_decision, generation_key, judge_name, row_key, row_sig
from moderator.contract import SAFE
from moderator.taxonomy import Taxonomy

JudgeLoader = Callable[[JudgeConfig, Taxonomy], Judge]

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


def _pending(ctx: RunContext, samples: Sequence[EvalSample]) -> list[Pending]:
    return [
        Pending(target, defence, sample, cached_decision(ctx, defence, sample))
        for target in ctx.config.targets
        for defence in ctx.config.defences
        for sample in samples
    ]


def _pending_key(ctx: RunContext, pending: Pending) -> tuple:
    return row_key(ctx, pending.target, pending.defence, pending.sample)


def ensure_judge(ctx: RunContext, judge_loader: JudgeLoader) -> Judge:
    """The run's judge, built from ``config.judge`` the first time it is needed."""
    if ctx.judge is None:
        ctx.judge = judge_loader(ctx.config.judge, ctx.taxonomy)
    return ctx.judge


def judge_all(ctx: RunContext, samples: Sequence[EvalSample], judge_loader: JudgeLoader) -> None:
    """Phase 3: judge every row not cached yet (or whose cached judge call failed).

    A judge that streams its answers (the OpenAI-compatible one: ``concurrency`` requests in flight,
    no batch barrier) gets the whole workload and each row is cached as its call finishes; others
    get ``max(batch_size, concurrency)`` rows per call, each batch cached as it returns.
    """
    pending = _pending(ctx, samples)
    ctx.tally.need("judgements", len(pending))
    judge = ctx.config.judge
    # Before the judge is built, its kind's class says whether it will stream.
    streams = ctx.judge.streams_answers if ctx.judge is not None else judge_kind(judge.kind).judge_class.streams_answers
    key = partial(_pending_key, ctx)
    if streams:
        todo = missing_items(ctx.caches.judgements, pending, key, row_needs_rejudge)
        with stage_bar(len(todo), "judge") as progress:
            _judge_streamed(ctx, judge_loader, todo, progress)
        done = len(todo)
    else:
        done = compute_missing(
            ctx.caches.judgements,
            pending,
            key,
            partial(_judge_batch, ctx, judge_loader),
            max(judge.batch_size, judge.concurrency),
            desc="judge",
            recompute=row_needs_rejudge,  # a judge error cached by an earlier run is asked again
        )
    ctx.tally.add_computed("judgements", done)


def report_rows(ctx: RunContext, samples: Sequence[EvalSample]) -> list[dict[str, Any]]:
    """The report rows of this config (the cache may also hold rows of other configs)."""
    rows = []
    for pending in _pending(ctx, samples):
        row = ctx.caches.judgements.get(_pending_key(ctx, pending))
        if row is None:
            raise RuntimeError(f"no judged row for {pending.target.label}/{pending.defence.label}/{pending.sample.key}")
        rows.append(row)
    return rows


def _reply(ctx: RunContext, pending: Pending) -> str:
    if pending.decision.action == BLOCK:
        return ctx.config.refusal_text
    system = system_for(pending.target, pending.decision, ctx.taxonomy)
    record = ctx.caches.generations.get(generation_key(ctx, pending.target, pending.sample, system))
    if record is None:
        raise RuntimeError(f"no cached reply of {pending.target.label} for {pending.sample.key}")
    return record["reply"]


def _outcome_without_judge(ctx: RunContext, pending: Pending, reply: str) -> Outcome | str:
    """The row's outcome when it needs no judge call, else the call it needs (:data:`SAFETY` or :data:`REFUSAL`)."""
    blocked = pending.decision.action == BLOCK
    if pending.sample.benign:
        if blocked:
            return (None, None, True, None)
        if ctx.config.judge.refusal_check == "heuristic":
            return (None, None, heuristic_refusal(reply), None)
        return REFUSAL
    if blocked:
        return (SAFE, None, None, None)  # the fixed refusal, safe by construction
    return SAFETY


def _judge_calls(
    ctx: RunContext,
    judge_loader: JudgeLoader,
    batch: Sequence[Pending],
    replies: Sequence[str],
    outcomes: Sequence[Outcome | str],
) -> Iterator[tuple[int, Outcome]]:
    """``(index into batch, outcome)`` of every item that needs a judge call, as each call finishes."""
    safety = [i for i, outcome in enumerate(outcomes) if outcome == SAFETY]
    refusal = [i for i, outcome in enumerate(outcomes) if outcome == REFUSAL]
    if not safety and not refusal:
        return
    judge = ensure_judge(ctx, judge_loader)
    if safety:
        items = (_judge_item(batch[i], replies[i]) for i in safety)
        for index, judgement in judge.iter_judge_safety(items):
            yield safety[index], (judgement.label, judgement.raw, None, None)
    if refusal:
        items = (_judge_item(batch[i], replies[i]) for i in refusal)
        for index, result in judge.iter_judge_refusal(items):
            yield refusal[index], (None, None, result.refused, result.raw)


def _judge_batch(ctx: RunContext, judge_loader: JudgeLoader, batch: list[Pending]) -> list[dict]:
    replies = [_reply(ctx, p) for p in batch]
    outcomes = [_outcome_without_judge(ctx, p, r) for p, r in zip(batch, replies, strict=True)]
    for index, outcome in _judge_calls(ctx, judge_loader, batch, replies, outcomes):
        outcomes[index] = outcome
    if unanswered := sum(1 for outcome in outcomes if isinstance(outcome, str)):
        raise RuntimeError(f"judge: {unanswered} of {len(batch)} requests got no result")
    return [_row(ctx, p, r, o) for p, r, o in zip(batch, replies, outcomes, strict=True)]  # type: ignore[arg-type]


def _judge_streamed(ctx: RunContext, judge_loader: JudgeLoader, todo: Sequence[Pending], progress: Any) -> None:
    """Judge ``todo`` caching each row as its call finishes: a crash loses only the calls in flight."""
    replies = [_reply(ctx, p) for p in todo]
    outcomes = [_outcome_without_judge(ctx, p, r) for p, r in zip(todo, replies, strict=True)]
    if any(isinstance(outcome, str) for outcome in outcomes):
        ensure_judge(ctx, judge_loader)  # before any row is built: rows carry the judge's name
    fixed = [i for i, outcome in enumerate(outcomes) if not isinstance(outcome, str)]
    rows = [_row(ctx, todo[i], replies[i], outcomes[i]) for i in fixed]  # type: ignore[arg-type]
    _append_rows(ctx, rows, [todo[i] for i in fixed])
    progress.update(len(fixed))
    for index, outcome in _judge_calls(ctx, judge_loader, todo, replies, outcomes):
        _append_rows(ctx, [_row(ctx, todo[index], replies[index], outcome)], [todo[index]])
        progress.update(1)


def _append_rows(ctx: RunContext, rows: list[dict], pending: Sequence[Pending]) -> None:
    cache = ctx.caches.judgements
    for row, item in zip(rows, pending, strict=True):
        expected = _pending_key(ctx, item)
        if cache.key_of(row) != expected:
            raise RuntimeError(f"judge: row key {cache.key_of(row)} for {expected}")
    cache.append(rows)


def _row(ctx: RunContext, pending: Pending, reply: str, outcome: Outcome) -> dict[str, Any]:
    sample, decision = pending.sample, pending.decision
    label, judge_raw, refused, refusal_raw = outcome
    return {
        "target": pending.target.label,
        "defence": pending.defence.label,
        "judge": judge_name(ctx),
        "id": sample.id,
        "k": sample.k,
        "benign": sample.benign,
        "sig": row_sig(ctx, pending.target, pending.defence),
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


def _judge_item(pending: Pending, reply: str) -> JudgeItem:
    sample = pending.sample
    return JudgeItem(
        dialogue=sample.dialogue,
        reply=reply,
        question=sample.question,
        scenario=sample.scenario,
        has_image=sample.image_path is not None,
    )
