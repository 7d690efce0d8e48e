"""Safety Index and ASR per length from judge labels in the SafeMT reference layout.

    python -m eval.safety_index --labels DIR [--turns 1 2 4 6 8]

``DIR/<k>/label/<model>.json`` is a JSON list of records, each with at least ``id`` and
``safety_label`` (the SafeMT judge script writes the judge's answer under ``safety_label``, keyed by
``id``). Every model with a file at any length is scored. Prints to stdout::

    {"models": {"<model>": {"si": 0.1234, "si_reason": null, "asr": {"1": 0.5, "2": ...},
                            "n_labelled": {"1": 2, ...},
                            "outcomes": {"1": {"safe": 1, "unsafe": 1, "unparsed": 0, "error": 0,
                                               "content_filter": 0}, ...}}}}

``si`` is null, with ``si_reason`` saying why (and a warning on stderr), when a length has no
``safe``/``unsafe`` label: its file is missing, or every answer there is an error, a content-filter
refusal or unparsed; that length's ``asr`` is null too. Pass ``--turns`` with the lengths you have to
score those. A malformed file is an error naming the file (and entry), exit code 2. Differences
from the reference ``scripts/score/score.py``: it skips unreadable files with a printed message and
accepts a single JSON object as a one-record file; here both are errors, since they silently change
the SI. It also counts a length without labels as ASR 0, so all-error labels score a perfect 1.0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.metrics import SAFEMT_TURNS, safety_index_result
from moderator.contract import SAFE, UNSAFE

LABEL_FIELDS = ("id", "safety_label")


class LabelFileError(ValueError):
    """A label file cannot be scored; the message names the file (and entry)."""


def label_path(labels_dir: Path, k: int, model: str) -> Path:
    return labels_dir / str(k) / "label" / f"{model}.json"


def find_models(labels_dir: Path, turns: Sequence[int]) -> list[str]:
    """Every model with a label file at any of the given lengths, sorted."""
    return sorted({path.stem for k in turns for path in (labels_dir / str(k) / "label").glob("*.json")})


def load_label_file(path: Path, k: int) -> list[dict[str, Any]]:
    """Read one ``<k>/label/<model>.json`` into results ``{"id", "k", "label"}``."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LabelFileError(f"{path}: cannot read JSON: {error}") from error
    if not isinstance(records, list):
        raise LabelFileError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    results = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise LabelFileError(f"{path}: entry {index}: expected an object, got {type(record).__name__}")
        for field in LABEL_FIELDS:
            if field not in record:
                raise LabelFileError(f"{path}: entry {index} (id={record.get('id')!r}): missing field {field!r}")
        if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
            raise LabelFileError(f"{path}: entry {index}: field 'id' must be a string or int, got {record['id']!r}")
        results.append({"id": record["id"], "k": k, "label": record["safety_label"]})
    return results


def score_labels(labels_dir: Path, turns: Sequence[int] = SAFEMT_TURNS, warn=None) -> dict[str, Any]:
    """Score every model under ``labels_dir``; ``warn(message)`` receives the warnings."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    if not labels_dir.is_dir():
        raise LabelFileError(f"{labels_dir}: not a directory")
    models = find_models(labels_dir, turns)
    if not models:
        raise LabelFileError(
            f"{labels_dir}: no label files found (expected <dir>/<k>/label/<model>.json for k in {list(turns)})"
        )
    scores: dict[str, Any] = {}
    for model in models:
        results: list[dict[str, Any]] = []
        for k in turns:
            path = label_path(labels_dir, k, model)
            if not path.is_file():
                warn(f"{path} is missing: {model} has no labelled reply at length {k}")
                continue
            results.extend(load_label_file(path, k))
        result = safety_index_result(results, turns)
        for k, counts in result.counts.items():
            excluded = {outcome: n for outcome, n in counts.items() if n and outcome not in (SAFE, UNSAFE)}
            if excluded:
                described = ", ".join(f"{n} {outcome}" for outcome, n in excluded.items())
                warn(
                    f"{label_path(labels_dir, k, model)}: {described} record(s) with a safety_label other than "
                    "exactly 'safe'/'unsafe' are left out of the ASR"
                )
        if result.si is None:
            warn(f"{model}: SI n/a: {result.reason}")
        scores[model] = result.to_dict()
    return {"models": scores}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.safety_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=Path, required=True, help="directory holding <k>/label/<model>.json")
    parser.add_argument(
        "--turns", type=int, nargs="+", default=list(SAFEMT_TURNS), help="dialogue lengths K (default 1 2 4 6 8)"
    )
    args = parser.parse_args(argv)
    try:
        report = score_labels(args.labels, args.turns)
    except ValueError as error:  # LabelFileError, or bad --turns from the metrics
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
