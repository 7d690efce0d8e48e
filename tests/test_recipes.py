"""Every shipped recipe parses into the real training dataclasses, with the settings users rely on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trl import ModelConfig, SFTConfig

from moderator.cli import parse_config
from tests.conftest import REPO_ROOT
from train.config import LM_LINEAR_REGEX, ModeratorScriptArguments
from train.preflight import check_full_finetune_precision, data_recipe_writing, deepspeed_keeps_fp32_master

RECIPES = sorted((REPO_ROOT / "configs" / "sft").glob("*.yaml"))
ACCELERATE = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))


def parse(recipe: Path, *overrides: str):
    """The recipe parsed as train/sft.py parses it (``moderator.cli.parse_config``)."""
    # bf16 is refused at parse time on a machine without a GPU; the YAML's own value is checked below.
    return parse_config(
        (ModeratorScriptArguments, SFTConfig, ModelConfig),
        ["--config", str(recipe), "--bf16", "false", *overrides],
        prog="train/sft.py",
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses_and_is_safe_by_default(recipe):
    script_args, training_args, model_args = parse(recipe)
    assert training_args.assistant_only_loss  # loss on the verdict only
    assert training_args.max_length is None  # no silent truncation
    assert training_args.trust_remote_code is False
    # Checkpoints are chosen by a threshold-free metric: the serving threshold is picked after training.
    assert training_args.metric_for_best_model == "unsafe_auprc" and training_args.greater_is_better
    if model_args.use_peft:
        assert script_args.lora_target_regex == LM_LINEAR_REGEX
    else:
        assert script_args.freeze_vision_tower


def test_required_recipes_exist():
    names = {r.stem for r in RECIPES}
    assert {"qwen2_5_vl_7b_lora", "qwen2_5_vl_3b_lora", "tiny_cpu"} <= names
    assert any(not parse(r)[2].use_peft for r in RECIPES)  # a full fine-tune recipe


def test_real_recipes_train_in_bf16_with_wandb_and_bounded_images():
    for name in ("qwen2_5_vl_7b_lora", "qwen2_5_vl_3b_lora"):
        recipe = REPO_ROOT / "configs" / "sft" / f"{name}.yaml"
        assert yaml.safe_load(recipe.read_text())["bf16"] is True
        script_args, training_args, model_args = parse(recipe)
        assert training_args.activation_checkpointing
        assert training_args.lr_scheduler_type == "cosine"
        assert "wandb" in training_args.report_to
        assert model_args.dtype == "bfloat16"
        # Images are bounded once, in the data recipe that writes the training data; training takes its record.
        data_recipe = data_recipe_writing(script_args.dataset_path)
        assert script_args.max_pixels is None and data_recipe is not None
        assert yaml.safe_load(data_recipe.read_text())["max_pixels"] == 401408
        assert script_args.moderation_eval_generate is False  # one scoring pass per eval dialogue


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_keeps_fp32_master_weights_for_what_it_fully_trains(recipe):
    # The resolved recipe as a single-GPU or DDP launch runs it: no DeepSpeed config to keep fp32 masters.
    script_args, training_args, model_args = parse(recipe)
    assert training_args.deepspeed_plugin is None
    check_full_finetune_precision(model_args, training_args)
    if not model_args.use_peft:
        # Mixed precision: fp32 weights, bf16 autocast.
        assert model_args.dtype == "float32" and yaml.safe_load(recipe.read_text())["bf16"] is True


def test_full_finetune_of_16_bit_weights_is_refused_without_deepspeed_fp32_masters():
    recipe = REPO_ROOT / "configs" / "sft" / "qwen2_vl_2b_full.yaml"
    _, training_args, model_args = parse(recipe, "--dtype", "bfloat16")
    with pytest.raises(ValueError, match=r"full fine-tune \(use_peft false\) with dtype=bfloat16 and no DeepSpeed"):
        check_full_finetune_precision(model_args, training_args)
    _, training_args, model_args = parse(recipe, "--dtype", "bfloat16", "--use_peft", "true")
    check_full_finetune_precision(model_args, training_args)  # LoRA: PEFT keeps adapters in fp32


# Resolves the 2B recipe with bf16 weights as `accelerate launch --config_file configs/accelerate/zero3.yaml`
# would (accelerate's environment variables), with and without mixed precision, and prints whether the
# precision check lets each train. The CPU refuses --bf16 true at parse time; accelerate's
# mixed-precision variable turns DeepSpeed's bf16 on the same way.
_UNDER_ACCELERATE = """
import os, sys
from trl import ModelConfig, SFTConfig, TrlParser
from train.config import ModeratorScriptArguments
from train.preflight import check_full_finetune_precision
for precision in ("bf16", "no"):
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    parsed = TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(args=sys.argv[1:])
    try:
        check_full_finetune_precision(parsed[2], parsed[1])
        print(precision, "accepted")
    except ValueError as error:
        print(precision, "refused:", error)
"""


def test_deepspeed_launch_with_bf16_keeps_fp32_masters_and_without_it_is_refused():
    args = ["--config", "configs/sft/qwen2_vl_2b_full.yaml", "--dtype", "bfloat16", "--bf16", "false"]
    env = {
        **os.environ,
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero3.json",
        "DS_ACCELERATOR": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_ACCELERATE, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("bf16 ", "no ")))
    assert outputs["bf16"] == "accepted"
    assert outputs["no"].startswith("refused:") and "DeepSpeed config without bf16/fp16" in outputs["no"]


def test_which_deepspeed_configs_keep_fp32_master_weights():
    zero3 = json.loads((REPO_ROOT / "configs/deepspeed/zero3.json").read_text())
    assert deepspeed_keeps_fp32_master(zero3, bf16=True, fp16=False)  # "auto" follows --bf16
    assert not deepspeed_keeps_fp32_master(zero3, bf16=False, fp16=False)
    cpu = json.loads((REPO_ROOT / "configs/deepspeed/zero3_cpu.json").read_text())
    assert not deepspeed_keeps_fp32_master(cpu, bf16=True, fp16=False)  # bf16 off in the file itself
    bf16_masters = {**zero3, "bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}
    assert not deepspeed_keeps_fp32_master(bf16_masters, bf16=True, fp16=False)
    assert not deepspeed_keeps_fp32_master(None, bf16=True, fp16=False)


def test_command_line_overrides_the_recipe_like_a_sweep_agent():
    script_args, training_args, model_args = parse(
        REPO_ROOT / "configs/sft/qwen2_5_vl_7b_lora.yaml", "--learning_rate=3e-5", "--lora_r=8", "--max_pixels=200704"
    )
    assert training_args.learning_rate == 3e-5 and model_args.lora_r == 8 and script_args.max_pixels == 200704


@pytest.mark.parametrize("config", ACCELERATE, ids=[c.stem for c in ACCELERATE])
def test_accelerate_configs_reference_existing_deepspeed_files(config):
    data = yaml.safe_load(config.read_text())
    ds_file = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file:
        ds = json.loads((REPO_ROOT / ds_file).read_text())
        assert ds["zero_optimization"]["stage"] in (2, 3)
        assert data["distributed_type"] == "DEEPSPEED" and not data.get("use_cpu")
