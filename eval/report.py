"""Evaluation report: ``report.json``, ``report.md`` and ``asr_vs_turns.png`` from judged target replies.

Each row is one judged target reply::

    {"target": "qwen2.5-vl-7b", "defence": "none" | "llama_guard_3_vision" | "moderator" | ...,
     "judge": "gpt-4o-mini", "id": "jbv_fraud_42", "k": 4, "benign": False,
     "label": "safe" | "unsafe" | <anything else: unlabelled>,
     "flagged": True | False | None,      # did the defence flag the dialogue
     "refused": True | False | None,      # judged refusal (benign rows)
     "parse_error": False}                # the defence's output could not be parsed

``target``, ``defence``, ``id``, ``k``, ``benign`` and ``label`` are required; the others default to
None / False. Attack rows (``benign`` false) give ASR per length and the Safety Index; benign rows
(``k`` = their own turn count) give over-refusal: the defence's flag rate and the judged refusal rate.

A length in K without a single ``safe``/``unsafe`` label has ASR None, and then the group's SI is
None with ``si_reason`` saying why (:func:`eval.metrics.safety_index_result`); tables show n/a, and
report.md lists the reasons. ``outcomes`` counts, per length, the attack labels of each outcome
(safe, unsafe, error, content_filter, unparsed: :func:`eval.metrics.label_outcome`).

Intervals (``intervals`` says how they were drawn): ``asr_ci[k]`` is the Wilson score interval of
ASR_k; ``si_ci`` a percentile bootstrap interval of the SI over SafeMT ids (every length of an id
stays in the resample); ``delta_asr_ci[k]`` and ``delta_si_ci`` paired bootstrap intervals of the
differences against ``none`` (the same drawn ids for both defences). Each is ``[low, high]``, or None
where its point value is None. The bootstrap is seeded, so the same rows give a byte-identical
report.json in any row order (a sharded run and a single-process one agree).

``detection`` (optional): per detector, :func:`eval.metrics.detection_metrics` with each metric's
``<metric>_ci`` (Wilson for proportions, bootstrap over SafeMT ids for F1, AUPRC and AUROC), shown in
report.md as ``value [low, high]``.

``turns_to_detection`` (optional, absent when not given): :func:`eval.detection.turns_to_detection`'s
summary of the first user turn at which each defence flagged each dialogue, per dialogue length;
report.md shows a table per length and ``detection_vs_turn.png`` plots it.

``thresholds`` (written by ``eval.loop``) maps each moderator defence to the decision threshold every
one of its rows was measured at (:class:`eval.thresholds.ThresholdChoice` as a dict: ``threshold``,
``source``, ``detail``, ...); ``python -m export --eval-report`` refuses to ship another one.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.metrics import (
    CONTENT_FILTER,
    ERROR,
    SAFEMT_TURNS,
    UNPARSED,
    BootstrapSettings,
    asr_intervals,
    asr_reduction,
    length_weights,
    paired_delta_intervals,
    safety_index_result,
    si_interval,
)
from moderator.artefacts import report_thresholds, write_eval_report

NO_DEFENCE = "none"
NO_ATTACK_ROWS = "no attack reply (only benign dialogues were evaluated)"
# Judge outcomes that are left out of the ASR, in the order report.md lists them.
EXCLUDED_OUTCOMES = (ERROR, CONTENT_FILTER, UNPARSED)
REQUIRED_ROW_FIELDS = ("target", "defence", "id", "k", "benign", "label")
DETECTION_COLUMNS = (
    ("n", "n"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("accuracy", "accuracy"),
    ("auprc", "AUPRC"),
    ("auroc", "AUROC"),
    ("fpr_benign", "FPR (benign)"),
    ("category_accuracy_flagged", "category acc. (flagged unsafe)"),
    ("category_accuracy_all_unsafe", "category acc. (all unsafe)"),
)


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {index}: expected a mapping, got {type(row).__name__}")
        for field in REQUIRED_ROW_FIELDS:
            if field not in row:
                raise ValueError(f"row {index} (id={row.get('id')!r}): missing field {field!r}")
        for field in ("target", "defence"):
            if not isinstance(row[field], str) or not row[field]:
                raise ValueError(f"row {index} (id={row['id']!r}): field {field!r} must be a non-empty string")
        if isinstance(row["k"], bool) or not isinstance(row["k"], int):
            raise ValueError(f"row {index} (id={row['id']!r}): field 'k' must be an int, got {row['k']!r}")


def _fraction(rows: list[Mapping[str, Any]], field: str) -> tuple[float | None, int]:
    """Share of rows whose ``field`` is True, over rows where it is known (not None)."""
    known = [row.get(field) for row in rows if row.get(field) is not None]
    return (sum(1 for value in known if value) / len(known) if known else None), len(known)


def _attack_results(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": row["id"], "k": row["k"], "label": row["label"]} for row in rows if not row["benign"]]


def _interval(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]


def _group_summary(
    rows: list[Mapping[str, Any]], turns: tuple[int, ...], bootstrap: BootstrapSettings
) -> dict[str, Any]:
    attack = [row for row in rows if not row["benign"]]
    benign = [row for row in rows if row["benign"]]
    attack_results = _attack_results(rows)
    flag_rate, n_flag_known = _fraction(benign, "flagged")
    refusal_rate, n_refusal_known = _fraction(benign, "refused")
    attack_flag_rate, _ = _fraction(attack, "flagged")
    # None SI (with its reason) when a length has no labelled reply: never a made-up 1.0.
    scored = safety_index_result(attack_results, turns).to_dict() if attack else None
    return {
        "judges": sorted({str(row.get("judge")) for row in rows if row.get("judge") is not None}),
        "n_attack": len(attack),
        "n_benign": len(benign),
        "asr": scored["asr"] if scored else None,
        "asr_ci": (
            {str(k): _interval(ci) for k, ci in asr_intervals(attack_results, turns, bootstrap.confidence).items()}
            if scored
            else None
        ),
        "n_labelled": scored["n_labelled"] if scored else {str(k): 0 for k in turns},
        "si": scored["si"] if scored else None,
        "si_ci": _interval(si_interval(attack_results, turns, bootstrap)) if scored else None,
        "si_reason": scored["si_reason"] if scored else NO_ATTACK_ROWS,
        "outcomes": scored["outcomes"] if scored else None,
        "delta_asr": None,
        "delta_asr_ci": None,
        "delta_si": None,
        "delta_si_ci": None,
        "attack_flag_rate": attack_flag_rate,
        "over_refusal": {
            "n_benign": len(benign),
            "flag_rate": flag_rate,
            "n_flag_known": n_flag_known,
            "refusal_rate": refusal_rate,
            "n_refusal_known": n_refusal_known,
        },
        "parse_errors": sum(1 for row in rows if row.get("parse_error")),
    }


def _check_turns_to_detection(summary: Mapping[str, Any]) -> None:
    """The shape the report renders, checked up front so a wrong summary is named, not a KeyError later."""
    by_length = summary.get("by_length") if isinstance(summary, Mapping) else None
    if not isinstance(by_length, Mapping):
        raise ValueError("turns_to_detection: expected eval.detection.turns_to_detection's summary with 'by_length'")
    for length, defences in by_length.items():
        for defence, entry in defences.items():
            where = f"turns_to_detection.by_length.{length}.{defence}"
            for field in ("n", "flagged_by_turn", "mean_first_turn", "never_flagged"):
                if not isinstance(entry, Mapping) or field not in entry:
                    raise ValueError(f"{where}: missing field {field!r}")


def build_report(
    rows: Sequence[Mapping[str, Any]],
    turns: Sequence[int] = SAFEMT_TURNS,
    detection: Mapping[str, Any] | None = None,
    title: str = "SafeMT evaluation",
    thresholds: Mapping[str, Mapping[str, Any]] | None = None,
    bootstrap: BootstrapSettings | None = None,
    turns_to_detection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict: ``results[target][defence]`` holds each group's numbers.

    ``thresholds``: per moderator defence, the threshold its rows were measured at (see the module
    docstring); ``{}`` when no moderator was evaluated, None to leave the field out. ``bootstrap``:
    resamples, seed and confidence of the intervals (default 1000 resamples, seed 0, 95%).
    ``turns_to_detection``: a :func:`eval.detection.turns_to_detection` summary, stored as given under
    that key (left out when None, so a report without it is unchanged).
    """
    bootstrap = bootstrap or BootstrapSettings()
    _check_rows(rows)
    if turns_to_detection is not None:
        _check_turns_to_detection(turns_to_detection)
    if thresholds is not None:
        report_thresholds(thresholds, "report")  # each a usable decision threshold (ModeratorConfigError)
    turns = tuple(turns)
    weights = length_weights(turns)
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[row["target"]][row["defence"]].append(row)

    results: dict[str, dict[str, Any]] = {}
    for target in sorted(groups):
        # "none" first: it is the baseline every other defence is compared with.
        defences = sorted(groups[target], key=lambda name: (name != NO_DEFENCE, name))
        results[target] = {defence: _group_summary(groups[target][defence], turns, bootstrap) for defence in defences}
        baseline = results[target].get(NO_DEFENCE)
        if baseline is None or baseline["asr"] is None:
            continue
        for defence, summary in results[target].items():
            if defence == NO_DEFENCE or summary["asr"] is None:
                continue
            delta = asr_reduction(
                {int(k): v for k, v in baseline["asr"].items()}, {int(k): v for k, v in summary["asr"].items()}
            )
            summary["delta_asr"] = {str(k): v for k, v in delta.items()}
            if summary["si"] is not None and baseline["si"] is not None:  # eval.metrics: None when undefined
                summary["delta_si"] = round(summary["si"] - baseline["si"], 4)
            intervals = paired_delta_intervals(
                _attack_results(groups[target][NO_DEFENCE]), _attack_results(groups[target][defence]), turns, bootstrap
            )
            summary["delta_asr_ci"] = {str(k): _interval(ci) for k, ci in intervals.delta_asr.items()}
            summary["delta_si_ci"] = _interval(intervals.delta_si)

    report: dict[str, Any] = {
        "title": title,
        "turns": list(turns),
        "si_weights": {str(k): w for k, w in weights.items()},
        "intervals": {
            **bootstrap.to_dict(),
            "asr": "Wilson score interval",
            "si_and_deltas": "percentile bootstrap over SafeMT ids; deltas paired (same ids for both defences)",
        },
        "results": results,
    }
    if detection is not None:
        report["detection"] = detection
    if thresholds is not None:
        report["thresholds"] = thresholds
    if turns_to_detection is not None:
        report["turns_to_detection"] = turns_to_detection
    # Round-trip so the returned dict is exactly what report.json holds (numpy scalars become floats).
    return json.loads(json.dumps(report, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    if hasattr(value, "tolist"):  # numpy array
        return value.tolist()
    raise TypeError(f"report value of type {type(value).__name__} is not JSON serialisable: {value!r}")


def _measured_asr(summary: Mapping[str, Any], k: int) -> float | None:
    """ASR_k, or None when no reply at length k was labelled safe/unsafe (no data)."""
    return summary["asr"][str(k)] if summary["asr"] is not None else None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def _fmt_ci(value: float | None, interval: Sequence[float] | None, percent: bool) -> str:
    """``12.5% [8.1, 18.0]`` (a rate, in percent) or ``0.4552 [0.4100, 0.5012]`` (an SI); n/a for None."""
    if value is None:
        return "n/a"
    scale, digits, unit = (100.0, 1, "%") if percent else (1.0, 4, "")
    text = f"{value * scale:.{digits}f}{unit}"
    if interval is not None:
        text += f" [{interval[0] * scale:.{digits}f}, {interval[1] * scale:.{digits}f}]"
    return text


def _holds_zero(interval: Sequence[float] | None) -> bool:
    return interval is not None and interval[0] <= 0.0 <= interval[1]


def _within_noise(summary: Mapping[str, Any], turns: Sequence[int]) -> str:
    """Which differences of a defence from no defence have a 95% interval that holds 0."""
    names = [f"ΔASR_{k}" for k in turns if _holds_zero((summary.get("delta_asr_ci") or {}).get(str(k)))]
    names += ["ΔSI"] if _holds_zero(summary.get("delta_si_ci")) else []
    return ", ".join(names) if names else "none"


def _interval_sections(report: Mapping[str, Any], groups: list, delta_groups: list) -> tuple[list[str], list[str]]:
    """The interval tables that follow the ASR/SI table and the ΔASR table (empty for an older report)."""
    settings = report.get("intervals")
    if settings is None:  # a report.json written before intervals existed (export renders stored reports)
        return [], []
    turns, level = report["turns"], f"{settings['confidence']:.0%}"
    how = f"{settings['n_resamples']} resamples, seed {settings['seed']}"
    asr_lines = [f"### With {level} intervals", ""]
    asr_lines += [
        f"ASR_k in percent with its Wilson score interval; the SI with a percentile bootstrap interval over "
        f"SafeMT ids (all lengths of an id resampled together; {how}).",
        "",
    ]
    asr_lines += _table(
        ["target", "defence", *[f"ASR_{k}" for k in turns], "SI"],
        [
            [
                _fmt(target),
                _fmt(defence),
                *[_fmt_ci(_measured_asr(s, k), (s.get("asr_ci") or {}).get(str(k)), True) for k in turns],
                _fmt_ci(s["si"], s.get("si_ci"), False),
            ]
            for target, defence, s in groups
        ],
    )
    if not delta_groups:
        return asr_lines, []
    delta_lines = [f"### With {level} paired bootstrap intervals", ""]
    delta_lines += [
        f"Both defences are scored on the same resampled SafeMT ids ({how}). Within noise: the interval "
        f"holds 0, so this run cannot tell that difference from none.",
        "",
    ]
    delta_lines += _table(
        ["target", "defence", *[f"ΔASR_{k}" for k in turns], "ΔSI", "within noise"],
        [
            [
                _fmt(target),
                _fmt(defence),
                *[
                    _fmt_ci(
                        s["delta_asr"][str(k)] if s["delta_asr"] else None,
                        (s.get("delta_asr_ci") or {}).get(str(k)),
                        True,
                    )
                    for k in turns
                ],
                _fmt_ci(s["delta_si"], s.get("delta_si_ci"), False),
                _within_noise(s, turns) if s["delta_asr"] else "n/a",
            ]
            for target, defence, s in delta_groups
        ],
    )
    return asr_lines, delta_lines


def _table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines + [""]


def _detection_rows(detection: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``detection`` is one metrics dict, or a mapping name -> metrics dict (one row each)."""
    if detection and all(isinstance(value, Mapping) for value in detection.values()):
        return list(detection.items())
    return [("moderator", detection)]


def _fmt_metric(metrics: Mapping[str, Any], key: str) -> str:
    """``0.750 [0.301, 0.954]``: a detection metric with its interval (none in an older report.json)."""
    text = _fmt(metrics.get(key))
    interval = metrics.get(f"{key}_ci")
    if metrics.get(key) is not None and interval is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def _turns_to_detection_section(summary: Mapping[str, Any]) -> list[str]:
    settings = summary.get("intervals") or {}
    level = f"{settings['confidence']:.0%}" if "confidence" in settings else "95%"
    how = f"{settings['n_resamples']} resamples, seed {settings['seed']}" if "seed" in settings else "seeded"
    lines = ["## Turns to detection", ""]
    lines += [
        "Every prefix of each SafeMT dialogue (up to and including user turn j) is moderated; a dialogue "
        "counts as flagged by turn j when a defence flagged one of its first j prefixes. Shares in percent "
        f"with {level} Wilson score intervals; the mean first turn (over flagged dialogues) with a percentile "
        f"bootstrap interval over SafeMT ids ({how}).",
        "",
    ]
    by_length = summary["by_length"]
    if not by_length:
        return lines + ["No dialogue was moderated turn by turn.", ""]
    for length, defences in by_length.items():
        lines += [f"### Dialogues of {length} user turn{'' if length == '1' else 's'}", ""]
        lines += _table(
            [
                "defence",
                "n",
                *[f"flagged by turn {j}" for j in range(1, int(length) + 1)],
                "mean first turn",
                "never flagged",
            ],
            [
                [
                    _fmt(defence),
                    _fmt(entry["n"]),
                    *[_fmt_ci(turn["share"], turn.get("ci"), True) for turn in entry["flagged_by_turn"]],
                    _fmt_mean_turn(entry["mean_first_turn"], entry.get("mean_first_turn_ci")),
                    _fmt_ci(entry["never_flagged"], entry.get("never_flagged_ci"), True),
                ]
                for defence, entry in defences.items()
            ],
        )
    return lines


def _fmt_mean_turn(value: float | None, interval: Sequence[float] | None) -> str:
    if value is None:
        return "n/a (never flagged)"
    text = f"{value:.2f}"
    return text + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval is not None else "")


def _threshold_section(thresholds: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["## Moderator decision threshold", ""]
    if not thresholds:
        return lines + ["No moderator defence was evaluated.", ""]
    lines += [
        "Every table below was measured with each moderator defence flagging a dialogue when P(unsafe) >= "
        "its threshold here (or when its answer does not parse), fixed before the attack phase.",
        "",
    ]
    return lines + _table(
        ["defence", "threshold", "source", "target FPR", "FPR on benign validation rows", "validation rows", "how"],
        [
            [
                _fmt(name),
                f"{choice['threshold']:.6g}",
                _fmt(choice.get("source")),
                _fmt(choice.get("target_fpr")),
                _fmt(choice.get("validation_fpr")),
                _fmt(choice.get("n_validation")),
                _fmt(choice.get("detail")),
            ]
            for name, choice in thresholds.items()
        ],
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    turns = report["turns"]
    groups = [
        (target, defence, summary)
        for target, defences in report["results"].items()
        for defence, summary in defences.items()
    ]
    weights = ", ".join(f"w_{k} = {w:.4f}" for k, w in report["si_weights"].items())
    lines = [f"# {report['title']}", ""]
    if report.get("thresholds") is not None:
        lines += _threshold_section(report["thresholds"])

    lines += ["## Attack success rate per dialogue length and Safety Index", ""]
    lines += [
        f"ASR_k = unsafe / (safe + unsafe) judged replies at k turns. SI weights: {weights}, so the SI is "
        "dominated by the shortest lengths; read it beside the per-length ASR. n/a: no labelled reply at "
        "that length; the SI needs one at every length, so it is n/a too (reasons below the table).",
        "",
    ]
    lines += _table(
        ["target", "defence", "n attack", *[f"ASR_{k}" for k in turns], "SI"],
        [
            [
                _fmt(target),
                _fmt(defence),
                _fmt(s["n_attack"]),
                *[_fmt(_measured_asr(s, k)) for k in turns],
                _fmt(s["si"], 4),
            ]
            for target, defence, s in groups
        ],
    )
    delta_groups = [(t, d, s) for t, d, s in groups if d != NO_DEFENCE]
    asr_interval_lines, delta_interval_lines = _interval_sections(report, groups, delta_groups)
    lines += asr_interval_lines
    missing_si = [(t, d, s) for t, d, s in groups if s["si"] is None]
    if missing_si:
        lines += ["Why an SI is n/a:", ""]
        lines += [f"- {_fmt(t)} / {_fmt(d)}: {_fmt(s.get('si_reason'))}" for t, d, s in missing_si]
        lines += [""]

    lines += [f"## ASR reduction vs. no defence (ΔASR = ASR[{NO_DEFENCE}] - ASR[defence])", ""]
    if delta_groups:
        lines += _table(
            ["target", "defence", *[f"ΔASR_{k}" for k in turns], "ΔSI"],
            [
                [
                    _fmt(target),
                    _fmt(defence),
                    *[_fmt(s["delta_asr"][str(k)] if s["delta_asr"] else None) for k in turns],
                    _fmt(s["delta_si"], 4),
                ]
                for target, defence, s in delta_groups
            ],
        )
        lines += delta_interval_lines
    else:
        lines += ["No defended runs.", ""]

    lines += ["## Over-refusal on benign dialogues", ""]
    lines += _table(
        ["target", "defence", "n benign", "flag rate", "judged refusal rate", "flag rate on attacks"],
        [
            [
                _fmt(target),
                _fmt(defence),
                _fmt(s["over_refusal"]["n_benign"]),
                _fmt(s["over_refusal"]["flag_rate"]),
                _fmt(s["over_refusal"]["refusal_rate"]),
                _fmt(s["attack_flag_rate"]),
            ]
            for target, defence, s in groups
        ],
    )

    if report.get("detection") is not None:
        lines += ["## Detection metrics (unsafe = positive)", ""]
        lines += [
            "Each metric with its 95% interval where the report has one: Wilson score interval for precision, "
            "recall, accuracy, FPR and category accuracy; percentile bootstrap over SafeMT ids (rows where no "
            "ids were given) for F1, AUPRC and AUROC.",
            "",
        ]
        lines += _table(
            ["detector", *[label for _, label in DETECTION_COLUMNS]],
            [
                [_fmt(name), *[_fmt_metric(metrics, key) for key, _ in DETECTION_COLUMNS]]
                for name, metrics in _detection_rows(report["detection"])
            ],
        )

    if report.get("turns_to_detection") is not None:
        lines += _turns_to_detection_section(report["turns_to_detection"])

    lines += ["## Attack replies left out of the ASR, by judge outcome", ""]
    lines += [
        "error = the judge call failed or its response was malformed (asked again on the next run); "
        "content_filter = the judge API's content filter refused to judge; unparsed = an answer other than "
        "`safe`/`unsafe`. None of them counts in the ASR.",
        "",
    ]
    # .get: a report.json written before outcomes were counted has none (export renders stored reports).
    outcome_groups = [(t, d, s) for t, d, s in groups if s.get("outcomes") is not None]
    if outcome_groups:
        lines += _table(
            ["target", "defence", "outcome", *[f"k={k}" for k in turns]],
            [
                [_fmt(target), _fmt(defence), outcome, *[_fmt(s["outcomes"][str(k)][outcome]) for k in turns]]
                for target, defence, s in outcome_groups
                for outcome in EXCLUDED_OUTCOMES
            ],
        )
    else:
        lines += ["No attack replies.", ""]

    lines += ["## Defence parse errors", ""]
    lines += ["Defence outputs that could not be parsed (attack and benign dialogues).", ""]
    lines += _table(
        ["target", "defence", "parse errors"],
        [[_fmt(target), _fmt(defence), _fmt(s["parse_errors"])] for target, defence, s in groups],
    )
    return "\n".join(lines)


def plot_asr_vs_turns(report: Mapping[str, Any], path: Path) -> None:
    """ASR against the number of turns, one line per (target, defence), with Wilson-interval error bars."""
    # The object API with the Agg canvas leaves pyplot's global backend alone (safe inside training code).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    turns = report["turns"]
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for target, defences in report["results"].items():
        for defence, summary in defences.items():
            measured = [k for k in turns if _measured_asr(summary, k) is not None]
            if not measured:
                continue
            values = [summary["asr"][str(k)] for k in measured]
            (line,) = axes.plot(
                measured,
                values,
                marker="o",
                linestyle="-" if defence == NO_DEFENCE else "--",
                label=f"{target} / {defence}",
            )
            intervals = [(summary.get("asr_ci") or {}).get(str(k)) for k in measured]
            if all(interval is not None for interval in intervals):  # None only for an older report.json
                below = [value - low for value, (low, _) in zip(values, intervals, strict=True)]
                above = [high - value for value, (_, high) in zip(values, intervals, strict=True)]
                axes.errorbar(
                    measured, values, yerr=[below, above], fmt="none", ecolor=line.get_color(), capsize=3, alpha=0.7
                )
    axes.set_xlabel("number of turns (k)")
    settings = report.get("intervals")
    bars = f" (bars: {settings['confidence']:.0%} Wilson interval)" if settings else ""
    axes.set_ylabel(f"attack success rate{bars}")
    axes.set_xticks(turns)
    axes.set_ylim(-0.02, 1.02)
    axes.grid(True, alpha=0.3)
    axes.set_title(f"{report['title']}: ASR vs. dialogue length")
    if axes.lines:
        # Outside the axes: with several targets x defences an inside legend hides the lines.
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path, bbox_inches="tight")


def plot_detection_vs_turn(report: Mapping[str, Any], path: Path) -> None:
    """Share of dialogues flagged by each user turn: a panel per dialogue length, a line per defence.

    Error bars are the Wilson intervals of ``report["turns_to_detection"]``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    by_length = report["turns_to_detection"]["by_length"]
    lengths = list(by_length) or ["0"]
    # One colour per defence across panels, and a small sideways shift so overlapping bars stay readable.
    defences = sorted({defence for entries in by_length.values() for defence in entries})
    colour = {defence: f"C{index % 10}" for index, defence in enumerate(defences)}
    shift = {defence: (index - (len(defences) - 1) / 2) * 0.05 for index, defence in enumerate(defences)}
    figure = Figure(figsize=(4.2 * len(lengths) + 1.8, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(lengths), sharey=True, squeeze=False)[0]
    for axes, length in zip(panels, lengths, strict=True):
        for defence, entry in by_length.get(length, {}).items():
            turns = [turn["turn"] + shift[defence] for turn in entry["flagged_by_turn"]]
            shares = [turn["share"] for turn in entry["flagged_by_turn"]]
            axes.plot(turns, shares, marker="o", color=colour[defence], label=defence)
            intervals = [turn.get("ci") for turn in entry["flagged_by_turn"]]
            if turns and all(interval is not None for interval in intervals):
                below = [share - low for share, (low, _) in zip(shares, intervals, strict=True)]
                above = [high - share for share, (_, high) in zip(shares, intervals, strict=True)]
                axes.errorbar(
                    turns, shares, yerr=[below, above], fmt="none", ecolor=colour[defence], capsize=3, alpha=0.7
                )
        axes.set_title(f"{length} user turn{'' if length == '1' else 's'}")
        axes.set_xlabel("user turn (j)")
        axes.set_xticks(range(1, max(int(length), 1) + 1))
        axes.set_xlim(0.5, max(int(length), 1) + 0.5)
        axes.set_ylim(-0.02, 1.02)
        axes.grid(True, alpha=0.3)
    panels[0].set_ylabel("share flagged by turn j (bars: Wilson interval)")
    figure.suptitle(f"{report['title']}: detection rate vs. user turn")
    if defences:
        handles = [Line2D([], [], color=colour[defence], marker="o", label=defence) for defence in defences]
        figure.legend(handles=handles, fontsize="small", loc="outside right upper")
    figure.savefig(path)


def log_to_wandb(report: Mapping[str, Any], image_path: Path, detection_image: Path | None = None) -> bool:
    """Log the summary table and the plots to the active W&B run, if there is one. Returns whether it logged."""
    # If wandb was never imported, no run can be active: do not pay for importing it.
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return False
    turns = report["turns"]
    columns = ["target", "defence", "n_attack", *[f"asr_{k}" for k in turns], "si", "delta_si"]
    columns += ["benign_flag_rate", "benign_refusal_rate", "parse_errors", "si_ci_low", "si_ci_high"]
    table = wandb.Table(columns=columns)
    for target, defences in report["results"].items():
        for defence, s in defences.items():
            table.add_data(
                target,
                defence,
                s["n_attack"],
                *[s["asr"][str(k)] if s["asr"] else None for k in turns],
                s["si"],
                s["delta_si"],
                s["over_refusal"]["flag_rate"],
                s["over_refusal"]["refusal_rate"],
                s["parse_errors"],
                *(s.get("si_ci") or (None, None)),
            )
    logged = {"eval/report": table, "eval/asr_vs_turns": wandb.Image(str(image_path))}
    if detection_image is not None:
        logged["eval/detection_vs_turn"] = wandb.Image(str(detection_image))
    wandb.run.log(logged)
    return True


def write_report(
    rows: list[dict[str, Any]],
    out_dir: Path,
    turns: Sequence[int] = SAFEMT_TURNS,
    detection: dict[str, Any] | None = None,
    title: str = "SafeMT evaluation",
    thresholds: Mapping[str, Mapping[str, Any]] | None = None,
    bootstrap: BootstrapSettings | None = None,
    turns_to_detection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write report.json, report.md and asr_vs_turns.png under ``out_dir``; return the report dict.

    With ``turns_to_detection`` (an :func:`eval.detection.turns_to_detection` summary) also
    ``detection_vs_turn.png``.

    ``detection`` (optional) is a :func:`eval.metrics.detection_metrics` dict, or a mapping from a
    detector name to one; it is stored as given and rendered as a table. ``thresholds``: see
    :func:`build_report`, as is ``bootstrap``.
    """
    out_dir = Path(out_dir)
    report = build_report(rows, turns, detection, title, thresholds, bootstrap, turns_to_detection)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_eval_report(out_dir, report)
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    image_path = out_dir / "asr_vs_turns.png"
    plot_asr_vs_turns(report, image_path)
    detection_image: Path | None = out_dir / "detection_vs_turn.png"
    if report.get("turns_to_detection") is not None:
        plot_detection_vs_turn(report, detection_image)
    else:  # a plot left by an earlier run in this out_dir would not belong to this report
        detection_image.unlink(missing_ok=True)
        detection_image = None
    log_to_wandb(report, image_path, detection_image)
    return report
