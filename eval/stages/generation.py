"""Phase 2, target replies.

Every target answers the final user turn of every sample its defence did not block, with the system
prompt the defence gave it and the dialogue's image (none for a target with ``images: false``, a
text-only chat model); identical prompts (no defence, an unflagged guard) are generated once. One target
is in memory at a time. A target that batches its own work (vLLM) gets the pending requests
``workload_chunk`` at a time; others get ``batch_size`` at a time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from eval.cache import compute_missing, settings_digest
from eval.config import EvalConfig, TargetConfig
from eval.defences import BLOCK, INJECT, DefenceDecision, policy_system_prompt
from eval.samples import EvalSample, open_images
from eval.stages.context import RunContext
from eval.stages.keys import cached_decision, generation_key, target_sig
from eval.targets import ChatModel, ChatRequest, target_backend
from moderator.taxonomy import Taxonomy

TargetLoader = Callable[[TargetConfig], ChatModel]


@dataclass(frozen=True)
class Generation:
    """One reply to generate: a sample and the system prompt its defence gave the target."""

    sample: EvalSample
    system: str | None


def system_for(target: TargetConfig, decision: DefenceDecision, taxonomy: Taxonomy) -> str | None:
    """The system prompt ``target`` answers with under ``decision`` (an injected policy, or its own)."""
    if decision.action == INJECT:
        return policy_system_prompt(target.system_prompt, decision, taxonomy)
    return target.system_prompt


def _generation_items(ctx: RunContext, target: TargetConfig, samples: Sequence[EvalSample]) -> list[Generation]:
    items = []
    for defence in ctx.config.defences:
        for sample in samples:
            decision = cached_decision(ctx, defence, sample)
            if decision.action != BLOCK:
                items.append(Generation(sample, system_for(target, decision, ctx.taxonomy)))
    return items


def generate(ctx: RunContext, samples: Sequence[EvalSample], target_loader: TargetLoader) -> None:
    """Phase 2: one target in memory at a time, closed and dropped before the next one loads."""
    for cfg in ctx.config.targets:
        items = _generation_items(ctx, cfg, samples)
        key = partial(_item_key, ctx, cfg)
        ctx.tally.need("generations", len({key(item) for item in items}))
        if all(key(item) in ctx.caches.generations for item in items):
            continue
        target: ChatModel | None = target_loader(cfg)
        try:
            done = compute_missing(
                ctx.caches.generations,
                # Grouped by length, so a batch holds prompts of similar size (less padding).
                sorted(items, key=lambda item: (item.sample.benign, item.sample.k)),
                key,
                partial(_generate_batch, ctx, cfg, target),
                workload_chunk(ctx.config, cfg, target),
                desc=f"generate {cfg.label}",
            )
            ctx.tally.add_computed("generations", done)
        finally:
            close_model(target)
            # Drop the last reference too: the next loader runs before this name is rebound.
            target = None
            gc.collect()


def _item_key(ctx: RunContext, target: TargetConfig, item: Generation) -> tuple:
    return generation_key(ctx, target, item.sample, item.system)


def workload_chunk(config: EvalConfig, cfg: TargetConfig, target: Any) -> int:
    """How many pending requests one ``target.generate`` call gets.

    A target that schedules its own batches (vLLM; any target with ``batches_internally``) gets
    ``config.workload_chunk`` requests per call (default 1024): the
    engine sees a large workload, yet each chunk's replies are cached as soon as it returns, so an
    interrupted run loses at most one chunk and only one chunk's decoded images are in memory.
    Feeding the whole workload in one call would lose resume granularity and hold every image of a
    SafeMT-scale run (~10^5 requests) in RAM. A target that generates everything it is given as one
    padded batch (today's HF backend) gets ``batch_size`` requests.
    """
    if target_backend(cfg.backend).model_class.batches_internally or getattr(target, "batches_internally", False):
        return config.workload_chunk
    return config.batch_size


def _generate_batch(ctx: RunContext, cfg: TargetConfig, target: ChatModel, batch: list[Generation]) -> list[dict]:
    # A text-only target (images: false) gets the text alone; its images are not even opened.
    images = open_images([item.sample for item in batch]) if cfg.images else [[] for _ in batch]
    requests = [
        ChatRequest(dialogue=item.sample.dialogue, system=item.system, image=imgs[0] if imgs else None)
        for item, imgs in zip(batch, images, strict=True)
    ]
    replies = target.generate(requests, ctx.config.max_new_tokens)
    sig = target_sig(ctx.config, cfg)
    return [
        {
            "target": cfg.label,
            "sig": sig,
            "id": item.sample.id,
            "k": item.sample.k,
            "benign": item.sample.benign,
            "system_sig": settings_digest({"system": item.system}),
            "system": item.system,
            "reply": reply,
        }
        for item, reply in zip(batch, replies, strict=True)
    ]


def close_model(model: Any) -> None:
    """Free a target, guard or judge before the next model loads (``close()`` when it has one)."""
    closer = getattr(model, "close", None)
    if callable(closer):
        closer()
