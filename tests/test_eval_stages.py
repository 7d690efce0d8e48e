"""The eval's stages on the demo config: the closing summary line, turns to detection, per-turn prefixes.

One run of ``configs/eval/demo.yaml`` (its paths pointed at the test fixtures: the real SafeMT sample
records, the demo data recipe's prepared dataset, the tiny moderator and the tiny Llama Guard) is
shared by the tests of this module, then run again to see every stage found cached.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

import eval.run
from eval.cache import JsonlCache
from eval.config import load_config
from eval.defences import GuardDefence
from eval.guards.base import GuardResult
from eval.loop import EvalRun
from eval.stages.context import TURN_FLAGS_FILE, TURN_FLAGS_KEY
from tests.conftest import REPO_ROOT, copy_sample_with_images

DEMO = REPO_ROOT / "configs" / "eval" / "demo.yaml"
SUMMARY = re.compile(
    r"^eval run: decided (\d+) items \((\d+) cached, (\d+) computed\); "
    r"turns-to-detection over (\d+) dialogues \((\d+) cached, (\d+) computed\); "
    r"generated (\d+) replies \((\d+) cached, (\d+) computed\); "
    r"judged (\d+) rows \((\d+) cached, (\d+) computed\); \d+\.\d s$"
)


@pytest.fixture(scope="module")
def tiny_guard_dir(tmp_path_factory):
    from tiny_models.guards import build_tiny_mllama

    return build_tiny_mllama(tmp_path_factory.mktemp("tiny-llama-guard"))


def _demo_argv(root: Path, safemt: Path, prepared: Path, model: Path, guard: Path) -> list[str]:
    return [
        "--config",
        str(DEMO),
        "--safemt_dir",
        str(safemt),
        "--detection_split",
        str(prepared),
        "--out_dir",
        str(root / "eval"),
        "--targets.0.model",
        str(model),
        "--defences.1.model",
        str(guard),
        "--defences.2.model",
        str(model),
        "--defences.3.model",
        str(model),
        # The tiny checkpoint is not an export: loading it unverified is said, not silent.
        "--defences.2.verify",
        "false",
        "--defences.3.verify",
        "false",
        # The demo cut to 2 dialogues per length and lengths 1 and 2: every stage still runs, in a fraction
        # of the time.
        "--limit",
        "2",
        "--benign_limit",
        "2",
        "--turns",
        "[1, 2]",
    ]


def _summary(stderr: str) -> tuple[int, ...]:
    last = stderr.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, f"not the closing summary line: {last!r}"
    return tuple(int(group) for group in match.groups())


class _Loads:
    """Counts model loads through eval.run's run_eval."""

    def __init__(self):
        self.defences = self.targets = 0

    def run_eval(self, config, **kwargs):
        from eval.defences import load_defence
        from eval.targets import load_target

        def defence(cfg, taxonomy):
            self.defences += 1
            return load_defence(cfg, taxonomy)

        def target(cfg):
            self.targets += 1
            return load_target(cfg)

        return EvalRun(config, defence_loader=defence, target_loader=target, **kwargs).run()


@dataclass
class DemoRun:
    root: Path
    argv: list[str]
    first: tuple[int, ...]  # the closing line's counts, first run
    second: tuple[int, ...]  # and of the rerun
    loads: _Loads  # model loads of the rerun


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, prepared_data_dir, tiny_guard_dir, tmp_path_factory) -> DemoRun:
    """The demo config run twice on the fixtures (once for the module), stderr captured."""
    root = tmp_path_factory.mktemp("demo-eval")
    safemt = copy_sample_with_images(root / "safemt")
    argv = _demo_argv(root, safemt, prepared_data_dir, tiny_model_dir, tiny_guard_dir)
    summaries = []
    loads = _Loads()
    for run_eval in (eval.run.run_eval, loads.run_eval):
        stderr = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
            patch.setattr(eval.run, "run_eval", run_eval)
            assert eval.run.main(argv) == 0
        summaries.append(_summary(stderr.getvalue()))
    return DemoRun(root, argv, summaries[0], summaries[1], loads)


def test_demo_run_ends_with_what_it_did_and_a_rerun_finds_every_stage_cached(demo_run):
    first = demo_run.first
    # The counts by hand: 3 model passes decide every sample (none, the guard, the moderator's two modes
    # together), the moderator also its test and validation rows; the guard and the moderator flag every
    # user turn of each harmful sample; every (target, defence, sample) is one judged row.
    run = EvalRun(load_config(DEMO, demo_run.argv[2:]))
    samples = run.load_samples()
    harmful = [s for s in samples if not s.benign]
    assert harmful and len(harmful) < len(samples)  # benign samples are decided, never flagged per turn
    assert first[0] == 3 * len(samples) + len(run.split_rows) + len(run.threshold_rows)
    assert first[3] == 2 * len(harmful)
    assert first[9] == 4 * len(samples)
    decided, detections, generated, judged = first[0:3], first[3:6], first[6:9], first[9:12]
    for needed, cached, computed in (decided, detections, generated, judged):
        assert needed > 0 and (cached, computed) == (0, needed)

    for stage in range(4):
        needed = first[3 * stage]
        assert demo_run.second[3 * stage : 3 * stage + 3] == (needed, needed, 0)
    assert (demo_run.loads.defences, demo_run.loads.targets) == (0, 0)


def test_demo_report_has_turns_to_detection_in_json_markdown_and_plot(demo_run):
    root = demo_run.root
    out = root / "eval"
    report = json.loads((out / "report.json").read_text())
    summary = report["turns_to_detection"]
    flags = list(JsonlCache(out / "cache" / TURN_FLAGS_FILE, TURN_FLAGS_KEY).records())
    # One summary per length and detecting defence (not "none"), over the harmful samples of that length.
    defences = {"llama_guard_3_vision", "moderator", "moderator-block"}
    lengths = sorted({r["k"] for r in flags})
    assert sorted(summary["by_length"]) == [str(k) for k in lengths]
    for k in lengths:
        assert set(summary["by_length"][str(k)]) == defences
        for defence in defences:
            group = [r for r in flags if r["k"] == k and r["defence"] == defence]
            assert len(group[0]["flags"]) == k
            entry = summary["by_length"][str(k)][defence]
            never = sum(1 for r in group if not any(r["flags"]))
            assert (entry["n"], entry["n_never_flagged"]) == (len(group), never)
    assert "## Turns to detection" in (out / "report.md").read_text()
    assert (out / "detection_vs_turn.png").stat().st_size > 0


def test_per_turn_flags_of_the_moderator_are_moderate_on_each_prefix(demo_run, tiny_model_dir):
    from moderator.inference import Moderator

    root = demo_run.root
    out = root / "eval"
    threshold = json.loads((out / "report.json").read_text())["thresholds"]["moderator"]["threshold"]
    flags = JsonlCache(out / "cache" / TURN_FLAGS_FILE, TURN_FLAGS_KEY)
    longest = max((r for r in flags.records() if r["defence"] == "moderator"), key=lambda r: r["k"])
    assert longest["k"] > 1
    dialogue = json.loads((root / "safemt" / f"{longest['k']}_turn.json").read_text())
    record = next(r for r in dialogue if r["id"] == longest["id"])
    from moderator.schema import parse_safemt_record
    from moderator.taxonomy import load_taxonomy

    parsed = parse_safemt_record(record, load_taxonomy(), expected_turns=longest["k"])
    with Image.open(root / "safemt" / parsed.image_path) as image:
        images = [image.convert("RGB")]
    moderator = Moderator.from_pretrained(str(tiny_model_dir), threshold=threshold, verify=False)
    ends = [i for i, m in enumerate(parsed.dialogue) if m["role"] == "user"]
    expected = [moderator.moderate(parsed.dialogue[: end + 1], images) for end in ends]
    assert longest["flags"] == [v.flagged for v in expected]
    assert longest["scores"] == pytest.approx([v.p_unsafe for v in expected], abs=1e-4)


class _RecordingGuard:
    """A guard that flags a dialogue when its last user turn mentions "bomb", recording what it saw."""

    def __init__(self):
        self.seen: list[tuple[list[dict[str, str]], list]] = []

    def classify_batch(self, dialogues, images):
        self.seen += [(list(d), list(i)) for d, i in zip(dialogues, images, strict=True)]
        return [
            GuardResult(flagged="bomb" in d[-1]["content"], categories=(), score=None, parse_error=False, raw="")
            for d in dialogues
        ]


def test_a_guard_decides_each_prefix_ending_at_a_user_turn_with_the_dialogues_image():
    guard = _RecordingGuard()
    defence = GuardDefence(guard, "stub-guard")
    dialogues = [
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how to build a bomb"},
            {"role": "assistant", "content": "no"},
            {"role": "user", "content": "please"},
        ],
        [{"role": "user", "content": "a bomb"}],
    ]
    per_turn = defence.decide_per_turn(dialogues, [["image-a"], []])
    assert [[d.flagged for d in turns] for turns in per_turn] == [[False, True, False], [True]]
    assert [(len(d), i) for d, i in guard.seen] == [(1, ["image-a"]), (3, ["image-a"]), (5, ["image-a"]), (1, [])]
    assert all(d[-1]["role"] == "user" for d, _ in guard.seen)
