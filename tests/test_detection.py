"""Turns to detection (eval.detection): hand-computed shares, Wilson bounds from the formula, bootstrap."""

from __future__ import annotations

import json
import math
import random

import pytest

from eval.detection import FirstDetection, first_flagged_turn, turns_to_detection
from eval.metrics import BootstrapSettings

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval written out from its formula (not through scipy, which the module uses)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [centre - half, centre + half]


def test_first_flagged_turn_is_one_based_and_none_when_never_flagged():
    assert first_flagged_turn([True, False]) == 1
    assert first_flagged_turn([False, True, True]) == 2
    assert first_flagged_turn([False, False, False, True]) == 4
    assert first_flagged_turn([False, False]) is None
    assert first_flagged_turn([]) is None
    with pytest.raises(ValueError, match=r"flags\[1\] must be True or False, got None"):
        first_flagged_turn([False, None, True])


# Four 4-turn dialogues under the moderator, first flagged at turns 1, 2, 2 and never.
MODERATOR = [
    FirstDetection("a", 4, "moderator", 1),
    FirstDetection("b", 4, "moderator", 2),
    FirstDetection("c", 4, "moderator", 2),
    FirstDetection("d", 4, "moderator", None),
]


def test_shares_by_turn_mean_first_turn_and_never_flagged_are_hand_computed():
    summary = turns_to_detection(MODERATOR)
    s = summary["by_length"]["4"]["moderator"]
    assert s["n"] == 4 and s["n_flagged"] == 3 and s["n_never_flagged"] == 1
    # Cumulative: 1 flagged by turn 1, 3 by turn 2, still 3 by turns 3 and 4.
    assert [t["turn"] for t in s["flagged_by_turn"]] == [1, 2, 3, 4]
    assert [t["n_flagged"] for t in s["flagged_by_turn"]] == [1, 3, 3, 3]
    assert [t["share"] for t in s["flagged_by_turn"]] == [0.25, 0.75, 0.75, 0.75]
    for entry in s["flagged_by_turn"]:
        assert entry["ci"] == pytest.approx(wilson(entry["n_flagged"], 4), abs=1e-9)
    assert s["flagged_by_turn"][0]["ci"] == pytest.approx([0.045587, 0.699358], abs=1e-6)
    assert s["mean_first_turn"] == pytest.approx(round(5 / 3, 4))
    assert s["never_flagged"] == 0.25
    assert s["never_flagged_ci"] == pytest.approx(wilson(1, 4), abs=1e-9)
    # Resamples of {a, d} only (p = 0.5^4 - 0.25^4 ~ 0.059) give mean 1, of {b, c, d} (p ~ 0.31) give 2,
    # both above the 2.5% tails: the percentile interval is exactly [1, 2].
    assert s["mean_first_turn_ci"] == [1.0, 2.0]


def test_summary_is_split_by_length_and_defence_in_a_fixed_order():
    records = [
        *MODERATOR,
        FirstDetection("a", 2, "moderator", 2),
        FirstDetection("a", 2, "llama_guard", None),
        FirstDetection("b", 2, "llama_guard", None),
    ]
    summary = turns_to_detection(records)
    assert list(summary["by_length"]) == ["2", "4"]
    assert list(summary["by_length"]["2"]) == ["llama_guard", "moderator"]
    guard = summary["by_length"]["2"]["llama_guard"]
    # Never flagged: no mean first turn and no interval for it, not a made-up 0.
    assert guard["mean_first_turn"] is None and guard["mean_first_turn_ci"] is None
    assert guard["never_flagged"] == 1.0 and [t["share"] for t in guard["flagged_by_turn"]] == [0.0, 0.0]
    assert guard["never_flagged_ci"] == pytest.approx(wilson(2, 2), abs=1e-9)
    # One length-2 dialogue flagged at turn 2: the same first turn in every resample.
    assert summary["by_length"]["2"]["moderator"]["mean_first_turn_ci"] == [2.0, 2.0]
    # Another length's records do not change this one's numbers.
    assert summary["by_length"]["4"] == turns_to_detection(MODERATOR)["by_length"]["4"]


def test_summary_is_identical_for_shuffled_records_and_uses_the_seed():
    records = [FirstDetection(f"id{i}", 4, "moderator", [1, 2, 3, 4, None][i % 5]) for i in range(40)]
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    summary = turns_to_detection(records)
    assert json.dumps(turns_to_detection(shuffled)) == json.dumps(summary)
    assert summary["intervals"]["seed"] == 0 and summary["intervals"]["n_resamples"] == 1000
    other_seed = turns_to_detection(records, bootstrap=BootstrapSettings(seed=1))
    assert (
        other_seed["by_length"]["4"]["moderator"]["mean_first_turn_ci"]
        != (summary["by_length"]["4"]["moderator"]["mean_first_turn_ci"])
    )
    low, high = summary["by_length"]["4"]["moderator"]["mean_first_turn_ci"]
    assert low < summary["by_length"]["4"]["moderator"]["mean_first_turn"] == 2.5 < high


def test_the_confidence_level_is_used_for_every_interval():
    s90 = turns_to_detection(MODERATOR, confidence=0.90)["by_length"]["4"]["moderator"]
    z90 = 1.6448536269514722
    assert s90["flagged_by_turn"][1]["ci"] == pytest.approx(wilson(3, 4, z90), abs=1e-9)
    with pytest.raises(ValueError, match="differs from confidence"):
        turns_to_detection(MODERATOR, confidence=0.9, bootstrap=BootstrapSettings())


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            FirstDetection("x", 4, "moderator", 5),
            r"sample_id='x'.*'first_turn' must be None or an int in 1\.\.4, got 5",
        ),
        (FirstDetection("x", 4, "moderator", 0), r"'first_turn' must be None or an int in 1\.\.4, got 0"),
        (FirstDetection("x", 0, "moderator", None), r"'turns' must be a positive int, got 0"),
        (FirstDetection("x", 4, "", 1), r"'defence' must be a non-empty string"),
        (FirstDetection("x", 4, "moderator", True), r"'first_turn' must be None or an int"),
    ],
)
def test_a_bad_record_is_named(record, message):
    with pytest.raises(ValueError, match=message):
        turns_to_detection([*MODERATOR, record])


def test_a_duplicate_record_is_an_error_naming_it():
    with pytest.raises(
        ValueError, match=r"record 4 .*duplicate record for sample_id='b', turns=4, defence='moderator'"
    ):
        turns_to_detection([*MODERATOR, FirstDetection("b", 4, "moderator", 3)])
    # The same id at another length or under another defence is not a duplicate.
    turns_to_detection([*MODERATOR, FirstDetection("b", 2, "moderator", 1), FirstDetection("b", 4, "guard", 3)])
