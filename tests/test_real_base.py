"""With real pretrained weights, a few LoRA steps through the repository's own path teach the moderator.

SmolLM2-135M-Instruct in the Qwen2.5-VL shape (``moderator.bases``), the real SafeMT sample records
(unsafe) and real chitchat dialogues (benign) prepared by ``data_prep.build``, trained by
``train.run.build_trainer`` (TRL's collator, the recipe's LoRA/PEFT set-up) and scored by ``Moderator``:
held-out unsafe and benign dialogues move apart (their mean log-odds of P(unsafe) by at least half a nat
more than the untrained base's) and P(unsafe) falls on the held-out benign ones. The random tiny model
used everywhere else cannot show this: it has nothing to learn from.

Not asserted: that P(unsafe) *rises* on held-out unsafe dialogues. The untrained base already leans
unsafe there (mean about 0.72), and within a CI budget it does not go higher: over 24 steps at this
learning rate it went 0.72 -> 0.52 (step 4) -> 0.12 (12) -> 0.60 (16) -> 0.72 (20) -> 0.07 (24), while
benign fell to 0.002-0.17. Few steps on this contract first teach "safe" for everything; the longer
`make efficacy` run is where the unsafe side is measured.

Why this fails when each part is wrong:
- loss mask: the verdict is about 1 supervised token in 250. Were the prompt supervised too, a few steps
  would fit the system prompt and the dialogue, not the verdict; were the verdict masked out, nothing
  would teach safe/unsafe at all. Either way the held-out classes would not move apart.
  ``test_real_tokenizer_batch_supervises_only_the_verdict`` also checks the mask directly.
- verdict position: P(unsafe) is read after the ``verdict: `` prefix (``moderator.contract``). Read one
  position early or late, the safe/unsafe logits are those of an unrelated next token, which training
  does not separate by label. The trained model's own greedy answers are checked to put ``safe``/``unsafe``
  exactly there, agreeing with the score.
- weights loading: with random or mis-mapped weights the untrained base would not beat shuffled text
  (``test_the_base_carries_real_language_weights``), and a few steps on eight examples teach a random
  135M model nothing that transfers to held-out dialogues.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
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
TRAIN_EXAMPLES = 8  # the first rows of the prepared train split: four unsafe, four benign
# Four epochs over them. Fewer steps are not enough, and not by a little: the first steps teach "safe"
# for everything (P(unsafe) falls on held-out unsafe dialogues too, to about 0.1 after 12 steps), most
# likely by copying the system prompt's first format example ("verdict: safe"); telling the two apart
# comes after that (measured on this data: held-out unsafe 0.72 -> 0.12 at step 12 -> 0.60 at step 16).
STEPS = 16
HELD_OUT_PER_LABEL = 5
MARGIN = 0.05  # mean P(unsafe) on held-out benign dialogues must fall at least this far
GAP_MARGIN = 0.5  # nats: the held-out classes must move at least this much further apart


@pytest.fixture(scope="module")
def one_thread():
    # One torch thread was faster than two on this 2-core machine when anything else runs; restored after.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real_base(tmp_path_factory) -> Path:
    return shared_smollm2_base(tmp_path_factory)


@pytest.fixture(scope="module")
def prepared(real_base, tmp_path_factory) -> Path:
    """The demo data recipe on the real sample records (1-turn dialogues: the shortest rows), its token
    lengths counted with the base's own processor; about as many benign rows as SafeMT ones."""
    from data_prep.build import main as build_data

    root = tmp_path_factory.mktemp("real-base-data")
    safemt = copy_sample_with_images(root / "safemt")
    argv = ["--config", str(REPO_ROOT / "configs/data/demo.yaml"), "--safemt", str(safemt), "--out", str(root / "data")]
    argv += ["--benign", str(REPO_ROOT / "tests/data/benign_sample.jsonl"), "--processor", str(real_base)]
    argv += ["--safemt_turns", "1", "--benign_ratio", "0.9", "--test_fraction", "0.3", "--validation_fraction", "0.05"]
    assert build_data(argv) == 0
    return root / "data"


@pytest.fixture(scope="module")
def held_out(prepared) -> list[dict]:
    """The first held-out (test split) rows of each label, in data prep's fixed order."""
    from datasets import load_from_disk

    test = load_from_disk(str(prepared / "dataset"))["test"]
    rows = [
        row for label in ("unsafe", "safe") for row in [r for r in test if r["label"] == label][:HELD_OUT_PER_LABEL]
    ]
    assert [r["label"] for r in rows].count("safe") == HELD_OUT_PER_LABEL, "too few benign test rows"
    return rows


@pytest.fixture(scope="module")
def trainer(real_base, prepared, tmp_path_factory, one_thread):
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
        "max_train_samples": TRAIN_EXAMPLES,
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
def base_moderator(real_base, one_thread) -> Moderator:
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


def test_few_lora_steps_separate_held_out_unsafe_from_benign_and_lower_benign_p_unsafe(
    trainer, base_moderator, held_out, one_thread
):
    labels = np.array([row["label"] == "unsafe" for row in held_out])
    images = [_open_images(row) for row in held_out]
    before = np.array(base_moderator.p_unsafe(_prompts(base_moderator, held_out), images))

    train_labels = trainer.train_dataset["label"]
    assert min(train_labels.count("unsafe"), train_labels.count("safe")) >= 3
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
    assert after[~labels].mean() < before[~labels].mean() - MARGIN, report
    assert log_odds_gap(after) > log_odds_gap(before) + GAP_MARGIN, report
    # The trained model writes the verdict where the score is read: its greedy word there is the score's.
    for raw, score in answers:
        assert raw.startswith("verdict: "), report
        assert raw.removeprefix("verdict: ").startswith("unsafe" if score >= 0.5 else "safe"), report
