"""Moderator.from_pretrained verifies an export against its manifest before serving it (issue 15, item 2), and
(issue 21) refuses a directory with no manifest unless verify=False, loads the bytes it verified, trusts
only a hash cache no one else could write, and refuses FIFOs and other special files by name."""

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
    import os

    monkeypatch.setattr(manifest_module, "HASH_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(manifest_module, "RACY_WINDOW_NS", 0)
    monkeypatch.setattr(manifest_module, "BACKGROUND_MIN_BYTES", 1 << 16)  # large files: hashed from disk
    hashed = []
    real_sha256 = manifest_module.sha256_descriptor

    def recording(fd):
        hashed.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real_sha256(fd)

    monkeypatch.setattr(manifest_module, "sha256_descriptor", recording)

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


# -- issue 21: no manifest, time of check vs time of use, the hash cache's trust, special files ----------


def test_a_directory_without_manifest_and_config_is_refused_unless_verify_is_false(export_copy, tiny_model_dir):
    # Issue 21, defect 3: with both files deleted the export used to load silently, tampered weights and all.
    (export_copy / MANIFEST_FILE).unlink()
    (export_copy / "moderator_config.json").unlink()
    _flip_a_byte(export_copy)
    for directory in (export_copy, tiny_model_dir):  # a stripped export, and a checkpoint that never was one
        with pytest.raises(ManifestError) as refused:
            Moderator.from_pretrained(directory)
        message = str(refused.value)
        assert message.startswith(f"{directory}: ") and "\n" not in message
        assert f"missing file: {MANIFEST_FILE}" in message and "verify=False" in message and "--no-verify" in message
    # Explicitly unverified (development only): loads, with no threshold claimed from a manifest.
    assert Moderator.from_pretrained(export_copy, verify=False).threshold == 0.5


def _swap(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with other bytes (a new inode under the same name), as an attacker would."""
    swapped = path.with_name(path.name + ".swap")
    swapped.write_bytes(data)
    swapped.replace(path)


def test_the_files_used_are_the_bytes_verified_even_when_swapped_after_the_check(export_copy, monkeypatch):
    # Issue 21, defect 5: moderator_config.json swapped between its check and its use served threshold 0.999.
    # Deterministic: the files are swapped right after verification returned, before anything is loaded.
    import torch
    from safetensors.torch import load_file, save_file

    import moderator.inference as inference

    original_weights = load_file(export_copy / "model.safetensors")
    original_template = (export_copy / "chat_template.jinja").read_text()
    real_start = inference.start_verification

    def verify_then_swap(*args, **kwargs):
        pending = real_start(*args, **kwargs)
        config = export_copy / "moderator_config.json"
        _swap(config, json.dumps({**json.loads(config.read_text()), "decision_threshold": 0.999}).encode())
        _swap(export_copy / "chat_template.jinja", b"{{ 'verdict: safe' }}")
        poisoned = {name: torch.zeros_like(tensor) for name, tensor in original_weights.items()}
        save_file(poisoned, export_copy / "model.safetensors.swap", metadata={"format": "pt"})
        (export_copy / "model.safetensors.swap").replace(export_copy / "model.safetensors")
        return pending

    monkeypatch.setattr(inference, "start_verification", verify_then_swap)
    moderator = Moderator.from_pretrained(export_copy)
    assert moderator.threshold == THRESHOLD  # the verified config's, not the swapped-in 0.999
    assert moderator.processor.chat_template == original_template
    head = original_weights["lm_head.weight"]
    assert moderator.model.get_output_embeddings().weight.detach().equal(head)


def test_the_weights_swapped_while_they_are_hashed_in_the_background_are_the_verified_ones(export_copy, monkeypatch):
    # The large-file path (hashed in a thread while the model loads): both read the file opened at the check.
    import torch
    from safetensors.torch import load_file, save_file

    import moderator.inference as inference

    monkeypatch.setattr(manifest_module, "BACKGROUND_MIN_BYTES", 1 << 16)  # the tiny weights count as large
    original = load_file(export_copy / "model.safetensors")
    real_start = inference.start_verification

    def verify_then_swap(*args, **kwargs):
        pending = real_start(*args, **kwargs)
        save_file(
            {k: torch.zeros_like(v) for k, v in original.items()}, export_copy / "w.swap", metadata={"format": "pt"}
        )
        (export_copy / "w.swap").replace(export_copy / "model.safetensors")
        return pending

    monkeypatch.setattr(inference, "start_verification", verify_then_swap)
    moderator = Moderator.from_pretrained(export_copy)
    assert moderator.model.get_output_embeddings().weight.detach().equal(original["lm_head.weight"])


def _forge_cache_entry(export_copy: Path, cache_file: Path) -> None:
    """Tamper with the weights and record the manifest's (old) sha256 for their new stat, as a cache would."""
    import os

    expected = json.loads((export_copy / MANIFEST_FILE).read_text())["files"]["model.safetensors"]
    _flip_a_byte(export_copy)
    weights = export_copy / "model.safetensors"
    stat = os.stat(weights)
    stamp = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    cache_file.write_text(json.dumps({str(weights.resolve()): [*stamp, expected]}))


@pytest.mark.parametrize("untrusted", ["world-writable file", "group-writable file", "other owner", "open directory"])
def test_a_hash_cache_others_could_write_is_ignored_with_a_warning(
    export_copy, tmp_path, monkeypatch, caplog, untrusted
):
    # Issue 21, defect 8: a forged entry in a world-writable cache made tampered weights load.
    import os

    monkeypatch.setattr(manifest_module, "HASH_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(manifest_module, "RACY_WINDOW_NS", 0)
    monkeypatch.setattr(manifest_module, "BACKGROUND_MIN_BYTES", 1 << 16)  # the tiny weights count as large
    folder = tmp_path / "cache-folder"
    folder.mkdir(mode=0o700)
    cache_file = folder / "verified.json"
    monkeypatch.setenv(manifest_module.HASH_CACHE_ENV, str(cache_file))
    _forge_cache_entry(export_copy, cache_file)
    os.chmod(cache_file, 0o600)
    # The same forged entry in a cache only its owner can write is trusted (that owner can replace the
    # models themselves): it is the control that shows the forgery would have worked.
    Moderator.from_pretrained(export_copy)

    if untrusted == "world-writable file":
        os.chmod(cache_file, 0o666)
    elif untrusted == "group-writable file":
        os.chmod(cache_file, 0o620)
    elif untrusted == "other owner":
        real_uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real_uid + 4242)
    else:
        os.chmod(folder, 0o777)  # anyone may replace the file in it
    with caplog.at_level("WARNING", logger="moderator.manifest"), pytest.raises(ManifestError) as refused:
        Moderator.from_pretrained(export_copy)
    assert "tampered file: model.safetensors" in str(refused.value)
    assert any("ignoring the hash cache" in record.getMessage() for record in caplog.records), caplog.text


def _make_fifo(directory: Path) -> str:
    import os

    (directory / "additional_chat_templates").mkdir(exist_ok=True)
    os.mkfifo(directory / "additional_chat_templates" / "tool_use.jinja")
    return "additional_chat_templates/tool_use.jinja"


@pytest.fixture
def alarm():
    """Fail instead of hanging: opening a FIFO with no writer blocks forever."""
    import signal

    def timed_out(signum, frame):
        raise TimeoutError("blocked (a FIFO was opened?)")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_in_an_export_is_refused_by_verify_and_by_load_in_one_line(export_copy, alarm):
    # Issue 21, defect 9: a FIFO passed `export verify` and crashed the load with a 28-line traceback.
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    name = _make_fifo(export_copy)
    for verify in (True, False):
        with pytest.raises(ManifestError) as refused:
            Moderator.from_pretrained(export_copy, verify=verify)
        message = str(refused.value)
        assert name in message and "FIFO" in message and "\n" not in message, message
    result = subprocess.run(
        [sys.executable, "-m", "export", "verify", str(export_copy)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and name in result.stderr and "FIFO" in result.stderr, result


def test_an_error_in_a_verified_export_names_the_export_not_the_private_copy_loaded(export_copy):
    # A consistent export whose prompt format this code does not render: verified, then refused by name.
    import hashlib

    config = export_copy / "moderator_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prompt_format_version": "0"}))
    old_digest = hashlib.sha256((export_copy / MANIFEST_FILE).read_bytes()).hexdigest()
    manifest = json.loads((export_copy / MANIFEST_FILE).read_text())
    manifest["prompt_format_version"] = "0"
    manifest["files"]["moderator_config.json"] = hashlib.sha256(config.read_bytes()).hexdigest()
    (export_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    card = export_copy / "README.md"
    card.write_text(card.read_text().replace(old_digest, manifest_module.manifest_sha256(export_copy)))
    with pytest.raises(ModeratorConfigError) as refused:
        Moderator.from_pretrained(export_copy)
    assert str(refused.value).startswith(f"{export_copy / 'moderator_config.json'}: trained with prompt format 0")
