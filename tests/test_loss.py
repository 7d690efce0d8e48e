"""The verdict-weighted training loss (``--verdict_loss_weight``): where the weight lands, that weight 1 is
the model's own loss, and that a wrong mask or target format fails instead of weighting another token."""

import pytest
import torch
from trl import ModelConfig, SFTConfig, TrlParser

from moderator.cli import UsageError
from moderator.contract import verdict_choice_token_ids
from tests.conftest import tiny_recipe_args
from train.config import ModeratorScriptArguments
from train.loss import VerdictLossWeight, VerdictPositionError, verdict_token_weights
from train.run import build_trainer

PREFIX, SAFE_ID, UNSAFE_ID = [5, 6], 7, 8
IGNORE = -100


def parse(argv):
    return TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(args=argv)


def test_weight_lands_on_each_rows_verdict_word_only():
    labels = torch.tensor(
        [
            [IGNORE, IGNORE, 5, 6, UNSAFE_ID, 9, 10],  # verdict: unsafe + category/intent tokens
            [IGNORE, IGNORE, IGNORE, 5, 6, SAFE_ID, 11],  # verdict: safe + end of turn
            [IGNORE] * 7,  # nothing supervised (padding row): nothing weighted
        ]
    )
    weights = verdict_token_weights(labels, PREFIX, (SAFE_ID, UNSAFE_ID), 4.0)
    assert weights.tolist() == [
        [0, 0, 1, 1, 4, 1, 1],
        [0, 0, 0, 1, 1, 4, 1],
        [0] * 7,
    ]


@pytest.mark.parametrize(
    "row",
    [
        [3, 4, 5, 6, UNSAFE_ID, 9, 10],  # the prompt is supervised too: the span starts before the verdict
        [IGNORE, IGNORE, 5, 6, 9, 10, 11],  # no safe/unsafe word after the prefix
        [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 5, 6],  # cut off before the verdict word
        [IGNORE, IGNORE, 5, IGNORE, UNSAFE_ID, 9, 10],  # a hole in the mask inside the verdict
    ],
)
def test_a_supervised_span_that_does_not_start_with_the_verdict_fails_naming_the_row(row):
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, SAFE_ID, 11, 12], row])
    with pytest.raises(VerdictPositionError, match="batch row 1"):
        verdict_token_weights(labels, PREFIX, (SAFE_ID, UNSAFE_ID), 4.0)


@pytest.fixture(scope="module")
def weighted_trainer(tiny_model_dir, prepared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-verdict-weight")
    args = tiny_recipe_args(tiny_model_dir, prepared_data_dir, out, "--verdict_loss_weight", "5", "--max_steps", "2")
    return build_trainer(*parse(args))[0]


@pytest.fixture(scope="module")
def batch(weighted_trainer):
    dataset = weighted_trainer.train_dataset
    labels = dataset["label"]
    picks = [labels.index("unsafe"), labels.index("safe")]
    return weighted_trainer.data_collator([dataset[i] for i in picks])


def test_weighted_loss_is_trls_loss_plus_the_verdict_words_extra_nll(weighted_trainer, batch):
    model, tokenizer = weighted_trainer.model, weighted_trainer.processing_class.tokenizer
    model.eval()
    with torch.no_grad():
        weighted = weighted_trainer.compute_loss(model, dict(batch))
        outputs = model(**batch)  # plain forward with labels: the model's own shifted mean NLL and the logits
        loss_term, weighted_trainer.verdict_loss = weighted_trainer.verdict_loss, None
        try:
            plain = weighted_trainer.compute_loss(model, dict(batch))  # TRL's own loss
        finally:
            weighted_trainer.verdict_loss = loss_term
    torch.testing.assert_close(plain, outputs.loss)

    # By hand: the NLL of each row's verdict word (the token after the `verdict:` prefix) counts 5 times.
    prefix, safe_id, unsafe_id = verdict_choice_token_ids(tokenizer)
    log_probs = outputs.logits[:, :-1].float().log_softmax(-1)
    shift = batch["labels"][:, 1:]
    verdict_nll = []
    for row in range(shift.shape[0]):
        start = int((shift[row] != IGNORE).nonzero()[0])
        position = start + len(prefix)
        assert int(shift[row, position]) in (safe_id, unsafe_id)
        verdict_nll.append(-log_probs[row, position, shift[row, position]])
    n_tokens = (shift != IGNORE).sum()
    assert len(verdict_nll) == 2 and n_tokens > 10  # an unsafe row's category and intent are supervised too
    torch.testing.assert_close(weighted, outputs.loss + 4 * torch.stack(verdict_nll).sum() / n_tokens)


def test_the_recipe_weight_reaches_the_trainer_and_it_trains(weighted_trainer):
    assert isinstance(weighted_trainer.verdict_loss, VerdictLossWeight) and weighted_trainer.verdict_loss.weight == 5.0
    result = weighted_trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_default_weight_keeps_trls_own_loss(tiny_model_dir, prepared_data_dir, tmp_path):
    trainer = build_trainer(*parse(tiny_recipe_args(tiny_model_dir, prepared_data_dir, tmp_path / "out")))[0]
    assert trainer.verdict_loss is None


@pytest.mark.parametrize(
    "overrides",
    [
        ["--verdict_loss_weight", "0"],
        ["--verdict_loss_weight", "5", "--label_smoothing_factor", "0.1"],
        ["--verdict_loss_weight", "5", "--loss_type", "dft"],
    ],
)
def test_an_unusable_weight_is_refused_before_anything_loads(tmp_path, overrides):
    args = tiny_recipe_args(tmp_path / "no-model", tmp_path / "no-data", tmp_path / "out", *overrides)
    with pytest.raises(UsageError, match="verdict_loss_weight"):
        build_trainer(*parse(args))
