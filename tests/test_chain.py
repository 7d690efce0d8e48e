"""The shipped real recipes chain: data prep -> SFT -> export -> eval, run as written in a scratch folder.

Each stage runs as a subprocess with ``cwd`` the scratch folder, so every path between stages is the
recipes' own relative path (``configs`` is linked in, so the commands are the documented ones). The only
overrides are model names (tiny models), what a CPU needs (float32, no bf16, few steps, small batches,
no W&B, an offline judge, small limits) and the data source (the SafeMT sample with placeholder images,
written where the data recipe reads SafeMT). No path between stages is overridden.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, SAMPLE_DIR

DATA_RECIPE = "configs/data/safemt.yaml"
SFT_RECIPE = "configs/sft/qwen2_5_vl_7b_lora.yaml"
EVAL_CONFIG = "configs/eval/safemt_7b.yaml"
BENIGN_EVAL_SIZE = 6  # held-out benign dialogues (the recipe asks for 500)
BENIGN_LIMIT = 2
# A tiny random-weight checkpoint in each baseline guard's architecture (tiny_models.guards).
TINY_GUARDS = {
    "llama_guard_3_vision": "build_tiny_mllama",
    "llama_guard_4": "build_tiny_llama4",
    "shieldgemma_2": "build_tiny_gemma3",
    "llavaguard": "build_tiny_llava_onevision",
    "llama_guard_3_text": "build_tiny_llama3_text",
}


def _yaml(path: str) -> dict:
    return yaml.safe_load((REPO_ROOT / path).read_text())


def _same(a: str | Path, b: str | Path) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def documented_export_command() -> list[str]:
    """The export command the eval config documents (the README shows the same line)."""
    lines = re.findall(r"^#\s+(python -m export .*)$", (REPO_ROOT / EVAL_CONFIG).read_text(), re.MULTILINE)
    assert len(lines) == 1, f"{EVAL_CONFIG} must document exactly one export command, found {lines}"
    return shlex.split(lines[0])


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def run_stage(cwd: Path, argv: list[str], timeout: int = 600) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-4000:]}"


def test_recipes_name_the_same_paths_between_stages():
    """Cheap check of the agreement the slow test below exercises."""
    data, sft, evaluation = _yaml(DATA_RECIPE), _yaml(SFT_RECIPE), _yaml(EVAL_CONFIG)
    export = documented_export_command()
    # Each SFT recipe reads what its data recipe writes: the CPU recipes have their own data configs.
    own_data = {"tiny_cpu": "configs/data/demo.yaml", "smollm2_cpu": "configs/data/smollm2_cpu.yaml"}
    for recipe in sorted((REPO_ROOT / "configs/sft").glob("*.yaml")):
        paired = _yaml(own_data[recipe.stem]) if recipe.stem in own_data else data
        assert _same(yaml.safe_load(recipe.read_text())["dataset_path"], paired["out"]), recipe.name
    assert _same(evaluation["safemt_dir"], data["safemt"])
    assert _same(evaluation["detection_split"], data["out"])
    assert _same(Path(evaluation["benign"]).parent, data["out"]) and data["benign_eval_size"] > 0
    assert _same(_flag(export, "--checkpoint"), sft["output_dir"])
    assert _same(_flag(export, "--dataset"), data["out"])
    moderators = [d["model"] for d in evaluation["defences"] if d["kind"] == "moderator"]
    assert moderators and all(_same(m, _flag(export, "--out")) for m in moderators)


@pytest.fixture(scope="module")
def tiny_guards(tmp_path_factory) -> dict[str, Path]:
    import tiny_models.guards

    kinds = {d["guard_kind"] for d in _yaml(EVAL_CONFIG)["defences"] if d["kind"] == "guard"}
    return {
        kind: getattr(tiny_models.guards, TINY_GUARDS[kind])(tmp_path_factory.mktemp(f"tiny-{kind}"))
        for kind in sorted(kinds)
    }


@pytest.mark.slow
def test_shipped_recipes_run_end_to_end(tmp_path, tiny_model_dir, tiny_guards):
    data, sft, evaluation = _yaml(DATA_RECIPE), _yaml(SFT_RECIPE), _yaml(EVAL_CONFIG)
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    python = sys.executable

    # The data source: the SafeMT sample, with placeholder images, where the data recipe reads SafeMT.
    run_stage(tmp_path, [python, "-m", "tiny_models.images", data["safemt"], "--copy-from", str(SAMPLE_DIR)])

    # 1. data prep
    run_stage(
        tmp_path,
        [python, "-m", "data_prep.build", "--config", DATA_RECIPE, "--processor", str(tiny_model_dir)]
        + ["--benign_eval_size", str(BENIGN_EVAL_SIZE)]
        # The sample has 1, 2 and 4 turns; the recipe asks for SafeMT's five lengths (a missing one stops it).
        + ["--safemt_turns", "1", "2", "4"],
    )
    dataset = tmp_path / sft["dataset_path"]
    assert (dataset / "dataset" / "dataset_dict.json").is_file()
    assert (tmp_path / evaluation["detection_split"] / "dataset").is_dir()
    stats = json.loads((dataset / "stats.json").read_text())
    assert stats["benign_eval"]["dialogues"] == BENIGN_EVAL_SIZE
    benign_eval = [json.loads(line) for line in (tmp_path / evaluation["benign"]).read_text().splitlines()]
    assert len(benign_eval) == BENIGN_EVAL_SIZE
    from data_prep.io import load_prepared

    trained_ids = {row_id for split in load_prepared(dataset).values() for row_id in split["id"]}
    assert trained_ids.isdisjoint(row["id"] for row in benign_eval)  # held out: never in any split

    # 2. training (plain python: one CPU process; the GPU command is the same script under accelerate)
    run_stage(
        tmp_path,
        [python, str(REPO_ROOT / "train/sft.py"), "--config", SFT_RECIPE, "--model_name_or_path", str(tiny_model_dir)]
        + ["--dtype", "float32", "--bf16", "false", "--activation_checkpointing", "false"]
        + ["--max_steps", "1", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2"]
        + ["--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0", "--report_to", "none"]
        + ["--max_eval_samples", "2", "--moderation_eval_samples", "2", "--moderation_eval_max_new_tokens", "4"],
    )
    export = documented_export_command()
    assert (tmp_path / _flag(export, "--checkpoint") / "adapter_model.safetensors").is_file()

    # 3. export, as documented
    run_stage(tmp_path, [python, *export[1:], "--equivalence-samples", "1", "--equivalence-max-new-tokens", "4"])
    for defence in evaluation["defences"]:
        if defence["kind"] == "moderator":
            assert (tmp_path / defence["model"] / "manifest.json").is_file()

    # 4. eval: tiny target and guards, offline judge, small limits
    overrides = ["--targets.0.model", str(tiny_model_dir), "--targets.0.dtype", "float32"]
    for index, defence in enumerate(evaluation["defences"]):
        if defence["kind"] == "guard":
            overrides += [f"--defences.{index}.model", str(tiny_guards[defence["guard_kind"]])]
            overrides += [f"--defences.{index}.options", "{max_new_tokens: 6}"]
        elif defence["kind"] == "moderator":
            overrides += [f"--defences.{index}.max_new_tokens", "4"]
    overrides += ["--judge.kind", "refusal_match", "--judge.refusal_check", "heuristic", "--wandb", "false"]
    overrides += ["--limit", "1", "--benign_limit", str(BENIGN_LIMIT), "--max_new_tokens", "4", "--batch_size", "8"]
    run_stage(tmp_path, [python, "-m", "eval.run", "--config", EVAL_CONFIG, *overrides])

    report = json.loads((tmp_path / evaluation["out_dir"] / "report.json").read_text())
    configured = [str(k) for k in evaluation["turns"]]
    sample_lengths = {str(k) for k in (1, 2, 4)}  # the lengths tests/data/safemt_sample has
    assert report["turns"] == evaluation["turns"]
    assert len(report["results"]) == len(evaluation["targets"])
    for summaries in report["results"].values():
        assert len(summaries) == len(evaluation["defences"])
        for summary in summaries.values():
            assert sorted(summary["asr"]) == sorted(configured)
            assert all(summary["n_labelled"][k] >= 1 for k in sample_lengths)
            assert summary["over_refusal"]["n_benign"] == BENIGN_LIMIT  # the held-out benign file was read
    moderator_detection = [report["detection"][name] for name in report["detection"] if name.startswith("moderator")]
    assert moderator_detection and all(d["data"] == "test split" for d in moderator_detection)
