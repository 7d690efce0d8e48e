"""data_prep bad input: every record read is converted or quarantined with its file, index, id, field and reason."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_prep.build import main
from data_prep.io import load_prepared


def run(safemt_dir: Path, tmp_path: Path, *extra: str) -> tuple[int, dict, list[dict]]:
    out = tmp_path / "out"
    code = main(["--safemt", str(safemt_dir), "--out", str(out), "--benign", "none", *extra])
    report = out if code == 0 else tmp_path / "out.failed"  # a failed build reports beside out
    stats = json.loads((report / "stats.json").read_text())
    entries = [json.loads(line) for line in (report / "quarantine.jsonl").read_text().splitlines()]
    assert stats["read"] == stats["converted"] + stats["quarantined"]
    assert len(entries) == stats["quarantined"]
    return code, stats, entries


def edit(safemt_dir: Path, turns: int, change) -> list[dict]:
    path = safemt_dir / f"{turns}_turn.json"
    records = json.loads(path.read_text())
    change(records)
    path.write_text(json.dumps(records, indent=4))
    return records


def only(entries: list[dict]) -> dict:
    assert len(entries) == 1, entries
    return entries[0]


def assert_names(entry: dict, file: Path, index: int | None, id: str | None, field: str) -> None:
    assert (entry["file"], entry["index"], entry["id"], entry["field"]) == (str(file), index, id, field)
    message = entry["message"]
    assert str(file) in message and f"field {field!r}" in message
    if index is not None:
        assert f"record #{index}" in message
    if id is not None:
        assert repr(id) in message


def test_missing_field(safemt_dir, tmp_path):
    records = edit(safemt_dir, 2, lambda r: r[3].pop("question"))
    code, stats, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "2_turn.json", 3, records[3]["id"], "question")
    assert entry["reason"] == "missing"
    assert code == 0 and stats["converted"] == 155 and stats["read"] == 156


@pytest.mark.parametrize("where", ["record", "message"])
def test_unknown_field(safemt_dir, tmp_path, where):
    def add(records):
        if where == "record":
            records[5]["label"] = "unsafe"
        else:
            records[5]["dialogue"][0]["name"] = "alice"

    records = edit(safemt_dir, 1, add)
    _, _, entries = run(safemt_dir, tmp_path)
    field = "label" if where == "record" else "dialogue[0].name"
    entry = only(entries)
    assert_names(entry, safemt_dir / "1_turn.json", 5, records[5]["id"], field)
    assert "unexpected field" in entry["reason"]


def test_unknown_scenario_label(safemt_dir, tmp_path):
    records = edit(safemt_dir, 4, lambda r: r[0].update(scenario="Space Piracy"))
    _, _, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "4_turn.json", 0, records[0]["id"], "scenario")
    assert "unknown scenario label 'Space Piracy'" in entry["reason"]


def test_role_order_broken(safemt_dir, tmp_path):
    records = edit(safemt_dir, 4, lambda r: r[2]["dialogue"][3].update(role="user"))
    _, _, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "4_turn.json", 2, records[2]["id"], "dialogue[3].role")
    assert "expected 'assistant'" in entry["reason"]


def test_dialogue_not_ending_with_a_user_turn(safemt_dir, tmp_path):
    records = edit(safemt_dir, 2, lambda r: r[4].update(dialogue=r[4]["dialogue"][:2]))
    _, _, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "2_turn.json", 4, records[4]["id"], "dialogue")
    assert "does not end with a user turn" in entry["reason"]


def test_wrong_length_for_its_file(safemt_dir, tmp_path):
    two_turn = json.loads((safemt_dir / "2_turn.json").read_text())[9]
    edit(safemt_dir, 4, lambda r: r.__setitem__(9, two_turn))
    _, _, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "4_turn.json", 9, two_turn["id"], "dialogue")
    assert entry["reason"] == "has 2 user turns, file is for 4"


def test_empty_assistant_content_is_quarantined_but_empty_user_content_is_not(safemt_dir, tmp_path):
    def blank(records):
        records[7]["dialogue"][1]["content"] = "  "
        records[8]["dialogue"][0]["content"] = ""  # real SafeMT has empty user turns: the image carries them

    records = edit(safemt_dir, 2, blank)
    code, stats, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "2_turn.json", 7, records[7]["id"], "dialogue[1].content")
    assert entry["reason"] == "empty assistant turn"
    converted = {(r["id"], r["turns"]) for split in load_prepared(tmp_path / "out").values() for r in split}
    assert (records[8]["id"], 2) in converted and (records[7]["id"], 2) not in converted


def test_content_that_is_not_a_string(safemt_dir, tmp_path):
    records = edit(safemt_dir, 1, lambda r: r[11]["dialogue"][0].update(content=["a", "list"]))
    _, _, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "1_turn.json", 11, records[11]["id"], "dialogue[0].content")
    assert "expected a string, got list" in entry["reason"]


def test_duplicate_id_within_one_length(safemt_dir, tmp_path):
    records = edit(safemt_dir, 1, lambda r: r.__setitem__(10, dict(r[2])))
    code, stats, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "1_turn.json", 10, records[2]["id"], "id")
    assert "duplicate id" in entry["reason"] and "first at record #2" in entry["reason"]
    rows = [r for split in load_prepared(tmp_path / "out").values() for r in split]
    assert Counter((r["id"], r["turns"]) for r in rows)[(records[2]["id"], 1)] == 1
    assert {r["turns"] for r in rows if r["id"] == records[2]["id"]} == {1, 2, 4}  # other lengths are fine


def test_missing_image_file(safemt_dir, tmp_path):
    record = json.loads((safemt_dir / "1_turn.json").read_text())[6]
    image = safemt_dir / record["image_path"]
    image.unlink()
    _, stats, entries = run(safemt_dir, tmp_path)
    assert len(entries) == 3  # the same image serves all three lengths of the id
    for entry, turns in zip(entries, (1, 2, 4), strict=True):
        assert_names(entry, safemt_dir / f"{turns}_turn.json", 6, record["id"], "image_path")
        assert entry["reason"] == f"image file not found: {image}"
    assert stats["converted"] == 153


def test_image_path_outside_the_images_folder(safemt_dir, tmp_path):
    records = edit(safemt_dir, 1, lambda r: r[0].update(image_path="../../../etc/hostname"))
    _, _, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "1_turn.json", 0, records[0]["id"], "image_path")
    assert "outside the images folder" in entry["reason"]


def test_jpeg_cut_off_halfway_is_caught_and_each_image_checked_once(safemt_dir, tmp_path, monkeypatch):
    import numpy as np

    import data_prep.images

    record = next(r for r in json.loads((safemt_dir / "1_turn.json").read_text()) if r["image_path"].endswith(".jpg"))
    image = safemt_dir / record["image_path"]
    noise = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image, format="JPEG")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with Image.open(image) as cut:
        cut.verify()  # the header check alone passes: only a full decode finds the damage

    calls = Counter()
    real_check = data_prep.images.check_image

    def counting_check(path):
        calls[path] += 1
        return real_check(path)

    monkeypatch.setattr(data_prep.images, "check_image", counting_check)
    _, stats, entries = run(safemt_dir, tmp_path)
    assert len(entries) == 3
    for entry in entries:
        assert entry["id"] == record["id"] and entry["field"] == "image_path"
        assert (
            "cannot be decoded" in entry["reason"] and "truncated" in entry["reason"] and str(image) in entry["reason"]
        )
    assert len(calls) == 52 and set(calls.values()) == {1}


def test_non_utf8_file_is_quarantined_whole_with_its_position(safemt_dir, tmp_path):
    path = safemt_dir / "2_turn.json"
    data = path.read_bytes()
    offset = data.index(b'"question": "') + len(b'"question": "') + 3
    path.write_bytes(data[:offset] + b"\xe9" + data[offset + 1 :])  # a Latin-1 e-acute
    code, stats, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, path, None, None, "<file>")
    line = data[:offset].count(b"\n") + 1
    assert f"not valid UTF-8: byte 0xe9 at byte offset {offset} (line {line})" in entry["reason"]
    assert "whole file" in entry["message"]
    assert code == 0 and stats["converted"] == 104 and stats["read"] == 105


def test_truncated_json_file_names_line_column_and_record(safemt_dir, tmp_path):
    path = safemt_dir / "4_turn.json"
    text = path.read_text()
    starts = [m.start() for m in re.finditer(r'"id": "', text)]
    cut = (starts[20] + starts[21]) // 2  # inside record #20
    path.write_text(text[:cut])
    record_20 = json.loads(text)[20]
    _, stats, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, path, None, record_20["id"], "<file>")
    line = text[:cut].count("\n") + 1
    assert re.search(rf"invalid JSON at line {line} column \d+ \(char \d+\)", entry["reason"])
    assert "parsing stopped in record #20" in entry["reason"] and "truncated" in entry["reason"]
    assert stats["converted"] == 104


def test_strict_mode_exits_non_zero_and_writes_no_dataset(safemt_dir, tmp_path, capsys):
    edit(safemt_dir, 1, lambda r: r[0].update(scenario="Space Piracy"))
    code, stats, entries = run(safemt_dir, tmp_path, "--strict")
    assert code == 3 and len(entries) == 1 and stats["dataset"] is None
    assert not (tmp_path / "out" / "dataset").exists()
    assert "--strict: 1 record(s) quarantined" in capsys.readouterr().err


def test_strict_mode_with_clean_input_succeeds(safemt_dir, tmp_path):
    code, stats, entries = run(safemt_dir, tmp_path, "--strict", "--safemt_turns", "1")
    assert code == 0 and entries == [] and stats["read"] == stats["converted"] == 52


def test_bad_benign_rows_are_quarantined_by_line(safemt_dir, tmp_path):
    good = {"id": "ok_1", "messages": [{"role": "user", "content": "Nice weather today."}]}
    unknown_role = {
        "id": "bad_1",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep"}],
    }
    missing_image = {"id": "bad_2", "messages": [{"role": "user", "content": "Look"}], "images": ["nope.png"]}
    path = tmp_path / "benign.jsonl"
    path.write_bytes(
        (json.dumps(good) + "\n").encode()
        + b'{"id": "broken", "messages": [\n'
        + b'{"id": "latin1", "messages": "caf\xe9"}\n'
        + (json.dumps(unknown_role) + "\n").encode()
        + (json.dumps(missing_image) + "\n").encode()
    )
    out = tmp_path / "out"
    code = main(["--safemt", str(safemt_dir), "--out", str(out), "--benign", str(path), "--benign_ratio", "5"])
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    entries = {e["index"]: e for e in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())}
    assert stats["by_input"]["benign"] == {"read": 5, "converted": 1, "quarantined": 4}
    assert_names(entries[1], path, 1, None, "<line>")
    assert "line 2 is not valid JSON" in entries[1]["reason"]
    assert_names(entries[2], path, 2, None, "<line>")
    assert "line 3 is not valid UTF-8" in entries[2]["reason"]
    assert_names(entries[3], path, 3, "bad_1", "messages[1].role")
    assert entries[3]["reason"] == "unknown role 'robot'"
    assert_names(entries[4], path, 4, "bad_2", "images")
    assert entries[4]["reason"] == f"image file not found: {tmp_path / 'nope.png'}"


def _same_reason_for_each(entries: list[dict], paths: list[str]) -> str:
    """The reasons with each entry's own path taken out: one text, whatever lies outside."""
    reasons = {entry["reason"].replace(repr(path), "<path>") for entry, path in zip(entries, paths, strict=True)}
    assert len(reasons) == 1, reasons
    return reasons.pop()


def test_links_in_the_images_folder_that_lead_outside_are_quarantined_alike(safemt_dir, tmp_path):
    from moderator.images import placeholder_image

    outside = tmp_path / "outside"
    outside.mkdir()
    placeholder_image("secret").save(outside / "secret.jpg")
    images = safemt_dir / "images"
    (images / "leak.jpg").symlink_to(outside / "secret.jpg")  # a file link
    (images / "leakdir").symlink_to(outside, target_is_directory=True)  # a folder link
    (images / "dangling.jpg").symlink_to(outside / "missing.jpg")
    records = json.loads((safemt_dir / "1_turn.json").read_text())
    (images / "alias.jpg").symlink_to(safemt_dir / records[5]["image_path"])  # a link that stays inside
    bad = [
        "images/leak.jpg",
        "images/leakdir/secret.jpg",  # exists outside
        "images/leakdir/missing.jpg",  # does not
        "images/dangling.jpg",
        str(outside / "secret.jpg"),  # absolute
        "images/../../outside/secret.jpg",
    ]

    def point(records):
        for index, path in enumerate(bad):
            records[index]["image_path"] = path
        records[len(bad)]["image_path"] = "images/alias.jpg"

    records = edit(safemt_dir, 1, point)
    code, stats, entries = run(safemt_dir, tmp_path)
    assert code == 0 and stats["converted"] == 156 - len(bad)
    assert [e["index"] for e in entries] == list(range(len(bad)))
    for entry, index in zip(entries, range(len(bad)), strict=True):
        assert_names(entry, safemt_dir / "1_turn.json", index, records[index]["id"], "image_path")
    reason = _same_reason_for_each(entries, bad)
    assert reason == f"<path> points outside the images folder {safemt_dir.resolve()}"


def test_benign_image_paths_must_stay_inside_the_source_folder(safemt_dir, tmp_path):
    from moderator.images import placeholder_image

    folder, outside = tmp_path / "benign", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    placeholder_image("cat").save(folder / "cat.png")
    placeholder_image("secret").save(outside / "secret.png")
    (folder / "link.png").symlink_to(outside / "secret.png")
    (folder / "linkdir").symlink_to(outside, target_is_directory=True)
    bad = [
        "../outside/secret.png",
        str(outside / "secret.png"),
        "link.png",
        "linkdir/secret.png",
        "../outside/nope.png",
    ]
    good = ["cat.png", str(folder / "cat.png")]
    rows = [
        {"id": f"row_{i}", "messages": [{"role": "user", "content": f"Look {i}"}], "images": [image]}
        for i, image in enumerate(bad + good)
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["--safemt", str(safemt_dir), "--out", str(out), "--benign", str(path), "--benign_ratio", "1"]
    assert main([*argv, "--safemt_turns", "1", "--benign_turns", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["by_input"]["benign"] == {"read": len(rows), "converted": len(good), "quarantined": len(bad)}
    entries = sorted(map(json.loads, (out / "quarantine.jsonl").read_text().splitlines()), key=lambda e: e["id"])
    assert [(e["id"], e["field"]) for e in entries] == [(f"row_{i}", "images") for i in range(len(bad))]
    reason = _same_reason_for_each(entries, bad)
    assert reason == f"<path> points outside the benign source folder {folder.resolve()}"
    splits = load_prepared(out).values()
    converted = {i for split in splits for i, label in zip(split["id"], split["label"], strict=True) if label == "safe"}
    assert converted == {"row_5", "row_6"}


def test_hub_snapshot_images_may_link_into_the_blob_store_only(tmp_path, monkeypatch):
    """A hub snapshot's files are links into the cache's blobs/: those are followed, nothing else is."""
    import huggingface_hub

    from data_prep.images import ImagePathError, resolve_inside
    from data_prep.safemt import open_safemt

    repo = tmp_path / "hub" / "datasets--HappyCorpse--SafeMT"
    snapshot = repo / "snapshots" / "abc123"
    (snapshot / "images").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_bytes(b"image bytes")
    (snapshot / "images" / "a.jpg").symlink_to(repo / "blobs" / "f00d")
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    (snapshot / "images" / "b.jpg").symlink_to(tmp_path / "secret.jpg")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(snapshot))

    source = open_safemt("HappyCorpse/SafeMT", [1])
    assert source.link_roots == ((repo / "blobs").resolve(),)
    assert resolve_inside(source.images_root, "images/a.jpg", also_allowed=source.link_roots).read_bytes() == (
        b"image bytes"
    )
    with pytest.raises(ImagePathError, match="points outside the images folder"):
        resolve_inside(source.images_root, "images/b.jpg", also_allowed=source.link_roots)


def test_same_id_with_another_scenario_in_another_length_file_names_both_files(safemt_dir, tmp_path):
    first = json.loads((safemt_dir / "1_turn.json").read_text())
    other = next(r["scenario"] for r in first if r["scenario"] != first[0]["scenario"])
    edit(safemt_dir, 2, lambda r: r[0].update(scenario=other))
    code, stats, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "2_turn.json", 0, first[0]["id"], "scenario")
    assert str(safemt_dir / "1_turn.json") in entry["reason"] and "record #0" in entry["reason"]
    assert repr(other) in entry["reason"] and repr(first[0]["scenario"]) in entry["reason"]
    assert code == 0 and stats["converted"] == 155


def test_inputs_that_used_to_crash_are_quarantined_and_the_rest_converts(safemt_dir, tmp_path):
    from moderator.images import placeholder_image

    deep = "[" * 100_000 + "]" * 100_000  # RecursionError inside json
    (safemt_dir / "4_turn.json").write_text(deep)
    edit(safemt_dir, 1, lambda r: r[3].update(image_path="images/a\u0000.jpg"))  # ValueError in the filesystem
    folder = tmp_path / "benign"
    folder.mkdir()
    placeholder_image("cat").save(folder / "cat.png")
    rows = [
        {"id": "good", "messages": [{"role": "user", "content": "Hello"}], "images": ["cat.png"]},
        {
            "id": "str_bytes",
            "messages": [{"role": "user", "content": "Hi"}],
            "images": [{"bytes": "abc", "path": "x.png"}],
        },
        {"id": "nul", "messages": [{"role": "user", "content": "Hey"}], "images": ["cat\u0000.png"]},
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + deep + "\n")
    code, stats, entries = run(
        safemt_dir, tmp_path, "--benign", str(path), "--benign_ratio", "1", "--benign_turns", "1"
    )
    assert code == 0
    by_where = {(e["input"], Path(e["file"]).name, e["index"]): e for e in entries}
    whole_file = by_where[("safemt", "4_turn.json", None)]
    assert whole_file["field"] == "<file>" and "nested too deeply" in whole_file["reason"]
    nul = by_where[("safemt", "1_turn.json", 3)]
    assert nul["field"] == "image_path" and "NUL byte" in nul["reason"]
    assert by_where[("benign", "rows.jsonl", 1)]["reason"] == "image 'bytes' must be raw bytes, got str"
    assert "NUL byte" in by_where[("benign", "rows.jsonl", 2)]["reason"]
    deep_line = by_where[("benign", "rows.jsonl", 3)]
    assert deep_line["field"] == "<line>" and "nested too deeply" in deep_line["reason"]
    assert len(entries) == 5
    assert stats["by_input"]["safemt"]["converted"] == 2 * 52 - 1
    assert stats["by_input"]["benign"]["converted"] == 1


def test_github_layout_dialogue_stored_as_json_text_gets_a_clear_reason(safemt_dir, tmp_path):
    records = edit(safemt_dir, 1, lambda r: r[2].update(dialogue=json.dumps(r[2]["dialogue"])))
    code, stats, entries = run(safemt_dir, tmp_path)
    entry = only(entries)
    assert_names(entry, safemt_dir / "1_turn.json", 2, records[2]["id"], "dialogue")
    assert "a JSON string" in entry["reason"] and "list of {role, content} objects" in entry["reason"]


def test_a_processor_that_does_not_exist_is_a_one_line_error(safemt_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--safemt", str(safemt_dir), "--out", str(out), "--benign", "none", "--processor", str(tmp_path / "nope")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: processor ") and str(tmp_path / "nope") in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
