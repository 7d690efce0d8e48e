"""Training loss with the verdict word weighted up (``--verdict_loss_weight``).

The target is ``verdict: unsafe`` + a category line + a one-sentence intent, or just ``verdict: safe``.
With plain SFT the loss is a mean over every supervised token, so the one token that decides
safe/unsafe is about 1 in 30 of an unsafe row's loss: the first steps mostly teach the intent's wording.
Measured on SmolLM2-135M, 12 LoRA steps on 24 balanced 4-turn rows (``tests/test_real_base.py``):
held-out mean P(unsafe) on benign chitchat went *up* 0.29 -> 0.48 with plain SFT (unsafe 0.25 -> 0.64)
and down 0.29 -> 0.09 with weight 10 (unsafe 0.25 -> 0.57); the log-odds gap between the classes grew
by 1.0 and 3.1 nats. Weighting the verdict word keeps the category and intent in the loss while the
decision gets a share of the gradient that matches its importance.

The loss is ``sum(weight_t * nll_t) / n_tokens`` over supervised tokens, ``n_tokens`` being what TRL
divides by (the trainer's ``num_items_in_batch`` under gradient accumulation). It is TRL's own loss plus
``(weight - 1) * nll(verdict word) / n_tokens``, added from the per-token log-probabilities TRL's fused
LM head already returns: no extra forward pass, and weight 1 is exactly TRL's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moderator.contract import verdict_choice_token_ids

IGNORE_INDEX = -100


class VerdictPositionError(ValueError):
    """A training row's supervised tokens do not start with the contract's verdict."""


def verdict_token_weights(
    labels: torch.Tensor, prefix_ids: Sequence[int], choice_ids: Sequence[int], weight: float
) -> torch.Tensor:
    """Per-position loss weights for next-token ``labels`` (already shifted, ``-100`` where ignored).

    ``weight`` on each row's verdict word (the token after ``prefix_ids`` at the start of the supervised
    span), 1 on the other supervised tokens, 0 where ignored. A row whose supervised span does not start
    with ``prefix_ids`` + one of ``choice_ids`` raises: the loss mask or the target format is wrong, and
    weighting some other token would train on garbage.
    """
    supervised = labels != IGNORE_INDEX
    weights = supervised.to(torch.float32)
    prefix = torch.as_tensor(list(prefix_ids), dtype=labels.dtype, device=labels.device)
    for row in range(labels.shape[0]):
        positions = supervised[row].nonzero().flatten()
        if positions.numel() == 0:
            continue
        start = int(positions[0])
        verdict = start + len(prefix)
        span = labels[row, start : verdict + 1]
        if (
            span.numel() != len(prefix) + 1
            or not torch.equal(span[: len(prefix)], prefix)
            or int(span[-1]) not in choice_ids
            or not bool(supervised[row, start : verdict + 1].all())
        ):
            raise VerdictPositionError(
                f"batch row {row}: the supervised tokens start with {labels[row, start : start + len(prefix) + 1].tolist()}, "
                f"not the verdict prefix {list(prefix_ids)} + one of {list(choice_ids)}: the loss mask or the "
                "target format is wrong"
            )
        weights[row, verdict] = weight
    return weights


class VerdictLossWeight:
    """The verdict word's extra loss term for ``ModeratorSFTTrainer.compute_loss``."""

    def __init__(self, tokenizer: Any, weight: float):
        if weight <= 0:
            raise ValueError(f"verdict_loss_weight must be > 0, got {weight}")
        self.weight = float(weight)
        prefix, safe_id, unsafe_id = verdict_choice_token_ids(tokenizer)
        self.prefix_ids = list(prefix)
        self.choice_ids = (safe_id, unsafe_id)

    def extra_loss(self, log_probs: torch.Tensor, shift_labels: torch.Tensor, n_tokens: Any) -> torch.Tensor:
        """``(weight - 1) * sum(nll of each row's verdict word) / n_tokens``.

        ``log_probs``: each next-token label's log-probability, aligned with ``shift_labels`` (TRL's
        ``FusedCausalLMOutput.log_probs``); ``n_tokens``: the count the mean loss was divided by.
        """
        shift_labels = shift_labels.to(log_probs.device)
        weights = verdict_token_weights(shift_labels, self.prefix_ids, self.choice_ids, self.weight)
        extra = weights - (shift_labels != IGNORE_INDEX).to(weights.dtype)  # weight - 1 on verdicts, else 0
        n_tokens = torch.as_tensor(n_tokens, device=log_probs.device).clamp(min=1)
        return -(extra * log_probs.float()).sum() / n_tokens
