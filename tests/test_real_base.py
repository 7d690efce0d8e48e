"""With real pretrained weights, a few LoRA steps through the repository's own path teach the moderator.

SmolLM2-135M-Instruct in the Qwen2.5-VL shape (``moderator.bases``), real SafeMT sample records (unsafe)
and real chitchat-dataset conversations (benign, the ``real`` extra) prepared by ``data_prep.build``, trained by
``train.run.build_trainer`` (TRL's collator, the recipe's LoRA/PEFT set-up, ``--verdict_loss_weight``)
and scored by ``Moderator`` from the saved adapter: on held-out dialogues, mean P(unsafe) rises on the
unsafe ones and falls on the benign ones, relative to the untrained base, and the two classes move
apart. The random tiny model used everywhere else cannot show this: it has nothing to learn from.

Why 4-turn dialogues: there the untrained base cannot tell SafeMT from chitchat (held-out mean P(unsafe)
0.245 on unsafe, 0.292 on benign), so what the steps teach shows on both sides. On 1-turn dialogues the
base already leans unsafe on everything (0.72 unsafe, 0.40 benign) and the first steps mostly move every
verdict towards "safe"; the same happened in the 48-step ``make efficacy`` run of plain SFT (held-out
1-turn 0.70 -> 0.27, 4-turn 0.32 -> 0.63).
Why balanced, in order, with the verdict weighted: batches of one unsafe and one benign row cannot drift
towards either label, and with plain SFT the verdict word is one of ~30 supervised tokens of an unsafe
row (the category and intent are the rest), so 12 steps mostly teach the intent's wording. Measured on
exactly this set-up: plain SFT moved unsafe 0.245 -> 0.644 but benign *up* 0.292 -> 0.478 (log-odds gap
-0.23 -> 0.73); with ``verdict_loss_weight`` 10, unsafe 0.245 -> 0.570 and benign 0.292 -> 0.094 (gap
-0.23 -> 2.90).

Why this fails when each part is wrong:
- loss mask: were the prompt supervised too, the supervised span would not start with the verdict and
  ``--verdict_loss_weight`` refuses the batch (``train.loss.VerdictPositionError``); were the verdict
  masked out, nothing would teach safe/unsafe. ``test_real_tokenizer_batch_supervises_only_the_verdict``
  also checks the mask directly.
- verdict position: P(unsafe) is read after the ``verdict: `` prefix (``moderator.contract``). Read one
  position early or late, the safe/unsafe logits are those of an unrelated next token, which training
  does not separate by label. The trained model's own greedy answers are checked to put ``safe``/``unsafe``
  exactly there, agreeing with the score.
- weights loading: with random or mis-mapped weights the untrained base would not beat shuffled text
  (``test_the_base_carries_real_language_weights``), and a dozen steps on 24 examples teach a random
  135M model nothing that transfers to held-out dialogues.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import load_from_disk
from PIL import Image

from moderator.inference import Moderator
from moderator.loading import load_vlm
from tests.conftest import REPO_ROOT, copy_sample_with_images
from tests.test_bases import shared_smollm2_base

pytestmark = pytest.mark.slow

# LoRA on the top 10 of SmolLM2's 30 layers: the verdict is a read-out of late features, and the backward
# pass then stops at layer 20, a third of the full cost (CPU CI time).
TOP_LAYERS_REGEX = (
    r".*language_model\.layers\.(2[0-9])\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
TURNS = 4  # SafeMT user turns per dialogue (chitchat cut to the same): see the module docstring
PER_LABEL = 12  # training rows per label, interleaved unsafe/benign, read in order: every batch of 2 is balanced
STEPS = 12  # one epoch: every training row is seen once
VERDICT_LOSS_WEIGHT = 10.0  # the verdict word about as heavy as an unsafe row's category and intent together
HELD_OUT_PER_LABEL = 8
MARGIN = 0.05  # mean P(unsafe) must rise on held-out unsafe and fall on held-out benign by at least this
GAP_MARGIN = 0.5  # nats: the held-out classes must move at least this much further apart


@pytest.fixture(scope="module")
def torch_threads():
    # Two threads: the whole module took 150 s with 2 and 248 s with 1 on the idle 2-core CI machine (pytest runs
    # one test at a time); restored after.
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real_base(tmp_path_factory) -> Path:
    return shared_smollm2_base(tmp_path_factory)


@pytest.fixture(scope="module")
def prepared(real_base, tmp_path_factory) -> Path:
    """The demo data recipe on the real sample records (4-turn dialogues), token lengths counted with the
    base's own processor; then a training split of the first ``PER_LABEL`` rows of each label, interleaved."""
    from data_prep.build import main as build_data

    root = tmp_path_factory.mktemp("real-base-data")
    safemt = copy_sample_with_images(root / "safemt")
    argv = ["--config", str(REPO_ROOT / "configs/data/demo.yaml"), "--safemt", str(safemt), "--out", str(root / "data")]
    # Real chitchat-dataset conversations (the `real` extra), as many as SafeMT records, cut to 4 user turns.
    argv += ["--benign", "chitchat", "--benign_ratio", "1.0", "--processor", str(real_base)]
    argv += ["--safemt_turns", str(TURNS), "--test_fraction", "0.3", "--validation_fraction", "0.05"]
    assert build_data(argv) == 0
    datasets = load_from_disk(str(root / "data" / "dataset"))
    labels = datasets["train"]["label"]
    unsafe, benign = ([i for i, label in enumerate(labels) if label == want][:PER_LABEL] for want in ("unsafe", "safe"))
    assert len(benign) == PER_LABEL, f"only {len(benign)} benign training rows"
    datasets["train"] = datasets["train"].select([i for pair in zip(unsafe, benign, strict=True) for i in pair])
    balanced = root / "balanced"
    shutil.copytree(root / "data", balanced, ignore=shutil.ignore_patterns("dataset"))
    datasets.save_to_disk(str(balanced / "dataset"))
    return balanced


@pytest.fixture(scope="module")
def held_out(prepared) -> list[dict]:
    """The first held-out (test split) rows of each label, in data prep's fixed order."""
    test = load_from_disk(str(prepared / "dataset"))["test"]
    rows = [
        row for label in ("unsafe", "safe") for row in [r for r in test if r["label"] == label][:HELD_OUT_PER_LABEL]
    ]
    assert [r["label"] for r in rows].count("safe") == HELD_OUT_PER_LABEL, "too few benign test rows"
    return rows


@pytest.fixture(scope="module")
def trainer(real_base, prepared, tmp_path_factory, torch_threads):
    from trl import ModelConfig, SFTConfig, TrlParser

    from train.config import ModeratorScriptArguments
    from train.run import build_trainer

    out = tmp_path_factory.mktemp("real-base-sft")
    recipe = {
        "model_name_or_path": str(real_base),
        "dtype": "float32",
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_regex": TOP_LAYERS_REGEX,
        "dataset_path": str(prepared),
        "verdict_loss_weight": VERDICT_LOSS_WEIGHT,
        "train_sampling_strategy": "sequential",
        "max_length": None,
        "assistant_only_loss": True,
        "output_dir": str(out / "adapter"),
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "dataloader_num_workers": 0,
        "seed": 42,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "moderation_eval_samples": 0,
        "report_to": [],
    }
    config = out / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    parser = TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig))
    return build_trainer(*parser.parse_args_and_config(args=["--config", str(config)]))[0]


def _open_images(row: dict) -> list:
    return [Image.open(path) if isinstance(path, str) else path for path in row["images"]]


def _prompts(moderator: Moderator, rows: list[dict]) -> list[str]:
    # The prepared rows hold the contract's rendered messages; the last one is the target.
    return [
        moderator.processor.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        for row in rows
    ]


@pytest.fixture(scope="module")
def base_moderator(real_base, torch_threads) -> Moderator:
    return Moderator(*load_vlm(real_base))


@torch.no_grad()
def test_the_base_carries_real_language_weights(base_moderator):
    """Real weights predict natural text far better than the same words shuffled; random or mis-mapped
    weights predict both about equally badly (about ln(49,156) = 10.8 nats per token)."""
    text = (
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
        "capital of Germany. Water boils at one hundred degrees Celsius at sea level, and it freezes at zero."
    )
    words = text.split()
    random.Random(0).shuffle(words)

    def loss(sample: str) -> float:
        ids = base_moderator.processor.tokenizer([sample], return_tensors="pt").input_ids
        return base_moderator.model(input_ids=ids, labels=ids).loss.item()

    natural, shuffled = loss(text), loss(" ".join(words))
    assert natural < 4.0, natural
    assert shuffled - natural > 2.0, (natural, shuffled)


def test_real_tokenizer_batch_supervises_only_the_verdict(trainer):
    """With SmolLM2's tokenizer and the Qwen2.5-VL template, exactly the target and the end of turn carry
    labels: no system prompt, dialogue or image token."""
    rows = trainer.train_dataset
    picks = [rows["label"].index("unsafe"), rows["label"].index("safe")]
    examples = [rows[i] for i in picks]
    batch = trainer.data_collator(examples)
    tokenizer = trainer.processing_class.tokenizer
    for row, example in enumerate(examples):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert tokenizer.decode(ids[labels != -100]) == example["target"] + "<|im_end|>\n"
        first = (labels != -100).nonzero()[0].item()
        assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
        assert (labels[ids == trainer.model.config.image_token_id] == -100).all()


def test_few_lora_steps_raise_p_unsafe_on_held_out_unsafe_and_lower_it_on_held_out_benign(
    trainer, base_moderator, held_out, torch_threads
):
    labels = np.array([row["label"] == "unsafe" for row in held_out])
    images = [_open_images(row) for row in held_out]
    before = np.array(base_moderator.p_unsafe(_prompts(base_moderator, held_out), images))

    assert trainer.train_dataset["label"] == ["unsafe", "safe"] * PER_LABEL
    assert not {r["id"] for r in held_out} & set(trainer.train_dataset["id"])  # held out for real
    trainer.train()
    adapter = Path(trainer.args.output_dir)
    trainer.save_model(str(adapter))
    # Scored from the saved adapter through the serving loader, as a user would load it.
    trained = Moderator.from_pretrained(adapter)
    answers = trained.generate_with_scores(_prompts(trained, held_out), images, max_new_tokens=4)
    after = np.array([score for _, score in answers])

    def log_odds_gap(p: np.ndarray) -> float:
        # How far apart the two classes sit, in nats: mean log-odds of P(unsafe) on unsafe minus on benign.
        logit = np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log(np.clip(1 - p, 1e-6, 1 - 1e-6))
        return float(logit[labels].mean() - logit[~labels].mean())

    report = (
        f"mean P(unsafe) unsafe {before[labels].mean():.3f} -> {after[labels].mean():.3f}, "
        f"benign {before[~labels].mean():.3f} -> {after[~labels].mean():.3f}; log-odds gap "
        f"{log_odds_gap(before):.2f} -> {log_odds_gap(after):.2f}; answers {[a for a, _ in answers]}"
    )
    print(report)
    assert after[labels].mean() > before[labels].mean() + MARGIN, report
    assert after[~labels].mean() < before[~labels].mean() - MARGIN, report
    assert log_odds_gap(after) > log_odds_gap(before) + GAP_MARGIN, report
    # The trained model writes the verdict where the score is read: its greedy word there is the score's.
    for raw, score in answers:
        assert raw.startswith("verdict: "), report
        assert raw.removeprefix("verdict: ").startswith("unsafe" if score >= 0.5 else "safe"), report
