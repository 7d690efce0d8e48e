import json

import pytest

from moderator.taxonomy import DEFAULT_TAXONOMY_PATH, TaxonomyError, load_taxonomy
from tests.conftest import SAMPLE_DIR


def test_taxonomy_has_exactly_the_17_scenarios_of_the_data():
    taxonomy = load_taxonomy()
    assert len(taxonomy.scenarios) == 17
    data_labels = set()
    for path in SAMPLE_DIR.glob("*_turn.json"):
        data_labels |= {r["scenario"] for r in json.loads(path.read_text())}
    assert set(taxonomy.by_label) == data_labels
    assert len(set(taxonomy.ids)) == 17


def test_ids_match_the_image_folder_slugs_of_the_data():
    taxonomy = load_taxonomy()
    for record in json.loads((SAMPLE_DIR / "1_turn.json").read_text()):
        slug = record["image_path"].split("/")[1]
        assert taxonomy.by_label[record["scenario"]].id == slug


def test_caution_scenarios_are_the_sensitive_advice_ones():
    taxonomy = load_taxonomy()
    caution = {s.label for s in taxonomy.scenarios if s.action == "caution"}
    assert caution == {"Political", "Legal Opinion", "Financial Advice", "Health Consultation"}
    assert all(s.policy for s in taxonomy.scenarios)


def test_hash_and_version_are_recorded_and_follow_the_content(tmp_path):
    taxonomy = load_taxonomy()
    assert taxonomy.provenance() == {
        "taxonomy_version": taxonomy.version,
        "taxonomy_sha256": taxonomy.sha256,
        "taxonomy_ids": taxonomy.ids,
    }
    edited = tmp_path / "edited.yaml"
    edited.write_text(DEFAULT_TAXONOMY_PATH.read_text().replace("Do not help harm", "Never help harm"))
    assert load_taxonomy(edited).sha256 != taxonomy.sha256


@pytest.mark.parametrize(
    "mutation, message",
    [
        (lambda t: t.replace("id: fraud", "id: animal_abuse"), "duplicate scenario ids"),
        (lambda t: t.replace("action: caution", "action: maybe", 1), "action 'maybe'"),
        (lambda t: t.replace("id: fraud", "id: unknown"), "reserved"),
    ],
)
def test_malformed_taxonomy_is_refused(tmp_path, mutation, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(mutation(DEFAULT_TAXONOMY_PATH.read_text()))
    with pytest.raises(TaxonomyError, match=message):
        load_taxonomy(bad)


def test_policy_edits_keep_a_model_servable_but_category_changes_do_not(tmp_path):
    taxonomy = load_taxonomy()
    edited = tmp_path / "edited.yaml"
    edited.write_text(DEFAULT_TAXONOMY_PATH.read_text().replace("Do not help harm", "Never help harm"))
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(DEFAULT_TAXONOMY_PATH.read_text().replace("id: fraud", "id: scams"))
    assert load_taxonomy(edited).matches(taxonomy.provenance())
    assert not load_taxonomy(renamed).matches(taxonomy.provenance())
    # Records from before ids were kept fall back to the exact file hash.
    legacy = {"taxonomy_sha256": taxonomy.sha256}
    assert taxonomy.matches(legacy) and not load_taxonomy(edited).matches(legacy)
