"""Sharded eval: ``--shard I/N`` runs merge into the report a single process writes, and the launcher.

The shard/merge identity runs ``python -m eval.run``'s ``main`` in-process on the tiny models (a few
seconds); the launcher runs under bash with a stand-in ``sbatch`` on PATH (no cluster needed).
"""

from __future__ import annotations

import json

import eval.run
from eval.cache import JsonlCache
from eval.loop import EvalRun, Shard
from eval.run import main
from moderator.taxonomy import load_taxonomy
from tests.test_eval_loop import IDS, Counting, _prepared_dataset, eval_inputs  # noqa: F401 (fixture)

N_SHARDS = 3  # the 2 held-out SafeMT ids and 2 benign ids fall into every one of 3 shards


def _write_config(path, safemt_dir, benign, model_dir, prepared):
    config = {
        "safemt_dir": str(safemt_dir),
        "benign": str(benign),
        # Test rows shard too; validation fixes the threshold. Attacked: the 2 test-split ids at 2 lengths.
        "detection_split": str(prepared),
        "turns": [1, 2],
        "max_new_tokens": 4,
        # One item per model call: a batch's padding moves scores in the 7th digit, and a shard's batches
        # necessarily hold other items than a single process's; at batch 1 every output is byte-identical.
        "batch_size": 1,
        "out_dir": "unset",
        "targets": [{"model": str(model_dir), "name": "tiny-target"}],
        "defences": [
            {"kind": "none"},
            {"kind": "moderator", "model": str(model_dir), "max_new_tokens": 6},
            {"kind": "moderator", "model": str(model_dir), "mode": "block", "max_new_tokens": 6},
        ],
        "judge": {"kind": "refusal_match", "refusal_check": "heuristic"},
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_shards_then_an_unsharded_run_give_the_single_process_report(
    eval_inputs,  # noqa: F811
    tiny_model_dir,
    tmp_path,
    monkeypatch,
    capsys,
):
    safemt_dir, benign = eval_inputs
    prepared = _prepared_dataset(safemt_dir, tmp_path / "prepared", load_taxonomy())
    config = str(_write_config(tmp_path / "eval.yaml", safemt_dir, benign, tiny_model_dir, prepared))
    single, sharded = tmp_path / "single", tmp_path / "sharded"

    assert main(["--config", config, "--out_dir", str(single)]) == 0

    # The validation split fixes the run's threshold, which every shard needs: scored once, before them.
    assert main(["--config", config, "--out_dir", str(sharded), "--thresholds-only"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("thresholds fixed in ")
    for index in range(N_SHARDS):
        assert main(["--config", config, "--out_dir", str(sharded), "--shard", f"{index}/{N_SHARDS}"]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith(f"shard {index}/{N_SHARDS}: ") and "no report written" in last
        assert not (sharded / "report.json").exists() and not (sharded / "rows.jsonl").exists()
    # Each shard wrote only its own cache folder, and only its own ids (every length of an id together).
    shard_dirs = sorted(p.name for p in (sharded / "cache").iterdir() if p.is_dir())
    assert shard_dirs == [f"shard-{i}-of-{N_SHARDS}" for i in range(N_SHARDS)]
    validation = list(JsonlCache(sharded / "cache" / "decisions.jsonl", ("defence", "id")).records())
    assert validation and {r["id"].split(":")[0] for r in validation} == {"validation-split"}
    ids_per_shard, split_rows = [], 0
    for index in range(N_SHARDS):
        path = sharded / "cache" / f"shard-{index}-of-{N_SHARDS}" / "judgements.jsonl"
        ids = {r["id"] for r in JsonlCache(path, ("target", "defence", "id", "k", "benign")).records()}
        assert ids and all(Shard(index, N_SHARDS).holds(i) for i in ids)
        ids_per_shard.append(ids)
        decisions = list(JsonlCache(path.with_name("decisions.jsonl"), ("defence", "id", "k")).records())
        assert not any(r["id"].startswith("validation-split:") for r in decisions)  # found cached
        split_ids = {r["id"].removeprefix("test-split:") for r in decisions if r["id"].startswith("test-split:")}
        assert all(Shard(index, N_SHARDS).holds(i.split("@")[0]) for i in split_ids)
        split_rows += len(split_ids)
    assert sum(len(ids) for ids in ids_per_shard) == len(set().union(*ids_per_shard)) == len(IDS[:2]) + 2
    assert split_rows == len(_test_split_ids(prepared))  # every test-split row in exactly one shard

    # The merge: everything is cached, so no model is loaded and nothing is computed.
    counting = Counting()

    def counted_run(config, **kwargs):
        return EvalRun(config, target_loader=counting.target, defence_loader=counting.defence, **kwargs).run()

    monkeypatch.setattr(eval.run, "run_eval", counted_run)
    assert main(["--config", config, "--out_dir", str(sharded)]) == 0
    assert (counting.targets, counting.defences) == (0, 0)
    assert not (sharded / "cache" / "judgements.jsonl").exists()  # nothing new to write
    for name in ("report.json", "rows.jsonl", "report.md"):
        assert (sharded / name).read_bytes() == (single / name).read_bytes(), name


def test_bad_shard_argument_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"safemt_dir: {tmp_path}\nout_dir: {tmp_path}/out\ntargets: [{{model: x}}]\n")
    for shard, message in (("3/3", "expected 0 <= I < N"), ("1-of-2", "expected I/N")):
        assert main(["--config", str(config), "--shard", shard]) == 2
        assert capsys.readouterr().err == f"error: --shard: {message}" + (
            f", got {shard!r}\n" if message.startswith("expected 0") else f" (e.g. 0/8), got {shard!r}\n"
        )
    assert not (tmp_path / "out").exists()


def _test_split_ids(prepared):
    from data_prep.io import load_prepared

    return set(load_prepared(prepared)["test"]["id"])
