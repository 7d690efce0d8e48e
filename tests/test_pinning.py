"""Pinning an export by the sha256 of its manifest (issue 21, defect 4).

A manifest lists every file's sha256, so whoever can rewrite the weights can rewrite the manifest too:
flip the weights, write their new sha256 into ``manifest.json``, and the export still verifies. The
digest of the manifest itself, printed by ``python -m export`` and written into the model card, names
one export and no other: ``Moderator.from_pretrained(..., expect_manifest_sha256=...)`` and ``python -m
export verify DIR --expect-manifest-sha256 ...`` refuse any other manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

import moderator.manifest as manifest_module
from export.exporting import main as export_main
from export.manifest import MANIFEST_FILE, MODEL_CARD_FILE, verify_export
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.inference import Moderator, ModeratorConfigError
from moderator.manifest import ManifestError, manifest_sha256
from moderator.taxonomy import load_taxonomy
from tests.test_export import _flip_a_byte

THRESHOLD = 0.4


@pytest.fixture(scope="module")
def pinned_export(tiny_model_dir, tmp_path_factory) -> tuple[Path, str]:
    """The tiny model exported by the real export stage, and what the export printed."""
    root = tmp_path_factory.mktemp("pinning")
    checkpoint = root / "checkpoint"
    shutil.copytree(tiny_model_dir, checkpoint)
    record = {**load_taxonomy().provenance(), "prompt_format_version": PROMPT_FORMAT_VERSION, "config": {}}
    (checkpoint / "moderator_run.json").write_text(json.dumps(record))
    out = root / "export"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--equivalence-samples", "0"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export_main([*argv, "--threshold", str(THRESHOLD)]) == 0
    return out, printed.getvalue()


@pytest.fixture
def export_copy(pinned_export, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(manifest_module.HASH_CACHE_ENV, str(tmp_path / "hash-cache.json"))
    copy = tmp_path / "export"
    shutil.copytree(pinned_export[0], copy)
    return copy


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST_FILE).read_bytes()).hexdigest()


def _replace_the_weights_and_their_manifest_entry(directory: Path) -> str:
    """What the issue did: flip the weights, record their new sha256, and keep the card naming the manifest."""
    old = _digest(directory)
    _flip_a_byte(directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    weights = (directory / "model.safetensors").read_bytes()
    manifest["files"]["model.safetensors"] = hashlib.sha256(weights).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    new = _digest(directory)
    card = directory / MODEL_CARD_FILE
    card.write_text(card.read_text().replace(old, new))
    return new


def test_export_prints_the_manifest_sha256_and_writes_it_into_the_model_card(pinned_export):
    out, printed = pinned_export
    digest = _digest(out)
    assert manifest_sha256(out) == digest
    assert f"manifest sha256 {digest}" in printed
    card = (out / MODEL_CARD_FILE).read_text()
    assert f"`manifest.json` sha256: `{digest}`" in card
    assert f'expect_manifest_sha256="{digest}"' in card and f"--expect-manifest-sha256 {digest}" in card
    # The card is still listed in (and checked against) the manifest it names.
    manifest = verify_export(out)
    assert MODEL_CARD_FILE in manifest["files"]


def test_a_pinned_load_refuses_an_export_whose_manifest_was_rewritten_naming_both_digests(export_copy, capsys):
    pinned = _digest(export_copy)
    assert Moderator.from_pretrained(export_copy, expect_manifest_sha256=pinned).threshold == THRESHOLD
    assert Moderator.from_pretrained(export_copy, expect_manifest_sha256=pinned.upper()).threshold == THRESHOLD
    assert export_main(["verify", str(export_copy), "--expect-manifest-sha256", pinned]) == 0
    assert "OK" in capsys.readouterr().out

    forged = _replace_the_weights_and_their_manifest_entry(export_copy)
    # Unpinned, the rewritten export is consistent with itself: that is why pinning exists.
    assert export_main(["verify", str(export_copy)]) == 0
    capsys.readouterr()
    with pytest.raises(ManifestError) as refused:
        Moderator.from_pretrained(export_copy, expect_manifest_sha256=pinned)
    message = str(refused.value)
    assert pinned in message and forged in message and "\n" not in message
    assert message.startswith(str(export_copy))

    assert export_main(["verify", str(export_copy), "--expect-manifest-sha256", pinned]) == 2
    stderr = capsys.readouterr().err
    assert pinned in stderr and forged in stderr


def test_a_card_that_names_another_manifest_or_was_edited_is_refused(export_copy):
    card = export_copy / MODEL_CARD_FILE
    text = card.read_text()
    card.write_text(text.replace(_digest(export_copy), "0" * 64))
    with pytest.raises(ManifestError, match=f"{MODEL_CARD_FILE} names manifest.json sha256 {'0' * 64}, but"):
        verify_export(export_copy)
    card.write_text(text.replace("## Intended use and limits", "## Use freely"))
    with pytest.raises(ManifestError, match=f"tampered file: {MODEL_CARD_FILE}"):
        verify_export(export_copy)
    card.write_text(text)
    assert verify_export(export_copy)


def test_a_malformed_pin_or_a_pin_without_verification_is_refused(export_copy, capsys):
    for bad in ("abc", "g" * 64, "0x" + "a" * 62):
        with pytest.raises(ModeratorConfigError, match="expect_manifest_sha256: expected 64 hex digits"):
            Moderator.from_pretrained(export_copy, expect_manifest_sha256=bad)
    with pytest.raises(ModeratorConfigError, match="expect_manifest_sha256 needs verify=True"):
        Moderator.from_pretrained(export_copy, verify=False, expect_manifest_sha256=_digest(export_copy))
    with pytest.raises(Exception, match="64 hex digits"):
        export_main(["verify", str(export_copy), "--expect-manifest-sha256", "abc"])
    assert re.fullmatch(r"[0-9a-f]{64}", manifest_sha256(export_copy))


def _hub_snapshot(export: Path, cache: Path, repo_id: str) -> Path:
    """``export`` laid out as the Hub cache does (files are links into the repo's blobs), offline."""
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(p for p in export.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(export)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def test_a_hub_export_is_verified_through_its_cache_links_and_can_be_pinned(pinned_export, tmp_path, monkeypatch):
    # A Hub snapshot's files link into the repo's blobs: followed there, refused anywhere else.
    import huggingface_hub.constants

    out, _ = pinned_export
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv(manifest_module.HASH_CACHE_ENV, "off")
    snapshot = _hub_snapshot(out, tmp_path / "hub", "safemt-tests/pinned")
    pinned = _digest(out)
    assert Moderator.from_pretrained("safemt-tests/pinned", expect_manifest_sha256=pinned).threshold == THRESHOLD
    with pytest.raises(ManifestError, match=f"but {'1' * 64} was pinned"):
        Moderator.from_pretrained("safemt-tests/pinned", expect_manifest_sha256="1" * 64)

    outside = tmp_path / "elsewhere.jinja"
    outside.write_text((out / "chat_template.jinja").read_text())
    (snapshot / "chat_template.jinja").unlink()
    (snapshot / "chat_template.jinja").symlink_to(outside)
    with pytest.raises(ManifestError, match="not a regular file: chat_template.jinja"):
        Moderator.from_pretrained("safemt-tests/pinned")

    bare = _hub_snapshot(out, tmp_path / "hub", "safemt-tests/no-manifest")
    (bare / MANIFEST_FILE).unlink()
    with pytest.raises(ManifestError, match="verify=False"):
        Moderator.from_pretrained("safemt-tests/no-manifest")
    assert Moderator.from_pretrained("safemt-tests/no-manifest", verify=False).threshold == THRESHOLD
