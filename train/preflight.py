"""Pre-flight checks: what ``train/sft.py`` refuses before it loads a model, each with a one-line reason."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from trl import ModelConfig, SFTConfig

from moderator.artefacts import ModeratorConfigError, prepared_image_bounds, read_stats, stats_path
from moderator.cli import InputError, MissingInputError, UsageError, one_line
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.taxonomy import REPO_ROOT, Taxonomy


def data_recipe_writing(dataset_path: str | Path) -> Path | None:
    """The data recipe (``configs/data/*.yaml``) whose ``out`` is ``dataset_path``, if one is."""
    import yaml

    wanted = Path(dataset_path).resolve()
    for recipe in sorted((REPO_ROOT / "configs" / "data").glob("*.yaml")):
        try:
            out = (yaml.safe_load(recipe.read_text()) or {}).get("out")
        except (yaml.YAMLError, OSError, AttributeError):
            continue
        if out and wanted in (Path(out).resolve(), (REPO_ROOT / out).resolve()):
            return recipe
    return None


def missing_dataset_hint(dataset_path: str | Path) -> str:
    """Which command builds ``dataset_path``: the data recipe that writes it, else data prep with ``--out``."""
    recipe = data_recipe_writing(dataset_path)
    if recipe is None:
        return (
            f"build it first with `python -m data_prep.build --config configs/data/<recipe>.yaml --out {dataset_path}`"
        )
    command = f"`python -m data_prep.build --config {recipe.relative_to(REPO_ROOT)}`"
    if recipe.name == "demo.yaml":  # the demo data also needs the tiny model and images make demo creates
        return f"run `make demo` or {command} first"
    return f"run {command} first"


DEMO_BASE_MODEL = "runs/demo/base"  # the tiny default configs/sft/tiny_cpu.yaml trains


def missing_model_message(name_or_path: str, error: BaseException) -> str:
    """One line for a model that would not load: which command builds the tiny default, else why."""
    if Path(name_or_path).resolve() in (Path(DEMO_BASE_MODEL).resolve(), (REPO_ROOT / DEMO_BASE_MODEL).resolve()):
        return f"{name_or_path} not found: run `make demo` or `python -m tiny_models.moderator {DEMO_BASE_MODEL}` first"
    if not Path(name_or_path).exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        return f"{name_or_path} not found (no such folder, and not a Hugging Face Hub id)"
    return f"model {name_or_path!r} could not be loaded: {one_line(error)}"


def load_dataset_stats(dataset_path: str | Path) -> dict[str, Any]:
    """Data prep's ``stats.json`` for a prepared dataset folder (read once per run)."""
    if not Path(dataset_path).is_dir():
        raise MissingInputError(f"{dataset_path} not found: {missing_dataset_hint(dataset_path)}")
    try:
        stats = read_stats(dataset_path)
    except ModeratorConfigError as exc:
        raise InputError(f"{exc}; rebuild the dataset") from None
    if stats is None:
        raise MissingInputError(
            f"{stats_path(dataset_path)}: missing; was {dataset_path} written by python -m data_prep.build? "
            f"{missing_dataset_hint(dataset_path)}"
        )
    return stats


def check_dataset_contract(dataset_path: str | Path, stats: Mapping[str, Any], taxonomy: Taxonomy) -> None:
    """Refuse data rendered with another prompt format or taxonomy than the code trains and serves with."""
    version = stats.get("prompt_format_version")
    if str(version) != PROMPT_FORMAT_VERSION:
        raise InputError(
            f"{stats_path(dataset_path)}: data rendered with prompt format {version}, this code uses "
            f"{PROMPT_FORMAT_VERSION}; rebuild the dataset"
        )
    if not taxonomy.matches(stats.get("taxonomy") or {}):
        raise InputError(
            f"{stats_path(dataset_path)}: data built with other taxonomy categories than {taxonomy.path}; "
            "rebuild the dataset or pass --taxonomy_path"
        )


PixelBounds = tuple[int | None, int | None]  # (min_pixels, max_pixels); None: the processor's default


def processor_pixel_bounds(processor: Any) -> PixelBounds:
    """The (min, max) pixel bounds a Qwen2-VL-style processor resizes images into; None where it has none."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    return size.get("shortest_edge"), size.get("longest_edge")


def training_image_bounds(
    dataset_path: str | Path, stats: Mapping[str, Any], recipe: PixelBounds, processor_default: PixelBounds
) -> PixelBounds:
    """The bounds training resizes images into: the recipe's where it sets them, else data prep's.

    Data prep records the bounds its token lengths assume (``stats.json`` ``tokens.min_pixels/max_pixels``,
    None for the processor's default): that record is where a recipe that sets none takes them from, so
    the bounds are written once, in the data recipe. Bounds under which images become longer than data prep
    counted them are refused: a larger ``max_pixels`` keeps more of a large image, a larger ``min_pixels``
    enlarges small ones, and the collator would only catch the longer rows mid-run (or never, with
    ``max_length: null``).
    """
    prepared = prepared_image_bounds(stats)
    if prepared is None:
        return recipe  # data prep counted no lengths (no processor): there is no checked bound to leave
    bounds = (
        recipe[0] if recipe[0] is not None else prepared[0],
        recipe[1] if recipe[1] is not None else prepared[1],
    )
    for position, name in enumerate(("min_pixels", "max_pixels")):
        counted = prepared[position] if prepared[position] is not None else processor_default[position]
        trained = bounds[position] if bounds[position] is not None else processor_default[position]
        if counted is None or trained is None or trained <= counted:
            continue
        default = " (the processor's default)"
        raise InputError(
            f"{stats_path(dataset_path)}: token lengths were checked at {name}={counted}"
            f"{default if prepared[position] is None else ''}, but training would use {name}={trained}"
            f"{default if bounds[position] is None else ''}: images would be longer than checked. "
            f"Pass --{name} {counted} or less, or rebuild the data with --{name} {trained}."
        )
    return bounds


def deepspeed_keeps_fp32_master(ds_config: Mapping[str, Any] | None, bf16: bool, fp16: bool) -> bool:
    """Whether a DeepSpeed config trains 16-bit weights against fp32 master weights in its optimizer.

    DeepSpeed in bf16 or fp16 mode keeps an fp32 copy of the weights (ZeRO's fp32 partitions, or
    BF16_Optimizer at stage 0) unless ``*_master_weights_and_grads`` asks for 16-bit masters.
    "auto" sections take the training flags, as the HF integration fills them.
    """
    if not ds_config:
        return False
    for section, flag in (("bf16", bf16), ("fp16", fp16)):
        settings = ds_config.get(section) or {}
        enabled = settings.get("enabled", False)
        enabled = flag if enabled == "auto" else str(enabled).lower() == "true"
        if enabled and not settings.get(f"{section}_master_weights_and_grads", False):
            return True
    return False


def check_full_finetune_precision(model_args: ModelConfig, training_args: TrainingArguments) -> None:
    """Refuse a full fine-tune whose trained weights would be 16-bit with no fp32 master copy.

    AdamW on bf16 weights rounds most updates away at full-fine-tune learning rates (a 1e-5 step
    is below bf16's resolution for weights of magnitude > ~1e-3). LoRA is exempt: PEFT keeps
    adapter weights in fp32 over a 16-bit base.
    """
    if model_args.use_peft or model_args.dtype == "float32":
        return
    plugin = getattr(training_args, "deepspeed_plugin", None)  # set by --deepspeed or an accelerate DeepSpeed config
    ds_config = getattr(plugin, "deepspeed_config", None)
    if deepspeed_keeps_fp32_master(ds_config, bool(training_args.bf16), bool(training_args.fp16)):
        return
    where = "a DeepSpeed config without bf16/fp16 mixed precision" if ds_config else "no DeepSpeed config"
    raise UsageError(
        f"full fine-tune (use_peft false) with dtype={model_args.dtype} and {where}: the optimizer would update "
        "16-bit weights with no fp32 master copy and round most updates away. Load the weights with "
        "--dtype float32 and train with --bf16 true (mixed precision), or launch under a DeepSpeed config "
        "with bf16 enabled (configs/accelerate/zero3.yaml)."
    )


def check_verdict_loss_weight(weight: float, training_args: SFTConfig) -> None:
    if weight <= 0:
        raise UsageError(f"--verdict_loss_weight must be > 0, got {weight}")
    # The verdict term is added to TRL's plain NLL; with label smoothing TRL's per-token log-probs carry no
    # gradient, and DFT reweights tokens its own way.
    if weight != 1 and (training_args.label_smoothing_factor > 0 or training_args.loss_type != "nll"):
        raise UsageError(
            f"--verdict_loss_weight {weight} works with the plain NLL loss only: got label_smoothing_factor "
            f"{training_args.label_smoothing_factor} and loss_type {training_args.loss_type!r}"
        )
