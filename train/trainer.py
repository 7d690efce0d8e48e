"""``SFTTrainer`` for the moderator: moderation metrics in eval, no silent truncation, pre-emption."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from transformers import TrainerCallback
from trl import SFTTrainer

from moderator.inference import Moderator
from moderator.taxonomy import Taxonomy

logger = logging.getLogger(__name__)


class NoTruncationCollator:
    """Wraps TRL's VLM collator so a too-long example fails loudly instead of being truncated.

    TRL truncates to ``max_length`` in the collator: cutting the completion trains on loss 0.0,
    cutting image tokens fails deep in the model. We collate untruncated and refuse the batch,
    naming the example ids, when any row is longer than ``max_length`` or has no supervised token.
    """

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]], max_length: int | None):
        self.inner = inner
        self.max_length = max_length
        if hasattr(inner, "max_length"):
            inner.max_length = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [str(example.get("id", f"#{i}")) for i, example in enumerate(examples)]
        batch = self.inner(examples)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        if self.max_length is not None:
            too_long = [(i, n) for i, n in zip(ids, lengths, strict=True) if n > self.max_length]
            if too_long:
                listed = ", ".join(f"{i} ({n} tokens)" for i, n in too_long)
                raise ValueError(
                    f"examples longer than max_length={self.max_length}: {listed}. Truncation would cut the "
                    "verdict or image tokens; raise --max_length, lower --max_pixels, or filter at data prep."
                )
        supervised = (batch["labels"] != -100).sum(dim=1).tolist()
        empty = [i for i, n in zip(ids, supervised, strict=True) if n == 0]
        if empty:
            raise ValueError(f"examples with no supervised (verdict) token: {', '.join(empty)}")
        return batch


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (Slurm pre-emption), save a checkpoint at the next step end and stop.

    The flag is all-reduced so every rank stops at the same step even if only one got the signal.
    """

    def __init__(self) -> None:
        self.received = False
        self.started_at: int | None = None  # global step after any checkpoint was loaded
        self.stopped_at: int | None = None
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def _any_rank_received(self) -> bool:
        flag = self.received
        if dist.is_available() and dist.is_initialized():
            tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                tensor = tensor.cuda()
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def on_train_begin(self, args, state, control, **kwargs):
        self.started_at = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received():
            logger.warning("SIGTERM received: saving a checkpoint at step %d and stopping", state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class ProvenanceCallback(TrainerCallback):
    """Adds the run's provenance (taxonomy, data fingerprint, commit, resolved config) to W&B's config."""

    def __init__(self, provenance: Mapping[str, Any]):
        self.provenance = dict(provenance)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.config.update({"moderator": self.provenance}, allow_val_change=True)


def moderation_metrics(
    labels: list[str], categories: list[str], verdicts: list[Any], prefix: str = "eval"
) -> dict[str, float]:
    """Verdict accuracy, unsafe precision/recall/F1 and category accuracy (on truly unsafe dialogues)."""
    y_true = [int(label == "unsafe") for label in labels]
    y_pred = [int(v.flagged) for v in verdicts]
    unsafe = [i for i, y in enumerate(y_true) if y]
    metrics = {
        "verdict_accuracy": accuracy_score(y_true, y_pred),
        "unsafe_precision": precision_score(y_true, y_pred, zero_division=0),
        "unsafe_recall": recall_score(y_true, y_pred, zero_division=0),
        "unsafe_f1": f1_score(y_true, y_pred, zero_division=0),
        "category_accuracy": (sum(verdicts[i].category == categories[i] for i in unsafe) / len(unsafe))
        if unsafe
        else 0.0,
        "parse_error_rate": sum(v.parse_error for v in verdicts) / max(len(verdicts), 1),
    }
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items()}


class ModeratorSFTTrainer(SFTTrainer):
    """SFTTrainer whose ``evaluate`` also reports moderation metrics, usable for best-checkpoint selection."""

    def __init__(
        self,
        *args: Any,
        taxonomy: Taxonomy,
        moderation_eval_samples: int = 64,
        moderation_eval_max_new_tokens: int = 48,
        moderation_eval_threshold: float = 0.5,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.taxonomy = taxonomy
        self.moderation_eval_samples = moderation_eval_samples
        self.moderation_eval_max_new_tokens = moderation_eval_max_new_tokens
        self.moderation_eval_threshold = moderation_eval_threshold

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.moderation_eval_samples > 0 and dataset is not None and not isinstance(dataset, dict):
            extra = self.moderation_evaluate(dataset, metric_key_prefix)
            self.log(extra)
            metrics.update(extra)
        return metrics

    @torch.no_grad()
    def moderation_evaluate(self, dataset: Any, prefix: str = "eval", batch_size: int = 8) -> dict[str, float]:
        """Score validation dialogues like the served moderator does (same ``Moderator`` code path).

        Every rank runs the same examples, so ZeRO-3's gathered forward passes stay in step.
        """
        # A seeded sample, not the first rows: a split's order must not decide which labels are scored.
        n = min(self.moderation_eval_samples, len(dataset))
        subset = dataset.shuffle(seed=self.args.seed).select(range(n)) if n < len(dataset) else dataset
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = self.processing_class.tokenizer
        was_training, padding_side = model.training, tokenizer.padding_side
        model.eval()
        tokenizer.padding_side = "left"
        try:
            moderator = Moderator(model, self.processing_class, self.taxonomy, threshold=self.moderation_eval_threshold)
            verdicts = []
            for start in range(0, len(subset), batch_size):
                rows = subset[start : start + batch_size]
                prompts = [messages[:-1] for messages in rows["messages"]]
                images = [[image.convert("RGB") for image in imgs] for imgs in rows["images"]]
                verdicts += moderator.moderate_rendered(prompts, images, self.moderation_eval_max_new_tokens)
        finally:
            tokenizer.padding_side = padding_side
            model.train(was_training)
        return moderation_metrics(list(subset["label"]), list(subset["category"]), verdicts, prefix)
