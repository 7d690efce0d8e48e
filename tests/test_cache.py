import json

import pytest

from eval.cache import CacheError, JsonlCache, compute_missing, settings_digest

KEY_FIELDS = ("id", "k")


class Interrupted(RuntimeError):
    pass


def _squares(calls: list[int], fail_after: int | None = None):
    """A compute function that records every item it is asked for and can crash after N items."""

    def compute(batch):
        records = []
        for item in batch:
            if fail_after is not None and len(calls) >= fail_after:
                raise Interrupted(f"crash after {fail_after} items")
            calls.append(item)
            records.append({"id": f"s{item}", "k": item % 3, "value": item * item})
        return records

    return compute


def _key(item):
    return (f"s{item}", item % 3)


def test_interrupted_run_resumes_and_computes_only_the_rest(tmp_path):
    path = tmp_path / "cache.jsonl"
    items = list(range(10))
    first_calls: list[int] = []
    with pytest.raises(Interrupted):
        compute_missing(JsonlCache(path, KEY_FIELDS), items, _key, _squares(first_calls, fail_after=5), batch_size=2)
    # Batches [0,1], [2,3] finished and were flushed; batch [4,5] crashed at item 5 and was not written.
    assert first_calls == [0, 1, 2, 3, 4]
    assert len(path.read_text().splitlines()) == 4

    second_calls: list[int] = []
    cache = JsonlCache(path, KEY_FIELDS)
    assert compute_missing(cache, items, _key, _squares(second_calls), batch_size=2) == 6
    assert second_calls == [4, 5, 6, 7, 8, 9]
    assert {r["value"] for r in cache.records()} == {i * i for i in items}

    third_calls: list[int] = []
    reopened = JsonlCache(path, KEY_FIELDS)
    assert compute_missing(reopened, items, _key, _squares(third_calls), batch_size=2) == 0
    assert third_calls == []
    assert reopened.get(("s7", 1))["value"] == 49


def test_truncated_last_line_is_dropped_with_a_warning_and_recomputed(tmp_path):
    path = tmp_path / "cache.jsonl"
    compute_missing(JsonlCache(path, KEY_FIELDS), [0, 1, 2], _key, _squares([]), batch_size=3)
    text = path.read_text()
    # Simulate a crash in the middle of writing the last record.
    path.write_text(text[: len(text) - 9])
    with pytest.warns(RuntimeWarning, match=r"cache\.jsonl:3: dropped a truncated last line"):
        cache = JsonlCache(path, KEY_FIELDS)
    assert len(cache) == 2 and ("s2", 2) not in cache
    calls: list[int] = []
    compute_missing(cache, [0, 1, 2], _key, _squares(calls), batch_size=3)
    assert calls == [2]
    # The broken fragment was cut off, so the file is valid JSONL again.
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["s0", "s1", "s2"]


def test_last_record_without_newline_is_kept_and_next_append_starts_a_new_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"id": "a", "k": 1, "value": 1}')
    cache = JsonlCache(path, KEY_FIELDS)
    assert cache.get(("a", 1))["value"] == 1
    cache.append([{"id": "b", "k": 1, "value": 2}])
    assert len(JsonlCache(path, KEY_FIELDS)) == 2


def test_a_broken_line_before_the_end_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"id": "a", "k": 1}\n{"id": "b", \n{"id": "c", "k": 1}\n')
    with pytest.raises(CacheError, match=r"cache\.jsonl:2: unreadable cache line"):
        JsonlCache(path, KEY_FIELDS)


def test_a_record_without_its_key_fields_is_rejected(tmp_path):
    cache = JsonlCache(tmp_path / "cache.jsonl", KEY_FIELDS)
    with pytest.raises(KeyError, match=r"lacks key field\(s\) \['k'\]"):
        cache.append([{"id": "a"}])


def test_results_must_match_their_items(tmp_path):
    cache = JsonlCache(tmp_path / "cache.jsonl", KEY_FIELDS)
    with pytest.raises(RuntimeError, match="result key"):
        compute_missing(cache, [1], _key, lambda batch: [{"id": "other", "k": 0}], batch_size=1)
    assert len(cache) == 0


def test_settings_digest_is_order_independent_and_changes_with_values():
    assert settings_digest({"a": 1, "b": 2}) == settings_digest({"b": 2, "a": 1})
    assert settings_digest({"a": 1}) != settings_digest({"a": 2})


def test_records_flagged_by_recompute_are_computed_again_and_replace_the_cached_ones(tmp_path):
    # A judge that was down on the first run left "error" records; they must not stay cached forever.
    path = tmp_path / "cache.jsonl"

    def first_run(batch):
        return [{"id": f"s{i}", "k": i % 3, "value": "error" if i in (1, 3) else i * i} for i in batch]

    compute_missing(JsonlCache(path, KEY_FIELDS), range(5), _key, first_run, batch_size=2)
    # Without recompute, cached records are final.
    assert compute_missing(JsonlCache(path, KEY_FIELDS), range(5), _key, _squares([]), batch_size=2) == 0

    calls: list[int] = []
    cache = JsonlCache(path, KEY_FIELDS)
    failed = lambda record: record["value"] == "error"  # noqa: E731
    assert compute_missing(cache, range(5), _key, _squares(calls), batch_size=2, recompute=failed) == 2
    assert calls == [1, 3]
    reopened = JsonlCache(path, KEY_FIELDS)
    assert [reopened.get(_key(i))["value"] for i in range(5)] == [0, 1, 4, 9, 16]
    # Once filled in, nothing is asked again.
    assert compute_missing(reopened, range(5), _key, _squares([]), batch_size=2, recompute=failed) == 0


# -- the output folder lock --------------------------------------------------------------------------

_HOLD = """
import sys, time
from eval.cache import lock_out_dir
with lock_out_dir(sys.argv[1], sys.argv[2] or None):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Start another process that holds ``out_dir`` (whole run or one shard) until the test ends."""
    import subprocess
    import sys

    processes = []

    def start(out_dir, shard=""):
        process = subprocess.Popen(
            [sys.executable, "-c", _HOLD, str(out_dir), shard], stdout=subprocess.PIPE, text=True
        )
        processes.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def _refused(out_dir, shard, match):
    from eval.cache import OutDirLockedError, lock_out_dir

    with pytest.raises(OutDirLockedError, match=match), lock_out_dir(out_dir, shard):
        pytest.fail("the lock was granted")


def test_a_second_eval_on_the_same_out_dir_fails_at_once_naming_folder_and_pid(tmp_path, holder):
    from eval.cache import lock_out_dir

    out_dir = tmp_path / "eval"
    other = holder(out_dir)
    _refused(out_dir, None, rf"^{out_dir}: another eval is writing this folder \(pid {other.pid}\)")
    _refused(out_dir, "0-of-2", rf"a whole \(unsharded\) eval is writing this folder \(pid {other.pid}\)")
    other.kill()
    other.wait()
    with lock_out_dir(out_dir):  # released when its holder dies (kill -9 included)
        pass


def test_shards_of_one_run_go_together_but_not_twice_and_a_whole_run_waits_for_them(tmp_path, holder):
    from eval.cache import lock_out_dir

    out_dir = tmp_path / "eval"
    shard0 = holder(out_dir, "0-of-2")
    with lock_out_dir(out_dir, "1-of-2"):  # another shard of the same run
        pass
    _refused(out_dir, "0-of-2", rf"shard 0-of-2 is already running \(pid {shard0.pid}\)")
    _refused(out_dir, None, rf"another eval is writing this folder \(shard 0-of-2 pid {shard0.pid}\)")


def test_eval_run_refuses_an_out_dir_another_eval_holds(tmp_path, holder, capsys):
    from eval.run import main

    out_dir = tmp_path / "eval"
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"safemt_dir: {tmp_path}\nout_dir: {out_dir}\ntargets: [{{model: unused}}]\ndefences: [{{kind: none}}]\n"
    )
    other = holder(out_dir)
    assert main(["--config", str(config)]) == 4
    assert capsys.readouterr().err == (
        f"error: {out_dir}: another eval is writing this folder (pid {other.pid}); "
        "wait for it to finish or choose another out_dir\n"
    )
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock"]  # nothing else written


def test_other_processes_files_are_read_never_cut_and_the_own_file_wins(tmp_path):
    shard = tmp_path / "shard-0-of-2" / "cache.jsonl"
    shard.parent.mkdir()
    # The shard is writing its third line right now: that line is incomplete.
    shard.write_text('{"id": "a", "k": 1, "value": 1}\n{"id": "b", "k": 1, "value": 2}\n{"id": "c", "k"')
    before = shard.read_bytes()
    own = tmp_path / "cache.jsonl"
    own.write_text('{"id": "b", "k": 1, "value": 20}\n')
    with pytest.warns(RuntimeWarning, match="still being written by another process"):
        cache = JsonlCache(own, KEY_FIELDS, read_also=[shard])
    assert shard.read_bytes() == before  # never truncated: it is not this process's file
    assert {key: r["value"] for key, r in ((cache.key_of(r), r) for r in cache.records())} == {
        ("a", 1): 1,
        ("b", 1): 20,  # this process's record (e.g. a judge error judged again) supersedes the shard's
    }
    cache.append([{"id": "c", "k": 1, "value": 3}])
    assert shard.read_bytes() == before and len(own.read_text().splitlines()) == 2
