"""``bench/gpu_check.py``: its CPU dry run (the GPU check's code path, tiny model) and its MFU peak table."""

from __future__ import annotations

import json

import pytest
import yaml

from bench.gpu_check import RECIPE, bf16_peak_tflops, main


@pytest.fixture(scope="module")
def dry_run(tiny_model_dir, tmp_path_factory):
    """One small CPU dry run; the moderator is requested in bf16 although its checkpoint is saved in fp32."""
    out = tmp_path_factory.mktemp("gpu_check")
    argv = ["--cpu-dry-run", "--out", str(out), "--tiny-model", str(tiny_model_dir), "--peak-tflops", "1"]
    argv += ["--serve-dtype", "bfloat16", "--dialogues", "4", "--serve-batch", "2", "--max-new-tokens", "4"]
    rc = main(argv)
    return rc, out, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_reports_training_figures_from_the_recipe(dry_run):
    rc, out, payload = dry_run
    assert rc == 0
    figures = payload["figures"]
    names = {row["name"] for row in payload["rows"]}
    for name in ("step time (s, median)", "real tokens/s", "peak memory (GiB)", "MFU", "dialogues/s"):
        assert name in names
    assert figures["mode"] == "cpu dry run"
    assert figures["steps"] == 1 and figures["step_time_s"] > 0
    assert figures["real_tokens_per_s"] > 0
    assert 0 <= figures["pad_fraction"] < 1
    assert figures["train_peak_memory_gb"] > 0
    # MFU against the peak given: achieved TFLOP/s divided by 1 TFLOP/s, not a constant.
    assert figures["mfu"] == pytest.approx(figures["achieved_tflops"]) and figures["mfu"] > 0
    # Only LoRA trains: the frozen base and vision tower count in the FLOPs, not in the trainable set.
    assert 0 < figures["n_trainable_params"] < figures["n_text_params"] and figures["n_vision_params"] > 0
    # LoRA, checkpointing, attention and batch shape come from the 7B recipe, not from defaults.
    recipe = yaml.safe_load(RECIPE.read_text())
    assert figures["lora_r"] == recipe["lora_r"] and figures["lora_alpha"] == recipe["lora_alpha"]
    assert figures["gradient_checkpointing"] is recipe["activation_checkpointing"]
    assert figures["attn_implementation"] == recipe["attn_implementation"]
    assert figures["per_device_train_batch_size"] == recipe["per_device_train_batch_size"]
    assert figures["gradient_accumulation_steps"] == recipe["gradient_accumulation_steps"]
    assert figures["bf16"] is False  # the one precision override CPU needs
    markdown = (out / "gpu_check.md").read_text()
    assert "| train | real tokens/s |" in markdown and "6 * N_text * real_tokens" in markdown


def test_dry_run_moderator_loads_on_the_requested_device_and_dtype(dry_run):
    rc, _, payload = dry_run
    figures = payload["figures"]
    assert figures["requested_device"] == "cpu" and figures["moderator_device"] == "cpu"
    # Saved in float32; bfloat16 was asked for through Moderator.from_pretrained(..., dtype=...).
    assert figures["requested_dtype"] == "torch.bfloat16" and figures["moderator_dtype"] == "torch.bfloat16"
    assert figures["placement_ok"] is True
    assert figures["dialogues"] == 4 and figures["dialogues_per_s"] > 0


@pytest.mark.parametrize(
    ("device_name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0),  # must not match the SXM entry first
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", None),  # unknown: MFU is n/a unless --peak-tflops is given
    ],
)
def test_bf16_peak_by_device_name(device_name, peak):
    assert bf16_peak_tflops(device_name) == peak


def test_without_cuda_and_without_dry_run_it_refuses_with_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
