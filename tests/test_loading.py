"""The shared loader (moderator.loading): device, dtype, safetensors-only, padding and image bounds are
honoured through every public entry point: Moderator.from_pretrained, load_guard and load_target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eval.config import TargetConfig
from eval.guards import load_guard
from eval.targets import load_target
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.images import DEFAULT_MAX_PIXELS, ImageBounds, bound_image_pixels, supports_pixel_bounds
from moderator.inference import Moderator
from moderator.loading import ModelLoadError, load_vlm, resolve_device, resolve_dtype
from moderator.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def tiny_text_guard_dir(tmp_path_factory) -> Path:
    from tiny_models.guards import build_tiny_llama3_text

    return build_tiny_llama3_text(tmp_path_factory.mktemp("tiny-llama3-text"))


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny moderator saved in bfloat16, as the real 7B checkpoints are."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("tiny-bf16") / "model"
    shutil.copytree(tiny_model_dir, out)
    AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(out)
    return out


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def test_requested_dtype_and_the_cpu_default_hold_for_moderator_target_and_guard(bf16_checkpoint, tiny_text_guard_dir):
    # Asked for bfloat16 on the CPU: every loader gives bfloat16.
    assert (
        _param_dtype(Moderator.from_pretrained(bf16_checkpoint, dtype="bfloat16", verify=False).model) == torch.bfloat16
    )
    target = load_target(TargetConfig(model=str(bf16_checkpoint), dtype="bfloat16"))
    assert _param_dtype(target.model) == torch.bfloat16
    guard = load_guard("llama_guard_3_text", tiny_text_guard_dir, dtype="bfloat16")
    assert _param_dtype(guard.model) == torch.bfloat16
    # Not asked: float32 on the CPU, whatever the checkpoint was saved in (bf16 matmuls crawl on CPUs).
    assert _param_dtype(Moderator.from_pretrained(bf16_checkpoint, verify=False).model) == torch.float32
    assert _param_dtype(load_target(TargetConfig(model=str(bf16_checkpoint))).model) == torch.float32
    # "auto" is the checkpoint's own dtype.
    assert _param_dtype(Moderator.from_pretrained(bf16_checkpoint, dtype="auto", verify=False).model) == torch.bfloat16


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch believes a GPU is present; moves to a CUDA device are recorded and skipped (none exists here)."""
    moves: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    original_to = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, str | torch.device) and str(target).startswith("cuda"):
            moves.append(str(target))
            return self
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    return moves


def test_cuda_is_used_when_present_and_an_explicit_device_always_wins(fake_cuda, tiny_model_dir, tiny_text_guard_dir):
    moderator = Moderator.from_pretrained(tiny_model_dir, verify=False)
    assert fake_cuda == ["cuda"] and _param_dtype(moderator.model) == torch.bfloat16  # GPU default: bf16
    load_target(TargetConfig(model=str(tiny_model_dir)))
    load_guard("llama_guard_3_text", tiny_text_guard_dir)
    assert fake_cuda == ["cuda"] * 3

    fake_cuda.clear()
    moderator = Moderator.from_pretrained(tiny_model_dir, device="cuda:1", dtype="float32", verify=False)
    load_target(TargetConfig(model=str(tiny_model_dir), device="cuda:1"))
    load_guard("llama_guard_3_text", tiny_text_guard_dir, device="cuda:1")
    assert fake_cuda == ["cuda:1"] * 3 and _param_dtype(moderator.model) == torch.float32

    fake_cuda.clear()
    moderator = Moderator.from_pretrained(tiny_model_dir, device="cpu", verify=False)
    assert fake_cuda == [] and moderator.model.device.type == "cpu" and _param_dtype(moderator.model) == torch.float32


def test_device_auto_spreads_with_device_map_instead_of_moving(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    seen = {}
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.update(kwargs)
        kwargs.pop("device_map")  # accelerate would place it on the only device here anyway
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(recording))
    load_vlm(tiny_model_dir, device="auto")
    assert seen["device_map"] == "auto" and seen["use_safetensors"] is True


def test_bad_devices_and_dtypes_are_refused_by_name():
    with pytest.raises(ModelLoadError, match="'gpu0': not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_a_model_larger_than_the_gpu_is_refused_before_the_copy(fake_cuda, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 80 * 2**30))
    with pytest.raises(ModelLoadError, match="pass device='auto'"):
        Moderator.from_pretrained(tiny_model_dir, verify=False)
    assert fake_cuda == []


def test_adapters_and_checkpoints_load_from_safetensors_only(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny_model_dir), "r": 2})
    )
    (adapter / "adapter_model.bin").write_bytes(b"pickle")  # PEFT would torch.load this
    with pytest.raises(ModelLoadError, match=r"adapter_model.safetensors: missing \(found \['adapter_model.bin'\]\)"):
        Moderator.from_pretrained(adapter, verify=False)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickled weights only"):
        load_target(TargetConfig(model=str(pickled)))


def test_targets_guards_and_the_moderator_get_their_pixel_bounds(tiny_model_dir, tmp_path):
    from eval.guards.base import GenerativeGuard

    def longest_edge(processor) -> int:
        return processor.image_processor.size["longest_edge"]

    assert longest_edge(load_target(TargetConfig(model=str(tiny_model_dir))).processor) == DEFAULT_MAX_PIXELS
    configured = load_target(TargetConfig(model=str(tiny_model_dir), min_pixels=784, max_pixels=3136))
    assert configured.processor.image_processor.size == {"shortest_edge": 784, "longest_edge": 3136}

    class QwenStyleGuard(GenerativeGuard):  # a guard whose processor has a pixel budget
        kind = "qwen_style"

        def build_inputs(self, dialogue, images):
            raise NotImplementedError

        def parse(self, output):
            raise NotImplementedError

    assert longest_edge(QwenStyleGuard.from_pretrained(tiny_model_dir).processor) == DEFAULT_MAX_PIXELS
    assert longest_edge(QwenStyleGuard.from_pretrained(tiny_model_dir, max_pixels=6272).processor) == 6272

    # The moderator is served with the bounds it was trained with, as training recorded them.
    run = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, run)
    record = {
        **load_taxonomy().provenance(),
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "image_bounds": {"min_pixels": 784, "max_pixels": 3136},  # a field of its own, whatever the config class
    }
    (run / "moderator_run.json").write_text(json.dumps(record))
    assert Moderator.from_pretrained(run, verify=False).processor.image_processor.size == {
        "shortest_edge": 784,
        "longest_edge": 3136,
    }
    bounds = ImageBounds(784, 6272)
    assert longest_edge(Moderator.from_pretrained(run, image_bounds=bounds, verify=False).processor) == 6272


def test_pixel_bounds_touch_only_processors_that_resize_to_a_pixel_budget():
    from transformers import CLIPImageProcessor, MllamaImageProcessor

    for image_processor in (MllamaImageProcessor(), CLIPImageProcessor()):
        processor = SimpleNamespace(image_processor=image_processor)
        before = dict(image_processor.size)
        assert not supports_pixel_bounds(processor)
        with pytest.raises(ValueError, match="does not resize images into a pixel budget"):
            bound_image_pixels(processor, None, DEFAULT_MAX_PIXELS)  # CLIP's shortest_edge is an edge length
        assert dict(image_processor.size) == before
