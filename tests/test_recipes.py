"""Every shipped recipe parses into the real training dataclasses, with the settings users rely on."""

import json
from pathlib import Path

import pytest
import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from tests.conftest import REPO_ROOT
from train.config import LM_LINEAR_REGEX, ModeratorScriptArguments

RECIPES = sorted((REPO_ROOT / "configs" / "sft").glob("*.yaml"))
ACCELERATE = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))


def parse(recipe: Path, *overrides: str):
    # bf16 is refused at parse time on a machine without a GPU; the YAML's own value is checked below.
    return TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(
        args=["--config", str(recipe), "--bf16", "false", *overrides]
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses_and_is_safe_by_default(recipe):
    script_args, training_args, model_args = parse(recipe)
    assert training_args.assistant_only_loss  # loss on the verdict only
    assert training_args.max_length is None  # no silent truncation
    assert training_args.trust_remote_code is False
    assert training_args.metric_for_best_model == "unsafe_f1"
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
        assert training_args.gradient_checkpointing
        assert training_args.lr_scheduler_type == "cosine"
        assert "wandb" in training_args.report_to
        assert script_args.max_pixels and model_args.dtype == "bfloat16"


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
