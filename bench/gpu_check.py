"""GPU check in one go: ``python -m bench.gpu_check --out DIR`` (``--cpu-dry-run`` runs it on CPU, tiny).

On one NVIDIA GPU, in a few minutes, with nothing downloaded (see ``bench/gpu_wheels.sh`` for the
wheels to bring and the exact install commands):

1. **Training**: the 7B recipe's real architecture (Qwen2.5-VL-7B-Instruct's config, written out
   below, random weights built directly on the GPU) with the recipe's LoRA, dtype/bf16, attention
   implementation, gradient checkpointing, batch size and accumulation, all read from
   ``configs/sft/qwen2_5_vl_7b_lora.yaml`` through the trainer's own parser
   (``TrlParser`` + ``ModeratorScriptArguments``) and ``train.modeling.build_peft_config``. The
   model is prepared as TRL's ``SFTTrainer`` does (``get_peft_model``, ``enable_input_require_grads``
   under checkpointing, bf16 autocast, fused AdamW) and trained for a few optimizer steps on
   synthetic batches shaped like SafeMT rows: one photo-sized image resized into the recipe's pixel
   bounds, 300-500 text tokens, loss on the last tokens only (the verdict), length-grouped batches.
   Reports step time, real (non-pad) tokens/s, peak memory and MFU against the GPU's bf16 dense peak.
2. **Serving**: the same weights (LoRA removed) saved as a moderator checkpoint with a processor
   (the offline tiny tokenizer, the real Qwen2-VL image processor bounded like training), loaded
   through ``Moderator.from_pretrained(path, device=..., dtype=...)``; checks every parameter is on
   the requested device in the requested dtype, then times ``moderate_batch`` (P(unsafe) scoring
   pass + greedy generation) on SafeMT sample dialogues with photo-sized images.

Prints one table and writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``. Exits non-zero if
a check fails (moderator not on the requested device/dtype, no CUDA device without --cpu-dry-run).
Trailing unknown arguments go to the recipe parser as overrides (e.g. ``--attn_implementation
flash_attention_2``). Random weights: generation rarely stops early, so serving figures are for
``max_new_tokens`` generated tokens per dialogue (a pessimistic bound).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "configs" / "sft" / "qwen2_5_vl_7b_lora.yaml"
SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "safemt_sample"

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (transformers 5 names: rope_scaling -> rope_parameters).
# Written out because the GPU machine has no network; transformers' Qwen2_5_VLConfig() defaults are
# not the 7B (its text defaults are the 72B's, its vision hidden size 3584 instead of 1280).
QWEN2_5_VL_7B_CONFIG: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "out_hidden_size": 3584,
        "hidden_act": "silu",
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "initializer_range": 0.02,
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}
TOKEN_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
TEXT_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

# bf16 dense (no sparsity) peak TFLOP/s by device-name substring, most specific first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
)
FLOPS_FORMULA = (
    "model FLOPs/step = 6 * N_text * real_tokens + 2 * N_vision * image_patches, where N_text = language-model "
    "parameters without the embedding lookup (LoRA included) plus lm_head, i.e. 2*N forward + 4*N backward of the "
    "full model (not of the LoRA parameters); the vision tower is frozen and runs forward only. Attention score "
    "FLOPs and checkpointing recompute are not counted. LoRA computes no weight gradients for frozen weights, so "
    "4*N*tokens would be the work actually needed: this MFU is comparable with full fine-tune figures."
)
PHOTO_SIZE = (1024, 768)  # a typical SafeMT photo before the processor resizes it into the pixel bounds
COMPLETION_TOKENS = 24  # "verdict: unsafe / category: ... / intent: ..." + <|im_end|>: the only labelled tokens


@dataclass
class Row:
    section: str
    name: str
    value: Any
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, name: str, value: Any, note: str = "", key: str | None = None) -> None:
        self.rows.append(Row(section, name, value, note))
        if key is not None:
            self.figures[key] = value


def bf16_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak for a device name from ``torch.cuda.get_device_name``; None if unknown."""
    for needle, peak in BF16_PEAK_TFLOPS:
        if needle.lower() in device_name.lower():
            return peak
    return None


def parse_recipe(recipe: Path, overrides: Sequence[str], output_dir: Path):
    """The recipe through the trainer's own parser: (script_args, training_args, model_args)."""
    from trl import ModelConfig, SFTConfig, TrlParser

    from train.config import ModeratorScriptArguments

    argv = ["--config", str(recipe), "--output_dir", str(output_dir), "--report_to", "none", *overrides]
    parser = TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig))
    return parser.parse_args_and_config(args=argv)


def torch_dtype(name: str | None) -> Any:
    """A recipe/CLI dtype name as a torch dtype (the serving loader's parsing); unset or auto: float32."""
    import torch

    from moderator.loading import parse_dtype

    parsed = parse_dtype(name)
    return torch.float32 if parsed in (None, "auto") else parsed


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_markdown(report: Report, header: str) -> str:
    lines = [header, "", "| section | figure | value | note |", "|---|---|---|---|"]
    lines += [f"| {r.section} | {r.name} | {_fmt(r.value)} | {r.note} |" for r in report.rows]
    return "\n".join(lines) + "\n"


# -- synthetic SafeMT-shaped training rows ------------------------------------------------------------
def photo_image(seed: int, size: tuple[int, int] = PHOTO_SIZE):
    """A noise image of a typical photo's size (compute depends on its size only, not its content)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def synthetic_rows(
    n_rows: int,
    config: Any,
    image_processor: Any,
    text_tokens: tuple[int, int],
    seed: int,
    image_size: tuple[int, int] = PHOTO_SIZE,
) -> list[dict[str, Any]]:
    """Rows shaped like prepared SafeMT rows: system/turn text, one image, more text, the verdict."""
    import torch

    image = image_processor(images=[photo_image(seed, image_size)], return_tensors="pt")
    pixel_values, grid = image["pixel_values"], image["image_grid_thw"]
    merge = config.vision_config.spatial_merge_size
    n_image_tokens = int(grid.prod()) // (merge * merge)
    special = {getattr(config, f) for f in TOKEN_ID_FIELDS}
    vocab = config.text_config.vocab_size
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        n_text = rng.randint(*text_tokens)
        text = [t for t in (rng.randrange(vocab) for _ in range(n_text * 2)) if t not in special][:n_text]
        prefix = min(32, n_text // 4)  # system prompt start; the image opens the first user turn
        ids = [
            *text[:prefix],
            config.vision_start_token_id,
            *[config.image_token_id] * n_image_tokens,
            config.vision_end_token_id,
            *text[prefix:],
        ]
        labels = [-100] * (len(ids) - COMPLETION_TOKENS) + ids[-COMPLETION_TOKENS:]
        rows.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "pixel_values": pixel_values,
                "image_grid_thw": grid,
                "n_patches": int(grid.prod()),
                "n_image_tokens": n_image_tokens,
                "n_text_tokens": n_text + 2,
            }
        )
    return rows


def collate(rows: Sequence[dict[str, Any]], image_token_id: int, pad_token_id: int) -> dict[str, Any]:
    """Right-padded batch as TRL's collator builds it for training, with the mm token types mRoPE needs."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = row["input_ids"], row["labels"], 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "mm_token_type_ids": (input_ids == image_token_id).int(),
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
        "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows]),
    }


def length_grouped_batches(rows: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """The recipe's ``group_by_length`` in its simplest form: similar lengths share a batch."""
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


# -- device helpers -------------------------------------------------------------------------------
def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: Any) -> tuple[float, str]:
    """Peak memory on ``device``: CUDA's allocator peak, or on CPU this process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (CPU: ru_maxrss)"


def parameter_placement(model: Any) -> tuple[set[str], set[str]]:
    """The devices and dtypes of all parameters, as strings."""
    devices, dtypes = set(), set()
    for param in model.parameters():
        devices.add(str(param.device))
        dtypes.add(str(param.dtype))
    return devices, dtypes


def same_device(actual: str, requested: Any) -> bool:
    """``cuda:0`` satisfies a request for ``cuda``; an indexed request must match its index."""
    import torch

    actual_device, requested_device = torch.device(actual), torch.device(requested)
    if actual_device.type != requested_device.type:
        return False
    return requested_device.index is None or actual_device.index in (None, requested_device.index)


# -- part 1: training ------------------------------------------------------------------------------
def count_parameters(model: Any) -> tuple[int, int, int]:
    """(N_text without the embedding lookup, N_vision, N_trainable) of a (PEFT-wrapped) Qwen2.5-VL."""
    n_text = n_vision = n_trainable = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            n_trainable += param.numel()
        if ".visual." in name or name.startswith("visual."):
            n_vision += param.numel()
        elif "embed_tokens" not in name:
            n_text += param.numel()
    return n_text, n_vision, n_trainable


def enable_checkpointing(model: Any, training_args: Any) -> None:
    """As ``transformers.Trainer`` does: transformers 5 renamed gradient_* to activation_checkpointing*."""
    kwargs = dict(
        getattr(training_args, "activation_checkpointing_kwargs", None)
        or training_args.gradient_checkpointing_kwargs
        or {}
    )
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
        )
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def build_training_model(config: Any, script_args: Any, training_args: Any, model_args: Any, device: Any):
    """Random weights from ``config`` on ``device``, prepared with the recipe's settings as TRL's SFTTrainer does."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from train.modeling import build_peft_config

    dtype = torch_dtype(model_args.dtype)
    torch.manual_seed(training_args.seed)
    with torch.device(device):  # allocate and initialise directly on the GPU: no 16 GB host copy
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=model_args.attn_implementation
        )
    if training_args.activation_checkpointing:
        model.config.use_cache = False  # as train.modeling.build_model does
    peft_config = build_peft_config(model_args, script_args)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    if training_args.activation_checkpointing:
        enable_checkpointing(model, training_args)
        if peft_config is not None:
            model.enable_input_require_grads()  # TRL does this for PEFT + checkpointing
    model.train()
    return model


def train_check(
    report: Report,
    config: Any,
    processor: Any,
    recipe_args: tuple[Any, Any, Any],
    device: Any,
    steps: int,
    warmup_steps: int,
    text_tokens: tuple[int, int],
    image_size: tuple[int, int],
    peak_tflops: float | None,
    peak_source: str,
) -> Any:
    """Train a few optimizer steps; add the figures to ``report``; return the (PEFT) model."""
    import contextlib

    import torch

    script_args, training_args, model_args = recipe_args
    model = build_training_model(config, script_args, training_args, model_args, device)
    n_text, n_vision, n_trainable = count_parameters(model)
    batch_size, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    rows = synthetic_rows(
        (steps + warmup_steps) * batch_size * accumulation,
        config,
        processor.image_processor,
        text_tokens,
        training_args.seed,
        image_size,
    )
    pad_id = config.text_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    batches = [collate(b, config.image_token_id, pad_id) for b in length_grouped_batches(rows, batch_size)]
    random.Random(training_args.seed).shuffle(batches)  # the grouped sampler shuffles mega-batches too
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=training_args.learning_rate,
        weight_decay=training_args.weight_decay,
        fused=device.type == "cuda",  # the recipe's optim default is adamw_torch_fused
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if training_args.bf16 else contextlib.nullcontext()
    reset_peak_memory(device)
    step_seconds, real_tokens, padded_tokens, patches, losses = [], [], [], [], []
    batch_iter = iter(batches)
    for step in range(warmup_steps + steps):
        synchronize(device)
        start = time.perf_counter()
        real = padded = n_patches = 0
        for _ in range(accumulation):
            batch = next(batch_iter)
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            n_patches += int(batch["image_grid_thw"].prod(-1).sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(torch_dtype(model_args.dtype))
            with autocast:
                loss = model(**batch).loss / accumulation
            loss.backward()
            losses.append(float(loss.detach()) * accumulation)
        if training_args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, training_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup_steps:
            step_seconds.append(time.perf_counter() - start)
            real_tokens.append(real)
            padded_tokens.append(padded)
            patches.append(n_patches)
    peak_gb, peak_how = peak_memory_gb(device)
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"training loss is not finite: {losses}")

    step_s = statistics.median(step_seconds)
    tokens_per_step = statistics.mean(real_tokens)
    flops_per_step = 6 * n_text * tokens_per_step + 2 * n_vision * statistics.mean(patches)
    achieved_tflops = flops_per_step / step_s / 1e12
    section = "train"
    report.add(section, "parameters (text / vision / trainable LoRA)", f"{n_text:,} / {n_vision:,} / {n_trainable:,}")
    report.figures.update(n_text_params=n_text, n_vision_params=n_vision, n_trainable_params=n_trainable)
    report.add(
        section,
        "recipe settings",
        f"dtype={model_args.dtype} bf16={training_args.bf16} attn={model.config._attn_implementation} "
        f"grad_ckpt={training_args.activation_checkpointing} lora_r={model_args.lora_r} "
        f"lora_alpha={model_args.lora_alpha} batch={batch_size}x{accumulation}",
    )
    report.figures.update(
        attn_implementation=model.config._attn_implementation,
        gradient_checkpointing=training_args.activation_checkpointing,
        bf16=training_args.bf16,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
    )
    report.add(
        section,
        "tokens per row (image / text)",
        f"{rows[0]['n_image_tokens']} / {text_tokens[0] + 2}-{text_tokens[1] + 2}",
        f"{image_size[0]}x{image_size[1]} image, max_pixels={script_args.max_pixels}",
    )
    report.figures["image_tokens_per_row"] = rows[0]["n_image_tokens"]
    report.add(section, "optimizer steps timed", len(step_seconds), f"after {warmup_steps} warm-up", key="steps")
    report.add(section, "step time (s, median)", step_s, "one optimizer step incl. accumulation", key="step_time_s")
    report.add(section, "real tokens/s", tokens_per_step / step_s, "non-pad tokens, image tokens included",
               key="real_tokens_per_s")  # fmt: skip
    report.add(section, "pad fraction", 1 - sum(real_tokens) / sum(padded_tokens), key="pad_fraction")
    report.add(section, "loss (first / last)", f"{losses[0]:.3f} / {losses[-1]:.3f}")
    report.add(section, "peak memory (GiB)", peak_gb, peak_how, key="train_peak_memory_gb")
    report.add(section, "model TFLOP/s achieved", achieved_tflops, "6*N_text*tokens + 2*N_vision*patches",
               key="achieved_tflops")  # fmt: skip
    if peak_tflops:
        report.add(section, "MFU", achieved_tflops / peak_tflops, f"vs {peak_tflops:g} TFLOP/s bf16 ({peak_source})",
                   key="mfu")  # fmt: skip
    else:
        report.add(section, "MFU", "n/a", f"{peak_source}: pass --peak-tflops", key="mfu")
    report.figures["flops_formula"] = FLOPS_FORMULA
    del optimizer, batches, rows
    return model


# -- part 2: serving -------------------------------------------------------------------------------
def save_serving_checkpoint(model: Any, serving_source: Path, processor: Any, out_dir: Path) -> Path:
    """The trained architecture's base weights (LoRA removed) with the serving tokenizer's token ids."""
    from transformers import AutoConfig, GenerationConfig

    base = model.unload() if hasattr(model, "unload") else model  # PEFT: drop the adapters, keep the base
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()  # serving runs with the KV cache
    source = AutoConfig.from_pretrained(serving_source)
    # Special-token ids must come from the tokenizer the moderator is served with.
    for name in TOKEN_ID_FIELDS:
        setattr(base.config, name, getattr(source, name))
    for name in TEXT_TOKEN_ID_FIELDS:
        setattr(base.config.text_config, name, getattr(source.text_config, name))
    base.config.use_cache = True
    base.generation_config = GenerationConfig.from_pretrained(serving_source)
    base.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def sample_dialogues(n: int, image_size: tuple[int, int] = PHOTO_SIZE) -> list[tuple[list[dict[str, str]], Any]]:
    """``n`` SafeMT sample dialogues (all lengths, cycled) with placeholder images of ``image_size``."""
    from moderator.images import placeholder_image
    from moderator.schema import TURN_COUNTS, parse_safemt_record, safemt_turn_file
    from moderator.taxonomy import load_taxonomy

    taxonomy = load_taxonomy()
    records = []
    for turns in TURN_COUNTS:
        path = safemt_turn_file(SAMPLE_DIR, turns)
        if path.is_file():
            records += [parse_safemt_record(raw, taxonomy, turns) for raw in json.loads(path.read_text())]
    if not records:
        raise FileNotFoundError(f"{SAMPLE_DIR}: no <k>_turn.json sample files")
    picked = [records[i % len(records)] for i in range(n)]
    return [(list(r.dialogue), placeholder_image(r.image_path, image_size)) for r in picked]


def serve_check(
    report: Report,
    checkpoint: Path,
    device: Any,
    dtype: Any,
    n_dialogues: int,
    batch_size: int,
    max_new_tokens: int,
    image_size: tuple[int, int],
) -> bool:
    """Load the moderator on ``device`` in ``dtype``, prove where it lives, time ``moderate_batch``."""
    from moderator.inference import Moderator
    from moderator.schema import SAFEMT_IMAGE_TURNS

    reset_peak_memory(device)
    start = time.perf_counter()
    moderator = Moderator.from_pretrained(checkpoint, device=str(device), dtype=dtype, verify=False)
    load_s = time.perf_counter() - start
    devices, dtypes = parameter_placement(moderator.model)
    on_device = all(same_device(d, device) for d in devices)
    in_dtype = dtypes == {str(dtype)}
    section = "serve"
    report.add(section, "moderator device", ", ".join(sorted(devices)), f"requested {device}; all parameters",
               key="moderator_device")  # fmt: skip
    report.add(section, "moderator dtype", ", ".join(sorted(dtypes)), f"requested {dtype}", key="moderator_dtype")
    report.figures.update(requested_device=str(device), requested_dtype=str(dtype))
    report.add(section, "placement check", "pass" if on_device and in_dtype else "FAIL")
    report.figures["placement_ok"] = on_device and in_dtype
    report.add(section, "load time (s)", load_s, "from_pretrained, safetensors", key="load_s")

    dialogues = sample_dialogues(n_dialogues, image_size)
    texts = moderator.prompt_texts([d for d, _ in dialogues], [list(SAFEMT_IMAGE_TURNS)] * len(dialogues))
    encoded = moderator.processor(text=texts, images=[img for _, img in dialogues], padding=True, return_tensors="pt")
    prompt_tokens = int(encoded["attention_mask"].sum()) / len(dialogues)
    batches = [dialogues[i : i + batch_size] for i in range(0, len(dialogues), batch_size)]
    moderator.moderate_batch([d for d, _ in batches[0]], [[img] for _, img in batches[0]], max_new_tokens=2)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    verdicts = []
    for batch in batches:
        verdicts += moderator.moderate_batch(
            [d for d, _ in batch], [[img] for _, img in batch], max_new_tokens=max_new_tokens
        )
    synchronize(device)
    seconds = time.perf_counter() - start
    peak_gb, peak_how = peak_memory_gb(device)
    report.add(section, "dialogues (batch)", f"{len(verdicts)} ({batch_size})",
               f"SafeMT sample, {image_size[0]}x{image_size[1]} images")  # fmt: skip
    report.figures.update(dialogues=len(verdicts), serve_batch_size=batch_size)
    report.add(section, "prompt tokens per dialogue (mean)", prompt_tokens, "offline tiny tokenizer + image tokens",
               key="prompt_tokens_mean")  # fmt: skip
    report.add(section, "max new tokens", max_new_tokens, "random weights: generation rarely stops early",
               key="max_new_tokens")  # fmt: skip
    report.add(section, "dialogues/s", len(verdicts) / seconds, "moderate_batch: P(unsafe) pass + generation",
               key="dialogues_per_s")  # fmt: skip
    report.add(section, "peak memory (GiB)", peak_gb, peak_how, key="serve_peak_memory_gb")
    if not all(0.0 <= v.p_unsafe <= 1.0 for v in verdicts):
        raise RuntimeError("moderator returned P(unsafe) outside [0, 1]")
    return on_device and in_dtype


# -- entry point -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-dry-run", action="store_true", help="same code path on CPU with the tiny model (CI)")
    parser.add_argument("--recipe", default=str(RECIPE), help="SFT recipe whose LoRA/precision/attention settings run")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --cpu-dry-run)")
    parser.add_argument("--serve-dtype", default=None, help="moderator dtype; default: the recipe's dtype")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 3; dry run 1)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed optimizer steps (default 1; dry run 0)")
    parser.add_argument("--dialogues", type=int, default=None, help="dialogues moderated (default 64; dry run 8)")
    parser.add_argument("--serve-batch", type=int, default=None, help="moderate_batch size (default 16; dry run 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64; dry run 8")
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
        help=f"image before the processor's pixel bounds (default {PHOTO_SIZE[0]} {PHOTO_SIZE[1]}; dry run 224 168)",
    )  # fmt: skip
    parser.add_argument(
        "--text-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
        help="text tokens per training row (default 300 500; dry run 40 80)",
    )  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak, for a GPU not in the table")
    parser.add_argument(
        "--tiny-model", default=None, help="an existing `python -m tiny_models.moderator DIR` checkpoint to reuse"
    )
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--skip-serve", action="store_true", help="training part only")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args, recipe_overrides = parse_args(argv)
    started = time.perf_counter()
    import torch

    dry = args.cpu_dry_run
    device = torch.device(args.device or ("cpu" if dry else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible: run on the GPU machine, or pass --cpu-dry-run", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else (1 if dry else 3)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (0 if dry else 1)
    n_dialogues = args.dialogues if args.dialogues is not None else (8 if dry else 64)
    serve_batch = args.serve_batch if args.serve_batch is not None else (4 if dry else 16)
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else (8 if dry else 64)
    # The dry run proves the code path in seconds on 2 busy cores: small images and rows.
    image_size = tuple(args.image_size or ((224, 168) if dry else PHOTO_SIZE))
    text_tokens = tuple(args.text_tokens or ((40, 80) if dry else (300, 500)))
    # CPU has no fast bf16: precision flags are the only recipe settings the dry run overrides.
    overrides = (["--dtype", "float32", "--bf16", "false"] if dry else []) + recipe_overrides

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()})"
    peak = args.peak_tflops or (bf16_peak_tflops(device_name) if device.type == "cuda" else None)
    peak_source = (
        "--peak-tflops" if args.peak_tflops else "device table" if peak else f"unknown bf16 peak for {device_name}"
    )

    report = Report()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLConfig

        from moderator.images import bound_image_pixels
        from tiny_models.moderator import build_tiny_qwen2_5_vl

        recipe_args = parse_recipe(Path(args.recipe), overrides, work / "sft")
        script_args, _, model_args = recipe_args
        # The offline tiny checkpoint supplies the serving tokenizer (and, in the dry run, the architecture).
        tiny_dir = Path(args.tiny_model) if args.tiny_model else build_tiny_qwen2_5_vl(work / "tiny")
        processor = AutoProcessor.from_pretrained(tiny_dir)
        bound_image_pixels(processor, script_args.min_pixels, script_args.max_pixels)
        config = (
            AutoConfig.from_pretrained(tiny_dir) if dry else Qwen2_5_VLConfig(**copy.deepcopy(QWEN2_5_VL_7B_CONFIG))
        )
        architecture = "tiny Qwen2.5-VL (tiny_models.moderator)" if dry else "Qwen2.5-VL-7B-Instruct config"
        report.add("setup", "device", device_name, str(device), key="device_name")
        report.add("setup", "mode", "cpu dry run" if dry else "gpu", key="mode")
        report.add("setup", "architecture", architecture, "random weights")
        report.add("setup", "recipe", Path(args.recipe).name, " ".join(overrides) or "as written")
        report.add("setup", "torch / transformers", f"{torch.__version__} / {_version('transformers')}",
                   f"trl {_version('trl')}, peft {_version('peft')}")  # fmt: skip

        phase = time.perf_counter()
        model = train_check(
            report,
            config,
            processor,
            recipe_args,
            device,
            steps,
            warmup_steps,
            text_tokens,
            image_size,
            peak,
            peak_source,
        )
        report.add("time", "training part (s)", time.perf_counter() - phase, "build + warm-up + timed steps",
                   key="train_part_s")  # fmt: skip

        placement_ok = True
        if not args.skip_serve:
            phase = time.perf_counter()
            checkpoint = save_serving_checkpoint(model, tiny_dir, processor, work / "moderator")
            del model
            gc.collect()
            serve_dtype = torch_dtype(args.serve_dtype or model_args.dtype)
            report.add("time", "save moderator checkpoint (s)", time.perf_counter() - phase, key="save_s")
            phase = time.perf_counter()
            placement_ok = serve_check(
                report, checkpoint, device, serve_dtype, n_dialogues, serve_batch, max_new_tokens, image_size
            )
            report.add("time", "serving part (s)", time.perf_counter() - phase, "load + warm-up + timed",
                       key="serve_part_s")  # fmt: skip
        report.add("time", "total wall time (s)", time.perf_counter() - started, "target < 480 s on the GPU",
                   key="total_s")  # fmt: skip

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report.figures["date"] = date
    header = f"## GPU check: {device_name}, {date}\n\n{FLOPS_FORMULA}"
    markdown = render_markdown(report, header)
    (out / "gpu_check.md").write_text(markdown)
    payload = {"figures": report.figures, "rows": [vars(r) for r in report.rows], "formula": FLOPS_FORMULA}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(markdown)
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    if not placement_ok:
        print(f"error: the moderator's parameters are not all on {device} in the requested dtype", file=sys.stderr)
        return 1
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
