"""With real pretrained weights, a few LoRA steps through the repository's own path teach the moderator.

SmolLM2-135M-Instruct in the Qwen2.5-VL shape (``assets.bases``), real SafeMT sample records (unsafe)
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

The one-turn case (``test_one_turn_...``): harmful single questions against their matched benign twins
(``--matched_benign``: the same image and, for a framed question, the same framing, a real chatterbot-corpus
question instead of the request), SafeMT's 1-turn records plus ``EXTRA_HARMFUL`` AdvBench/Do-Not-Answer
single prompts so there are enough rows; each unsafe row is followed by its own twin, so every batch of 2 is
one pair differing only in what is asked. Held out: the first ``ONE_TURN_HELD_OUT_PAIRS`` test-split pairs.
Measured (2 torch threads, on a CPU shared with other jobs); "first 20" are the held-out pairs the test scores:
- 24 pairs, 24 steps, lr 1e-3, weight 10, all 31 test pairs: unsafe 0.664 -> 0.896 but benign twins only
  0.654 -> 0.644 (gap 0.10 -> 1.82 nats; single 0.651 -> 0.914 / 0.676 -> 0.668, framed 0.689 -> 0.864 /
  0.614 -> 0.600; SafeMT rows alone 0.658 -> 0.902 / 0.727 -> 0.676): the classes separate, but the unsafe
  rows' category and intent tokens push every verdict towards "unsafe", so the twins do not fall. Not used.
- 16 pairs, 16 steps, lr 1e-3, weight 30, first 20 test pairs: every verdict moved towards "safe": unsafe
  0.640 -> 0.567, benign twins 0.659 -> 0.385 (gap -0.05 -> 0.79 nats; single 0.667 -> 0.586 / 0.681 ->
  0.385, framed 0.579 -> 0.525 / 0.608 -> 0.384): the unsafe side does not rise. Not used. Time: 783 s for
  this test against 802 s for the 4-turn test (which takes ~130 s of the module's ~150 s on the idle CI
  machine).
- Weight 20, lr 1e-3, one run read in order and saved at steps 16 and 24 (with a constant learning rate and
  the rows in order, the adapter at step k is that of a k-pair, k-step run); data prep with twin ids
  ``<unsafe id>~benign`` (base twins 0.646 on the first 20, 0.622 on all 31):
  - 16 pairs, 16 steps: again every verdict towards "safe": first 20 unsafe 0.640 -> 0.539, twins 0.646 ->
    0.270 (gap -0.01 -> 1.28 nats); all 31 unsafe 0.664 -> 0.568, twins 0.622 -> 0.283. Not used.
  - 24 pairs, 24 steps (the constants below): first 20 unsafe 0.640 -> 0.824, twins 0.646 -> 0.288 (gap
    -0.01 -> 3.47 nats; single 0.667 -> 0.884 / 0.639 -> 0.265, framed 0.579 -> 0.683 / 0.663 -> 0.340); all
    31 unsafe 0.664 -> 0.837, twins 0.622 -> 0.298 (gap 0.23 -> 3.52); every greedy verdict where scored.
    Each side moves by more than three times ``ONE_TURN_MARGIN``. The first ~16 steps pull both sides
    towards "safe" (the base leans unsafe on both, so the twins' verdict loss is the larger) before the
    pairs' difference separates them; weight 10 lets the unsafe rows' category and intent win instead.
    Cost: half again the 16-step run's training (~58 s a step on the shared CPU), so by the 16-step timing
    above roughly 1.3x the 4-turn test. The module run that confirmed these numbers: 523 s for this test,
    930 s for the 4-turn test, 1491 s in all, the other jobs' load falling during the run.

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

from data_prep.io import DATASET_DIR
from data_prep.matched import TWIN_SUFFIX
from moderator.contract import DECISION, prompt_of_prepared_row
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
LEARNING_RATE = 1.0e-3
VERDICT_LOSS_WEIGHT = 10.0  # the verdict word about as heavy as an unsafe row's category and intent together
HELD_OUT_PER_LABEL = 8
MARGIN = 0.05  # mean P(unsafe) must rise on held-out unsafe and fall on held-out benign by at least this
GAP_MARGIN = 0.5  # nats: the held-out classes must move at least this much further apart
# The one-turn case: harmful single questions against their matched benign twins (see the module docstring).
EXTRA_HARMFUL = 40  # AdvBench / Do-Not-Answer single prompts added to SafeMT's 1-turn records (each with a twin)
ONE_TURN_PAIRS = 24  # training pairs (unsafe row, its twin), read in order: every batch of 2 is one pair
ONE_TURN_STEPS = 24  # one epoch
ONE_TURN_LEARNING_RATE = 1.0e-3
ONE_TURN_VERDICT_LOSS_WEIGHT = 20.0  # 10 pushed every verdict to unsafe, 30 to safe
ONE_TURN_HELD_OUT_PAIRS = 20
ONE_TURN_MARGIN = 0.05
EQUALITY_ROWS_PER_END = 5  # held-out rows from each end (unsafe first, benign last) for the decision's equality


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


def _build_data(real_base: Path, root: Path, turns: int, argv: list[str]) -> Path:
    """``data_prep.build`` with the demo recipe on the real sample records, ``turns``-turn dialogues, token
    lengths counted with the base's own processor, 30% held out as the test split; ``argv`` picks the
    benign side. Returns the built folder."""
    from data_prep.build import main as build_data

    safemt = copy_sample_with_images(root / "safemt")
    out = root / "data"
    args = ["--config", str(REPO_ROOT / "configs/data/demo.yaml"), "--safemt", str(safemt), "--out", str(out)]
    args += ["--processor", str(real_base), "--safemt_turns", str(turns)]
    assert build_data([*args, "--test_fraction", "0.3", "--validation_fraction", "0.05", *argv]) == 0
    return out


def _with_train_rows(built: Path, order: list[int], target: Path) -> Path:
    """A copy of the built data whose training split is the rows ``order`` lists, in that order."""
    datasets = load_from_disk(str(built / DATASET_DIR))
    datasets["train"] = datasets["train"].select(order)
    shutil.copytree(built, target, ignore=shutil.ignore_patterns(DATASET_DIR))
    datasets.save_to_disk(str(target / DATASET_DIR))
    return target


@pytest.fixture(scope="module")
def prepared(real_base, tmp_path_factory) -> Path:
    """The demo data recipe on the real sample records (4-turn dialogues) against real chitchat-dataset
    conversations (the `real` extra), as many as SafeMT records, cut to 4 user turns; then a training split
    of the first ``PER_LABEL`` rows of each label, interleaved."""
    root = tmp_path_factory.mktemp("real-base-data")
    built = _build_data(real_base, root, TURNS, ["--benign", "chitchat", "--benign_ratio", "1.0"])
    labels = load_from_disk(str(built / DATASET_DIR))["train"]["label"]
    unsafe, benign = ([i for i, label in enumerate(labels) if label == want][:PER_LABEL] for want in ("unsafe", "safe"))
    assert len(benign) == PER_LABEL, f"only {len(benign)} benign training rows"
    return _with_train_rows(built, [i for pair in zip(unsafe, benign, strict=True) for i in pair], root / "balanced")


@pytest.fixture(scope="module")
def held_out(prepared) -> list[dict]:
    """The first held-out (test split) rows of each label, in data prep's fixed order."""
    test = load_from_disk(str(prepared / DATASET_DIR))["test"]
    rows = [
        row for label in ("unsafe", "safe") for row in [r for r in test if r["label"] == label][:HELD_OUT_PER_LABEL]
    ]
    assert [r["label"] for r in rows].count("safe") == HELD_OUT_PER_LABEL, "too few benign test rows"
    return rows


def _twin_pairs(rows) -> list[tuple[int, int]]:
    """(unsafe row, its benign twin) index pairs of a split built with ``--matched_benign``, in data prep's order.

    A twin shares its unsafe row's ``split_group`` (one per source record, hence one unsafe row per group at a
    single length); its id ends with ``~benign`` and its source names the benign question (``matched:...``).
    """
    twins = {
        group: i
        for i, (group, label) in enumerate(zip(rows["split_group"], rows["label"], strict=True))
        if label == "safe"
    }
    pairs = [(i, twins[group]) for i, (group, label) in enumerate(zip(rows["split_group"], rows["label"], strict=True))
             if label == "unsafe"]  # fmt: skip
    assert len(pairs) * 2 == len(rows) == len(twins) * 2, "every row is an unsafe row or its twin"
    for _, twin in pairs:
        assert rows[twin]["id"].endswith(TWIN_SUFFIX) and rows[twin]["source"].startswith("matched:"), rows[twin]
    return pairs


@pytest.fixture(scope="module")
def prepared_one_turn(real_base, tmp_path_factory) -> Path:
    """One-turn SafeMT questions and extra harmful single prompts (AdvBench, Do-Not-Answer), each with its
    matched benign twin (``--matched_benign``); training split: every unsafe row followed by its own twin."""
    root = tmp_path_factory.mktemp("real-base-one-turn")
    argv = ["--benign", "none", "--matched_benign", "true"]
    argv += ["--extra_harmful", "advbench", "donotanswer", "--extra_harmful_per_length", str(EXTRA_HARMFUL)]
    built = _build_data(real_base, root, 1, argv)
    pairs = _twin_pairs(load_from_disk(str(built / DATASET_DIR))["train"])[:ONE_TURN_PAIRS]
    assert len(pairs) == ONE_TURN_PAIRS, f"only {len(pairs)} one-turn training pairs"
    return _with_train_rows(built, [i for pair in pairs for i in pair], root / "paired")


@pytest.fixture(scope="module")
def held_out_one_turn(prepared_one_turn) -> list[dict]:
    """The first held-out (test split) one-turn harmful questions, then their matched benign twins."""
    test = load_from_disk(str(prepared_one_turn / DATASET_DIR))["test"]
    pairs = _twin_pairs(test)[:ONE_TURN_HELD_OUT_PAIRS]
    assert len(pairs) == ONE_TURN_HELD_OUT_PAIRS, f"only {len(pairs)} held-out one-turn pairs"
    return [test[i] for i, _ in pairs] + [test[twin] for _, twin in pairs]


def _trainer(real_base: Path, prepared: Path, out: Path, steps: int, learning_rate: float, verdict_loss_weight: float):
    """``train.run.build_trainer`` on ``prepared``: the recipe's LoRA set-up on the top layers, the verdict
    weighted, the training rows read in order two at a time, a constant learning rate."""
    from trl import ModelConfig, SFTConfig, TrlParser

    from train.config import ModeratorScriptArguments
    from train.run import build_trainer

    recipe = {
        "model_name_or_path": str(real_base),
        "dtype": "float32",
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_regex": TOP_LAYERS_REGEX,
        "dataset_path": str(prepared),
        "verdict_loss_weight": verdict_loss_weight,
        "train_sampling_strategy": "sequential",
        "max_length": None,
        "assistant_only_loss": True,
        "output_dir": str(out / "adapter"),
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "learning_rate": learning_rate,
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


@pytest.fixture(scope="module")
def trainer(real_base, prepared, tmp_path_factory, torch_threads):
    return _trainer(
        real_base, prepared, tmp_path_factory.mktemp("real-base-sft"), STEPS, LEARNING_RATE, VERDICT_LOSS_WEIGHT
    )


@pytest.fixture(scope="module")
def trainer_one_turn(real_base, prepared_one_turn, tmp_path_factory, torch_threads):
    out = tmp_path_factory.mktemp("real-base-sft-one-turn")
    return _trainer(
        real_base, prepared_one_turn, out, ONE_TURN_STEPS, ONE_TURN_LEARNING_RATE, ONE_TURN_VERDICT_LOSS_WEIGHT
    )


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


def _train_and_score(trainer, base_moderator: Moderator, held_out: list[dict]):
    """Held-out P(unsafe) from the untrained base, then from the saved adapter after ``trainer.train()``
    (loaded through the serving loader, as a user would load it), with the trained model's greedy answers."""
    images = [_open_images(row) for row in held_out]
    before = np.array(base_moderator.p_unsafe(_prompts(base_moderator, held_out), images))
    assert not {r["id"] for r in held_out} & set(trainer.train_dataset["id"])  # held out for real
    trainer.train()
    adapter = Path(trainer.args.output_dir)
    trainer.save_model(str(adapter))
    trained = Moderator.from_pretrained(adapter, verify=False)
    answers = trained.generate_with_scores(_prompts(trained, held_out), images, max_new_tokens=4)
    _assert_decision_equals_full_answer(trained, held_out, images)
    return before, np.array([score for _, score in answers]), answers


def _assert_decision_equals_full_answer(trained: Moderator, held_out: list[dict], images: list) -> None:
    """Issue 26 on real weights: the one-step decision's verdict is the full answer's on every held-out row,
    its category the full answer's wherever that parses. Eight new tokens hold a whole safe answer (and the
    end after it); a cut unsafe answer fails to parse and flags, as an unsafe verdict does anyway. The
    first and last rows of the held-out set (both labels): all of them cost four minutes of CI."""
    picked = [*range(EQUALITY_ROWS_PER_END), *range(len(held_out) - EQUALITY_ROWS_PER_END, len(held_out))]
    held_out, images = [held_out[i] for i in picked], [images[i] for i in picked]
    prompts = [prompt_of_prepared_row(row["messages"], row["id"]) for row in held_out]
    full = trained.moderate_rendered(prompts, images, max_new_tokens=8)
    decided = trained.moderate_rendered(prompts, images, answer=DECISION)
    for row, reference, decision in zip(held_out, full, decided, strict=True):
        assert decision.verdict == reference.verdict, (row["id"], reference.raw, decision)
        if not reference.parse_error and reference.flagged:
            assert decision.category == reference.category, (row["id"], reference.raw, decision)
        assert decision.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-4), row["id"]


def log_odds_gap(p: np.ndarray, labels: np.ndarray) -> float:
    # How far apart the two classes sit, in nats: mean log-odds of P(unsafe) on unsafe minus on benign.
    logit = np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log(np.clip(1 - p, 1e-6, 1 - 1e-6))
    return float(logit[labels].mean() - logit[~labels].mean())


def _report(before: np.ndarray, after: np.ndarray, labels: np.ndarray, answers) -> str:
    return (
        f"mean P(unsafe) unsafe {before[labels].mean():.3f} -> {after[labels].mean():.3f}, "
        f"benign {before[~labels].mean():.3f} -> {after[~labels].mean():.3f}; log-odds gap "
        f"{log_odds_gap(before, labels):.2f} -> {log_odds_gap(after, labels):.2f}; answers {[a for a, _ in answers]}"
    )


def _assert_verdict_where_scored(answers, report: str) -> None:
    # The trained model writes the verdict where the score is read: its greedy word there is the score's.
    for raw, score in answers:
        assert raw.startswith("verdict: "), report
        assert raw.removeprefix("verdict: ").startswith("unsafe" if score >= 0.5 else "safe"), report


def test_few_lora_steps_raise_p_unsafe_on_held_out_unsafe_and_lower_it_on_held_out_benign(
    trainer, base_moderator, held_out, torch_threads
):
    labels = np.array([row["label"] == "unsafe" for row in held_out])
    assert trainer.train_dataset["label"] == ["unsafe", "safe"] * PER_LABEL
    before, after, answers = _train_and_score(trainer, base_moderator, held_out)
    report = _report(before, after, labels, answers)
    print(report)
    assert after[labels].mean() > before[labels].mean() + MARGIN, report
    assert after[~labels].mean() < before[~labels].mean() - MARGIN, report
    assert log_odds_gap(after, labels) > log_odds_gap(before, labels) + GAP_MARGIN, report
    _assert_verdict_where_scored(answers, report)


def test_one_turn_lora_steps_raise_p_unsafe_on_held_out_harmful_questions_and_lower_it_on_their_twins(
    trainer_one_turn, base_moderator, held_out_one_turn, torch_threads
):
    rows = trainer_one_turn.train_dataset
    assert rows["label"] == ["unsafe", "safe"] * ONE_TURN_PAIRS
    assert rows["split_group"][1::2] == rows["split_group"][::2]  # each unsafe row, then its own twin
    assert set(rows["turns"]) == {1}
    labels = np.array([row["label"] == "unsafe" for row in held_out_one_turn])
    before, after, answers = _train_and_score(trainer_one_turn, base_moderator, held_out_one_turn)
    report = _report(before, after, labels, answers)
    forms = np.array([row["form"] for row in held_out_one_turn])
    for form in sorted(set(forms)):
        pick = forms == form
        report += (
            f"\n{form}: unsafe {before[pick & labels].mean():.3f} -> {after[pick & labels].mean():.3f}, "
            f"benign {before[pick & ~labels].mean():.3f} -> {after[pick & ~labels].mean():.3f} ({pick.sum()} rows)"
        )
    print(report)
    assert after[labels].mean() > before[labels].mean() + ONE_TURN_MARGIN, report
    assert after[~labels].mean() < before[~labels].mean() - ONE_TURN_MARGIN, report
    _assert_verdict_where_scored(answers, report)
