"""Script arguments for ``train/sft.py``; TRL's ``SFTConfig`` and ``ModelConfig`` hold the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

from moderator.artefacts import DEFAULT_THRESHOLD

# LoRA on the language model's linear layers only: the vision tower also has gate/up/down_proj,
# so a plain list of module names would silently wrap it too.
LM_LINEAR_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ModeratorScriptArguments:
    dataset_path: str = field(
        default="runs/demo/data",
        metadata={"help": "Output folder of `python -m data_prep.build` (holds dataset/ and stats.json)."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_eval_split: str = field(default="validation", metadata={"help": "Split for evaluation during training."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    taxonomy_path: str | None = field(
        default=None, metadata={"help": "Taxonomy YAML; default configs/policies/safemt.yaml."}
    )
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "Lower bound on image pixels (default: the bound data prep counted lengths at)."},
    )
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Upper bound on image pixels, bounding image tokens (default: the bound data prep counted lengths at)."
        },
    )
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision tower frozen (full FT)."})
    lora_target_regex: str | None = field(
        default=LM_LINEAR_REGEX,
        metadata={"help": "Regex of modules LoRA wraps; overrides --lora_target_modules when set."},
    )
    verdict_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Loss weight of the verdict word (safe/unsafe) relative to the other target tokens (category, "
            "intent). 1: plain SFT. An unsafe target has about 30 supervised tokens and one decides the verdict "
            "(train/loss.py)."
        },
    )
    moderation_eval_samples: int = field(
        default=64,
        metadata={
            "help": "Validation dialogues scored at each evaluation, split across ranks, for unsafe AUPRC and "
            "the thresholded metrics (0: off)."
        },
    )
    moderation_eval_generate: bool = field(
        default=False,
        metadata={
            "help": "Also generate each verdict (adds category accuracy and parse-error rate; many forward passes "
            "per dialogue). Off: one scoring pass reads P(unsafe)."
        },
    )
    moderation_eval_max_new_tokens: int = field(
        default=48, metadata={"help": "Tokens generated per eval verdict (with moderation_eval_generate)."}
    )
    moderation_eval_threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={"help": "P(unsafe) threshold for the thresholded eval metrics (not for AUPRC)."},
    )
    fresh_start: bool = field(
        default=False,
        metadata={"help": "Ignore checkpoints in output_dir and train from scratch (default: resume from the last)."},
    )
