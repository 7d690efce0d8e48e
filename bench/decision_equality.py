"""The one-step decision against the full answer on a trained export, per test set:
``python -m bench.decision_equality --model runs/smollm2/export --sets runs/smollm2/sets [--per-set 20]``.

For the first ``--per-set`` records of every test set (``bench.efficacy_data``'s held-out sets, each
dialogue with its photo), ``Moderator.moderate`` once with the whole answer decoded (``answer="full"``, 64
new tokens) and once with the decision alone (``answer="decision"``). Prints, per set: rows, rows the
full answer flags, verdicts that agree, categories that agree where the full answer parses, and the mean
wall time of each; then every disagreement with its reason (the full answer's text). Not a test: the
tests check the same equality on the scripted tiny model and the real-weights LoRA run
(``tests/test_decision.py``, ``tests/test_real_base.py``); this reruns it on a trained export.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from moderator.contract import DECISION, FULL_ANSWER
from moderator.inference import Moderator


@dataclass
class SetResult:
    name: str
    rows: int = 0
    flagged: int = 0
    verdicts_equal: int = 0
    parsed_flagged: int = 0
    categories_equal: int = 0
    full_s: float = 0.0
    decision_s: float = 0.0
    disagreements: list[str] = field(default_factory=list)


def compare_set(moderator: Moderator, name: str, records: Sequence[dict], max_new_tokens: int) -> SetResult:
    result = SetResult(name)
    for record in records:
        with Image.open(record["image"]) as image:
            images = [image.convert("RGB")]
        start = time.perf_counter()
        full = moderator.moderate(record["dialogue"], images, answer=FULL_ANSWER, max_new_tokens=max_new_tokens)
        middle = time.perf_counter()
        decision = moderator.moderate(record["dialogue"], images, answer=DECISION)
        result.decision_s += time.perf_counter() - middle
        result.full_s += middle - start
        result.rows += 1
        result.flagged += full.flagged
        result.verdicts_equal += decision.verdict == full.verdict
        if full.flagged and not full.parse_error:
            result.parsed_flagged += 1
            result.categories_equal += decision.category == full.category
        if decision.verdict != full.verdict or (
            full.flagged and not full.parse_error and decision.category != full.category
        ):
            result.disagreements.append(
                f"{record['id']}: full {full.verdict}/{full.category} (p={full.p_unsafe:.3f}, "
                f"parse_error={full.parse_error}, answer {full.raw!r}, forced {full.forced_raw!r}); "
                f"decision {decision.verdict}/{decision.category} (parse_error={decision.parse_error})"
            )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from bench.efficacy_data import find_test_sets, load_test_set

    parser = argparse.ArgumentParser(prog="python -m bench.decision_equality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained moderator export (verified at load)")
    parser.add_argument("--sets", required=True, help="bench.efficacy_data's output folder")
    parser.add_argument("--per-set", type=int, default=20, help="records per test set")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the full answer's length")
    parser.add_argument("--no-verify", action="store_true", help="a training output rather than an export")
    parser.add_argument("--only", nargs="+", default=None, help="these test sets only")
    args = parser.parse_args(argv)
    sets = {k: v for k, v in find_test_sets(args.sets).items() if args.only is None or k in args.only}
    if not sets:
        parser.error(f"--sets {args.sets}: no test sets (run python -m bench.efficacy_data --out {args.sets})")
    moderator = Moderator.from_pretrained(args.model, verify=not args.no_verify)
    results = [
        compare_set(moderator, name, load_test_set(path)[: args.per_set], args.max_new_tokens)
        for name, path in sets.items()
    ]
    print(f"\nmodel: {Path(args.model)}; threshold {moderator.threshold}; first {args.per_set} records per set\n")
    print("| set | rows | flagged (full) | verdicts equal | categories equal (full parses) | full ms | decision ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.name} | {r.rows} | {r.flagged} | {r.verdicts_equal}/{r.rows} | {r.categories_equal}/{r.parsed_flagged}"
            f" | {r.full_s / max(r.rows, 1) * 1e3:.0f} | {r.decision_s / max(r.rows, 1) * 1e3:.0f} |"
        )
    rows = sum(r.rows for r in results)
    verdicts = sum(r.verdicts_equal for r in results)
    parsed = sum(r.parsed_flagged for r in results)
    categories = sum(r.categories_equal for r in results)
    print(f"\nverdicts equal: {verdicts} of {rows}; categories equal: {categories} of {parsed} flagged rows that parse")
    for r in results:
        for line in r.disagreements:
            print(f"disagreement ({r.name}) {line}")
    return 0 if verdicts == rows and categories == parsed else 1


if __name__ == "__main__":
    raise SystemExit(main())
