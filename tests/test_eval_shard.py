"""Sharded eval: ``--shard I/N`` runs merge into the report a single process writes, and the launcher.

The shard/merge identity runs ``python -m eval.run``'s ``main`` in-process on the tiny models (a few
seconds); the launcher runs under bash with a stand-in ``sbatch`` on PATH (no cluster needed).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

import eval.run
from eval.cache import JsonlCache
from eval.loop import EvalRun, Shard
from eval.run import main
from moderator.taxonomy import load_taxonomy
from tests.conftest import REPO_ROOT
from tests.test_eval_loop import IDS, Counting, _prepared_dataset, eval_inputs  # noqa: F401 (fixture)

N_SHARDS = 3  # the 2 held-out SafeMT ids and 2 benign ids fall into every one of 3 shards


def _write_config(path, safemt_dir, benign, model_dir, prepared):
    config = {
        "safemt_dir": str(safemt_dir),
        "benign": str(benign),
        # Test rows shard too; validation fixes the threshold. Attacked: the 2 test-split ids at 2 lengths.
        "detection_split": str(prepared),
        "turns": [1, 2],
        "max_new_tokens": 2,
        # One item per model call: a batch's padding moves scores in the 7th digit, and a shard's batches
        # necessarily hold other items than a single process's; at batch 1 every output is byte-identical.
        "batch_size": 1,
        "out_dir": "unset",
        "targets": [{"model": str(model_dir), "name": "tiny-target"}],
        "defences": [
            {"kind": "none"},
            {"kind": "moderator", "model": str(model_dir), "max_new_tokens": 2, "verify": False},
            {"kind": "moderator", "model": str(model_dir), "mode": "block", "max_new_tokens": 2, "verify": False},
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
    ids_per_shard, split_rows, turn_flags = [], 0, 0
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
        # Turns to detection: each shard flags every user turn of its own harmful samples only.
        flags = list(JsonlCache(path.with_name("turn_flags.jsonl"), ("defence", "id", "k")).records())
        assert all(Shard(index, N_SHARDS).holds(r["id"]) and len(r["flags"]) == r["k"] for r in flags)
        turn_flags += len(flags)
    assert sum(len(ids) for ids in ids_per_shard) == len(set().union(*ids_per_shard)) == len(IDS[:2]) + 2
    assert split_rows == len(_test_split_ids(prepared))  # every test-split row in exactly one shard
    assert turn_flags == len(IDS[:2]) * 2 * 2  # every held-out id at both lengths, under both moderator modes

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
    # ... turns to detection included: every defence but none, at both attacked lengths.
    by_length = json.loads((sharded / "report.json").read_text())["turns_to_detection"]["by_length"]
    assert {k: set(v) for k, v in by_length.items()} == {
        "1": {"moderator", "moderator-block"},
        "2": {"moderator", "moderator-block"},
    }


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


# -- launchers -------------------------------------------------------------------------------------

TIMEOUT = 60
# Stand-in for sbatch --parsable: logs its argv (one JSON line each) and prints the next job id as
# Slurm does on a multi-cluster setup ("<id>;<cluster>").
FAKE_SBATCH = """#!{python}
import json, os, sys
log = os.environ["FAKE_LOG"]
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
open(log, "a").write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{{1001 + n}};cluster")
"""
# Stand-in for the eval's python: logs CUDA_VISIBLE_DEVICES and argv; the shard in $FAIL_SHARD fails.
FAKE_PYTHON = """#!{python}
import json, os, sys
open(os.environ["FAKE_LOG"], "a").write(json.dumps([os.environ.get("CUDA_VISIBLE_DEVICES"), *sys.argv[1:]]) + "\\n")
sys.exit(1 if os.environ.get("FAIL_SHARD") and sys.argv[-1] == os.environ["FAIL_SHARD"] else 0)
"""


def _env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("python-fake", FAKE_PYTHON)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    return {"PATH": path, "HOME": str(tmp_path), "VENV": "", "FAKE_LOG": str(tmp_path / "log.jsonl"), **extra}


def _run(script, args, env):
    return subprocess.run(
        ["bash", script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def _log(tmp_path):
    path = tmp_path / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_eval_sharded_sh_submits_thresholds_then_the_shard_array_then_the_report(tmp_path):
    env = _env(tmp_path, PYTHON="python")
    dry = _run("launch/eval_sharded.sh", ["--dry-run", "8", "--", "--limit", "3"], env)
    assert dry.returncode == 0, dry.stderr
    assert [shlex.split(line) for line in dry.stdout.splitlines()] == [
        ["sbatch", "--parsable", "--job-name=safemt-eval-thresholds", "launch/slurm/eval.sbatch",
         "--thresholds-only", "--limit", "3"],
        ["sbatch", "--parsable", "--dependency=afterok:<thresholds job>", "--array=0-7",
         "--export=ALL,EVAL_SHARDS=8", "launch/slurm/eval_shards.sbatch", "--limit", "3"],
        ["sbatch", "--parsable", "--dependency=afterok:<array job>", "--job-name=safemt-eval-report",
         "launch/slurm/eval.sbatch", "--limit", "3"],
    ]  # fmt: skip
    assert _log(tmp_path) == []  # a dry run submits nothing

    submitted = _run("launch/eval_sharded.sh", ["8", "--", "--limit", "3"], env)
    assert submitted.returncode == 0, submitted.stderr
    calls = _log(tmp_path)
    assert [c[1] for c in calls] == ["--job-name=safemt-eval-thresholds", "--dependency=afterok:1001",
                                     "--dependency=afterok:1002"]  # fmt: skip
    assert "--array=0-7" in calls[1] and calls[1][-3:] == ["launch/slurm/eval_shards.sbatch", "--limit", "3"]
    assert calls[2][-3:] == ["launch/slurm/eval.sbatch", "--limit", "3"]
    assert "report job 1003" in submitted.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "N, the number of shards"), (["0"], "N, the number of shards"), (["--bogus", "--dry-run", "2"], "--bogus"),
     (["2", "3"], "unexpected argument 3"), (["--limit", "3", "2"], "unknown option --limit")],
)  # fmt: skip
def test_eval_sharded_sh_refuses_bad_arguments_and_submits_nothing(tmp_path, args, message):
    result = _run("launch/eval_sharded.sh", args, _env(tmp_path))
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    assert _log(tmp_path) == []


def test_eval_sharded_sh_local_runs_each_shard_on_its_gpu_and_the_report_only_after_all_succeeded(tmp_path):
    env = _env(tmp_path, PYTHON=str(tmp_path / "bin" / "python-fake"), CUDA_VISIBLE_DEVICES="4,5")
    result = _run("launch/eval_sharded.sh", ["--local", "3"], env)
    assert result.returncode == 0, result.stderr
    calls = _log(tmp_path)
    run = ["-m", "eval.run", "--config", "configs/eval/safemt_7b.yaml"]
    assert calls[0] == ["4,5", *run, "--thresholds-only"] and calls[-1] == ["4,5", *run]
    assert sorted(calls[1:-1]) == [["4", *run, "--shard", "0/3"], ["4", *run, "--shard", "2/3"],
                                   ["5", *run, "--shard", "1/3"]]  # fmt: skip

    (tmp_path / "log.jsonl").unlink()
    failed = _run("launch/eval_sharded.sh", ["--local", "3"], {**env, "FAIL_SHARD": "1/3"})
    assert failed.returncode == 2 and "a shard failed" in failed.stderr
    assert len(_log(tmp_path)) == 4  # thresholds and the 3 shards; no report


def test_eval_shards_sbatch_runs_its_array_tasks_shard(tmp_path):
    env = _env(tmp_path, PYTHON="python", LAUNCH_DRY_RUN="1", EVAL_SHARDS="8")
    result = _run("launch/slurm/eval_shards.sbatch", ["--limit", "3"], {**env, "SLURM_ARRAY_TASK_ID": "3"})
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "python", "-m", "eval.run", "--config", "configs/eval/safemt_7b.yaml", "--shard", "3/8", "--limit", "3"
    ]  # fmt: skip
    for extra, message in (({}, "SLURM_ARRAY_TASK_ID is not set"), ({"SLURM_ARRAY_TASK_ID": "8"}, "not below")):
        refused = _run("launch/slurm/eval_shards.sbatch", [], {**env, **extra})
        assert refused.returncode == 2 and message in refused.stderr
