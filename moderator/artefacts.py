"""The files one stage hands to another, each opened here and nowhere else, and the decision threshold.

| file                    | written by                      | read by                                   |
|-------------------------|---------------------------------|-------------------------------------------|
| ``stats.json``          | data prep (``write_stats``)     | training (``read_stats``)                 |
| ``moderator_run.json``  | training (``write_run_record``) | export, serving a training output         |
| ``moderator_config.json`` | export (``write_serving_config``) | serving (``read_serving_config``)     |
| ``report.json``         | eval (``write_eval_report``)    | export (``read_eval_report``)             |
| ``manifest.json``       | export (``moderator.manifest``) | every load of an export (``moderator.manifest``) |

The manifest's hashing and checking live in ``moderator.manifest``, which takes the file names from
here. The image bounds a model was trained with are a field of their own (``image_bounds``) in the run
record and the serving config, so no reader depends on a config class's name.

The decision threshold: one default (``DEFAULT_THRESHOLD``), one validator (``check_threshold``), one
flag rule (``flags``: a score at or above the threshold, a non-finite score, or an answer that did not
parse, all fail closed), and where a checkpoint's threshold comes from (``resolve_threshold``) or an
eval report's (``measured_threshold``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moderator.images import ImageBounds

STATS_FILE = "stats.json"
RUN_RECORD_FILE = "moderator_run.json"
SERVING_CONFIG_FILE = "moderator_config.json"
EVAL_REPORT_FILE = "report.json"
EXPORTED_EVAL_REPORT_FILE = "eval_report.json"  # the eval report as shipped inside an export
MANIFEST_FILE = "manifest.json"

DEFAULT_THRESHOLD = 0.5


class ModeratorConfigError(ValueError):
    """A file one stage handed to another is missing a field, malformed, or disagrees with the code."""


# --------------------------------------------------------------------------- the decision threshold


def check_threshold(value: Any, where: str) -> float:
    """A decision threshold strictly inside (0, 1): 0 flags everything and 1 nothing (the moderator is off)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ModeratorConfigError(f"{where}: decision threshold must be a number in (0, 1), got {value!r}")
    if not 0.0 < value < 1.0:
        raise ModeratorConfigError(f"{where}: decision threshold must be in (0, 1), got {value}")
    return float(value)


def flags(score: float | None, threshold: float, parse_error: bool = False) -> bool:
    """The flag rule, everywhere a score meets a threshold: fail-closed.

    A non-finite score flags (``NaN >= t`` alone is False and would pass the dialogue), and so does an
    answer that did not parse.
    """
    if parse_error or score is None:
        return True
    return not math.isfinite(score) or score >= threshold


def flag_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``flags`` over an array of scores at once (no parse errors here): a non-finite score flags too."""
    return ~np.isfinite(scores) | (scores >= threshold)


def within_threshold_bounds(value: float) -> float:
    """A threshold chosen from scores, kept strictly inside (0, 1) where ``check_threshold`` needs it.

    A score-based choice can land on exactly 0 or 1 (saturated probabilities); the nearest usable
    threshold flags the same rows save those scored exactly at the bound.
    """
    return float(min(max(value, 1e-6), 1.0 - 1e-6))


def shipped_threshold(directory: str | Path) -> float | None:
    """The threshold a checkpoint ships in its serving config (None: it ships none)."""
    config = read_serving_config(directory)
    if config is None or config.get("decision_threshold") is None:
        return None
    where = f"{Path(directory) / SERVING_CONFIG_FILE}: field 'decision_threshold'"
    return check_threshold(config["decision_threshold"], where)


def resolve_threshold(directory: str | Path, threshold: float | None = None) -> float:
    """An explicit threshold, else the one the checkpoint ships, else ``DEFAULT_THRESHOLD``."""
    if threshold is not None:
        return check_threshold(threshold, "threshold argument")
    shipped = shipped_threshold(directory)
    return DEFAULT_THRESHOLD if shipped is None else shipped


def measured_threshold(report: Mapping[str, Any], where: str | Path) -> tuple[float, str] | None:
    """``(threshold, which defence)``: the one threshold an eval report's moderator tables were measured at.

    Eval records, per moderator defence, the threshold it fixed before the attack phase
    (``thresholds.<defence>``). None when the eval ran no moderator. A report without ``thresholds``
    (an older eval) and one whose moderators ran at different thresholds are refused: no single shipped
    threshold would match its tables.
    """
    thresholds = report.get("thresholds")
    if thresholds is None:
        raise ModeratorConfigError(
            f"{where}: no 'thresholds' field, so the threshold its tables were measured at is unknown "
            "(written by an older eval); re-run `python -m eval.run` and export with the new report"
        )
    values = report_thresholds(thresholds, where)
    if not values:
        return None
    if len(set(values.values())) > 1:
        raise ModeratorConfigError(
            f"{where}: its moderator defences were measured at different thresholds {values}; export one "
            "report whose moderator tables share the threshold to ship"
        )
    name = "moderator" if "moderator" in values else sorted(values)[0]
    source = thresholds[name].get("source") if isinstance(thresholds[name], Mapping) else None
    return values[name], f"eval report thresholds.{name}" + (f" ({source})" if source else "")


def report_thresholds(thresholds: Any, where: str | Path) -> dict[str, float]:
    """An eval report's ``thresholds`` field (defence -> ``{threshold, source, ...}``), checked."""
    if not isinstance(thresholds, Mapping):
        raise ModeratorConfigError(f"{where}: thresholds: expected a mapping defence -> {{threshold, source}}")
    return {
        name: check_threshold(
            choice.get("threshold") if isinstance(choice, Mapping) else choice, f"{where}: thresholds.{name}.threshold"
        )
        for name, choice in thresholds.items()
    }


# --------------------------------------------------------------------------- reading and writing


def read_json_object(path: str | Path, expected: str = "a JSON object") -> dict[str, Any]:
    """A JSON file holding one object; anything else is a ``ModeratorConfigError`` naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModeratorConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModeratorConfigError(f"{path}: expected {expected}")
    return value


def write_json(path: str | Path, value: Any, *, ensure_ascii: bool = True, sort_keys: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=2, ensure_ascii=ensure_ascii, sort_keys=sort_keys, default=str)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def bounds_record(bounds: ImageBounds | None) -> dict[str, int | None]:
    """``image_bounds`` as the run record and the serving config hold it."""
    return {"min_pixels": bounds.min_pixels if bounds else None, "max_pixels": bounds.max_pixels if bounds else None}


def _bounds_from(record: Any, where: str) -> ImageBounds | None:
    if not isinstance(record, Mapping):
        return None
    try:
        bounds = ImageBounds(record.get("min_pixels"), record.get("max_pixels"))
    except ValueError as exc:
        raise ModeratorConfigError(f"{where}: {exc}") from None
    return bounds if bounds.is_set else None


# stats.json: data prep -> training


def stats_path(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / STATS_FILE


def write_stats(dataset_dir: str | Path, stats: Mapping[str, Any]) -> Path:
    return write_json(stats_path(dataset_dir), stats, ensure_ascii=False)


def read_stats(dataset_dir: str | Path) -> dict[str, Any] | None:
    """Data prep's ``stats.json`` of a prepared folder; None when there is none."""
    path = stats_path(dataset_dir)
    return read_json_object(path) if path.is_file() else None


def stats_sha256(dataset_dir: str | Path) -> str | None:
    path = stats_path(dataset_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def prepared_image_bounds(stats: Mapping[str, Any]) -> tuple[int | None, int | None] | None:
    """The (min, max) pixel bounds data prep counted token lengths at; None when it counted none."""
    tokens = stats.get("tokens")
    if not tokens:
        return None
    return tokens.get("min_pixels"), tokens.get("max_pixels")


# moderator_run.json: training -> export and serving


def run_record_path(checkpoint: str | Path) -> Path | None:
    """The run record of a training output; a ``checkpoint-N`` falls back to its run dir's. None: none."""
    checkpoint = Path(checkpoint)
    candidates = [checkpoint / RUN_RECORD_FILE]
    if checkpoint.name.startswith("checkpoint-"):
        candidates.append(checkpoint.parent / RUN_RECORD_FILE)
    return next((c for c in candidates if c.is_file()), None)


def write_run_record(output_dir: str | Path, record: Mapping[str, Any]) -> Path:
    return write_json(Path(output_dir) / RUN_RECORD_FILE, record)


def read_run_record(checkpoint: str | Path) -> tuple[dict[str, Any], Path] | None:
    path = run_record_path(checkpoint)
    return None if path is None else (read_json_object(path), path)


def recorded_image_bounds(record: Mapping[str, Any], where: str | Path) -> ImageBounds | None:
    """The bounds a run record holds in its ``image_bounds`` field (None: not recorded)."""
    return _bounds_from(record.get("image_bounds"), f"{where}: image_bounds")


# moderator_config.json: export -> serving


def write_serving_config(directory: str | Path, config: Mapping[str, Any]) -> Path:
    return write_json(Path(directory) / SERVING_CONFIG_FILE, config, sort_keys=True)


def read_serving_config(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / SERVING_CONFIG_FILE
    return read_json_object(path) if path.is_file() else None


def looks_like_export(directory: str | Path) -> bool:
    """Whether a folder is an export (a manifest or a serving config), not a training output."""
    directory = Path(directory)
    return (directory / MANIFEST_FILE).is_file() or (directory / SERVING_CONFIG_FILE).is_file()


def trained_image_bounds(path: str | Path) -> ImageBounds | None:
    """The pixel bounds a checkpoint was trained with (None: not recorded).

    An export's serving config holds them; a training output (or its ``checkpoint-N``) has its run
    record. Serving with other bounds would show the model other image-token counts than it learnt on.
    """
    config = read_serving_config(path)
    if config is not None:
        return _bounds_from(config.get("image_bounds"), f"{Path(path) / SERVING_CONFIG_FILE}: image_bounds")
    found = read_run_record(path)
    return None if found is None else recorded_image_bounds(found[0], found[1])


# report.json: eval -> export


def write_eval_report(out_dir: str | Path, report: Mapping[str, Any]) -> Path:
    return write_json(Path(out_dir) / EVAL_REPORT_FILE, report)


def read_eval_report(path: str | Path) -> dict[str, Any]:
    return read_json_object(path, "the JSON object written by `python -m eval.run` (report.json)")


def ship_eval_report(path: str | Path, export_dir: str | Path) -> Path:
    """Copy an eval report into an export, as the bytes that were read (the manifest hashes them)."""
    target = Path(export_dir) / EXPORTED_EVAL_REPORT_FILE
    shutil.copyfile(path, target)
    return target
