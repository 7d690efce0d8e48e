"""``SFTTrainer`` for the moderator: moderation metrics in eval, no silent truncation, pre-emption."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, recall_score
from transformers import TrainerCallback
from trl import SFTTrainer

from moderator.artefacts import DEFAULT_THRESHOLD, flags
from moderator.contract import prompt_of_prepared_row
from moderator.inference import Moderator, Verdict
from moderator.taxonomy import Taxonomy
from train.loss import VerdictLossWeight

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
    labels: Sequence[str],
    scores: Sequence[float],
    threshold: float,
    verdicts: Sequence[Verdict] | None = None,
    categories: Sequence[str] | None = None,
    prefix: str = "eval",
) -> dict[str, float]:
    """Unsafe AUPRC (threshold-free, for checkpoint selection) and verdict accuracy / unsafe P/R/F1 at ``threshold``.

    With generated ``verdicts`` the flags are the served ones (an unparseable answer flags, fail-closed),
    and category accuracy (on truly unsafe dialogues) and the parse-error rate are added.
    """
    y_true = [int(label == "unsafe") for label in labels]
    # Generated verdicts flag as the service does (fail-closed on parse errors); else the score decides.
    flagged = [v.flagged for v in verdicts] if verdicts is not None else [flags(score, threshold) for score in scores]
    y_pred = [int(flag) for flag in flagged]
    metrics = {
        # Average precision: the area under the precision-recall curve, as sklearn defines it.
        "unsafe_auprc": average_precision_score(y_true, scores) if any(y_true) else 0.0,
        "verdict_accuracy": accuracy_score(y_true, y_pred),
        "unsafe_precision": precision_score(y_true, y_pred, zero_division=0),
        "unsafe_recall": recall_score(y_true, y_pred, zero_division=0),
        "unsafe_f1": f1_score(y_true, y_pred, zero_division=0),
    }
    if verdicts is not None:
        if categories is None:
            raise ValueError("category accuracy needs the true categories of the scored dialogues")
        unsafe = [i for i, y in enumerate(y_true) if y]
        metrics["category_accuracy"] = (
            sum(verdicts[i].category == categories[i] for i in unsafe) / len(unsafe) if unsafe else 0.0
        )
        metrics["parse_error_rate"] = sum(v.parse_error for v in verdicts) / max(len(verdicts), 1)
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items()}


def moderation_shard(n: int, num_processes: int, process_index: int) -> tuple[list[int], int]:
    """The eval dialogues (indices into ``range(n)``) rank ``process_index`` scores, and how many are its own.

    Each rank takes a contiguous slice; a shorter slice is padded by repeating an index (results
    dropped after the gather) so every rank runs the same number of forward passes: under ZeRO-3
    each forward gathers parameters from all ranks, and a rank that stopped early would hang the rest.
    Written out rather than ``PartialState.split_between_processes`` so it is testable for any rank
    count without a process group.
    """
    if n <= 0:
        return [], 0
    per_rank = math.ceil(n / num_processes)
    own = list(range(min(process_index * per_rank, n), min((process_index + 1) * per_rank, n)))
    padding = [own[-1] if own else n - 1] * (per_rank - len(own))
    return own + padding, len(own)


class ModeratorSFTTrainer(SFTTrainer):
    """SFTTrainer whose ``evaluate`` also reports moderation metrics, usable for best-checkpoint selection.

    Its collator is TRL's own VLM collator (built by ``SFTTrainer`` with the training chat template and
    pad token it sets up) behind ``NoTruncationCollator``, installed as the trainer is built: a trainer
    never exists that would truncate a row.
    """

    def __init__(
        self,
        *args: Any,
        taxonomy: Taxonomy,
        moderation_eval_samples: int = 64,
        moderation_eval_generate: bool = False,
        moderation_eval_max_new_tokens: int = 48,
        moderation_eval_threshold: float = DEFAULT_THRESHOLD,
        verdict_loss: VerdictLossWeight | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if not isinstance(self.data_collator, NoTruncationCollator):
            self.data_collator = NoTruncationCollator(self.data_collator, self.args.max_length)
        self.verdict_loss = verdict_loss
        self.taxonomy = taxonomy
        self.moderation_eval_samples = moderation_eval_samples
        self.moderation_eval_generate = moderation_eval_generate
        self.moderation_eval_max_new_tokens = moderation_eval_max_new_tokens
        self.moderation_eval_threshold = moderation_eval_threshold

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, plus the verdict word's extra weight when ``--verdict_loss_weight`` is not 1."""
        if self.verdict_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's forward returns each label's log-probability (its fused LM head) but hands back recomputed
        # logits instead when asked for outputs: a hook keeps the fused output, so no extra forward is needed.
        fused: list[Any] = []

        def keep_fused(module: Any, args: Any, output: Any) -> None:
            if not fused and getattr(output, "log_probs", None) is not None:
                fused.append(output)

        handle = model.register_forward_hook(keep_fused)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if not fused:
            raise RuntimeError("--verdict_loss_weight needs TRL's per-token log-probabilities; the forward gave none")
        loss, outputs = result if return_outputs else (result, None)
        # TRL scores next-token labels: shifted here, pre-shifted under context/sequence parallelism.
        shift_labels = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][:, 1:]
        n_tokens = fused[0].label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        extra = self.verdict_loss.extra_loss(fused[0].log_probs, shift_labels, n_tokens)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            extra = extra * (self.accelerator.num_processes // self.get_tp_size())  # as TRL scales its loss
        loss = loss + extra
        return (loss, outputs) if return_outputs else loss

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

    def moderation_subset(self, dataset: Any) -> Any:
        """The dialogues scored at each evaluation: the same seeded sample on every rank and at every step."""
        # A seeded sample, not the first rows: a split's order must not decide which labels are scored.
        n = min(self.moderation_eval_samples, len(dataset))
        return dataset.shuffle(seed=self.args.seed).select(range(n)) if n < len(dataset) else dataset

    @torch.no_grad()
    def score_moderation_shard(self, subset: Any, indices: Sequence[int]) -> list[tuple[int, float, Verdict | None]]:
        """``(index, P(unsafe), verdict or None)`` for ``subset[indices]``, through the served ``Moderator``.

        Without ``moderation_eval_generate`` only ``Moderator.p_unsafe`` runs (one forward pass a batch).
        """
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = self.processing_class.tokenizer
        was_training, padding_side = model.training, tokenizer.padding_side
        model.eval()
        # Training pads on the right; batched scoring reads the last position, so it pads on the left.
        tokenizer.padding_side = "left"
        batch_size = self.args.per_device_eval_batch_size
        results: list[tuple[int, float, Verdict | None]] = []
        try:
            moderator = Moderator(model, self.processing_class, self.taxonomy, threshold=self.moderation_eval_threshold)
            for start in range(0, len(indices), batch_size):
                batch = list(indices[start : start + batch_size])
                rows = subset[batch]
                prompts = [prompt_of_prepared_row(m, i) for m, i in zip(rows["messages"], rows["id"], strict=True)]
                texts = moderator.rendered_texts(prompts)
                images = [[image.convert("RGB") for image in imgs] for imgs in rows["images"]]
                if self.moderation_eval_generate:
                    verdicts = moderator.moderate_texts(texts, images, self.moderation_eval_max_new_tokens)
                    results += [(i, v.p_unsafe, v) for i, v in zip(batch, verdicts, strict=True)]
                else:
                    scores = moderator.p_unsafe(texts, images)
                    results += [(i, score, None) for i, score in zip(batch, scores, strict=True)]
        finally:
            tokenizer.padding_side = padding_side
            model.train(was_training)
        return results

    def moderation_evaluate(self, dataset: Any, prefix: str = "eval") -> dict[str, float]:
        """Moderation metrics on a seeded sample of ``dataset``, each rank scoring its share.

        Every rank gets the gathered results, so all ranks agree on the metric that picks the best checkpoint.
        """
        subset = self.moderation_subset(dataset)
        n = len(subset)
        indices, own = moderation_shard(n, self.accelerator.num_processes, self.accelerator.process_index)
        scored = self.score_moderation_shard(subset, indices)[:own]  # padding dropped
        gathered = sorted(gather_object(scored), key=lambda item: item[0])
        if [item[0] for item in gathered] != list(range(n)):
            raise RuntimeError(f"moderation eval gathered indices {[i for i, *_ in gathered]}, expected 0..{n - 1}")
        scores = [score for _, score, _ in gathered]
        verdicts = [verdict for _, _, verdict in gathered] if self.moderation_eval_generate else None
        return moderation_metrics(
            list(subset["label"]),
            scores,
            self.moderation_eval_threshold,
            verdicts=verdicts,
            categories=list(subset["category"]),
            prefix=prefix,
        )
