"""Shared fixtures: an offline tiny Qwen2.5-VL checkpoint and a SafeMT folder with generated images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "safemt_sample"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny checkpoint on disk, loaded by tests through ``from_pretrained``."""
    from moderator.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2_5_vl"))


@pytest.fixture
def safemt_dir(tmp_path) -> Path:
    """The repo's real SafeMT sample records, in the GitHub layout, with placeholder images."""
    from moderator.images import write_placeholder_images

    target = tmp_path / "safemt"
    target.mkdir()
    for path in SAMPLE_DIR.glob("*_turn.json"):
        shutil.copy(path, target / path.name)
    write_placeholder_images(target)
    return target
