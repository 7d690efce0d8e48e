"""At SafeMT scale, every real recipe evaluates and checkpoints several times per run on every GPU count
the README and the accelerate configs document, so ``load_best_model_at_end`` has checkpoints to choose from.

Step counts come from the resolved recipe (``rows / (per_device_batch * grad_accum * gpus) * epochs``) and
the schedule from transformers' own callback (``train.run.planned_evaluations``).
"""

from __future__ import annotations

import shlex

import pytest
import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from tests.conftest import REPO_ROOT
from train.config import ModeratorScriptArguments
from train.run import planned_evaluations

REAL_RECIPES = ["qwen2_5_vl_7b_lora", "qwen2_5_vl_3b_lora", "qwen2_vl_2b_full"]
MIN_EVALUATIONS = 4
# SafeMT: 2,000 harmful queries, each as a 1/2/4/6/8-turn dialogue (configs/data/safemt.yaml safemt_turns).
SAFEMT_QUERIES = 2_000


def _accelerate_gpu_counts() -> set[int]:
    counts = set()
    for config in (REPO_ROOT / "configs" / "accelerate").glob("*.yaml"):
        data = yaml.safe_load(config.read_text())
        if not str(config.stem).startswith("cpu_"):
            counts.add(int(data["num_processes"]))
    return counts


# The accelerate configs (1, 8, 16) plus what the README's commands add: `--num_processes 4` on one
# node, `sbatch --nodes=4` (x 8 GPUs).
GPU_COUNTS = sorted(_accelerate_gpu_counts() | {4, 32})


def safemt_train_rows(benign: bool) -> int:
    """Training rows data prep writes from SafeMT with configs/data/safemt.yaml (with or without its benign mix:
    the matched twins, the extra harmful prompts with their twins, and the unmatched benign share)."""
    data = yaml.safe_load((REPO_ROOT / "configs" / "data" / "safemt.yaml").read_text())
    safemt = SAFEMT_QUERIES * len(data["safemt_turns"])
    rows = safemt
    if benign:
        pair = 2 if data["matched_benign"] else 1
        rows += safemt * (pair - 1) + data["extra_harmful_per_length"] * len(data["safemt_turns"]) * pair
        rows += safemt * data["benign_ratio"]
    return int(rows * (1 - data["validation_fraction"] - data["test_fraction"]))


def resolve(recipe: str, *overrides: str):
    # bf16 is refused at parse time on a machine without a GPU; it does not change the schedule.
    path = REPO_ROOT / "configs" / "sft" / f"{recipe}.yaml"
    return TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(
        args=["--config", str(path), "--bf16", "false", *overrides]
    )


def test_documented_gpu_counts_and_safemt_size():
    assert {1, 8, 16} <= set(GPU_COUNTS)
    # 10,000 SafeMT rows + 10,000 twins + 1,000 extra harmful + their 1,000 twins + 1,000 chitchat, 80% train.
    assert safemt_train_rows(benign=False) == 8_000 and safemt_train_rows(benign=True) == 18_400


@pytest.mark.parametrize("benign", [False, True], ids=["safemt_only", "with_benign"])
@pytest.mark.parametrize("gpus", GPU_COUNTS)
@pytest.mark.parametrize("recipe", REAL_RECIPES)
def test_recipe_evaluates_and_checkpoints_several_times_at_safemt_scale(recipe, gpus, benign):
    _, training_args, _ = resolve(recipe)
    assert training_args.load_best_model_at_end
    rows = safemt_train_rows(benign)
    steps, evaluations, saves = planned_evaluations(training_args, rows, gpus)
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * gpus
    assert steps >= rows // global_batch * training_args.num_train_epochs  # the formula, before rounding up
    assert len(evaluations) >= MIN_EVALUATIONS, f"{recipe} on {gpus} GPUs: {steps} steps, evaluations at {evaluations}"
    # Every evaluation has a checkpoint, so the best one can be loaded at the end.
    assert set(evaluations) <= set(saves), (evaluations, saves)


def test_the_old_absolute_schedule_evaluates_too_rarely():
    # The schedule the recipes had (every 200 steps) is what this file guards against.
    _, training_args, _ = resolve("qwen2_5_vl_7b_lora", "--eval_steps", "200", "--save_steps", "200")
    steps, evaluations, _ = planned_evaluations(training_args, safemt_train_rows(benign=True), 8)
    assert steps == 288 and evaluations == [200, 288]


def _sweep_trial(sweep: str) -> tuple[str, int, dict]:
    config = yaml.safe_load((REPO_ROOT / "configs" / "sweeps" / f"{sweep}.yaml").read_text())
    words = shlex.split(next(item for item in config["command"] if "--config" in item))
    recipe = words[words.index("--config") + 1]
    accelerate = yaml.safe_load((REPO_ROOT / words[words.index("--config_file") + 1]).read_text())
    return recipe, int(accelerate["num_processes"]), config["parameters"]


def test_shortest_7b_sweep_trial_logs_the_sweep_metric_several_times():
    recipe, gpus, parameters = _sweep_trial("qwen2_5_vl_7b_lora")
    epochs = min(parameters["num_train_epochs"]["values"])
    _, training_args, _ = resolve(recipe.removeprefix("configs/sft/").removesuffix(".yaml"))
    training_args.num_train_epochs = epochs
    for benign in (False, True):
        steps, evaluations, _ = planned_evaluations(training_args, safemt_train_rows(benign), gpus)
        assert len(evaluations) >= MIN_EVALUATIONS, f"{epochs}-epoch trial: {steps} steps, evaluations {evaluations}"


def test_shortest_tiny_sweep_trial_evaluates():
    recipe, gpus, parameters = _sweep_trial("tiny_cpu")
    _, training_args, _ = resolve(recipe.removeprefix("configs/sft/").removesuffix(".yaml"))
    training_args.max_steps = min(parameters["max_steps"]["values"])
    _, evaluations, saves = planned_evaluations(training_args, 100, gpus)  # max_steps bounds the run, not rows
    assert evaluations and set(evaluations) <= set(saves)
