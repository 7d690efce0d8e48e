"""Model, processor and PEFT config for moderator fine-tuning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from peft import LoraConfig
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import ModelConfig

from moderator.loading import parse_dtype
from train.config import ModeratorScriptArguments

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """Local directories become absolute, so adapter configs name a base that reloads from anywhere."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.is_dir() else name_or_path


def build_processor(model_args: ModelConfig, trust_remote_code: bool = False) -> Any:
    """The base model's processor with its own image bounds (``train.run`` sets the training bounds once)."""
    return AutoProcessor.from_pretrained(
        resolve_model_path(model_args.model_name_or_path),
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
    )


def build_model(
    model_args: ModelConfig,
    script_args: ModeratorScriptArguments,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> Any:
    dtype = parse_dtype(model_args.dtype)  # the serving loader's parsing: a typo fails here, by name
    model = AutoModelForImageTextToText.from_pretrained(
        resolve_model_path(model_args.model_name_or_path),
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        use_safetensors=True,
    )
    if gradient_checkpointing:
        model.config.use_cache = False
    if script_args.freeze_vision_tower and not model_args.use_peft:
        frozen = 0
        for name, param in model.named_parameters():
            if _is_vision_param(name):
                param.requires_grad_(False)
                frozen += param.numel()
        logger.info("froze %d vision-tower parameters", frozen)
    return model


def _is_vision_param(name: str) -> bool:
    return any(part in name for part in (".visual.", "vision_tower", "vision_model")) or name.startswith("visual.")


def build_peft_config(model_args: ModelConfig, script_args: ModeratorScriptArguments) -> LoraConfig | None:
    if not model_args.use_peft:
        return None
    target = script_args.lora_target_regex or model_args.lora_target_modules
    if not target:
        raise ValueError("use_peft is set but neither --lora_target_regex nor --lora_target_modules names modules")
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=target,
        modules_to_save=model_args.lora_modules_to_save,
        bias="none",
        task_type=model_args.lora_task_type,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )
