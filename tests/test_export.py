"""Export behaviour users rely on: a self-contained, verifiable serving directory that equals the trained model.

The tiny adapter is trained once per module (16 steps on 8 sample dialogues, enough to emit the verdict format).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from export.equivalence import EquivalenceError, check_equivalence, compare_scores, write_equivalence_samples
from export.exporting import ExportError, export, main, parse_export_args
from export.manifest import MANIFEST_FILE, verify_export
from moderator.artefacts import RUN_RECORD_FILE
from moderator.contract import PROMPT_FORMAT_VERSION, render_moderator_messages
from moderator.taxonomy import DEFAULT_TAXONOMY_PATH, UNKNOWN_CATEGORY, load_taxonomy
from tests.conftest import REPO_ROOT, SAMPLE_DIR, tiny_recipe_args
from tests.wandb_offline import read_offline_run
from train.config import ModeratorScriptArguments
from train.provenance import REDACTED
from train.run import train

FAKE_TOKEN = "hf_FAKEexportTOKEN1234567890"
BASE_MODEL_ID = "safemt-tests/tiny-qwen2_5_vl"
MERGED_FILES = {
    "README.md", "manifest.json", "moderator_config.json", "taxonomy.yaml", "eval_report.json",
    "config.json", "generation_config.json", "model.safetensors",
    "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
}  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sample_dialogue():
    """The first real 2-turn SafeMT record, with a generated image."""
    from moderator.images import placeholder_image

    record = json.loads((SAMPLE_DIR / "2_turn.json").read_text())[0]
    return record["dialogue"], [placeholder_image(record["image_path"])]


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, prepared_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-sft") / "run"
    argv = tiny_recipe_args(
        tiny_model_dir, prepared_data_dir, out,
        "--max_train_samples", "8", "--max_steps", "16", "--learning_rate", "1e-2", "--logging_steps", "8",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
    )  # fmt: skip
    assert train(*TrlParser((ModeratorScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(args=argv)) == 0
    # A run recorded by an older, unredacted version could hold a token: the export must not pass it on.
    provenance = json.loads((out / RUN_RECORD_FILE).read_text())
    provenance["config"]["SFTConfig"]["hub_token"] = FAKE_TOKEN
    provenance["data"]["uploaded_with"] = FAKE_TOKEN
    (out / RUN_RECORD_FILE).write_text(json.dumps(provenance))
    return out


def _report_rows() -> list[dict]:
    """Hand-made judged rows: ids a and b at k = 1, 2, without defence and with the moderator, plus 4 benign."""
    rows = []
    labels = {"none": {("a", 1): "unsafe", ("b", 1): "unsafe", ("a", 2): "unsafe", ("b", 2): "safe"},
              "moderator": {("a", 1): "safe", ("b", 1): "unsafe", ("a", 2): "safe", ("b", 2): "safe"}}  # fmt: skip
    for defence, by_key in labels.items():
        for (sample_id, k), label in by_key.items():
            flagged = None if defence == "none" else sample_id == "a"
            rows.append({"target": "tiny-target", "defence": defence, "id": sample_id, "k": k, "benign": False,
                         "label": label, "flagged": flagged})  # fmt: skip
    for index, flagged in enumerate([True, False, False, False]):
        rows.append({"target": "tiny-target", "defence": "moderator", "id": f"benign{index}", "k": 1, "benign": True,
                     "label": "safe", "flagged": flagged, "refused": False})  # fmt: skip
    return rows


DETECTION = {
    "moderator": {
        "n": 8, "precision": 0.75, "recall": 0.6, "f1": 2 / 3, "accuracy": 0.625, "auprc": 0.81, "auroc": None,
        "fpr_benign": 0.125, "category_accuracy_flagged": 0.5, "category_accuracy_all_unsafe": 0.3,
    }
}  # fmt: skip
# What eval.loop records: the threshold every moderator row above was decided at (eval.thresholds.ThresholdChoice).
THRESHOLDS = {
    "moderator": {
        "threshold": 0.3, "source": "validation", "detail": "smallest threshold with FPR <= 0.05 on the validation split",
        "target_fpr": 0.05, "validation_fpr": 0.04, "n_validation": 50, "n_validation_benign": 25,
    }
}  # fmt: skip


@pytest.fixture(scope="module")
def eval_report(tmp_path_factory) -> Path:
    from eval.report import write_report

    out = tmp_path_factory.mktemp("eval-report")
    write_report(_report_rows(), out, turns=(1, 2), detection=DETECTION, title="Tiny eval", thresholds=THRESHOLDS)
    return out / "report.json"


@pytest.fixture(scope="module")
def merged_export(trained_adapter, eval_report, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "merged"
    argv = ["--checkpoint", str(trained_adapter), "--out", str(out), "--eval-report", str(eval_report),
            "--equivalence-samples", "4", "--equivalence-max-new-tokens", "24",
            "--base-model-id", BASE_MODEL_ID]  # fmt: skip
    assert export(parse_export_args(argv)) == out
    return out


def test_merged_export_holds_safetensors_and_every_serving_file_and_its_manifest_verifies(
    merged_export, trained_adapter, tiny_model_dir
):
    from safetensors import safe_open

    assert {p.name for p in merged_export.iterdir()} == MERGED_FILES
    with (
        safe_open(merged_export / "model.safetensors", "pt") as merged,
        safe_open(trained_adapter / "adapter_model.safetensors", "pt") as adapter,
    ):
        assert not [key for key in merged.keys() if "lora" in key]  # noqa: SIM118 (safe_open is not a dict)
        # The trained lm_head (modules_to_save) is what ships, not the base's random one.
        assert merged.get_tensor("lm_head.weight").equal(adapter.get_tensor("base_model.model.lm_head.weight"))

    manifest = json.loads((merged_export / MANIFEST_FILE).read_text())
    hashed = MERGED_FILES - {MANIFEST_FILE, "README.md"}
    assert {name: manifest["files"][name] for name in hashed} == {
        name: _sha256(merged_export / name) for name in hashed
    }
    # The card names the manifest's own sha256 (issue 21: pinning): recorded with that digest left out.
    card = (merged_export / "README.md").read_bytes()
    digest = _sha256(merged_export / MANIFEST_FILE).encode()
    assert digest in card and manifest["manifest_sha256_written_in"] == ["README.md"]
    assert (
        manifest["files"]["README.md"] == hashlib.sha256(card.replace(digest, b"<sha256 of manifest.json>")).hexdigest()
    )
    assert verify_export(merged_export)["export_type"] == "merged"

    taxonomy = load_taxonomy()
    assert (merged_export / "taxonomy.yaml").read_bytes() == DEFAULT_TAXONOMY_PATH.read_bytes()
    assert manifest["taxonomy"] == {"file": "taxonomy.yaml", "version": taxonomy.version, "sha256": taxonomy.sha256}
    assert manifest["prompt_format_version"] == PROMPT_FORMAT_VERSION
    assert json.loads((merged_export / "moderator_config.json").read_text())["prompt_format_version"] == (
        PROMPT_FORMAT_VERSION
    )
    provenance = json.loads((trained_adapter / RUN_RECORD_FILE).read_text())
    assert manifest["base_model"] == str(tiny_model_dir)
    assert manifest["adapter_config"]["r"] == 16 and manifest["adapter_config"]["modules_to_save"] == ["lm_head"]
    assert manifest["training_config"]["SFTConfig"]["learning_rate"] == 1e-2
    assert manifest["data_fingerprint"]["stats_sha256"] == provenance["data"]["stats_sha256"]
    assert manifest["git"]["training"] == provenance["git"]
    assert (merged_export / "chat_template.jinja").read_text() == (trained_adapter / "chat_template.jinja").read_text()
    assert json.loads((merged_export / "generation_config.json").read_text())["do_sample"] is False


def test_equivalence_result_is_recorded_and_the_threshold_comes_from_the_eval_report(merged_export):
    manifest = json.loads((merged_export / MANIFEST_FILE).read_text())
    equivalence = manifest["equivalence"]
    assert equivalence["n"] == 4 and equivalence["verdicts_identical"] is True
    assert 0.0 <= equivalence["max_abs_diff_p_unsafe"] <= equivalence["tolerance"] == 1e-3
    assert "safemt_sample" in equivalence["samples"]
    assert manifest["decision_threshold"] == 0.3
    assert manifest["decision_threshold_source"] == "eval report thresholds.moderator (validation)"


def test_manifest_and_card_hold_no_secret_from_the_training_record(merged_export):
    for path in merged_export.iterdir():
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    manifest = json.loads((merged_export / MANIFEST_FILE).read_text())
    assert manifest["training_config"]["SFTConfig"]["hub_token"] == REDACTED
    assert manifest["data_fingerprint"]["uploaded_with"] == REDACTED


def test_plain_transformers_loads_the_merged_export_and_generates_what_the_adapter_generates(
    merged_export, trained_adapter
):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from moderator.inference import load_model_and_processor

    model = AutoModelForImageTextToText.from_pretrained(merged_export)
    processor = AutoProcessor.from_pretrained(merged_export)
    assert not hasattr(model, "peft_config")
    dialogue, images = _sample_dialogue()
    text = processor.apply_chat_template(
        render_moderator_messages(dialogue), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], images=images, return_tensors="pt")
    reference_model, _ = load_model_and_processor(trained_adapter)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = reference_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert generated.tolist() == expected.tolist()
    assert processor.decode(generated[0, inputs["input_ids"].shape[1] :]).startswith("verdict:")


def test_moderator_loads_the_merged_export_with_the_manifest_threshold(merged_export):
    from moderator.inference import Moderator

    moderator = Moderator.from_pretrained(merged_export)
    assert moderator.threshold == 0.3
    verdict = moderator.moderate(*_sample_dialogue())
    assert verdict.flagged == (verdict.p_unsafe >= 0.3 or verdict.parse_error)
    if verdict.flagged:
        assert verdict.category in [*load_taxonomy().ids, UNKNOWN_CATEGORY]


def _verify_cli(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", "verify", str(directory)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip


def _flip_a_byte(directory: Path) -> str:
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "tampered file: model.safetensors"


def _delete_a_file(directory: Path) -> str:
    (directory / "tokenizer.json").unlink()
    return "missing file: tokenizer.json"


def _add_a_file(directory: Path) -> str:
    (directory / "notes").mkdir()
    (directory / "notes" / "extra.txt").write_text("not part of the export")
    return "unlisted file: notes/extra.txt"


def _edit_manifest_threshold(directory: Path) -> str:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["decision_threshold"] = 0.99
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return "decision_threshold is 0.99 but moderator_config.json says 0.3"


@pytest.mark.parametrize("damage", [_flip_a_byte, _delete_a_file, _add_a_file, _edit_manifest_threshold])
def test_verify_refuses_a_changed_directory_naming_the_file(merged_export, tmp_path, damage):
    copy = tmp_path / "export"
    shutil.copytree(merged_export, copy)
    intact = _verify_cli(copy)
    assert intact.returncode == 0, intact.stderr
    assert "OK" in intact.stdout
    expected = damage(copy)
    result = _verify_cli(copy)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


def test_equivalence_check_fails_when_the_exported_weights_differ(merged_export, trained_adapter, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    perturbed = tmp_path / "perturbed"
    shutil.copytree(merged_export, perturbed)
    tensors = load_file(perturbed / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    tensors["lm_head.weight"] += 0.5 * torch.randn(tensors["lm_head.weight"].shape, generator=generator)
    save_file(tensors, perturbed / "model.safetensors", metadata={"format": "pt"})
    samples, _ = write_equivalence_samples(2, tmp_path / "samples", load_taxonomy())
    with pytest.raises(EquivalenceError) as info:
        check_equivalence(trained_adapter, perturbed, samples, dtype="float32", device="cpu", max_new_tokens=8)
    message = str(info.value)
    max_diff = float(re.search(r"max \|P\(unsafe\) difference\| = ([0-9.e+-]+)", message).group(1))
    assert max_diff > 1e-3, message


def test_compare_scores_names_the_dialogue_whose_verdict_or_score_differs():
    reference = {"ids": ["a", "b", "c"], "p_unsafe": [0.1, 0.5, 0.9], "raw": ["verdict: safe"] * 3}
    close = {"ids": ["a", "b", "c"], "p_unsafe": [0.1, 0.5004, 0.9], "raw": ["verdict: safe"] * 3}
    result = compare_scores(reference, close, tolerance=1e-3)
    assert result["n"] == 3 and result["max_abs_diff_p_unsafe"] == pytest.approx(0.0004)

    other_text = {**close, "raw": ["verdict: safe", "verdict: safe", "verdict: unsafe"]}
    with pytest.raises(EquivalenceError, match=r"generated verdict differs on dialogue c: .*'verdict: unsafe'"):
        compare_scores(reference, other_text, tolerance=1e-3)
    far = {**close, "p_unsafe": [0.1, 0.5, 0.93]}
    with pytest.raises(EquivalenceError, match=r"= 0\.03 > tolerance 0\.001 \(dialogue c"):
        compare_scores(reference, far, tolerance=1e-3)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_describes_the_moderator_and_holds_the_eval_tables(merged_export):
    card = (merged_export / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "cc-by-nc-4.0"
    assert meta["base_model"] == BASE_MODEL_ID
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert "safety" in meta["tags"]
    assert "CC BY-NC 4.0" in card and "non-commercial" in card
    assert "verdict: unsafe\ncategory: <category id>\nintent:" in card
    assert "## Intended use and limits" in card
    assert f"vllm serve {merged_export}" in card
    assert "P(unsafe) >= **0.3**" in card
    # The tables are the ones measured at the shipped threshold, and the card says which one that is.
    assert "Every table below was measured with the moderator flagging at P(unsafe) >= **0.3**, the threshold" in card
    assert "| moderator | 0.3 | validation | 0.050 | 0.040 | 50 |" in card
    # Hand-computed from _report_rows: moderator ASR_1 = 1/2, ASR_2 = 0/2; SI = (1 - 0.7311*0.5) * (1 - 0.25)
    # = 0.4759 (sigma of b is 0.5, of a 0). No defence: ASR 1.0 / 0.5, SI = (1 - 0.7311 - 0.1345) * 0.75 = 0.1009.
    assert "| tiny-target | moderator | 4 | 0.500 | 0.000 | 0.4759 |" in card
    assert "| tiny-target | none | 4 | 1.000 | 0.500 | 0.1009 |" in card
    assert "| tiny-target | moderator | 0.500 | 0.500 | 0.3750 |" in card  # ΔASR_1, ΔASR_2, ΔSI
    # Over-refusal: 1 of 4 benign dialogues flagged, none refused; 2 of 4 attack replies flagged.
    assert "| tiny-target | moderator | 4 | 0.250 | 0.000 | 0.500 |" in card
    assert "| moderator | 8 | 0.750 | 0.600 | 0.667 | 0.625 | 0.810 | n/a | 0.125 | 0.500 | 0.300 |" in card
    assert (merged_export / "eval_report.json").read_bytes() != b""


def test_adapter_only_export_reloads_with_moderator_logs_a_wandb_artifact_and_pushes(
    trained_adapter, prepared_data_dir, tmp_path, monkeypatch
):
    import huggingface_hub

    from moderator.inference import Moderator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    calls = []

    class RecordingHfApi:  # stands in for the Hub: no network in tests
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    out = tmp_path / "adapter"
    argv = ["--checkpoint", str(trained_adapter), "--out", str(out), "--adapter-only", "--threshold", "0.7",
            "--dataset", str(prepared_data_dir), "--equivalence-samples", "2", "--equivalence-max-new-tokens", "16",
            "--wandb-artifact", "tiny-moderator", "--push-to-hub", "safemt-tests/tiny-moderator"]  # fmt: skip
    assert main(argv) == 0

    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "taxonomy.yaml", "moderator_config.json"} <= names
    assert {"README.md", "manifest.json", "processor_config.json", "chat_template.jinja"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    assert (out / "adapter_model.safetensors").read_bytes() == (
        trained_adapter / "adapter_model.safetensors"
    ).read_bytes()
    manifest = verify_export(out)
    assert manifest["export_type"] == "adapter" and manifest["decision_threshold"] == 0.7
    assert manifest["equivalence"]["n"] == 2 and manifest["equivalence"]["samples"].startswith("validation split")
    meta = _front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"

    moderator = Moderator.from_pretrained(out)
    assert moderator.threshold == 0.7 and hasattr(moderator.model, "peft_config")
    verdict = moderator.moderate(*_sample_dialogue())
    assert verdict.flagged == (verdict.p_unsafe >= 0.7 or verdict.parse_error)

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (artifact,) = read_offline_run(run_dir)["artifacts"]
    assert artifact["name"] == "tiny-moderator" and artifact["type"] == "model"
    assert set(artifact["files"]) == names
    for name, entry in artifact["files"].items():
        assert entry["digest"] == base64.b64encode(hashlib.md5((out / name).read_bytes()).digest()).decode(), name
    assert artifact["metadata"]["decision_threshold"] == 0.7
    assert artifact["metadata"]["manifest_sha256"] == _sha256(out / MANIFEST_FILE)

    assert [(c[0], c[1]) for c in calls] == [
        ("create_repo", "safemt-tests/tiny-moderator"),
        ("upload_folder", "safemt-tests/tiny-moderator"),
    ]
    assert calls[0][2]["private"] is True and calls[1][2]["folder_path"] == str(out)


def test_full_checkpoint_is_re_saved_as_is(trained_adapter, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    full = tmp_path / "full-checkpoint"
    shutil.copytree(tiny_model_dir, full)
    shutil.copy(trained_adapter / RUN_RECORD_FILE, full / RUN_RECORD_FILE)
    out = tmp_path / "full-export"
    export(parse_export_args(["--checkpoint", str(full), "--out", str(out), "--equivalence-samples", "0"]))
    manifest = verify_export(out)
    assert manifest["export_type"] == "full" and manifest["adapter_config"] is None
    assert manifest["equivalence"] == {"skipped": True}
    assert "| export check | skipped" in (out / "README.md").read_text()
    original, exported = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(original[key].equal(exported[key]) for key in original)


def _adapter_copy(trained_adapter: Path, directory: Path) -> Path:
    directory.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", RUN_RECORD_FILE):
        shutil.copy(trained_adapter / name, directory / name)
    return directory


def test_export_refuses_a_report_measured_at_another_threshold_than_it_ships(
    trained_adapter, eval_report, tmp_path, capsys
):
    out = tmp_path / "never"
    argv = ["--checkpoint", str(trained_adapter), "--out", str(out), "--eval-report", str(eval_report)]
    assert main([*argv, "--threshold", "0.7"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, naming the report and both values
    assert line.startswith(f"export failed: {eval_report}: ") and "0.3" in line and "--threshold 0.7" in line
    assert not out.exists()

    # Today's eval wrote a recommended threshold beside tables measured at the manifest's: refused.
    legacy = json.loads(eval_report.read_text())
    del legacy["thresholds"]
    legacy["detection"]["moderator"]["threshold"] = 0.3
    legacy_path = tmp_path / "legacy-report.json"
    legacy_path.write_text(json.dumps(legacy))
    assert main(["--checkpoint", str(trained_adapter), "--out", str(out), "--eval-report", str(legacy_path)]) == 2
    assert f"{legacy_path}: no 'thresholds' field" in capsys.readouterr().err

    # Two moderators measured at different thresholds: no single shipped threshold matches both tables.
    split = json.loads(eval_report.read_text())
    split["thresholds"]["moderator-block"] = {**split["thresholds"]["moderator"], "threshold": 0.6}
    split_path = tmp_path / "split-report.json"
    split_path.write_text(json.dumps(split))
    assert main(["--checkpoint", str(trained_adapter), "--out", str(out), "--eval-report", str(split_path)]) == 2
    assert "measured at different thresholds" in capsys.readouterr().err


def test_threshold_choice_and_card_follow_the_reports_threshold():
    from export.card import render_model_card
    from export.exporting import threshold_to_ship

    report = {"thresholds": THRESHOLDS}
    assert threshold_to_ship(None, report, "r.json") == (0.3, "eval report thresholds.moderator (validation)")
    assert threshold_to_ship(0.3, report, "r.json")[0] == 0.3  # the same value given twice is fine
    assert threshold_to_ship(0.7, None, None) == (0.7, "--threshold given to the export")
    assert threshold_to_ship(0.7, {"thresholds": {}}, "r.json")[0] == 0.7  # an eval without a moderator
    assert threshold_to_ship(None, None, None)[0] == 0.5
    with pytest.raises(ExportError, match=r"^r\.json: its tables were measured at threshold 0\.3 .* --threshold 0\.7"):
        threshold_to_ship(0.7, report, "r.json")

    # The card itself never prints tables of another threshold than the one it describes.
    from eval.report import build_report

    full_report = build_report(_report_rows(), (1, 2), DETECTION, "Tiny eval", THRESHOLDS)
    manifest = {
        "export_type": "merged", "base_model_id": None, "base_model": "/tmp/base", "license": "cc-by-nc-4.0",
        "adapter_config": None, "decision_threshold": 0.5, "decision_threshold_source": "--threshold",
        "prompt_format_version": PROMPT_FORMAT_VERSION, "equivalence": {"skipped": True},
    }  # fmt: skip
    with pytest.raises(ExportError, match=r"measured at thresholds \{'moderator': 0\.3\}.*describes threshold 0\.5"):
        render_model_card(manifest, load_taxonomy(), full_report, "out")
    card = render_model_card({**manifest, "decision_threshold": 0.3}, load_taxonomy(), full_report, "out")
    assert "measured with the moderator flagging at P(unsafe) >= **0.3**" in card


def test_export_refuses_bad_inputs_with_a_clear_message(trained_adapter, eval_report, tiny_model_dir, tmp_path, capsys):
    def refused(checkpoint: Path, *extra: str, out: Path | None = None) -> str:
        argv = ["--checkpoint", str(checkpoint), "--out", str(out or tmp_path / "never"), *extra]
        with pytest.raises(ExportError) as info:
            export(parse_export_args(argv))
        return str(info.value)

    no_record = tmp_path / "no-record"
    shutil.copytree(trained_adapter, no_record)
    (no_record / RUN_RECORD_FILE).unlink()
    assert f"{no_record / RUN_RECORD_FILE}: missing" in refused(no_record)

    other_taxonomy = _adapter_copy(trained_adapter, tmp_path / "other-taxonomy")
    provenance = json.loads((other_taxonomy / RUN_RECORD_FILE).read_text())
    provenance["taxonomy_sha256"] = "0" * 64
    (other_taxonomy / RUN_RECORD_FILE).write_text(json.dumps(provenance))
    message = refused(other_taxonomy)
    assert "taxonomy sha256" in message and "0" * 64 in message and str(DEFAULT_TAXONOMY_PATH) in message

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("user data")
    assert "already exists and is not empty" in refused(trained_adapter, out=occupied)
    assert (occupied / "keep.txt").exists()

    assert "would overwrite the checkpoint" in refused(trained_adapter, "--overwrite", out=trained_adapter)
    assert "would overwrite the base model" in refused(trained_adapter, "--overwrite", out=tiny_model_dir)
    assert "--threshold: decision threshold must be in (0, 1), got 1.5" in refused(
        trained_adapter, "--threshold", "1.5"
    )
    assert "--threshold: decision threshold must be in (0, 1), got 1" in refused(trained_adapter, "--threshold", "1")

    bad_report = tmp_path / "bad-report.json"
    report = json.loads(eval_report.read_text())
    report["thresholds"]["moderator"]["threshold"] = "high"
    bad_report.write_text(json.dumps(report))
    assert f"{bad_report}: thresholds.moderator.threshold" in refused(trained_adapter, "--eval-report", str(bad_report))
    del report["results"]
    bad_report.write_text(json.dumps(report))
    assert "missing field(s) ['results']" in refused(trained_adapter, "--eval-report", str(bad_report))
    assert main(["--checkpoint", str(no_record), "--out", str(tmp_path / "never")]) == 2
    assert f"export failed: {no_record / RUN_RECORD_FILE}: missing" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
