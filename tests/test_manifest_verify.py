"""Moderator.from_pretrained verifies an export against its manifest before serving it (issue 15, item 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import moderator.manifest as manifest_module
from eval.config import ConfigError, DefenceConfig, EvalConfig, TargetConfig
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.inference import Moderator, ModeratorConfigError
from moderator.loading import ModelLoadError
from moderator.manifest import MANIFEST_FILE, ManifestError
from moderator.taxonomy import load_taxonomy
from tests.test_export import _flip_a_byte

THRESHOLD = 0.4


@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported by the real export stage (a full checkpoint; no equivalence check, for speed)."""
    from export.exporting import export, parse_export_args

    root = tmp_path_factory.mktemp("verify")
    checkpoint = root / "checkpoint"
    shutil.copytree(tiny_model_dir, checkpoint)
    record = {**load_taxonomy().provenance(), "prompt_format_version": PROMPT_FORMAT_VERSION, "config": {}}
    (checkpoint / "moderator_run.json").write_text(json.dumps(record))
    out = root / "export"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--equivalence-samples", "0"]
    assert export(parse_export_args([*argv, "--threshold", str(THRESHOLD)])) == out
    return out


@pytest.fixture
def export_copy(tiny_export, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(manifest_module.HASH_CACHE_ENV, str(tmp_path / "hash-cache.json"))
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    return copy


def _switch_the_moderator_off(directory: Path) -> str:
    path = directory / "moderator_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "decision_threshold": 0.999}))
    return "tampered file: moderator_config.json"


def _add_a_pickle(directory: Path) -> str:
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that runs code when loaded")
    return "pickle file: pytorch_model.bin"


def _delete_the_manifest(directory: Path) -> str:
    (directory / MANIFEST_FILE).unlink()
    return f"missing file: {MANIFEST_FILE}"


@pytest.mark.parametrize("tamper", [_flip_a_byte, _switch_the_moderator_off, _add_a_pickle, _delete_the_manifest])
def test_a_tampered_export_is_refused_with_one_line_naming_the_file(export_copy, tamper):
    assert Moderator.from_pretrained(export_copy).threshold == THRESHOLD  # intact: served
    expected = tamper(export_copy)
    with pytest.raises(ManifestError) as refused:
        Moderator.from_pretrained(export_copy)
    message = str(refused.value)
    assert expected in message and "\n" not in message
    assert message.startswith(f"{export_copy}: does not match its {MANIFEST_FILE}")


def test_weights_hashed_alongside_the_load_are_checked_before_the_moderator_is_handed_out(export_copy, monkeypatch):
    import moderator.inference as inference

    monkeypatch.setattr(manifest_module, "BACKGROUND_MIN_BYTES", 1 << 16)  # the tiny weights count as large
    loads = []
    real_load = inference.load_vlm
    monkeypatch.setattr(inference, "load_vlm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    _flip_a_byte(export_copy)
    with pytest.raises(ManifestError, match="tampered file: model.safetensors"):
        Moderator.from_pretrained(export_copy)
    assert len(loads) == 1  # loaded while its hash ran (safetensors runs no code), then refused


def test_verification_can_be_skipped_for_development_only_explicitly(export_copy):
    _switch_the_moderator_off(export_copy)
    assert Moderator.from_pretrained(export_copy, verify=False).threshold == 0.999


def test_thresholds_outside_zero_one_are_refused(export_copy):
    # 0 flags everything, 1 nothing: either switches the moderator off.
    with pytest.raises(ModeratorConfigError, match=r"threshold argument: decision threshold must be in \(0, 1\)"):
        Moderator.from_pretrained(export_copy, threshold=1.0)
    with pytest.raises(ConfigError, match=r"defences.0.threshold: a moderator threshold must be in \(0, 1\)"):
        EvalConfig(
            "s", [TargetConfig("t")], [DefenceConfig("moderator", model=str(export_copy), threshold=1.0)]
        ).validate()
    config = export_copy / "moderator_config.json"
    for bad in (0.0, 1.0, 1.5, "0.3"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "decision_threshold": bad}))
        with pytest.raises(ModeratorConfigError, match="moderator_config.json: field 'decision_threshold'"):
            Moderator.from_pretrained(export_copy, verify=False)


def test_a_remembered_hash_is_reused_only_while_the_file_is_unchanged(export_copy, monkeypatch):
    # The tiny weights are under the size worth caching and were just written: cache them anyway here.
    monkeypatch.setattr(manifest_module, "HASH_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(manifest_module, "RACY_WINDOW_NS", 0)
    hashed = []
    real_sha256 = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path.name) or real_sha256(path))

    Moderator.from_pretrained(export_copy)
    assert "model.safetensors" in hashed
    hashed.clear()
    Moderator.from_pretrained(export_copy)
    assert hashed == []  # unchanged files: nothing read twice

    _flip_a_byte(export_copy)  # same size, same inode: only mtime/ctime tell
    with pytest.raises(ManifestError, match="tampered file: model.safetensors"):
        Moderator.from_pretrained(export_copy)
    assert hashed == ["model.safetensors"]


def test_a_missing_model_is_one_line_naming_it(tmp_path):
    for name in (str(tmp_path / "nowhere"), "no-such-org/no-such-moderator"):  # offline: the hub is not asked
        with pytest.raises(ModelLoadError) as missing:
            Moderator.from_pretrained(name)
        assert str(missing.value).startswith(name) and "\n" not in str(missing.value)
