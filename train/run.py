"""Build everything ``train/sft.py`` needs and run it (importable and tested)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, SFTConfig

from data_prep.io import load_prepared
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.taxonomy import Taxonomy, load_taxonomy
from train.config import ModeratorScriptArguments
from train.modeling import build_model, build_peft_config, build_processor
from train.provenance import run_provenance, write_provenance
from train.trainer import ModeratorSFTTrainer, NoTruncationCollator, PreemptionCallback, ProvenanceCallback

logger = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run is not finished; rerun the same command to resume


def resume_checkpoint(training_args: SFTConfig, fresh_start: bool) -> str | None:
    """The checkpoint to resume from: an explicit ``--resume_from_checkpoint``, else the last in output_dir."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    if fresh_start:
        if output_dir.is_dir() and training_args.process_index == 0:
            for checkpoint in output_dir.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
        return None
    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def check_dataset_contract(dataset_path: str | Path, taxonomy: Taxonomy) -> None:
    """Refuse data rendered with another prompt format or taxonomy than the code trains and serves with."""
    stats_file = Path(dataset_path) / "stats.json"
    if not stats_file.is_file():
        raise FileNotFoundError(f"{stats_file}: missing; was {dataset_path} written by python -m data_prep.build?")
    stats = json.loads(stats_file.read_text())
    version = stats.get("prompt_format_version")
    if str(version) != PROMPT_FORMAT_VERSION:
        raise ValueError(
            f"{stats_file}: data rendered with prompt format {version}, this code uses {PROMPT_FORMAT_VERSION}; "
            "rebuild the dataset"
        )
    if not taxonomy.matches(stats.get("taxonomy") or {}):
        raise ValueError(
            f"{stats_file}: data built with other taxonomy categories than {taxonomy.path}; "
            "rebuild the dataset or pass --taxonomy_path"
        )


def _first(dataset, n: int | None):
    return dataset.select(range(min(n, len(dataset)))) if dataset is not None and n is not None else dataset


def build_trainer(
    script_args: ModeratorScriptArguments, training_args: SFTConfig, model_args: ModelConfig
) -> tuple[ModeratorSFTTrainer, PreemptionCallback]:
    taxonomy = load_taxonomy(script_args.taxonomy_path)
    check_dataset_contract(script_args.dataset_path, taxonomy)
    datasets = load_prepared(script_args.dataset_path)
    train_dataset = _first(datasets[script_args.dataset_train_split], script_args.max_train_samples)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = _first(datasets[script_args.dataset_eval_split], script_args.max_eval_samples)
    # Metadata columns (id, label, category) must reach the collator and the moderation eval.
    training_args.remove_unused_columns = False
    grouped = training_args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
    if grouped and training_args.length_column_name not in train_dataset.column_names:
        raise ValueError(
            f"train_sampling_strategy={training_args.train_sampling_strategy!r} needs a "
            f"{training_args.length_column_name!r} column of token lengths in {script_args.dataset_path}: run "
            "data prep with --processor set to the model you train, or use --train_sampling_strategy random"
        )

    processor = build_processor(model_args, script_args, training_args.trust_remote_code)
    model = build_model(model_args, script_args, training_args.gradient_checkpointing, training_args.trust_remote_code)
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
        moderation_eval_max_new_tokens=script_args.moderation_eval_max_new_tokens,
        moderation_eval_threshold=script_args.moderation_eval_threshold,
    )
    trainer.data_collator = NoTruncationCollator(trainer.data_collator, training_args.max_length)
    return trainer, preemption


def train(script_args: ModeratorScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> int:
    """Train; return 0 when finished, ``PREEMPTED_EXIT_CODE`` when stopped by SIGTERM after a checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
