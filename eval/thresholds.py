"""The moderator's decision threshold for one eval run, fixed on the validation split before the attack.

An explicit threshold in the defence's config wins; otherwise the smallest threshold whose FPR on the
benign validation rows meets ``target_fpr``; without validation data (or when only flagging nothing
meets the budget) the threshold the checkpoint records. ``report.json`` records the choice under
``thresholds.<defence>``, which ``python -m export`` checks against the threshold it ships.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from eval.metrics import threshold_for_fpr
from moderator.artefacts import DEFAULT_THRESHOLD, flags, resolve_threshold, within_threshold_bounds

if TYPE_CHECKING:
    from eval.defences import DefenceDecision


THRESHOLD_SOURCES = ("validation", "explicit", "manifest")


@dataclass(frozen=True)
class ThresholdChoice:
    """The moderator's decision threshold for one eval run, fixed before the attack phase.

    Every decision of the run (attack samples, benign samples, test split) is made at ``threshold``,
    and ``report.json`` records it under ``thresholds.<defence>``, which ``python -m export`` checks
    against the threshold it ships.
    """

    threshold: float
    source: str  # validation (threshold_for_fpr at target_fpr) | explicit (the eval config) | manifest
    detail: str  # the same in words, for the report
    target_fpr: float | None = None  # the FPR budget (source validation, or validation data present)
    validation_fpr: float | None = None  # benign validation rows flagged at ``threshold`` (parse errors count)
    n_validation: int = 0
    n_validation_benign: int = 0

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def choose_threshold(
    config: Any,
    validation: Sequence[DefenceDecision] = (),
    validation_benign: Sequence[bool] = (),
    target_fpr: float | None = None,
) -> ThresholdChoice:
    """The threshold a moderator defence uses for a whole run.

    An explicit ``threshold`` in the defence's config wins. Otherwise, with validation decisions,
    the smallest threshold whose FPR on the benign validation rows is <= ``target_fpr``
    (``eval.metrics.threshold_for_fpr`` on their P(unsafe)). Without validation data, or when only
    "flag nothing" meets the budget, the threshold the checkpoint records (``moderator_config.json``
    , else ``DEFAULT_THRESHOLD``).
    """

    if len(validation) != len(validation_benign):
        raise ValueError(f"{len(validation)} validation decisions for {len(validation_benign)} labels")
    scores = [d.score if d.score is not None else float(d.flagged) for d in validation]
    n_benign = sum(1 for benign in validation_benign if benign)
    budget = {"target_fpr": target_fpr} if validation else {}
    if config.threshold is not None:
        threshold, source, detail = float(config.threshold), "explicit", "set in the eval config"
    elif validation and n_benign:
        threshold = threshold_for_fpr([0 if b else 1 for b in validation_benign], scores, target_fpr)
        threshold = threshold if math.isinf(threshold) else within_threshold_bounds(threshold)
        source, detail = "validation", f"smallest threshold with FPR <= {target_fpr} on the validation split"
        if math.isinf(threshold):
            threshold, source = resolve_threshold(config.model), "manifest"
            detail = (
                f"no threshold keeps the validation FPR <= {target_fpr} (only flagging nothing does), so the "
                f"checkpoint's recorded threshold is used ({DEFAULT_THRESHOLD} when it records none)"
            )
    else:
        threshold, source = resolve_threshold(config.model), "manifest"
        detail = f"no validation data: the checkpoint's recorded threshold ({DEFAULT_THRESHOLD} when it records none)"
    flagged_benign = sum(
        1
        for decision, score, benign in zip(validation, scores, validation_benign, strict=True)
        if benign and flags(score, threshold, decision.parse_error)  # as served: fail-closed
    )
    return ThresholdChoice(
        threshold=float(threshold),
        source=source,
        detail=detail,
        validation_fpr=flagged_benign / n_benign if n_benign else None,
        n_validation=len(validation),
        n_validation_benign=n_benign,
        **budget,
    )
