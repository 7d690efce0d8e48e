"""data_prep: SafeMT (GitHub and hub layouts) + benign dialogues -> the trainer's dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import datasets
import pytest

from data_prep.build import main
from data_prep.io import load_prepared
from moderator.contract import one_sentence, render_moderator_messages, render_target, target_message
from moderator.taxonomy import load_taxonomy
from tests.conftest import REPO_ROOT, SAMPLE_DIR

BENIGN_FIXTURE = REPO_ROOT / "tests" / "data" / "benign_sample.jsonl"
TAXONOMY = load_taxonomy()


def sample_records(turns: int) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads((SAMPLE_DIR / f"{turns}_turn.json").read_text())}


def build(safemt, out, *extra: str) -> tuple[int, dict]:
    code = main(["--safemt", str(safemt), "--out", str(out), *extra])
    report = Path(out) if code == 0 else Path(f"{out}.failed")  # a failed build reports beside out
    stats = json.loads((report / "stats.json").read_text())
    return code, stats


def all_rows(dataset_dict) -> list[tuple[str, dict]]:
    """(split, row) for every row, images left as paths (no decoding)."""
    rows = []
    for split, data in dataset_dict.items():
        data = data.cast_column("images", datasets.List(datasets.Image(decode=False)))
        rows += [(split, row) for row in data]
    return rows


@pytest.fixture
def built(safemt_dir, tmp_path):
    out = tmp_path / "out"
    code, stats = build(safemt_dir, out, "--benign", str(BENIGN_FIXTURE), "--benign_ratio", "0.25")
    assert code == 0
    return out, stats


def test_known_records_get_the_contract_targets(built, safemt_dir):
    out, stats = built
    rows = {(row["id"], row["turns"]): (split, row) for split, row in all_rows(load_prepared(out))}

    raw = sample_records(4)["mllm_economic_harm_1"]
    _, row = rows[("mllm_economic_harm_1", 4)]
    assert row["category"] == "economic_harm" and row["scenario"] == "Economic Harm"
    assert row["intent"] == one_sentence(raw["question"]) and row["intent"]
    assert row["target"] == render_target("unsafe", "economic_harm", raw["question"])
    assert row["label"] == "unsafe" and row["source"] == "mllm" and row["split_group"] == "mllm_economic_harm_1"
    expected = render_moderator_messages(raw["dialogue"], (0,), TAXONOMY) + [target_message(row["target"])]
    got = [
        {"role": m["role"], "content": [{k: v for k, v in p.items() if v is not None} for p in m["content"]]}
        for m in row["messages"]
    ]
    assert got == expected
    assert [image["path"] for image in row["images"]] == [str((safemt_dir / raw["image_path"]).resolve())]

    # Empty / near-empty user text is real benchmark content: converted, not quarantined.
    raw = sample_records(2)["jbv_political_39"]
    assert raw["dialogue"][0]["content"] == ""
    _, row = rows[("jbv_political_39", 2)]
    assert row["category"] == "political" and row["target"] == render_target("unsafe", "political", raw["question"])
    _, row = rows[("jbv_malware_121", 2)]
    assert row["category"] == "malware" and row["source"] == "jbv"
    _, row = rows[("guard_hate_speech_102", 1)]
    assert row["category"] == "hate_speech" and row["images"][0]["path"].endswith(".png")

    # Every real sample record at every length is there exactly once.
    expected_keys = {(i, k) for k in (1, 2, 4) for i in sample_records(k)}
    assert {key for key in rows if not key[0].startswith("chitchat_")} == expected_keys
    assert stats["by_input"]["safemt"] == {"read": 156, "converted": 156, "quarantined": 0}


def test_every_example_has_exactly_one_image_and_benign_rows_are_safe(built):
    out, stats = built
    dataset = load_prepared(out)
    benign = 0
    for _split, row in all_rows(dataset):
        placeholders = sum(p["type"] == "image" for m in row["messages"] for p in m["content"])
        assert placeholders == 1 and len(row["images"]) == 1 and Path(row["images"][0]["path"]).is_absolute()
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"][0]["text"] == row["target"]
        if row["source"] == "benign_sample":
            benign += 1
            assert row["label"] == "safe" and row["target"] == "verdict: safe"
            assert row["category"] == row["scenario"] == row["intent"] == "" and row["split_group"] == row["id"]
    assert benign == stats["benign"]["examples"] == round(0.25 * 156) == 39
    # Benign lengths are spread evenly over the SafeMT lengths (1, 2, 4): length must not give the label away.
    benign_turns = [row["turns"] for _, row in all_rows(dataset) if row["label"] == "safe"]
    assert sorted(benign_turns.count(k) for k in (1, 2, 4)) == [13, 13, 13]
    # Images decode lazily to PIL in the loaded dataset.
    image = dataset["train"][0]["images"][0]
    assert image.size == (64, 48)
    # By default each benign dialogue is cut at every length it reaches (like a SafeMT id), in one split.
    dialogues = stats["benign"]["dialogues"]
    assert 13 <= dialogues < 39
    assert stats["read"] == stats["converted"] + stats["quarantined"] == 156 + dialogues


def test_splits_are_grouped_by_id_deterministic_and_cover_scenarios(safemt_dir, tmp_path):
    _, stats_a = build(safemt_dir, tmp_path / "a", "--benign", "none", "--seed", "3")
    _, stats_b = build(safemt_dir, tmp_path / "b", "--benign", "none", "--seed", "3")
    _, _ = build(safemt_dir, tmp_path / "c", "--benign", "none", "--seed", "4")
    splits_of = {}
    for name in "abc":
        groups = defaultdict(set)
        for split, row in all_rows(load_prepared(tmp_path / name)):
            groups[row["split_group"]].add(split)
        assert all(len(s) == 1 for s in groups.values()), "an id appears in two splits"
        splits_of[name] = {g: next(iter(s)) for g, s in groups.items()}
    assert splits_of["a"] == splits_of["b"]
    assert splits_of["a"] != splits_of["c"]
    # 52 ids: about 10% in test and 10% in validation, every length of an id together.
    assert stats_a["examples"]["test"] % 3 == 0 and 3 * 3 <= stats_a["examples"]["test"] <= 3 * 9
    assert 3 * 3 <= stats_a["examples"]["validation"] <= 3 * 9
    # Scenarios with 5+ ids reach training.
    train_scenarios = {row["scenario"] for split, row in all_rows(load_prepared(tmp_path / "a")) if split == "train"}
    assert {"Animal Abuse", "Hate Speech", "Political", "Privacy Violation", "Sex", "Legal Opinion"} <= train_scenarios


def test_an_empty_split_is_saved_loadable(safemt_dir, tmp_path):
    """test_fraction 0 gives an empty test split; datasets wrote no shard for it and loading failed."""
    code, stats = build(safemt_dir, tmp_path / "out", "--benign", "none", "--test_fraction", "0")
    assert code == 0 and stats["examples"]["test"] == 0
    dataset = load_prepared(tmp_path / "out")
    assert len(dataset["test"]) == 0 and len(dataset["train"]) > 0


def test_holdout_source_puts_all_its_ids_in_test(safemt_dir, tmp_path):
    code, stats = build(safemt_dir, tmp_path / "out", "--benign", "none", "--holdout_source", "jbv")
    assert code == 0
    by_split = defaultdict(set)
    for split, row in all_rows(load_prepared(tmp_path / "out")):
        by_split[split].add(row["source"])
    assert "jbv" not in by_split["train"] | by_split["validation"]
    assert stats["sources"]["test"]["jbv"] == 18 * 3


def _write_hub_layout(safemt_dir: Path, target: Path, with_turns: bool, suffix: str) -> Path:
    rows = []
    for k in (1, 2, 4):
        for raw in sample_records(k).values():
            row = {
                "id": raw["id"],
                "scenario": raw["scenario"],
                "image_rel_path": raw["image_path"],
                "dialogue": json.dumps(raw["dialogue"]),
                "question": raw["question"],
            }
            if with_turns:
                row["turns"] = k
            rows.append(row)
    target.mkdir()
    shutil.copytree(safemt_dir / "images", target / "images")  # a link out of the folder would be refused
    path = target / f"safemt.{suffix}"
    data = datasets.Dataset.from_list(rows)
    data.to_parquet(str(path)) if suffix == "parquet" else data.to_json(str(path))
    return path


@pytest.mark.parametrize("with_turns, suffix", [(True, "parquet"), (False, "jsonl")])
def test_hub_layout_gives_the_same_examples_as_the_github_layout(safemt_dir, tmp_path, with_turns, suffix):
    hub_file = _write_hub_layout(safemt_dir, tmp_path / "hub", with_turns, suffix)
    code_hub, stats_hub = build(hub_file, tmp_path / "from_hub", "--benign", "none")
    code_gh, _ = build(safemt_dir, tmp_path / "from_github", "--benign", "none")
    assert code_hub == code_gh == 0
    assert stats_hub["by_input"]["safemt"] == {"read": 156, "converted": 156, "quarantined": 0}

    def key_rows(out):
        return {
            (row["id"], row["turns"]): (split, row["target"], row["messages"][1], Path(row["images"][0]["path"]).name)
            for split, row in all_rows(load_prepared(out))
        }

    assert key_rows(tmp_path / "from_hub") == key_rows(tmp_path / "from_github")


def test_hub_layout_turns_column_is_checked_against_the_dialogue(safemt_dir, tmp_path):
    raw = sample_records(2)["mllm_economic_harm_1"]
    row = {k: raw[k] for k in ("id", "scenario", "question")}
    row.update(image_rel_path=raw["image_path"], dialogue=json.dumps(raw["dialogue"]), turns=4)
    path = tmp_path / "hub.parquet"
    datasets.Dataset.from_list([row]).to_parquet(str(path))
    code, stats = build(path, tmp_path / "out", "--benign", "none", "--safemt_images_root", str(safemt_dir))
    assert code == 0 and stats["quarantined"] == 1 and stats["read"] == 1
    entry = json.loads((tmp_path / "out" / "quarantine.jsonl").read_text())
    assert entry["file"] == str(path) and entry["index"] == 0 and entry["id"] == "mllm_economic_harm_1"
    assert entry["field"] == "dialogue" and "2 user turns" in entry["reason"] and "4" in entry["reason"]


def test_prefixes_share_the_split_and_follow_the_label_policy(safemt_dir, tmp_path):
    for policy, verdict in (("safe", "safe"), ("inherit", "unsafe")):
        out = tmp_path / policy
        code, _ = build(
            safemt_dir, out, "--benign", "none", "--prefixes", "--prefix_label", policy, "--safemt_turns", "4"
        )
        assert code == 0
        rows = all_rows(load_prepared(out))
        family = {row["id"]: (split, row) for split, row in rows if row["split_group"] == "mllm_economic_harm_1"}
        assert sorted(family) == [
            "mllm_economic_harm_1",
            "mllm_economic_harm_1@1of4",
            "mllm_economic_harm_1@2of4",
            "mllm_economic_harm_1@3of4",
        ]
        assert len({split for split, _ in family.values()}) == 1
        raw = sample_records(4)["mllm_economic_harm_1"]
        for k in (1, 2, 3):
            _, row = family[f"mllm_economic_harm_1@{k}of4"]
            assert row["turns"] == k and row["label"] == verdict and row["scenario"] == "Economic Harm"
            transcript = row["messages"][1]["content"][-1]["text"]
            assert one_sentence(raw["dialogue"][2 * k - 2]["content"]) in one_sentence(transcript)
            if k < 3:
                assert one_sentence(raw["dialogue"][2 * k]["content"]) not in one_sentence(transcript)
            if verdict == "safe":
                assert row["target"] == "verdict: safe" and row["category"] == "" and row["intent"] == ""
            else:
                assert row["target"] == family["mllm_economic_harm_1"][1]["target"]
        assert len(rows) == 52 * 4


def test_chitchat_is_the_default_real_benign_source(safemt_dir, tmp_path):
    code, stats = build(safemt_dir, tmp_path / "out", "--benign", "chitchat", "--benign_ratio", "0.5")
    assert code == 0 and stats["benign"]["examples"] == 78 and stats["by_input"]["benign"]["quarantined"] == 0
    benign = [row for _, row in all_rows(load_prepared(tmp_path / "out")) if row["source"] == "chitchat"]
    assert len(benign) == 78 and all(row["id"].startswith("chitchat_") for row in benign)
    assert sorted(sum(r["turns"] == k for r in benign) for k in (1, 2, 4)) == [26, 26, 26]
    for row in benign:  # the generated image sits on the first user turn
        user_text = row["messages"][1]["content"]
        assert user_text[1] == {"type": "image", "text": None}
        assert user_text[0]["text"].endswith("User: ")


def test_benign_rows_with_their_own_image_keep_it_on_its_turn(safemt_dir, tmp_path):
    from moderator.images import placeholder_image

    folder = tmp_path / "benign"
    folder.mkdir()
    placeholder_image("cat", (80, 60)).save(folder / "cat.png")
    rows = [
        {  # ShareGPT/LLaVA style, image marker on the second user turn
            "id": "llava_1",
            "conversations": [
                {"from": "human", "value": "Hi there"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "<image>\nWhat animal is this?"},
                {"from": "gpt", "value": "A cat."},
            ],
            "image": "cat.png",
        },
        {  # messages with typed parts
            "id": "typed_1",
            "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A small square."}]},
            ],
            "images": ["cat.png"],
        },
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stats = build(
        safemt_dir, tmp_path / "out", "--benign", str(path), "--safemt_turns", "1", "--benign_turns", "1", "2"
    )
    assert code == 0 and stats["benign"]["dialogues"] == 2 and stats["benign"]["examples"] == 3
    benign = {(r["id"], r["turns"]): r for _, r in all_rows(load_prepared(tmp_path / "out")) if r["label"] == "safe"}
    assert set(benign) == {("llava_1", 1), ("llava_1", 2), ("typed_1", 1)}
    for row in benign.values():
        assert [i["path"] for i in row["images"]] == [str((folder / "cat.png").resolve())]
        assert "<image>" not in json.dumps(row["messages"]) and "be nice" not in json.dumps(row["messages"])

    def text_before_image(row):
        parts = row["messages"][1]["content"]
        image_at = [i for i, p in enumerate(parts) if p["type"] == "image"]
        assert len(image_at) == 1
        return parts[image_at[0] - 1]["text"]

    assert text_before_image(benign[("llava_1", 2)]).endswith("Assistant: Hello!\nUser: ")
    # Cut before the turn its marker was on, the image moves to the first user turn.
    assert text_before_image(benign[("llava_1", 1)]).endswith("<conversation>\nUser: ")
    assert text_before_image(benign[("typed_1", 1)]).endswith("<conversation>\nUser: ")


def test_token_lengths_match_the_full_processor(safemt_dir, tmp_path, tiny_model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    from data_prep.stats import TokenCounter

    code, stats = build(
        safemt_dir,
        tmp_path / "out",
        "--benign",
        str(BENIGN_FIXTURE),
        "--benign_ratio",
        "0.1",
        "--processor",
        str(tiny_model_dir),
    )
    assert code == 0
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = [row for _, row in all_rows(load_prepared(tmp_path / "out"))]
    full = []
    for row in rows:
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        images = [Image.open(image["path"]).convert("RGB") for image in row["images"]]
        full.append(len(processor(text=[text], images=images, add_special_tokens=False)["input_ids"][0]))
    counter = TokenCounter(str(tiny_model_dir))
    sizes = {image["path"]: Image.open(image["path"]).size for row in rows for image in row["images"]}
    fast = counter.count([row["messages"] for row in rows], [[i["path"] for i in row["images"]] for row in rows], sizes)
    assert fast == full
    assert stats["tokens"]["longest"]["tokens"] == max(full)
    per_split_max = max(s["max"] for s in stats["tokens"]["per_split"].values() if s)
    assert per_split_max == max(full)


def test_max_length_fails_loudly_naming_the_record(safemt_dir, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    code, stats = build(safemt_dir, out, "--benign", "none", "--processor", str(tiny_model_dir), "--max_length", "700")
    assert code == 2
    err = capsys.readouterr().err
    longest = stats["tokens"]["longest"]
    assert longest["tokens"] > 700
    assert f"id {longest['id']!r} ({longest['turns']} turns" in err and "max_length 700" in err
    assert stats["tokens"]["over_max_length"] >= 1
    assert not (out / "dataset").exists()


def test_max_length_without_a_processor_is_a_config_error(safemt_dir, tmp_path, capsys):
    assert main(["--safemt", str(safemt_dir), "--out", str(tmp_path / "o"), "--max_length", "10"]) == 2
    assert "max_length needs a processor" in capsys.readouterr().err


def test_load_prepared_names_a_missing_image(safemt_dir, tmp_path):
    code, _ = build(safemt_dir, tmp_path / "out", "--benign", "none", "--safemt_turns", "1")
    assert code == 0
    _, first = all_rows(load_prepared(tmp_path / "out"))[0]
    Path(first["images"][0]["path"]).unlink()
    with pytest.raises(FileNotFoundError, match=first["id"]):
        load_prepared(tmp_path / "out")


def test_the_command_runs_as_a_subprocess_with_config_and_overrides(safemt_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "demo_data"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.build",
            "--config",
            str(REPO_ROOT / "configs" / "data" / "demo.yaml"),
            "--safemt",
            str(safemt_dir),
            "--out",
            str(out),
            "--processor",
            str(tiny_model_dir),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["config"]["benign_ratio"] == 0.25 and stats["config"]["out"] == str(out)  # from yaml / from the flag
    assert stats["benign"]["examples"] == 39 and stats["quarantined"] == 0
    assert stats["read"] == stats["converted"] == 156 + stats["benign"]["dialogues"]
    assert (out / "quarantine.jsonl").read_text() == ""
    assert "examples per scenario" in result.stdout and "Economic Harm" in result.stdout
    assert set(load_prepared(out)) == {"train", "validation", "test"}


def test_sft_trainer_prepares_and_collates_the_dataset(built, tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    out, _ = built
    train = load_prepared(out)["train"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        bf16=False,
        report_to=[],
        max_length=None,
        assistant_only_loss=True,
        per_device_train_batch_size=4,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert (image_tokens > 0).all() and batch["pixel_values"].shape[0] > 0
    # Only the verdict (and its closing token) carries labels.
    targets = {row["target"] for row in train.select_columns(["target"])}
    for labels in batch["labels"]:
        text = processor.tokenizer.decode(labels[labels != -100])
        assert text.replace("<|im_end|>", "").strip() in targets


def test_benign_normalisation_of_real_chitchat_quirks():
    from data_prep.benign import BenignCandidate, cut_dialogue, normalize

    # chitchat has blank messages (4 of the first ~4,000 conversations): a blank assistant message answers
    # nothing, so it is dropped and the user turns around it merge; the dialogue then ends on a user turn.
    blocks = [
        [{"sender": "a", "text": "Hi"}, {"sender": "a", "text": "there"}],
        [{"sender": "b", "text": ""}],
        [{"sender": "a", "text": "Anyone?"}],
        [{"sender": "b", "text": "Yes, hello!"}],
        [{"sender": "a", "text": "Great"}],
        [{"sender": "b", "text": "Bye"}],
    ]
    candidate = BenignCandidate("dataset.json", 7, "chitchat_x", {"chitchat": {"messages": blocks}}, None)
    dialogue = normalize(candidate)
    assert dialogue.dialogue == [
        {"role": "user", "content": "Hi there\nAnyone?"},
        {"role": "assistant", "content": "Yes, hello!"},
        {"role": "user", "content": "Great"},
    ]
    assert dialogue.dropped_empty == 1 and dialogue.image_turn == 0 and dialogue.source_image is None
    assert cut_dialogue(dialogue, 1).dialogue == [{"role": "user", "content": "Hi there\nAnyone?"}]


def test_rows_carry_their_token_length_for_length_grouped_batching(prepared_data_dir, tiny_model_dir):
    from transformers import AutoProcessor

    from data_prep.io import load_prepared

    train = load_prepared(prepared_data_dir)["train"]
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    for row in train.select(range(3)):
        # The cheap count (template text + image tokens from the image size) equals the real processor's.
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        full = processor(text=[text], images=row["images"], return_tensors="pt")["input_ids"].shape[1]
        assert row["length"] == full


def test_each_split_is_shuffled_so_the_first_rows_hold_both_labels(prepared_data_dir, safemt_dir, tmp_path):
    # Rows are built SafeMT (unsafe) first and benign (safe) last; evaluation subsets and
    # --max_train_samples take the first N rows of a split, so those must not all be unsafe.
    train = load_prepared(prepared_data_dir)["train"]
    assert set(train.select(range(20))["label"]) == {"safe", "unsafe"}

    def order(out, seed):
        code, _ = build(safemt_dir, out, "--benign", str(BENIGN_FIXTURE), "--benign_ratio", "0.25", "--seed", seed)
        assert code == 0
        return {split: list(zip(data["id"], data["turns"], strict=True)) for split, data in load_prepared(out).items()}

    first, again, other = order(tmp_path / "a", "0"), order(tmp_path / "b", "0"), order(tmp_path / "c", "1")
    assert first == again
    assert first != other


def test_benign_rows_reuse_safemt_images_of_their_own_split_only(safemt_dir, tmp_path):
    out = tmp_path / "out"
    code, stats = build(
        safemt_dir, out, "--benign", str(BENIGN_FIXTURE), "--benign_ratio", "0.25", "--benign_image_pool", "safemt"
    )
    assert code == 0 and stats["benign"]["examples"] == 39
    splits_of_image = defaultdict(set)
    safemt_images = defaultdict(set)
    for split, row in all_rows(load_prepared(out)):
        path = row["images"][0]["path"]
        splits_of_image[path].add(split)
        if row["source"] != "benign_sample":
            safemt_images[split].add(path)
    leaked = {path: splits for path, splits in splits_of_image.items() if len(splits) > 1}
    assert not leaked, f"images in two splits: {leaked}"
    benign = [(split, row) for split, row in all_rows(load_prepared(out)) if row["source"] == "benign_sample"]
    assert len(benign) == 39
    for split, row in benign:  # each benign image is a SafeMT image of the same split
        assert row["images"][0]["path"] in safemt_images[split]


def test_benign_eval_set_is_held_out_of_training_and_read_by_the_eval(safemt_dir, tmp_path):
    from data_prep.build import BENIGN_EVAL_FILE
    from eval.loop import load_benign_samples

    common = ["--benign", "chitchat", "--benign_ratio", "0.5", "--benign_image_pool", "safemt"]
    code, stats = build(safemt_dir, tmp_path / "with", *common, "--benign_eval_size", "12")
    assert code == 0 and stats["benign_eval"]["dialogues"] == 12
    assert stats["by_input"]["benign_eval"] == {"read": 12, "converted": 12, "quarantined": 0}
    assert stats["benign_eval"]["per_length"] == {"1": 4, "2": 4, "4": 4}
    assert stats["read"] == stats["converted"] == 156 + stats["benign"]["dialogues"] + 12

    samples = load_benign_samples(tmp_path / "with" / BENIGN_EVAL_FILE, None)
    assert len(samples) == 12 and sorted(s.k for s in samples) == [1] * 4 + [2] * 4 + [4] * 4
    rows = all_rows(load_prepared(tmp_path / "with"))
    assert {s.id for s in samples}.isdisjoint(row["id"] for _, row in rows)  # never trained on
    # Held-out dialogues get held-out images: bytes of a test-split SafeMT image, copied beside the file.
    test_images = {Path(r["images"][0]["path"]).read_bytes() for split, r in rows if split == "test"}
    for sample in samples:
        assert sample.image_path.parent == tmp_path / "with" / "benign_eval_images"
        assert sample.image_path.read_bytes() in test_images

    # The eval set is drawn after the training pool: asking for it changes nothing in training.
    code, stats_without = build(safemt_dir, tmp_path / "without", *common)
    assert code == 0 and stats_without["benign_eval"] is None
    assert not (tmp_path / "without" / BENIGN_EVAL_FILE).exists()
    without = all_rows(load_prepared(tmp_path / "without"))
    assert [(split, row["id"], row["turns"], row["images"][0]["path"]) for split, row in without] == [
        (split, row["id"], row["turns"], row["images"][0]["path"]) for split, row in rows
    ]


def test_token_lengths_follow_the_training_pixel_bounds(safemt_dir, tmp_path, tiny_model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    from moderator.images import bound_image_pixels
    from tiny_models.images import write_placeholder_images

    write_placeholder_images(safemt_dir, size=(224, 224))  # larger than both bounds below
    common = ["--benign", "none", "--safemt_turns", "1", "--processor", str(tiny_model_dir)]
    code, default_stats = build(safemt_dir, tmp_path / "default", *common)
    assert code == 0 and default_stats["tokens"]["max_pixels"] is None
    code, stats = build(safemt_dir, tmp_path / "bounded", *common, "--min_pixels", "784", "--max_pixels", "3136")
    assert code == 0
    assert (stats["tokens"]["min_pixels"], stats["tokens"]["max_pixels"]) == (784, 3136)
    assert stats["config"]["max_pixels"] == 3136

    default_lengths = {r["id"]: r["length"] for _, r in all_rows(load_prepared(tmp_path / "default"))}
    rows = [row for _, row in all_rows(load_prepared(tmp_path / "bounded"))]
    assert len(rows) == len(default_lengths) == 52
    # The tiny processor's default bound (112*112 pixels) gives a 224x224 image 16 tokens; 3136 pixels give 4.
    assert all(default_lengths[row["id"]] - row["length"] == 16 - 4 for row in rows)

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    bound_image_pixels(processor, 784, 3136)
    image_processor = processor.image_processor
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (784, 3136)
    for row in rows[:5]:
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        images = [Image.open(image["path"]).convert("RGB") for image in row["images"]]
        full = processor(text=[text], images=images, add_special_tokens=False)["input_ids"][0]
        assert row["length"] == len(full)


def test_pixel_bounds_without_a_processor_or_out_of_order_are_config_errors(safemt_dir, tmp_path, capsys):
    assert main(["--safemt", str(safemt_dir), "--out", str(tmp_path / "o"), "--max_pixels", "3136"]) == 2
    assert "max_pixels needs a processor" in capsys.readouterr().err
    argv = ["--safemt", str(safemt_dir), "--out", str(tmp_path / "o"), "--processor", "x", "--min_pixels", "9"]
    assert main([*argv, "--max_pixels", "4"]) == 2
    assert "min_pixels must not exceed max_pixels" in capsys.readouterr().err


def test_the_image_bounds_are_set_once_in_the_data_recipes_and_training_takes_them_from_there():
    import yaml

    for name in ("safemt", "smollm2_cpu"):
        data = yaml.safe_load((REPO_ROOT / f"configs/data/{name}.yaml").read_text())
        assert data["min_pixels"] and data["max_pixels"], name
    for recipe in (REPO_ROOT / "configs/sft").glob("*.yaml"):
        sft = yaml.safe_load(recipe.read_text())
        assert "min_pixels" not in sft and "max_pixels" not in sft, f"{recipe}: bounds belong to the data recipe"


# -- a build replaces its output only when it succeeded ----------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".building-" in p.name or ".old-" in p.name)


def test_a_failed_build_leaves_the_previous_output_byte_identical(safemt_dir, tmp_path, monkeypatch, capsys):
    import data_prep.build

    out = tmp_path / "out"
    argv = ["--benign", str(BENIGN_FIXTURE), "--benign_ratio", "0.25", "--benign_eval_size", "2"]
    code, _ = build(safemt_dir, out, *argv)
    assert code == 0 and (out / "benign_images").is_dir() and (out / "benign_eval.jsonl").is_file()
    before = snapshot(out)

    # Input that does not exist: the error comes before anything is touched.
    assert main(["--safemt", str(tmp_path / "typo"), "--out", str(out), *argv]) == 2
    assert "typo" in capsys.readouterr().err
    assert snapshot(out) == before and leftovers(tmp_path) == []

    # A build that runs to the end but fails (--strict): its report goes beside out, out is untouched.
    edit_path = safemt_dir / "1_turn.json"
    records = json.loads(edit_path.read_text())
    records[0]["scenario"] = "Space Piracy"
    edit_path.write_text(json.dumps(records))
    code, stats = build(safemt_dir, out, *argv, "--strict", "true")
    assert code == 3 and stats["quarantined"] == 1 and stats["dataset"] is None
    assert "out.failed" in capsys.readouterr().err
    assert (tmp_path / "out.failed" / "quarantine.jsonl").read_text().count("\n") == 1
    assert snapshot(out) == before and leftovers(tmp_path) == []

    # A crash while saving: the half-written staging folder is removed, out is untouched.
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(data_prep.build, "build_dataset_dict", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["--safemt", str(safemt_dir), "--out", str(out), *argv])
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_rebuild_replaces_the_output_whole_with_paths_under_out(safemt_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--benign", str(BENIGN_FIXTURE), "--benign_ratio", "0.25", "--benign_eval_size", "2"]
    assert build(safemt_dir, out, *argv)[0] == 0
    from data_prep.build import REPORT_MARKER

    (tmp_path / "out.failed").mkdir()  # an earlier failure's report, marked as data prep's
    (tmp_path / "out.failed" / REPORT_MARKER).write_text("{}")
    (tmp_path / "out.failed" / "stats.json").write_text("{}")
    first_images = set((out / "benign_images").iterdir())
    code, stats = build(safemt_dir, out, *argv, "--seed", "1")
    assert code == 0 and stats["dataset"] == str((out / "dataset").resolve())
    assert not (tmp_path / "out.failed").exists() and leftovers(tmp_path) == []
    # Nothing of the first build is left over: its benign images were replaced with the folder.
    second_images = set((out / "benign_images").iterdir())
    assert second_images != first_images
    benign_paths = {r["images"][0]["path"] for _, r in all_rows(load_prepared(out)) if r["label"] == "safe"}
    assert benign_paths == {str(p.resolve()) for p in second_images}  # recorded where they are now


def test_an_out_folder_holding_other_files_is_refused_untouched(safemt_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "checkpoint-100").mkdir(parents=True)
    (out / "checkpoint-100" / "model.safetensors").write_bytes(b"weights")
    before = snapshot(out)
    assert main(["--safemt", str(safemt_dir), "--out", str(out), "--benign", "none"]) == 2
    assert "checkpoint-100" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_folder_with_no_safemt_data_is_a_config_error_naming_it(tmp_path):
    from data_prep.config import ConfigError
    from data_prep.safemt import open_safemt

    (tmp_path / "empty").mkdir()
    source = open_safemt(str(tmp_path / "empty"), [1, 2])  # no <k>_turn.json: taken for a hub-layout folder
    with pytest.raises(ConfigError, match=r"empty: no SafeMT data: neither <k>_turn\.json files"):
        list(source.records())
