"""Training behaviour users rely on, proven on CPU with the tiny model and the real sample records."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trl import ModelConfig, SFTConfig, TrlParser

from moderator.inference import Moderator
from moderator.taxonomy import load_taxonomy
from tests.conftest import REPO_ROOT, tiny_recipe_args
from tests.wandb_offline import read_offline_run
from train.config import ModeratorScriptArguments
from train.provenance import PROVENANCE_FILE, REDACTED, redact
from train.run import PREEMPTED_EXIT_CODE, build_trainer, train

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
    record = json.loads((Path(trainer.args.output_dir) / PROVENANCE_FILE).read_text())
    taxonomy = load_taxonomy()
    assert record["taxonomy_sha256"] == taxonomy.sha256 and record["taxonomy_version"] == taxonomy.version
    assert len(record["git"]["commit"]) in (40, len("unknown"))
    assert record["data"]["train"] and record["data"]["stats_sha256"]
    assert record["config"]["SFTConfig"]["learning_rate"] == trainer.args.learning_rate
    assert record["config"]["ModeratorScriptArguments"]["dataset_path"]


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
    moderator = Moderator.from_pretrained(out)
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
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "safemt-moderator-test")
    secret = "hf_SECRETsecret1234567890"
    argv = tiny_recipe_args(
        tiny_model_dir, prepared_data_dir, tmp_path / "out",
        "--max_steps", "4", "--eval_steps", "4", "--save_steps", "4", "--moderation_eval_samples", "4",
        "--report_to", "wandb", "--run_name", "offline-test", "--hub_token", secret, "--logging_steps", "2",
    )  # fmt: skip
    assert train(*parse(argv)) == 0
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
    assert {"train/loss", "eval/loss", "eval/unsafe_f1", "eval/verdict_accuracy", "eval/category_accuracy"} <= logged
    for path in [*run_dir.rglob("*"), tmp_path / "out" / PROVENANCE_FILE]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


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
    assert any("eval_unsafe_f1" in entry for entry in state["log_history"])
    assert (out / "adapter_model.safetensors").exists()
    moderator = Moderator.from_pretrained(out)
    from PIL import Image

    verdict = moderator.moderate(
        [{"role": "user", "content": "What is in this picture?"}], [Image.new("RGB", (56, 56))]
    )
    assert verdict.raw and 0.0 <= verdict.p_unsafe <= 1.0


def test_data_rendered_with_another_contract_is_refused(prepared_data_dir, tmp_path):
    from train.run import check_dataset_contract

    taxonomy = load_taxonomy()
    check_dataset_contract(prepared_data_dir, taxonomy)  # the real build passes
    stats = json.loads((prepared_data_dir / "stats.json").read_text())
    other_ids = {**taxonomy.provenance(), "taxonomy_ids": ["scams", *taxonomy.ids[1:]]}
    for field, value in (("prompt_format_version", "0"), ("taxonomy", other_ids)):
        stale = tmp_path / field
        stale.mkdir()
        (stale / "stats.json").write_text(json.dumps({**stats, field: value}))
        with pytest.raises(ValueError, match="stats.json: data (rendered with prompt format|built with other)"):
            check_dataset_contract(stale, taxonomy)
