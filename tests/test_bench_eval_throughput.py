"""``python -m bench.eval_throughput`` (#13 item 8): the structure of its output, not its timings."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT

RATE = r"(\d+) items in ([0-9.]+) s = ([0-9.]+) items/s"


@pytest.mark.slow
def test_benchmark_runs_single_shards_and_merge_and_the_shard_counts_add_up(tiny_model_dir, tmp_path, capsys):
    # Bugs caught: the benchmark broken by a change to eval.run's flags or its shard summary line (the
    # regex no longer matches), shards that drop or repeat items (their counts do not add up to the
    # single run's rows or the merged report's), a merge run that recomputes (fails the 'add up' check
    # through the merged rows), or a projection line missing its estimate label.
    from bench.eval_throughput import main

    argv = [
        "--work",
        str(tmp_path),
        "--base",
        str(tiny_model_dir),
        "--skip-guards",
        "--limit",
        "1",
        "--single-threads",
        "1",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    single = re.fullmatch(rf"single process \(\d+ thread\(s\)\): {RATE}", lines[1])
    shards = re.fullmatch(rf"2 shards at once \(\d+ thread\(s\) each\): (\d+) \+ (\d+) = {RATE}", lines[2])
    assert single and shards, lines[1:3]
    assert int(shards[1]) + int(shards[2]) == int(shards[3]) == int(single[1])
    # 1 SafeMT id at each of the demo's 3 lengths + 1 benign dialogue, x 3 defences (guard skipped) x 1 target
    assert int(single[1]) == (1 * 3 + 1) * 3 * 1
    assert re.fullmatch(r"merge run \(report; computes nothing new\): [0-9.]+ s", lines[3])
    assert lines[5] == f"shard counts add up: yes ({shards[1]} + {shards[2]} = {shards[3]}; single process " \
        f"{single[1]}; merged report {single[1]} rows)"  # fmt: skip
    assert lines[6].startswith("projection: ESTIMATE") and "not a measurement" in lines[6]
    for backend in ("hf", "vllm"):
        assert any(re.match(rf"projected {backend} target backend: [0-9.,]+ GPU-hours \(", line) for line in lines)


def test_projection_counts_dialogues_lengths_defences_and_targets_from_the_config():
    # Bug caught: a projection that forgets a factor of the workload (lengths, defences, targets or the
    # benign dialogues) or ignores the config it names.
    from bench.eval_throughput import GpuAssumptions, projection
    from eval.config import load_config

    config = load_config(REPO_ROOT / "configs" / "eval" / "demo.yaml")
    lines = projection(GpuAssumptions(), "configs/eval/demo.yaml", dialogues=10, gpus=2)
    expected = (10 * len(config.turns) + config.benign_limit) * len(config.defences) * len(config.targets)
    assert f"= {expected:,} items;" in lines[1]
    pattern = r"projected (\w+) target backend: [0-9.,]+ GPU-hours \(([0-9.]+) GPU-s per item"
    per_item = {m[1]: float(m[2]) for m in map(re.compile(pattern).match, lines) if m}
    assert set(per_item) == {"hf", "vllm"} and all(seconds > 0 for seconds in per_item.values())
    doubled = projection(GpuAssumptions(), "configs/eval/demo.yaml", dialogues=20, gpus=2)
    assert f"= {(20 * len(config.turns) + config.benign_limit) * len(config.defences):,} items;" in doubled[1]
