"""Turns to detection (a part of :class:`eval.loop.EvalRun`): when each defence first flags a SafeMT dialogue.

For every harmful SafeMT sample of the run (or shard) and every defence that detects (``none``
excluded), the defence decides on each prefix of the dialogue that ends at a user turn: the moderator
through ``Moderator.moderate_turns`` (one verdict per user turn, reusing the earlier turns' cache,
flagged at the run's threshold as its policy/block decisions are), a guard on each prefix as a
dialogue of its own (:meth:`eval.defences.Defence.decide_per_turn`; the whole dialogue's verdict is
its phase-1 decision, so a guard's last flag is the one that blocked). The per-turn flags are cached per
(defence, settings, id, k) in ``turn_flags.jsonl`` like the other stages, so shards compute them and
the merging run finds them cached. They are computed in the decision phase, while the defence's model
is loaded anyway (:meth:`eval.decisions.DecisionStage.decide`). :meth:`TurnDetectionStage.first_detections`
turns them into :class:`eval.detection.FirstDetection` records for :func:`eval.detection.turns_to_detection`.
Off with ``turns_to_detection: false`` in the eval config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from eval.cache import JsonlCache
from eval.config import DefenceConfig, EvalConfig
from eval.defences import Defence, DefenceDecision
from eval.detection import FirstDetection, first_flagged_turn, turns_to_detection
from eval.inputs import EvalSample, open_images
from eval.progress import RunTally

TURN_FLAGS_FILE = "turn_flags.jsonl"
TURN_FLAGS_KEY = ("defence", "sig", "id", "k")


class TurnDetectionStage:
    """Per-turn flags of the detecting defences on the harmful samples; needs :class:`eval.keys.CacheKeys`."""

    config: EvalConfig
    turn_flags: JsonlCache
    tally: RunTally
    _defence_sig: Callable[[DefenceConfig], str]
    decision: Callable[..., DefenceDecision]  # eval.decisions.DecisionStage

    @property
    def turns_to_detection_enabled(self) -> bool:
        return bool(getattr(self.config, "turns_to_detection", True))

    def _turn_flag_key(self, cfg: DefenceConfig, sample: EvalSample) -> tuple:
        return (cfg.label, self._defence_sig(cfg), sample.id, sample.k)

    def _detection_samples(self, group: Sequence[DefenceConfig], samples: Sequence[EvalSample]) -> list[EvalSample]:
        """The harmful samples whose per-turn flags this group of defences gives (none for ``none``, or when off)."""
        if not self.turns_to_detection_enabled or group[0].kind == "none":
            return []
        return [sample for sample in samples if not sample.benign]

    def missing_turn_flags(self, group: Sequence[DefenceConfig], samples: Sequence[EvalSample]) -> list[EvalSample]:
        """The harmful samples some defence of ``group`` has no cached per-turn flags for (counted in the tally)."""
        wanted = self._detection_samples(group, samples)
        if wanted:
            self.tally.need("detections", len(wanted))
        return [s for s in wanted if any(self._turn_flag_key(cfg, s) not in self.turn_flags for cfg in group)]

    def compute_turn_flags(
        self, group: Sequence[DefenceConfig], defence: Defence, samples: Sequence[EvalSample], progress: Any
    ) -> None:
        """Decide every user-turn prefix of ``samples``, a batch at a time, appending each batch's records.

        Defences of one group (the moderator's policy and block modes) share the pass and flag alike.
        """
        batch_size = self.config.batch_size
        for start in range(0, len(samples), batch_size):
            batch = list(samples[start : start + batch_size])
            images = open_images(batch)
            if group[0].kind == "moderator":
                per_turn = defence.decide_per_turn([s.dialogue for s in batch], images)
            else:
                # A guard's verdict on the whole dialogue is its phase-1 decision (the same call on the same
                # input), so only the shorter prefixes run; its last flag is then the flag that blocked.
                shorter = defence.decide_per_turn([s.dialogue[:-2] for s in batch], images)
                per_turn = [[*earlier, self.decision(group[0], s)] for earlier, s in zip(shorter, batch, strict=True)]
            records = []
            for cfg in group:
                for sample, decisions in zip(batch, per_turn, strict=True):
                    if len(decisions) != sample.k:
                        raise RuntimeError(f"{cfg.label}: {len(decisions)} per-turn decisions for {sample.key}")
                    key = dict(zip(TURN_FLAGS_KEY, self._turn_flag_key(cfg, sample), strict=True))
                    records.append(
                        {
                            **key,
                            "flags": [bool(d.flagged) for d in decisions],
                            "scores": [d.score for d in decisions],
                        }
                    )
            self.turn_flags.append(records)
            self.tally.add_computed("detections", len(batch))
            progress.update(len(batch))

    def first_detections(self, samples: Sequence[EvalSample]) -> list[FirstDetection]:
        """One record per harmful sample and detecting defence: the first user turn it flagged at (None: never)."""
        records = []
        for cfg in self.config.defences:
            for sample in self._detection_samples([cfg], samples):
                cached = self.turn_flags.get(self._turn_flag_key(cfg, sample))
                if cached is None:
                    raise RuntimeError(f"no cached per-turn flags of {cfg.label} for {sample.key}")
                first = first_flagged_turn(cached["flags"])
                records.append(FirstDetection(sample_id=sample.id, turns=sample.k, defence=cfg.label, first_turn=first))
        return records

    def turns_to_detection_summary(self, samples: Sequence[EvalSample]) -> dict[str, Any] | None:
        """:func:`eval.detection.turns_to_detection` over :meth:`first_detections`; None when off or empty."""
        records = self.first_detections(samples) if self.turns_to_detection_enabled else []
        return turns_to_detection(records) if records else None
