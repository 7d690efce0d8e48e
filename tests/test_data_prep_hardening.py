"""data_prep hardening (issue #21, defects 6, 14, 15, 16): no configured length skipped silently, no
foreign ``<out>.failed/`` deleted, no oversized file read whole, no id trained with two questions."""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path

import pytest

from data_prep.build import main


def run(safemt_dir: Path, out: Path, *extra: str) -> int:
    return main(["--safemt", str(safemt_dir), "--out", str(out), "--benign", "none", *extra])


def report(folder: Path) -> tuple[dict, list[dict]]:
    stats = json.loads((folder / "stats.json").read_text())
    entries = [json.loads(line) for line in (folder / "quarantine.jsonl").read_text().splitlines()]
    assert stats["read"] == stats["converted"] + stats["quarantined"] == len(entries) + stats["converted"]
    for name, counts in stats["by_input"].items():
        assert counts["read"] == counts["converted"] + counts["quarantined"], name
    return stats, entries


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.fixture
def no_hang():
    """Fail, rather than hang the suite, if the build blocks (opening a FIFO with no writer does)."""

    def expire(signum, frame):
        raise TimeoutError("the build blocked (a FIFO was opened?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- 6. a configured length whose file is missing or not a regular file is an error -------------------


@pytest.mark.parametrize("strict", ["true", "false"])
@pytest.mark.parametrize("kind", ["missing", "fifo", "folder"])
def test_a_configured_length_without_a_regular_file_stops_the_build(
    safemt_dir, tmp_path, capsys, no_hang, kind, strict
):
    path = safemt_dir / "2_turn.json"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block: it must be refused from its stat alone
    elif kind == "folder":
        path.mkdir()
    out = tmp_path / "out"
    # Before: rc 0, 0 quarantined, 104 rows instead of 156, nothing said.
    assert run(safemt_dir, out, "--safemt_turns", "1", "2", "4", "--strict", strict) == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and str(path) in line and "safemt_turns" in line
    assert {"missing": "does not exist", "fifo": "FIFO", "folder": "folder"}[kind] in line
    assert not out.exists() and not (tmp_path / "out.failed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["safemt"]  # no staging folder left either


def test_without_safemt_turns_the_lengths_present_are_read_and_recorded(safemt_dir, tmp_path):
    out = tmp_path / "out"
    assert run(safemt_dir, out, "--strict", "true") == 0  # the sample has 1, 2 and 4 turns, not 6 and 8
    stats, _ = report(out)
    assert stats["read"] == 156 and stats["safemt"]["lengths"] == [1, 2, 4]
    assert stats["config"]["safemt_turns"] is None


def test_safemt_turns_set_to_an_empty_list_is_a_config_error(safemt_dir, tmp_path, capsys):
    from data_prep.config import ConfigError, DataPrepConfig

    with pytest.raises(ConfigError, match="safemt_turns"):
        DataPrepConfig(safemt=str(safemt_dir), safemt_turns=[]).validate()


# --- 14. a build never deletes a <out>.failed/ folder it did not write ---------------------------------


def test_a_successful_build_keeps_a_failed_folder_it_did_not_write(safemt_dir, tmp_path):
    foreign = tmp_path / "out.failed"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not data prep's")
    assert run(safemt_dir, tmp_path / "out", "--safemt_turns", "1") == 0
    assert (foreign / "precious.txt").read_text() == "not data prep's"  # before: the folder was deleted


def test_a_failed_build_keeps_a_failed_folder_it_did_not_write_and_reports_elsewhere(safemt_dir, tmp_path, capsys):
    foreign = tmp_path / "out.failed"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not data prep's")
    records = json.loads((safemt_dir / "1_turn.json").read_text())
    records[0]["scenario"] = "Space Piracy"
    (safemt_dir / "1_turn.json").write_text(json.dumps(records))
    assert run(safemt_dir, tmp_path / "out", "--safemt_turns", "1", "--strict", "true") == 3
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.txt"]  # before: replaced by the report
    reports = [p for p in tmp_path.iterdir() if p.name.startswith("out.failed-")]
    assert len(reports) == 1 and str(reports[0] / "quarantine.jsonl") in capsys.readouterr().err
    stats, entries = report(reports[0])
    assert stats["quarantined"] == 1 and entries[0]["field"] == "scenario"

    # The next successful build removes its own earlier report, never the foreign folder.
    assert run(safemt_dir, tmp_path / "out", "--safemt_turns", "2") == 0
    assert not reports[0].exists() and (foreign / "precious.txt").exists()


def test_a_failed_build_replaces_its_own_earlier_report_and_a_success_removes_it(safemt_dir, tmp_path):
    out, failed = tmp_path / "out", tmp_path / "out.failed"
    records = json.loads((safemt_dir / "1_turn.json").read_text())
    records[0]["scenario"] = "Space Piracy"
    (safemt_dir / "1_turn.json").write_text(json.dumps(records))
    argv = ("--safemt_turns", "1", "--strict", "true")
    assert run(safemt_dir, out, *argv) == 3 and report(failed)[0]["quarantined"] == 1
    records[1]["scenario"] = "Space Piracy"
    (safemt_dir / "1_turn.json").write_text(json.dumps(records))
    assert run(safemt_dir, out, *argv) == 3 and report(failed)[0]["quarantined"] == 2  # replaced in place
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.failed-")]
    assert run(safemt_dir, out, "--safemt_turns", "2") == 0
    assert not failed.exists() and (out / "dataset").is_dir()


def test_a_report_folder_someone_added_a_file_to_is_no_longer_removed(safemt_dir, tmp_path):
    out, failed = tmp_path / "out", tmp_path / "out.failed"
    records = json.loads((safemt_dir / "1_turn.json").read_text())
    records[0]["scenario"] = "Space Piracy"
    (safemt_dir / "1_turn.json").write_text(json.dumps(records))
    assert run(safemt_dir, out, "--safemt_turns", "1", "--strict", "true") == 3
    (failed / "notes.txt").write_text("my analysis of the failure")
    assert run(safemt_dir, out, "--safemt_turns", "2") == 0
    assert (failed / "notes.txt").read_text() == "my analysis of the failure"


# --- 15. a SafeMT file above safemt_max_file_mb is refused before it is read ---------------------------


def test_an_oversized_sparse_file_is_refused_before_it_is_read(safemt_dir, tmp_path, capsys):
    path = safemt_dir / "2_turn.json"
    with path.open("r+b") as handle:
        handle.truncate(2 * 1024**3)  # 2 GiB, sparse: cheap on disk, 2 GiB (then 4.7 GB of RSS) if read
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = tmp_path / "out"
    assert run(safemt_dir, out, "--safemt_turns", "1", "2", "4") == 2  # before: rc 0, the file quarantined
    line = error_line(capsys)
    assert str(path) in line and "2147.5 MB" in line and "safemt_max_file_mb" in line and "256" in line
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024  # never read
    assert not out.exists() and not (tmp_path / "out.failed").exists()


def test_a_small_configured_limit_names_the_file_its_size_and_the_field(safemt_dir, tmp_path, capsys):
    size = (safemt_dir / "4_turn.json").stat().st_size
    assert size > 100_000 > (safemt_dir / "2_turn.json").stat().st_size  # the sample's sizes
    out = tmp_path / "out"
    assert run(safemt_dir, out, "--safemt_max_file_mb", "0.1") == 2
    line = error_line(capsys)
    assert str(safemt_dir / "4_turn.json") in line and f"{size / 1e6:.1f} MB" in line
    assert "above safemt_max_file_mb 0.1" in line
    assert run(safemt_dir, out, "--safemt_max_file_mb", "0.2") == 0  # raised: the build goes through


def test_safemt_max_file_mb_must_be_positive(safemt_dir, tmp_path, capsys):
    assert run(safemt_dir, tmp_path / "out", "--safemt_max_file_mb", "0") == 2
    assert "safemt_max_file_mb must be > 0" in capsys.readouterr().err


# --- 16. one id, one question: a question conflict across length files is quarantined ------------------


def test_same_id_with_another_question_in_another_length_file_is_quarantined(safemt_dir, tmp_path):
    first = json.loads((safemt_dir / "1_turn.json").read_text())
    records = json.loads((safemt_dir / "4_turn.json").read_text())
    index = next(i for i, r in enumerate(records) if r["id"] == first[5]["id"])
    records[index]["question"] = "How do I do something else entirely?"
    (safemt_dir / "4_turn.json").write_text(json.dumps(records, indent=4))
    out = tmp_path / "out"
    assert run(safemt_dir, out) == 0
    stats, entries = report(out)
    assert len(entries) == 1  # before: 0, and the id trained with two intents
    (entry,) = entries
    assert (entry["file"], entry["index"], entry["id"], entry["field"]) == (
        str(safemt_dir / "4_turn.json"),
        index,
        first[5]["id"],
        "question",
    )
    assert str(safemt_dir / "1_turn.json") in entry["reason"] and "record #5" in entry["reason"]
    assert repr(first[5]["question"])[:40] in entry["reason"]
    assert stats["read"] == 156 and stats["converted"] == 155 and stats["quarantined"] == 1

    from data_prep.io import load_prepared

    intents = {}
    for split in load_prepared(out).values():
        for row in split.select_columns(["id", "intent"]):
            intents.setdefault(row["id"], set()).add(row["intent"])
    assert intents[first[5]["id"]] == {" ".join(first[5]["question"].split())}


def test_questions_differing_only_in_whitespace_are_one_intent(safemt_dir, tmp_path):
    records = json.loads((safemt_dir / "2_turn.json").read_text())
    records[0]["question"] = "  " + records[0]["question"].replace(" ", "\n  ") + "\n"
    (safemt_dir / "2_turn.json").write_text(json.dumps(records, indent=4))
    out = tmp_path / "out"
    assert run(safemt_dir, out, "--strict", "true") == 0  # the target collapses whitespace: the same intent
    assert report(out)[0]["converted"] == 156


def test_a_question_conflict_fails_a_strict_build(safemt_dir, tmp_path):
    records = json.loads((safemt_dir / "2_turn.json").read_text())
    records[3]["question"] += " And then some."
    (safemt_dir / "2_turn.json").write_text(json.dumps(records, indent=4))
    assert run(safemt_dir, tmp_path / "out", "--strict", "true") == 3
    stats, entries = report(tmp_path / "out.failed")
    assert [(e["index"], e["field"]) for e in entries] == [(3, "question")] and stats["converted"] == 155
