"""Turns to detection: when each defence first flags a SafeMT dialogue.

For every harmful SafeMT sample of the run (or shard) and every defence that detects (``none``
excluded), the defence decides on each prefix of the dialogue that ends at a user turn: the moderator
through ``Moderator.moderate_turns`` (one decision per user turn, no text decoded, reusing the earlier
turns' cache, flagged at the run's threshold as its policy/block decisions are), a guard on each prefix as a
dialogue of its own (:meth:`eval.defences.Defence.decide_per_turn`; the whole dialogue's verdict is
its phase-1 decision, so a guard's last flag is the one that blocked). The per-turn flags are cached per
(defence, settings, id, k) in ``turn_flags.jsonl`` like the other stages, so shards compute them and
the merging run finds them cached. They are computed in the decision phase, while the defence's model
is loaded anyway (:func:`eval.stages.decisions.decide`). :func:`first_detections` turns them into
:class:`eval.detection.FirstDetection` records for :func:`eval.detection.turns_to_detection`.
Off with ``turns_to_detection: false`` in the eval config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eval.config import DefenceConfig, EvalConfig
from eval.defences import Defence
from eval.detection import FirstDetection, first_flagged_turn, turns_to_detection
from eval.samples import EvalSample, open_images
from eval.stages.context import TURN_FLAGS_KEY, RunContext
from eval.stages.keys import cached_decision, turn_flag_key


def turns_to_detection_enabled(config: EvalConfig) -> bool:
    return bool(getattr(config, "turns_to_detection", True))


def detection_samples(
    config: EvalConfig, group: Sequence[DefenceConfig], samples: Sequence[EvalSample]
) -> list[EvalSample]:
    """The harmful samples whose per-turn flags this group of defences gives (none for ``none``, or when off)."""
    if not turns_to_detection_enabled(config) or group[0].kind == "none":
        return []
    return [sample for sample in samples if not sample.benign]


def missing_turn_flags(
    ctx: RunContext, group: Sequence[DefenceConfig], samples: Sequence[EvalSample]
) -> list[EvalSample]:
    """The harmful samples some defence of ``group`` has no cached per-turn flags for (counted in the tally)."""
    wanted = detection_samples(ctx.config, group, samples)
    if wanted:
        ctx.tally.need("detections", len(wanted))
    cache = ctx.caches.turn_flags
    return [s for s in wanted if any(turn_flag_key(ctx, cfg, s) not in cache for cfg in group)]


def compute_turn_flags(
    ctx: RunContext, group: Sequence[DefenceConfig], defence: Defence, samples: Sequence[EvalSample], progress: Any
) -> None:
    """Decide every user-turn prefix of ``samples``, a batch at a time, appending each batch's records.

    Defences of one group (the moderator's policy and block modes) share the pass and flag alike.
    """
    batch_size = ctx.config.batch_size
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        images = open_images(batch)
        if group[0].kind == "moderator":
            per_turn = defence.decide_per_turn([s.dialogue for s in batch], images)
        else:
            # A guard's verdict on the whole dialogue is its phase-1 decision (the same call on the same
            # input), so only the shorter prefixes run; its last flag is then the flag that blocked.
            shorter = defence.decide_per_turn([s.dialogue[:-2] for s in batch], images)
            per_turn = [
                [*earlier, cached_decision(ctx, group[0], s)] for earlier, s in zip(shorter, batch, strict=True)
            ]
        records = []
        for cfg in group:
            for sample, decisions in zip(batch, per_turn, strict=True):
                if len(decisions) != sample.k:
                    raise RuntimeError(f"{cfg.label}: {len(decisions)} per-turn decisions for {sample.key}")
                key = dict(zip(TURN_FLAGS_KEY, turn_flag_key(ctx, cfg, sample), strict=True))
                records.append(
                    {
                        **key,
                        "flags": [bool(d.flagged) for d in decisions],
                        "scores": [d.score for d in decisions],
                    }
                )
        ctx.caches.turn_flags.append(records)
        ctx.tally.add_computed("detections", len(batch))
        progress.update(len(batch))


def first_detections(ctx: RunContext, samples: Sequence[EvalSample]) -> list[FirstDetection]:
    """One record per harmful sample and detecting defence: the first user turn it flagged at (None: never)."""
    records = []
    for cfg in ctx.config.defences:
        for sample in detection_samples(ctx.config, [cfg], samples):
            cached = ctx.caches.turn_flags.get(turn_flag_key(ctx, cfg, sample))
            if cached is None:
                raise RuntimeError(f"no cached per-turn flags of {cfg.label} for {sample.key}")
            first = first_flagged_turn(cached["flags"])
            records.append(FirstDetection(sample_id=sample.id, turns=sample.k, defence=cfg.label, first_turn=first))
    return records


def turns_to_detection_summary(ctx: RunContext, samples: Sequence[EvalSample]) -> dict[str, Any] | None:
    """:func:`eval.detection.turns_to_detection` over :func:`first_detections`; None when off or empty."""
    records = first_detections(ctx, samples) if turns_to_detection_enabled(ctx.config) else []
    return turns_to_detection(records) if records else None
