"""The cache keys of the eval's stages (a part of :class:`eval.loop.EvalRun`).

A cached record is reused only when everything that decided it is in its key: a defence decision by
(defence, settings incl. the run's threshold, id, k, benign); a validation-split score by the settings
without the threshold (choosing the threshold never invalidates it); a reply by (target, settings incl.
whether it sees images, id, k, benign, system prompt); a judged row by (target, defence, judge, id, k,
benign, all their settings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eval.cache import settings_digest
from eval.config import DefenceConfig, EvalConfig, TargetConfig
from eval.defences import defence_settings, score_settings
from eval.inputs import THRESHOLD_SPLIT, EvalSample, SplitRow
from eval.judge import Judge, judge_settings
from eval.thresholds import ThresholdChoice

if TYPE_CHECKING:
    from eval.generation import Generation


class CacheKeys:
    """Signatures and cache keys; memoised, since a moderator's settings hash files on disk."""

    config: EvalConfig
    judge: Judge | None
    thresholds: dict[str, ThresholdChoice]
    _defence_sigs: dict[tuple[str, float | None], str]
    _score_sigs: dict[str, str]

    def _defence_sig(self, defence: DefenceConfig) -> str:
        threshold = None
        if defence.kind == "moderator":
            if defence.label not in self.thresholds:
                raise RuntimeError(f"{defence.label}: its threshold is chosen in decide() before any decision")
            threshold = self.thresholds[defence.label].threshold
        # Memoised: the moderator's settings hash files on disk (see defence_settings).
        memo = (defence.label, threshold)
        if memo not in self._defence_sigs:
            self._defence_sigs[memo] = settings_digest(defence_settings(defence, threshold))
        return self._defence_sigs[memo]

    def _score_sig(self, defence: DefenceConfig) -> str:
        if defence.label not in self._score_sigs:
            self._score_sigs[defence.label] = settings_digest(score_settings(defence))
        return self._score_sigs[defence.label]

    def _target_sig(self, target: TargetConfig) -> str:
        settings = {
            "model": target.model,
            "backend": target.backend,
            "dtype": target.dtype,
            "system_prompt": target.system_prompt,
            "max_new_tokens": self.config.max_new_tokens,
            # A reply to the text alone is not a reply to text and image: never reuse one for the other.
            "images": target.images,
        }
        return settings_digest(settings)

    @property
    def judge_name(self) -> str:
        return self.judge.name if self.judge is not None else self.config.judge.label

    def _judge_settings(self) -> dict[str, Any]:
        base = self.judge.settings if self.judge is not None else judge_settings(self.config.judge)
        return {**base, "refusal_check": self.config.judge.refusal_check}

    def _row_sig(self, target: TargetConfig, defence: DefenceConfig) -> str:
        return settings_digest(
            {
                "target": self._target_sig(target),
                "defence": self._defence_sig(defence),
                "judge": self._judge_settings(),
                "refusal_text": self.config.refusal_text,
            }
        )

    def _decision_key(self, defence: DefenceConfig, item: EvalSample | SplitRow) -> tuple:
        # Validation rows serve only their P(unsafe), which the threshold does not change.
        threshold_row = isinstance(item, SplitRow) and item.split == THRESHOLD_SPLIT
        sig = self._score_sig(defence) if threshold_row else self._defence_sig(defence)
        return (defence.label, sig, *item.key)

    def _generation_key(self, target: TargetConfig, item: Generation) -> tuple:
        return (target.label, self._target_sig(target), *item.sample.key, settings_digest({"system": item.system}))

    def _row_key(self, target: TargetConfig, defence: DefenceConfig, sample: EvalSample) -> tuple:
        return (target.label, defence.label, self.judge_name, *sample.key, self._row_sig(target, defence))
