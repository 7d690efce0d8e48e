"""Training behaviour users rely on, proven on CPU with the tiny model and the real sample records."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trl import ModelConfig, SFTConfig, TrlParser

from moderator.artefacts import RUN_RECORD_FILE, trained_image_bounds
from moderator.images import ImageBounds
from moderator.inference import Moderator, Verdict
from moderator.taxonomy import load_taxonomy
from tests.conftest import REPO_ROOT, tiny_recipe_args
from tests.wandb_offline import read_offline_run
from train.checkpoints import checkpoint_problem
from train.config import ModeratorScriptArguments
from train.preflight import processor_pixel_bounds, training_image_bounds
from train.provenance import REDACTED, redact
from train.run import PREEMPTED_EXIT_CODE, build_trainer, planned_evaluations, resume_checkpoint, train
from train.trainer import moderation_metrics, moderation_shard

SFT = str(REPO_ROOT / "train" / "sft.py")


def parse(argv):
    return TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(args=argv)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, prepared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-build")
    return build_trainer(*parse(tiny_recipe_args(tiny_model_dir, prepared_data_dir, out)))[0]


def test_collated_batch_supervises_only_the_verdict(trainer):
    dataset = trainer.train_dataset
    labels = dataset["label"]
    picks = [i for i, label in enumerate(labels) if label == "unsafe"][:2] + [labels.index("safe")]
    examples = [dataset[i] for i in picks]
    targets = [e["target"] for e in examples]
    batch = trainer.data_collator(examples)
    tokenizer = trainer.processing_class.tokenizer
    image_token = trainer.model.config.image_token_id
    for row, target in enumerate(targets):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        supervised = ids[labels != -100]
        # Exactly the verdict text and the end of turn are learned: no prompt, dialogue or image token.
        assert tokenizer.decode(supervised) == target + "<|im_end|>\n"
        assert (ids == image_token).sum() > 0
        assert (labels[ids == image_token] == -100).all()
        first = (labels != -100).nonzero()[0].item()
        assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_too_long_example_fails_loudly_naming_it(trainer):
    examples = [trainer.train_dataset[i] for i in range(2)]
    trainer.data_collator.max_length = 50
    try:
        with pytest.raises(ValueError, match="longer than max_length=50") as info:
            trainer.data_collator(examples)
    finally:
        trainer.data_collator.max_length = None
    assert examples[0]["id"] in str(info.value) and examples[1]["id"] in str(info.value)


def test_lora_wraps_only_the_language_model_and_records_provenance(trainer):
    names = [n for n, _ in trainer.model.named_modules() if "lora_A" in n]
    assert names and all("language_model" in n for n in names)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert not any("visual" in n for n in trainable)
    assert any("lm_head" in n for n in trainable)  # modules_to_save
    record = json.loads((Path(trainer.args.output_dir) / RUN_RECORD_FILE).read_text())
    taxonomy = load_taxonomy()
    assert record["taxonomy_sha256"] == taxonomy.sha256 and record["taxonomy_version"] == taxonomy.version
    assert len(record["git"]["commit"]) in (40, len("unknown"))
    assert record["data"]["train"] and record["data"]["stats_sha256"]
    assert record["config"]["SFTConfig"]["learning_rate"] == trainer.args.learning_rate
    assert record["config"]["ModeratorScriptArguments"]["dataset_path"]
    # The bounds images were resized into are a field of their own, read back without any config class name.
    min_pixels, max_pixels = processor_pixel_bounds(trainer.processing_class)
    assert record["image_bounds"] == {"min_pixels": min_pixels, "max_pixels": max_pixels}
    assert trained_image_bounds(trainer.args.output_dir) == ImageBounds(min_pixels, max_pixels)


def test_a_recipe_without_image_bounds_takes_the_ones_data_prep_counted_lengths_at():
    stats = {"tokens": {"min_pixels": 3136, "max_pixels": 12544}}
    assert training_image_bounds("data", stats, (None, None), (56 * 56, 28 * 28 * 1280)) == (3136, 12544)
    assert training_image_bounds("data", stats, (None, 6272), (None, None)) == (3136, 6272)  # a sweep's smaller max
    with pytest.raises(ValueError, match=r"data/stats.json: token lengths were checked at max_pixels=12544"):
        training_image_bounds("data", stats, (None, 50176), (None, None))
    # Data prep that counted at the processor's default: the default stays, and a larger bound is refused.
    default = {"tokens": {"min_pixels": None, "max_pixels": None}}
    assert training_image_bounds("data", default, (None, None), (3136, 12544)) == (None, None)
    with pytest.raises(ValueError, match=r"max_pixels=12544 \(the processor's default\)"):
        training_image_bounds("data", default, (None, 50176), (3136, 12544))


def test_secrets_are_redacted_from_recorded_configs():
    config = {
        "hub_token": "hf_abcdefghijkl",
        "nested": {"openai_api_key": "x", "note": "sk-abcdefghijklmnop", "cmd": "push --token hf_abcdefghijkl now"},
        "lr": 1,
        "pad_token": "<|endoftext|>",
    }
    assert redact(config) == {
        "hub_token": REDACTED,
        "nested": {"openai_api_key": REDACTED, "note": REDACTED, "cmd": f"push --token {REDACTED} now"},
        "lr": 1,
        "pad_token": "<|endoftext|>",
    }


def _balanced_subset(prepared_data_dir: Path, out: Path, per_label: int = 4) -> Path:
    """A prepared dataset of ``per_label`` unsafe and ``per_label`` safe training rows (both labels present)."""
    import datasets

    train_split = datasets.load_from_disk(str(prepared_data_dir / "dataset"))["train"]
    labels = train_split["label"]
    picks = [i for i, label in enumerate(labels) if label == "unsafe"][:per_label]
    picks += [i for i, label in enumerate(labels) if label == "safe"][:per_label]
    rows = train_split.select(picks)
    datasets.DatasetDict(train=rows, validation=rows, test=rows).save_to_disk(str(out / "dataset"))
    shutil.copy(prepared_data_dir / "stats.json", out / "stats.json")
    return out


def test_overfits_eight_examples_and_the_adapter_reloads_producing_verdicts(
    tiny_model_dir, prepared_data_dir, tmp_path
):
    data = _balanced_subset(prepared_data_dir, tmp_path / "eight")
    out = tmp_path / "overfit"
    argv = tiny_recipe_args(
        tiny_model_dir, data, out,
        "--max_steps", "80", "--learning_rate", "1e-2", "--logging_steps", "5",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
    )  # fmt: skip
    script_args, training_args, model_args = parse(argv)
    assert train(script_args, training_args, model_args) == 0
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses[-1] < 0.5 * losses[0], losses

    from data_prep.io import load_prepared

    rows = load_prepared(data)["train"]
    assert sorted(rows["label"]) == ["safe"] * 4 + ["unsafe"] * 4
    moderator = Moderator.from_pretrained(out, verify=False)
    prompts = [m[:-1] for m in rows["messages"]]
    verdicts = moderator.moderate_rendered(prompts, [[i.convert("RGB") for i in imgs] for imgs in rows["images"]], 48)
    category_lines = []
    for verdict, target, label in zip(verdicts, rows["target"], rows["label"], strict=True):
        # The generated verdict line and the calibrated score both carry the trained label.
        assert verdict.raw.splitlines()[0] == target.splitlines()[0]
        assert (verdict.p_unsafe >= 0.5) == (label == "unsafe")
        if label == "unsafe":
            category_lines.append(verdict.raw.splitlines()[1:2] == target.splitlines()[1:2])
    assert sum(category_lines) >= len(category_lines) / 2, category_lines


def _sft_command(tiny_model_dir, data_dir, out, *overrides):
    return [sys.executable, SFT, *tiny_recipe_args(tiny_model_dir, data_dir, out, *overrides)]


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes_from_it(tiny_model_dir, prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    command = _sft_command(
        tiny_model_dir, prepared_data_dir, out,
        "--max_steps", "30", "--save_steps", "4", "--save_total_limit", "20", "--eval_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", "1",
    )  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-4").exists():  # pre-empt once a regular checkpoint exists
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    log = first.communicate(timeout=240)[0]
    assert first.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    stopped = steps[-1]
    assert f"pre-empted: checkpoint saved at step {stopped}" in log
    assert 4 <= stopped < 30
    assert not (out / "adapter_model.safetensors").exists()  # no final model from a pre-empted run

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{stopped}'}" in second.stdout
    assert f"trained steps {stopped}->30" in second.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 30
    assert (out / "adapter_model.safetensors").exists()


def test_wandb_offline_records_metrics_and_provenance_but_no_secret(
    tiny_model_dir, prepared_data_dir, tmp_path, monkeypatch
):
    from train.sft import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "safemt-moderator-test")
    monkeypatch.setenv("HF_TOKEN", "")  # restored after the test; the run moves --hub_token here
    secret = "hf_SECRETsecret1234567890"
    argv = tiny_recipe_args(
        tiny_model_dir, prepared_data_dir, tmp_path / "out",
        "--max_steps", "4", "--eval_steps", "4", "--save_steps", "4", "--moderation_eval_samples", "4",
        "--report_to", "wandb", "--run_name", "offline-test", "--hub_token", secret, "--logging_steps", "2",
    )  # fmt: skip
    # As `python train/sft.py ...` runs it: W&B records the process's command line with the run.
    monkeypatch.setattr(sys, "argv", [SFT, *argv])
    assert main(argv) == 0
    assert os.environ["HF_TOKEN"] == secret  # where huggingface_hub reads it for push_to_hub
    import wandb

    # The run the trainer logged to (wandb's settings may predate this test's WANDB_DIR in one process).
    assert wandb.run is not None and wandb.run.name == "offline-test"
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    assert run_dir.name.startswith("offline-run-")
    recorded = read_offline_run(run_dir)
    provenance = recorded["config"]["moderator"]
    assert provenance["taxonomy_sha256"] == load_taxonomy().sha256
    assert provenance["config"]["SFTConfig"]["hub_token"] == REDACTED
    assert recorded["config"]["learning_rate"] == 5e-3
    logged = {key for row in recorded["history"] for key in row}
    expected = {"train/loss", "eval/loss", "eval/unsafe_auprc", "eval/unsafe_f1", "eval/verdict_accuracy"}
    assert expected | {"eval/category_accuracy"} <= logged  # the tiny recipe also generates its verdicts
    # Nowhere in the run's files: training_args.bin of the run and of every checkpoint (which push_to_hub
    # uploads) pickle the whole TrainingArguments; W&B's files hold the config and the command line.
    written = [p for p in [*run_dir.rglob("*"), *(tmp_path / "out").rglob("*")] if p.is_file()]
    assert tmp_path / "out" / "checkpoint-4" / "training_args.bin" in written
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    # W&B did record the command line, so the check above covers it: with the token's value redacted.
    (wandb_log,) = run_dir.glob("run-*.wandb")
    assert b"--hub_token" in wandb_log.read_bytes()


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, prepared_data_dir, tmp_path_factory) -> Path:
    """A finished 4-step tiny run that saved checkpoint-2 and checkpoint-4 (no evaluation: seconds)."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    argv = tiny_recipe_args(
        tiny_model_dir, prepared_data_dir, out,
        "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "10", "--eval_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", "1",
    )  # fmt: skip
    assert train(*parse(argv)) == 0
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return out


def _cut(path: Path, keep: float = 0.5) -> None:
    """Truncate ``path`` as a write killed part-way leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_resume_skips_torn_checkpoints_for_the_newest_complete_one(
    checkpointed_run, tiny_model_dir, prepared_data_dir, tmp_path, caplog
):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(checkpointed_run / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-4").mkdir()  # killed right after the folder was made
    partial = out / "checkpoint-6"  # killed after the weights and optimizer, before trainer_state.json
    shutil.copytree(checkpointed_run / "checkpoint-4", partial)
    (partial / "trainer_state.json").unlink()
    _, training_args, _ = parse(tiny_recipe_args(tiny_model_dir, prepared_data_dir, out))

    with caplog.at_level(logging.WARNING, logger="train.run"):
        assert resume_checkpoint(training_args, fresh_start=False) == str(out / "checkpoint-2")
    skipped = [r.getMessage() for r in caplog.records if "skipping torn checkpoint" in r.getMessage()]
    assert len(skipped) == 2, skipped
    assert skipped[0].startswith(f"skipping torn checkpoint {partial}: no trainer_state.json")
    assert skipped[1].startswith(f"skipping torn checkpoint {out / 'checkpoint-4'}: empty folder")
    assert all(message.endswith(f"resuming from {out / 'checkpoint-2'} instead") for message in skipped)
    # Set aside, out of transformers' checkpoint-* rotation and of the next save of those steps.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "torn-checkpoint-4", "torn-checkpoint-6"]
    assert f"moved to {out / 'torn-checkpoint-6'}" in skipped[0]

    # An explicit --resume_from_checkpoint that is torn is refused, naming what is missing.
    training_args.resume_from_checkpoint = str(out / "torn-checkpoint-6")
    with pytest.raises(ValueError, match=r"torn-checkpoint-6: no trainer_state\.json"):
        resume_checkpoint(training_args, fresh_start=False)

    # Nothing complete at all: training starts over, and says so.
    only_torn = tmp_path / "only-torn"
    (only_torn / "checkpoint-2").mkdir(parents=True)
    training_args.resume_from_checkpoint, training_args.output_dir = None, str(only_torn)
    assert resume_checkpoint(training_args, fresh_start=False) is None
    assert "empty folder; moved to" in caplog.text and "no complete checkpoint: training from step 0" in caplog.text


@pytest.mark.parametrize(
    ("tear", "problem"),
    [
        (lambda c: _cut(c / "adapter_model.safetensors"), r"adapter_model\.safetensors is \d+ bytes, its header"),
        (lambda c: _cut(c / "adapter_model.safetensors", 0.0001), "adapter_model.safetensors is cut off inside"),
        (lambda c: _cut(c / "optimizer.pt"), r"optimizer\.pt is cut off"),
        (lambda c: (c / "scheduler.pt").unlink(), "no scheduler.pt"),
        (lambda c: _cut(c / "rng_state.pth"), r"rng_state\.pth is cut off"),
        (lambda c: _cut(c / "trainer_state.json"), "trainer_state.json does not parse"),
        (lambda c: (c / "adapter_model.safetensors").unlink(), "no weights"),
    ],
)
def test_checkpoint_completeness_catches_each_file_cut_off(checkpointed_run, tmp_path, tear, problem):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(checkpointed_run / "checkpoint-4", checkpoint)
    assert checkpoint_problem(checkpoint) is None  # what the Trainer wrote is complete
    tear(checkpoint)
    assert re.match(problem, checkpoint_problem(checkpoint) or "complete"), checkpoint_problem(checkpoint)


def test_checkpoint_completeness_of_deepspeed_and_sharded_layouts(checkpointed_run, tmp_path):
    import torch
    from safetensors.torch import save_file

    # DeepSpeed ZeRO-3 on 2 ranks, as the 2-process CPU run writes it: states in global_step4/, named by `latest`.
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(checkpointed_run / "checkpoint-4", checkpoint)
    (checkpoint / "optimizer.pt").unlink()
    (checkpoint / "adapter_model.safetensors").unlink()  # ZeRO-3 without a 16-bit gather saves none
    (checkpoint / "rng_state.pth").rename(checkpoint / "rng_state_0.pth")
    shutil.copy(checkpoint / "rng_state_0.pth", checkpoint / "rng_state_1.pth")
    shards = checkpoint / "global_step4"
    shards.mkdir()
    for rank in (0, 1):
        torch.save({"rank": rank}, shards / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        torch.save({"rank": rank}, shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (checkpoint / "latest").write_text("global_step4")
    assert checkpoint_problem(checkpoint) is None
    _cut(shards / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert "optim_states.pt is cut off" in checkpoint_problem(checkpoint)
    (shards / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problem(checkpoint) == "RNG states of 2 ranks but optimizer shards of 1"
    (checkpoint / "latest").unlink()  # DeepSpeed writes it once every rank has saved
    assert "no 'latest' file" in checkpoint_problem(checkpoint)

    # A full model in safetensors shards: every shard the index maps must be there and whole.
    full = tmp_path / "checkpoint-2"
    shutil.copytree(checkpointed_run / "checkpoint-2", full)
    (full / "adapter_model.safetensors").unlink()
    for name in ("a", "b"):
        save_file({name: torch.zeros(64)}, full / f"model-{name}.safetensors")
    index = {"weight_map": {"a": "model-a.safetensors", "b": "model-b.safetensors"}}
    (full / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(full) is None
    (full / "model-b.safetensors").unlink()
    assert checkpoint_problem(full) == "sharded weights incomplete: no model-b.safetensors"


def test_relaunch_after_a_torn_last_checkpoint_resumes_from_the_one_before(
    checkpointed_run, tiny_model_dir, prepared_data_dir, tmp_path, capsys, caplog
):
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    # The node died while checkpoint-4's weights were written: trainer_state.json made it, the weights not.
    _cut(out / "checkpoint-4" / "adapter_model.safetensors")
    argv = tiny_recipe_args(
        tiny_model_dir, prepared_data_dir, out,
        "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "10", "--eval_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", "1",
    )  # fmt: skip
    assert train(*parse(argv)) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    assert "trained steps 2->6" in printed
    assert any(f"skipping torn checkpoint {out / 'checkpoint-4'}" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    # Steps 3-4 were retrained and checkpoint-4 saved afresh, whole.
    assert checkpoint_problem(out / "checkpoint-4") is None and checkpoint_problem(out / "checkpoint-6") is None
    assert (out / "torn-checkpoint-4").is_dir()


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_trains_and_writes_a_loadable_checkpoint(
    tiny_model_dir, prepared_data_dir, tmp_path
):
    out = tmp_path / "zero3"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "configs/accelerate/cpu_zero3_2proc.yaml"),
        SFT, *tiny_recipe_args(tiny_model_dir, prepared_data_dir, out)[:],
        "--ddp_backend", "gloo", "--max_steps", "4", "--save_steps", "4", "--eval_steps", "4",
        "--moderation_eval_samples", "4", "--logging_steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "trained steps 0->4" in result.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    # Each rank scored its share of the 4 dialogues; gathered, the metrics cover all of them.
    assert any("eval_unsafe_auprc" in entry for entry in state["log_history"])
    assert (out / "adapter_model.safetensors").exists()
    moderator = Moderator.from_pretrained(out, verify=False)
    from PIL import Image

    verdict = moderator.moderate(
        [{"role": "user", "content": "What is in this picture?"}], [Image.new("RGB", (56, 56))]
    )
    assert verdict.raw and 0.0 <= verdict.p_unsafe <= 1.0


def test_data_rendered_with_another_contract_is_refused(prepared_data_dir, tmp_path):
    from train.preflight import check_dataset_contract, load_dataset_stats

    taxonomy = load_taxonomy()
    check_dataset_contract(prepared_data_dir, load_dataset_stats(prepared_data_dir), taxonomy)  # the real build passes
    stats = json.loads((prepared_data_dir / "stats.json").read_text())
    other_ids = {**taxonomy.provenance(), "taxonomy_ids": ["scams", *taxonomy.ids[1:]]}
    for field, value in (("prompt_format_version", "0"), ("taxonomy", other_ids)):
        stale = tmp_path / field
        stale.mkdir()
        (stale / "stats.json").write_text(json.dumps({**stats, field: value}))
        with pytest.raises(ValueError, match="stats.json: data (rendered with prompt format|built with other)"):
            check_dataset_contract(stale, load_dataset_stats(stale), taxonomy)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 16, 17, 512])
@pytest.mark.parametrize("ranks", [1, 2, 3, 8, 32])
def test_moderation_eval_shards_cover_every_dialogue_once_in_equal_steps(n, ranks):
    shards = [moderation_shard(n, ranks, rank) for rank in range(ranks)]
    own = [index for indices, count in shards for index in indices[:count]]
    assert sorted(own) == list(range(n))  # the union covers all, nothing twice
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively),
    # and no rank scores more than its share.
    assert len({len(indices) for indices, _ in shards}) == 1
    assert all(len(indices) <= -(-n // ranks) for indices, _ in shards)
    assert all(0 <= index < n for indices, _ in shards for index in indices)


def test_each_rank_scores_a_contiguous_slice_padded_to_equal_length():
    assert [moderation_shard(10, 4, rank) for rank in range(4)] == [
        ([0, 1, 2], 3),
        ([3, 4, 5], 3),
        ([6, 7, 8], 3),
        ([9, 9, 9], 1),  # its one dialogue, then repeats whose results are dropped
    ]
    assert [moderation_shard(2, 4, rank) for rank in range(4)] == [([0], 1), ([1], 1), ([1], 0), ([1], 0)]


def test_moderation_metrics_auprc_is_sklearns_and_flags_follow_the_served_rule():
    from sklearn.metrics import average_precision_score

    labels = ["unsafe", "safe", "unsafe", "unsafe", "safe"]
    scores = [0.9, 0.8, 0.7, 0.2, 0.1]
    by_score = moderation_metrics(labels, scores, threshold=0.5)
    y_true = [1, 0, 1, 1, 0]
    assert by_score["eval_unsafe_auprc"] == pytest.approx(average_precision_score(y_true, scores))
    assert by_score["eval_unsafe_auprc"] == pytest.approx(29 / 36)  # precision 1, 2/3, 3/4 at each third of recall
    assert by_score["eval_unsafe_recall"] == pytest.approx(2 / 3) and "eval_category_accuracy" not in by_score
    # Generated verdicts: an unparseable answer is flagged (fail-closed) whatever its score.
    verdicts = [
        Verdict("unsafe", "fraud", None, 0.9, None),
        Verdict("unsafe", "fraud", None, 0.8, None),
        Verdict("unsafe", "violence", None, 0.7, None),
        Verdict("unsafe", "unknown", None, 0.2, None, parse_error=True),
        Verdict("safe", None, None, 0.1, None),
    ]
    categories = ["fraud", "", "fraud", "privacy", ""]
    by_verdict = moderation_metrics(labels, scores, 0.5, verdicts=verdicts, categories=categories)
    assert by_verdict["eval_unsafe_recall"] == 1.0 and by_verdict["eval_unsafe_auprc"] == by_score["eval_unsafe_auprc"]
    assert by_verdict["eval_category_accuracy"] == pytest.approx(1 / 3)
    assert by_verdict["eval_parse_error_rate"] == pytest.approx(1 / 5)


def test_score_only_moderation_eval_never_generates(trainer, monkeypatch):
    def no_generate(*args, **kwargs):
        raise AssertionError("generate called with moderation_eval_generate off")

    monkeypatch.setattr(Moderator, "generate", no_generate)
    monkeypatch.setattr(type(trainer.accelerator.unwrap_model(trainer.model)), "generate", no_generate)
    monkeypatch.setattr(trainer, "moderation_eval_generate", False)
    monkeypatch.setattr(trainer, "moderation_eval_samples", 6)
    metrics = trainer.moderation_evaluate(trainer.eval_dataset)
    assert 0.0 <= metrics["eval_unsafe_auprc"] <= 1.0 and "eval_unsafe_f1" in metrics
    assert "eval_category_accuracy" not in metrics and "eval_parse_error_rate" not in metrics


def test_sharded_moderation_eval_gathers_the_same_metrics_as_one_rank(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "moderation_eval_generate", True)
    monkeypatch.setattr(trainer, "moderation_eval_samples", 5)
    single = trainer.moderation_evaluate(trainer.eval_dataset)
    subset = trainer.moderation_subset(trainer.eval_dataset)
    indices, own = moderation_shard(len(subset), 2, 0)
    rank0 = trainer.score_moderation_shard(subset, indices)[:own]

    # Rank 1 of 2: it scores only its share; the gather brings rank 0's.
    sent = []

    def gather_object(results):
        sent.extend(results)
        return rank0 + results

    real = trainer.accelerator
    as_rank1 = type(
        "Rank1", (), {"num_processes": 2, "process_index": 1, "unwrap_model": staticmethod(real.unwrap_model)}
    )
    monkeypatch.setattr(trainer, "accelerator", as_rank1())
    monkeypatch.setattr("train.trainer.gather_object", gather_object)
    sharded = trainer.moderation_evaluate(trainer.eval_dataset)
    assert sorted(i for i, *_ in sent) == [3, 4] and sorted(i for i, *_ in rank0) == [0, 1, 2]
    assert sharded.keys() == single.keys()
    for name, value in single.items():
        assert sharded[name] == pytest.approx(value, abs=1e-4), name

    monkeypatch.setattr("train.trainer.gather_object", lambda results: results)  # rank 0's results lost
    with pytest.raises(RuntimeError, match="moderation eval gathered indices"):
        trainer.moderation_evaluate(trainer.eval_dataset)


def test_planned_evaluations_are_the_steps_the_trainer_evaluates_at(tiny_model_dir, prepared_data_dir, tmp_path):
    # 20 rows, batch 4, accumulation 2: 5 batches, 3 optimizer steps an epoch (the last one partial), 6 in
    # all; eval/save every 0.7 of the run -> at step ceil(4.2) = 5, then at the end (6).
    argv = tiny_recipe_args(
        tiny_model_dir, prepared_data_dir, tmp_path / "out",
        "--max_steps", "-1", "--num_train_epochs", "2", "--max_train_samples", "20", "--gradient_accumulation_steps", "2",
        "--eval_steps", "0.7", "--save_steps", "0.7", "--max_eval_samples", "2", "--moderation_eval_samples", "2",
        "--moderation_eval_generate", "false", "--logging_steps", "1",
    )  # fmt: skip
    script_args, training_args, model_args = parse(argv)
    planned = planned_evaluations(training_args, 20, world_size=1)
    assert train(script_args, training_args, model_args) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    evaluated = [entry["step"] for entry in state["log_history"] if "eval_unsafe_auprc" in entry]
    saved = sorted(int(path.name.split("-")[1]) for path in (tmp_path / "out").glob("checkpoint-*"))
    assert planned == (state["max_steps"], evaluated, saved) == (6, [5, 6], [5, 6])
    assert state["best_model_checkpoint"] and state["best_metric"] is not None


def test_training_refuses_images_larger_than_the_data_lengths_were_checked_at(
    tiny_model_dir, prepared_data_dir, tmp_path
):
    # The demo data counted lengths at the tiny processor's default bound (12544 pixels).
    argv = tiny_recipe_args(tiny_model_dir, prepared_data_dir, tmp_path / "out", "--max_pixels", "50176")
    with pytest.raises(ValueError, match="checked at max_pixels=12544 .* would use max_pixels=50176") as info:
        build_trainer(*parse(argv))
    assert str(prepared_data_dir / "stats.json") in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written
