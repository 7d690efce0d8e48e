"""The cache keys of the eval's stages, and the lookup of a cached decision by its key.

A cached record is reused only when everything that decided it is in its key: a defence decision by
(defence, settings incl. the run's threshold, id, k, benign); a validation-split score by the settings
without the threshold (choosing the threshold never invalidates it); a reply by (target, settings incl.
whether it sees images, id, k, benign, system prompt); a judged row by (target, defence, judge, id, k,
benign, all their settings); a defence's per-turn flags by (defence, settings, id, k).
"""

from __future__ import annotations

from typing import Any

from eval.cache import settings_digest
from eval.config import DefenceConfig, EvalConfig, TargetConfig
from eval.defences import DefenceDecision, defence_settings, score_settings
from eval.judge import judge_settings
from eval.samples import THRESHOLD_SPLIT, EvalSample, SplitRow
from eval.stages.context import RunContext


def defence_sig(ctx: RunContext, defence: DefenceConfig) -> str:
    """The defence's settings digest; a moderator's holds the run's threshold (``ctx.thresholds``)."""
    threshold = None
    if defence.kind == "moderator":
        if defence.label not in ctx.thresholds:
            raise RuntimeError(f"{defence.label}: its threshold is chosen in decide() before any decision")
        threshold = ctx.thresholds[defence.label].threshold
    # Memoised: the moderator's settings hash files on disk (see defence_settings).
    memo = ("defence", defence.label, threshold)
    if memo not in ctx.signatures:
        ctx.signatures[memo] = settings_digest(defence_settings(defence, threshold))
    return ctx.signatures[memo]


def score_sig(ctx: RunContext, defence: DefenceConfig) -> str:
    """:func:`defence_sig` without the threshold: what the validation split's P(unsafe) depends on."""
    memo = ("score", defence.label)
    if memo not in ctx.signatures:
        ctx.signatures[memo] = settings_digest(score_settings(defence))
    return ctx.signatures[memo]


def target_sig(config: EvalConfig, target: TargetConfig) -> str:
    settings = {
        "model": target.model,
        "backend": target.backend,
        "dtype": target.dtype,
        "system_prompt": target.system_prompt,
        "max_new_tokens": config.max_new_tokens,
        # A reply to the text alone is not a reply to text and image: never reuse one for the other.
        "images": target.images,
    }
    return settings_digest(settings)


def judge_name(ctx: RunContext) -> str:
    return ctx.judge.name if ctx.judge is not None else ctx.config.judge.label


def _judge_settings(ctx: RunContext) -> dict[str, Any]:
    base = ctx.judge.settings if ctx.judge is not None else judge_settings(ctx.config.judge)
    return {**base, "refusal_check": ctx.config.judge.refusal_check}


def row_sig(ctx: RunContext, target: TargetConfig, defence: DefenceConfig) -> str:
    return settings_digest(
        {
            "target": target_sig(ctx.config, target),
            "defence": defence_sig(ctx, defence),
            "judge": _judge_settings(ctx),
            "refusal_text": ctx.config.refusal_text,
        }
    )


def decision_key(ctx: RunContext, defence: DefenceConfig, item: EvalSample | SplitRow) -> tuple:
    # Validation rows serve only their P(unsafe), which the threshold does not change.
    threshold_row = isinstance(item, SplitRow) and item.split == THRESHOLD_SPLIT
    sig = score_sig(ctx, defence) if threshold_row else defence_sig(ctx, defence)
    return (defence.label, sig, *item.key)


def generation_key(ctx: RunContext, target: TargetConfig, sample: EvalSample, system: str | None) -> tuple:
    return (target.label, target_sig(ctx.config, target), *sample.key, settings_digest({"system": system}))


def row_key(ctx: RunContext, target: TargetConfig, defence: DefenceConfig, sample: EvalSample) -> tuple:
    return (target.label, defence.label, judge_name(ctx), *sample.key, row_sig(ctx, target, defence))


def turn_flag_key(ctx: RunContext, defence: DefenceConfig, sample: EvalSample) -> tuple:
    return (defence.label, defence_sig(ctx, defence), sample.id, sample.k)


def cached_decision(ctx: RunContext, defence: DefenceConfig, item: EvalSample | SplitRow) -> DefenceDecision:
    """The defence's decision on ``item``, from the decisions cache (the decisions stage computed it)."""
    record = ctx.caches.decisions.get(decision_key(ctx, defence, item))
    if record is None:
        raise RuntimeError(f"no cached decision of {defence.label} for {item.key}")
    return DefenceDecision.from_record(record)
