"""Build everything ``train/sft.py`` needs and run it (importable and tested)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState
from transformers.trainer_utils import IntervalStrategy
from trl import ModelConfig, SFTConfig

from data_prep.io import load_prepared
from moderator.cli import InputError, MissingInputError, UsageError, one_line
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.images import bound_image_pixels
from moderator.taxonomy import REPO_ROOT, Taxonomy, load_taxonomy
from train.checkpoints import TORN_PREFIX, checkpoint_problem, find_resume_checkpoint, set_aside
from train.config import ModeratorScriptArguments
from train.loss import VerdictLossWeight
from train.modeling import build_model, build_peft_config, build_processor
from train.provenance import run_provenance, write_provenance
from train.trainer import ModeratorSFTTrainer, NoTruncationCollator, PreemptionCallback, ProvenanceCallback

logger = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run is not finished; rerun the same command to resume


def resume_checkpoint(training_args: SFTConfig, fresh_start: bool) -> str | None:
    """The checkpoint to resume from: an explicit ``--resume_from_checkpoint``, else the newest complete one
    in output_dir (``train.checkpoints.checkpoint_problem`` says what complete means).

    Newer torn checkpoints (a save killed mid-write) are logged and renamed ``torn-checkpoint-N`` by the
    process that saves, so a relaunch never loops on them; an explicit checkpoint that is torn is refused.
    """
    needs_training_state = not training_args.save_only_model
    if training_args.resume_from_checkpoint:
        problem = checkpoint_problem(training_args.resume_from_checkpoint, needs_training_state)
        if problem:
            raise InputError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: {problem}")
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    if fresh_start:
        if output_dir.is_dir() and training_args.process_index == 0:
            for checkpoint in [*output_dir.glob("checkpoint-*"), *output_dir.glob(f"{TORN_PREFIX}checkpoint-*")]:
                shutil.rmtree(checkpoint)
        return None
    checkpoint, torn = find_resume_checkpoint(output_dir, needs_training_state)
    for path, problem in torn:
        moved = ""
        if training_args.should_save:  # the saving process; the others reach the same choice without it
            try:
                moved = f"; moved to {set_aside(path)}"
            except OSError as exc:
                moved = f"; could not move it aside ({exc.strerror or exc})"
        instead = (
            f"resuming from {checkpoint} instead" if checkpoint else "no complete checkpoint: training from step 0"
        )
        logger.warning("skipping torn checkpoint %s: %s%s; %s", path, problem, moved, instead)
    return str(checkpoint) if checkpoint else None


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
    """Data prep's ``stats.json`` for a prepared dataset folder."""
    stats_file = Path(dataset_path) / "stats.json"
    if not Path(dataset_path).is_dir():
        raise MissingInputError(f"{dataset_path} not found: {missing_dataset_hint(dataset_path)}")
    if not stats_file.is_file():
        raise MissingInputError(
            f"{stats_file}: missing; was {dataset_path} written by python -m data_prep.build? "
            f"{missing_dataset_hint(dataset_path)}"
        )
    try:
        return json.loads(stats_file.read_text())
    except ValueError as exc:
        raise InputError(f"{stats_file}: not valid JSON ({exc}); rebuild the dataset") from exc


def check_dataset_contract(dataset_path: str | Path, taxonomy: Taxonomy) -> None:
    """Refuse data rendered with another prompt format or taxonomy than the code trains and serves with."""
    stats_file = Path(dataset_path) / "stats.json"
    stats = load_dataset_stats(dataset_path)
    version = stats.get("prompt_format_version")
    if str(version) != PROMPT_FORMAT_VERSION:
        raise InputError(
            f"{stats_file}: data rendered with prompt format {version}, this code uses {PROMPT_FORMAT_VERSION}; "
            "rebuild the dataset"
        )
    if not taxonomy.matches(stats.get("taxonomy") or {}):
        raise InputError(
            f"{stats_file}: data built with other taxonomy categories than {taxonomy.path}; "
            "rebuild the dataset or pass --taxonomy_path"
        )


PixelBounds = tuple[int | None, int | None]  # (min_pixels, max_pixels); None: the processor's default


def processor_pixel_bounds(processor: Any) -> PixelBounds:
    """The (min, max) pixel bounds a Qwen2-VL-style processor resizes images into; None where it has none."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    return size.get("shortest_edge"), size.get("longest_edge")


def check_pixel_bounds(
    dataset_path: str | Path, stats: Mapping[str, Any], training: PixelBounds, processor_default: PixelBounds
) -> None:
    """Refuse image bounds under which images become longer than data prep counted them.

    Data prep records the bounds its token lengths assume (``stats.json`` ``tokens.min_pixels/max_pixels``,
    None for the processor's default). A larger ``max_pixels`` keeps more of a large image, a larger
    ``min_pixels`` enlarges small ones: either makes rows longer than the checked lengths, which the
    collator would only catch mid-run (or never, with ``max_length: null``).
    """
    tokens = stats.get("tokens")
    if not tokens:
        return  # data prep counted no lengths (no processor): there is no checked bound to leave
    for position, name in enumerate(("min_pixels", "max_pixels")):
        prepared = tokens.get(name) if tokens.get(name) is not None else processor_default[position]
        trained = training[position] if training[position] is not None else processor_default[position]
        if prepared is None or trained is None or trained <= prepared:
            continue
        default = " (the processor's default)"
        raise InputError(
            f"{Path(dataset_path) / 'stats.json'}: token lengths were checked at {name}={prepared}"
            f"{default if tokens.get(name) is None else ''}, but training would use {name}={trained}"
            f"{default if training[position] is None else ''}: images would be longer than checked. "
            f"Pass --{name} {prepared} or less, or rebuild the data with --{name} {trained}."
        )


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


def planned_evaluations(
    training_args: TrainingArguments, train_rows: int, world_size: int
) -> tuple[int, list[int], list[int]]:
    """(total optimizer steps, steps that evaluate, steps that save) for a run on ``train_rows`` rows.

    The step count is the Trainer's for a sized dataloader that accelerate splits across ranks
    (``Trainer.set_initial_training_values``); the schedule is transformers' own: ``TrainerState``
    turns fractional eval/save steps into absolute ones and ``DefaultFlowCallback`` decides each step.
    """
    batches = train_rows / training_args.per_device_train_batch_size
    batches = math.floor(batches) if training_args.dataloader_drop_last else math.ceil(batches)
    batches_per_rank = math.ceil(batches / world_size)
    steps_per_epoch = max(math.ceil(batches_per_rank / training_args.gradient_accumulation_steps), 1)
    if training_args.max_steps > 0:
        max_steps = training_args.max_steps
    else:
        max_steps = math.ceil(training_args.num_train_epochs * steps_per_epoch)
    state = TrainerState(max_steps=max_steps)
    state.compute_steps(training_args, max_steps)
    flow = DefaultFlowCallback()
    evaluations, saves = [], []
    for step in range(1, max_steps + 1):
        state.global_step = step
        state.epoch = step / steps_per_epoch
        control = flow.on_step_end(training_args, state, TrainerControl())
        if step % steps_per_epoch == 0 or step == max_steps:
            control = flow.on_epoch_end(training_args, state, control)
        if control.should_evaluate:
            evaluations.append(step)
        if control.should_save:
            saves.append(step)
    return max_steps, evaluations, saves


def _log_evaluation_plan(training_args: TrainingArguments, train_rows: int) -> None:
    if training_args.eval_strategy == IntervalStrategy.NO:
        return
    steps, evaluations, saves = planned_evaluations(training_args, train_rows, training_args.world_size)
    world = training_args.world_size
    logger.info("%d steps on %d ranks: evaluating at steps %s, saving at %s", steps, world, evaluations, saves)
    if training_args.load_best_model_at_end and len(evaluations) < 2:
        logger.warning(
            "only %d evaluation(s) in %d steps: load_best_model_at_end has nothing to choose from; use a "
            "fractional --eval_steps/--save_steps (e.g. 0.1)",
            len(evaluations),
            steps,
        )


def _split(datasets: Mapping[str, Any], dataset_path: str | Path, name: str, flag: str) -> Any:
    """A split that exists and has rows (TRL fails on an empty one with a bare StopIteration)."""
    if name not in datasets:
        raise InputError(f"{dataset_path}: no split {name!r} (it has {', '.join(datasets)}); set {flag}")
    if len(datasets[name]) == 0:
        hint = "; pass --eval_strategy no to train without evaluation" if flag == "--dataset_eval_split" else ""
        raise InputError(f"{dataset_path}: split {name!r} has no rows (see its stats.json and quarantine.jsonl){hint}")
    return datasets[name]


def _first(dataset, n: int | None, flag: str):
    if n is not None and n < 1:
        raise UsageError(f"{flag} {n}: must be at least 1 (TRL cannot train or evaluate on no rows)")
    return dataset.select(range(min(n, len(dataset)))) if dataset is not None and n is not None else dataset


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


def build_trainer(
    script_args: ModeratorScriptArguments, training_args: SFTConfig, model_args: ModelConfig
) -> tuple[ModeratorSFTTrainer, PreemptionCallback]:
    check_verdict_loss_weight(script_args.verdict_loss_weight, training_args)
    taxonomy = load_taxonomy(script_args.taxonomy_path)
    check_dataset_contract(script_args.dataset_path, taxonomy)
    check_full_finetune_precision(model_args, training_args)  # before loading a multi-GB model
    try:
        datasets = load_prepared(script_args.dataset_path)
    except FileNotFoundError as exc:
        raise MissingInputError(str(exc)) from exc
    train_dataset = _first(
        _split(datasets, script_args.dataset_path, script_args.dataset_train_split, "--dataset_train_split"),
        script_args.max_train_samples,
        "--max_train_samples",
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = _first(
            _split(datasets, script_args.dataset_path, script_args.dataset_eval_split, "--dataset_eval_split"),
            script_args.max_eval_samples,
            "--max_eval_samples",
        )
    # Metadata columns (id, label, category) must reach the collator and the moderation eval.
    training_args.remove_unused_columns = False
    grouped = training_args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
    if grouped and training_args.length_column_name not in train_dataset.column_names:
        raise InputError(
            f"train_sampling_strategy={training_args.train_sampling_strategy!r} needs a "
            f"{training_args.length_column_name!r} column of token lengths in {script_args.dataset_path}: run "
            "data prep with --processor set to the model you train, or use --train_sampling_strategy random"
        )

    # Unbounded first, to learn the processor's own bounds (what data prep's "None" bounds meant).
    unbounded = dataclasses.replace(script_args, min_pixels=None, max_pixels=None)
    try:
        processor = build_processor(model_args, unbounded, training_args.trust_remote_code)
    except OSError as exc:  # transformers' "not a folder, not a Hub repo (or offline)" errors
        raise MissingInputError(missing_model_message(model_args.model_name_or_path, exc)) from exc
    check_pixel_bounds(
        script_args.dataset_path,
        load_dataset_stats(script_args.dataset_path),
        (script_args.min_pixels, script_args.max_pixels),
        processor_pixel_bounds(processor),
    )
    bound_image_pixels(processor, script_args.min_pixels, script_args.max_pixels)
    _log_evaluation_plan(training_args, len(train_dataset))
    model = build_model(
        model_args, script_args, training_args.activation_checkpointing, training_args.trust_remote_code
    )
    provenance = run_provenance(
        taxonomy,
        script_args.dataset_path,
        {"train": train_dataset, "eval": eval_dataset},
        script_args,
        training_args,
        model_args,
    )
    if training_args.process_index == 0:
        write_provenance(training_args.output_dir, provenance)

    preemption = PreemptionCallback()
    trainer = ModeratorSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=build_peft_config(model_args, script_args),
        callbacks=[preemption, ProvenanceCallback(provenance)],
        taxonomy=taxonomy,
        moderation_eval_samples=script_args.moderation_eval_samples,
        moderation_eval_generate=script_args.moderation_eval_generate,
        moderation_eval_max_new_tokens=script_args.moderation_eval_max_new_tokens,
        moderation_eval_threshold=script_args.moderation_eval_threshold,
        verdict_loss=verdict_loss(script_args.verdict_loss_weight, processor),
    )
    trainer.data_collator = NoTruncationCollator(trainer.data_collator, training_args.max_length)
    return trainer, preemption


def verdict_loss(weight: float, processor: Any) -> VerdictLossWeight | None:
    """The verdict word's extra loss term; None (TRL's own loss, untouched) at weight 1."""
    if weight == 1:
        return None
    return VerdictLossWeight(getattr(processor, "tokenizer", processor), weight)


def hub_token_to_environment(training_args: TrainingArguments) -> None:
    """Move ``--hub_token`` into ``HF_TOKEN`` and off the arguments, before any Trainer sees them.

    The Trainer pickles the whole ``TrainingArguments`` into ``training_args.bin`` of the run and of
    every checkpoint (``Trainer._save``), and ``push_to_hub`` uploads those files. With the field
    empty, huggingface_hub reads the token from ``HF_TOKEN`` for every download and upload instead.
    """
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None


def train(script_args: ModeratorScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> int:
    """Train; return 0 when finished, ``PREEMPTED_EXIT_CODE`` when stopped by SIGTERM after a checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hub_token_to_environment(training_args)
    trainer, preemption = build_trainer(script_args, training_args, model_args)
    checkpoint = resume_checkpoint(training_args, script_args.fresh_start)
    if checkpoint and trainer.is_world_process_zero():
        print(f"resuming from {checkpoint}", flush=True)
    trainer.train(resume_from_checkpoint=checkpoint)

    if preemption.stopped_at is not None:
        if trainer.is_world_process_zero():
            print(f"pre-empted: checkpoint saved at step {preemption.stopped_at}; rerun to resume", flush=True)
        return PREEMPTED_EXIT_CODE

    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the loss curve and best checkpoint
    if trainer.is_world_process_zero():
        print(
            f"trained steps {preemption.started_at}->{trainer.state.global_step}; "
            f"model saved to {training_args.output_dir}",
            flush=True,
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=os.path.basename(os.path.normpath(script_args.dataset_path)))
    return 0
