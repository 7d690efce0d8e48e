"""Build everything ``train/sft.py`` needs and run it (importable and tested)."""

from __future__ import annotations

import dataclasses
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
from moderator.artefacts import write_run_record
from moderator.cli import PREEMPTED_EXIT_CODE, InputError, MissingInputError, UsageError
from moderator.images import bound_image_pixels
from moderator.taxonomy import load_taxonomy
from train.checkpoints import TORN_PREFIX, checkpoint_problem, find_resume_checkpoint, set_aside
from train.config import ModeratorScriptArguments
from train.loss import VerdictLossWeight
from train.modeling import build_model, build_peft_config, build_processor
from train.preflight import (
    check_dataset_contract,
    check_full_finetune_precision,
    check_verdict_loss_weight,
    load_dataset_stats,
    missing_model_message,
    processor_pixel_bounds,
    training_image_bounds,
)
from train.provenance import run_provenance
from train.trainer import ModeratorSFTTrainer, PreemptionCallback, ProvenanceCallback

logger = logging.getLogger(__name__)


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


def build_trainer(
    script_args: ModeratorScriptArguments, training_args: SFTConfig, model_args: ModelConfig
) -> tuple[ModeratorSFTTrainer, PreemptionCallback]:
    check_verdict_loss_weight(script_args.verdict_loss_weight, training_args)
    taxonomy = load_taxonomy(script_args.taxonomy_path)
    stats = load_dataset_stats(script_args.dataset_path)
    check_dataset_contract(script_args.dataset_path, stats, taxonomy)
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

    try:
        processor = build_processor(model_args, training_args.trust_remote_code)
    except OSError as exc:  # transformers' "not a folder, not a Hub repo (or offline)" errors
        raise MissingInputError(missing_model_message(model_args.model_name_or_path, exc)) from exc
    min_pixels, max_pixels = training_image_bounds(
        script_args.dataset_path,
        stats,
        (script_args.min_pixels, script_args.max_pixels),
        processor_pixel_bounds(processor),
    )
    script_args = dataclasses.replace(script_args, min_pixels=min_pixels, max_pixels=max_pixels)
    bound_image_pixels(processor, min_pixels, max_pixels)
    _log_evaluation_plan(training_args, len(train_dataset))
    model = build_model(
        model_args, script_args, training_args.activation_checkpointing, training_args.trust_remote_code
    )
    provenance = run_provenance(
        taxonomy,
        script_args.dataset_path,
        {"train": train_dataset, "eval": eval_dataset},
        processor_pixel_bounds(processor),
        script_args,
        training_args,
        model_args,
    )
    if training_args.process_index == 0:
        write_run_record(training_args.output_dir, provenance)

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
