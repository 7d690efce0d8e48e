"""Turns to detection: at which user turn each defence first flags a SafeMT dialogue.

The eval moderates every prefix of a dialogue (the conversation up to and including user turn j,
``j = 1..turns``) and records one :class:`FirstDetection` per (SafeMT id, dialogue length, defence):
the first user turn whose prefix was flagged, or None when no prefix was. :func:`turns_to_detection`
summarises them per dialogue length and defence:

- ``flagged_by_turn``: for every j = 1..length, the share of dialogues flagged at turn j or earlier
  (cumulative, so it never decreases), with its Wilson score interval;
- ``mean_first_turn``: the mean first-flagged turn over the dialogues that were flagged, with a
  percentile bootstrap interval over SafeMT ids (a resample with no flagged dialogue is left out);
- ``never_flagged``: the share of dialogues no prefix of which was flagged, with its Wilson interval.

The bootstrap is seeded and draws ids in a fixed order (not the records' order), so the same records
give the same summary byte for byte, whichever order they come in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from eval.metrics import (
    DEFAULT_CONFIDENCE,
    BootstrapSettings,
    id_order,
    percentile_interval,
    resample_counts,
    wilson_interval,
)


def first_flagged_turn(flags: Sequence[bool]) -> int | None:
    """The 1-based index of the first True in ``flags`` (one flag per user turn), None if none is True."""
    for index, flag in enumerate(flags):
        if not isinstance(flag, bool):
            raise ValueError(f"flags[{index}] must be True or False, got {flag!r}")
        if flag:
            return index + 1
    return None


@dataclass(frozen=True)
class FirstDetection:
    """One dialogue under one defence: the first user turn whose prefix was flagged (None: never)."""

    sample_id: str
    turns: int  # the dialogue's length in user turns
    defence: str
    first_turn: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked(records: Iterable[FirstDetection]) -> list[FirstDetection]:
    """Validate every record once; a bad one is named (index, id, field) instead of failing later."""
    checked: list[FirstDetection] = []
    seen: set[tuple[str, int, str]] = set()
    for index, record in enumerate(records):
        if not isinstance(record, FirstDetection):
            raise ValueError(f"record {index}: expected a FirstDetection, got {type(record).__name__}")
        where = f"record {index} (sample_id={record.sample_id!r}, defence={record.defence!r})"
        if not isinstance(record.sample_id, str) or not record.sample_id:
            raise ValueError(f"record {index}: field 'sample_id' must be a non-empty string, got {record.sample_id!r}")
        if not isinstance(record.defence, str) or not record.defence:
            raise ValueError(f"{where}: field 'defence' must be a non-empty string")
        if not _is_int(record.turns) or record.turns < 1:
            raise ValueError(f"{where}: field 'turns' must be a positive int, got {record.turns!r}")
        first = record.first_turn
        if first is not None and (not _is_int(first) or not 1 <= first <= record.turns):
            raise ValueError(f"{where}: field 'first_turn' must be None or an int in 1..{record.turns}, got {first!r}")
        key = (record.sample_id, record.turns, record.defence)
        if key in seen:
            raise ValueError(
                f"{where}: duplicate record for sample_id={record.sample_id!r}, turns={record.turns}, "
                f"defence={record.defence!r}"
            )
        seen.add(key)
        checked.append(record)
    return checked


def _interval(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]


def _mean_first_turn_interval(group: list[FirstDetection], settings: BootstrapSettings) -> list[float] | None:
    """Percentile bootstrap interval of the mean first turn among flagged dialogues, resampling ids."""
    import numpy as np

    by_id = {record.sample_id: record.first_turn for record in group}
    ids = id_order(by_id)
    flagged = np.array([0.0 if by_id[i] is None else 1.0 for i in ids])
    first = np.array([0.0 if by_id[i] is None else float(by_id[i]) for i in ids])
    if not flagged.any():
        return None
    means = []
    for counts in resample_counts(len(ids), settings):
        n_flagged = counts @ flagged
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append(np.where(n_flagged > 0, (counts @ first) / np.maximum(n_flagged, 1), np.nan))
    interval = percentile_interval(np.concatenate(means), settings.confidence)
    return None if interval is None else [round(interval[0], 4), round(interval[1], 4)]


def _summary(group: list[FirstDetection], length: int, settings: BootstrapSettings) -> dict[str, Any]:
    n = len(group)
    firsts = [record.first_turn for record in group if record.first_turn is not None]
    by_turn = []
    for j in range(1, length + 1):
        flagged = sum(1 for first in firsts if first <= j)
        by_turn.append(
            {
                "turn": j,
                "n_flagged": flagged,
                "share": flagged / n,
                "ci": _interval(wilson_interval(flagged, n, settings.confidence)),
            }
        )
    never = n - len(firsts)
    return {
        "n": n,
        "flagged_by_turn": by_turn,
        "n_flagged": len(firsts),
        "mean_first_turn": round(sum(firsts) / len(firsts), 4) if firsts else None,
        "mean_first_turn_ci": _mean_first_turn_interval(group, settings),
        "n_never_flagged": never,
        "never_flagged": never / n,
        "never_flagged_ci": _interval(wilson_interval(never, n, settings.confidence)),
    }


def turns_to_detection(
    records: Iterable[FirstDetection],
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    bootstrap: BootstrapSettings | None = None,
) -> dict[str, Any]:
    """Per dialogue length and defence: share flagged by each turn, mean first turn, share never flagged.

    Returns a JSON-ready dict (lengths as string keys in increasing order, defences sorted)::

        {"intervals": {...how they were drawn...},
         "by_length": {"4": {"moderator": {"n": 4, "flagged_by_turn": [{"turn": 1, "n_flagged": 1,
                      "share": 0.25, "ci": [low, high]}, ...], "n_flagged": 3, "mean_first_turn": 2.0,
                      "mean_first_turn_ci": [low, high], "n_never_flagged": 1, "never_flagged": 0.25,
                      "never_flagged_ci": [low, high]}}}}

    ``confidence`` is the level of every interval; ``bootstrap`` (resamples and seed of the mean first
    turn's interval, default 1000 resamples, seed 0) must have the same confidence if given. A record
    with ``first_turn`` outside 1..turns, or a repeated (sample_id, turns, defence), is an error naming it.
    """
    settings = bootstrap or BootstrapSettings(confidence=confidence)
    if settings.confidence != confidence:
        raise ValueError(f"bootstrap.confidence ({settings.confidence}) differs from confidence ({confidence})")
    groups: dict[int, dict[str, list[FirstDetection]]] = defaultdict(lambda: defaultdict(list))
    for record in _checked(records):
        groups[record.turns][record.defence].append(record)
    return {
        "intervals": {
            **settings.to_dict(),
            "flagged_by_turn_and_never_flagged": "Wilson score interval",
            "mean_first_turn": "percentile bootstrap over SafeMT ids (resamples without a flagged dialogue left out)",
        },
        "by_length": {
            str(length): {
                defence: _summary(groups[length][defence], length, settings) for defence in sorted(groups[length])
            }
            for length in sorted(groups)
        },
    }
