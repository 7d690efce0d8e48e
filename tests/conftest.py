"""Shared fixtures: an offline tiny Qwen2.5-VL checkpoint and a SafeMT folder with generated images."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"  # test servers listen on loopback only
SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "safemt_sample"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny checkpoint on disk, loaded by tests through ``from_pretrained``."""
    from tiny_models.moderator import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2_5_vl"))


def copy_sample_with_images(target: Path) -> Path:
    """``target``: the repo's real SafeMT sample records, in the GitHub layout, with placeholder images."""
    from tiny_models.images import write_placeholder_images

    target.mkdir()
    for path in SAMPLE_DIR.glob("*_turn.json"):
        shutil.copy(path, target / path.name)
    write_placeholder_images(target)
    return target


@pytest.fixture
def safemt_dir(tmp_path) -> Path:
    """The repo's real SafeMT sample records, in the GitHub layout, with placeholder images."""
    return copy_sample_with_images(tmp_path / "safemt")


@pytest.fixture(scope="session")
def prepared_data_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The demo data recipe run on the real sample records: the dataset the trainer reads."""
    from data_prep.build import main as build_data

    root = tmp_path_factory.mktemp("prepared")
    safemt = copy_sample_with_images(root / "safemt")
    out = root / "data"
    argv = ["--config", str(REPO_ROOT / "configs/data/demo.yaml"), "--safemt", str(safemt), "--out", str(out)]
    argv += ["--benign", str(REPO_ROOT / "tests/data/benign_sample.jsonl"), "--processor", str(tiny_model_dir)]
    assert build_data(argv) == 0
    return out


def tiny_recipe_args(model_dir: Path, data_dir: Path, output_dir: Path, *overrides: str) -> list[str]:
    """Command-line arguments running the tiny CPU recipe on test paths."""
    return [
        "--config",
        str(REPO_ROOT / "configs/sft/tiny_cpu.yaml"),
        "--model_name_or_path",
        str(model_dir),
        "--dataset_path",
        str(data_dir),
        "--output_dir",
        str(output_dir),
        *overrides,
    ]


# -- an OpenAI-compatible server on loopback: `transformers serve` with the tiny model --------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _wait_for_health(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s} s")


@pytest.fixture(scope="session")
def served_model(tiny_model_dir, tmp_path_factory):
    """``transformers serve`` on a loopback port with the tiny model; killed after the session."""
    port = _free_port()
    hub_cache = tmp_path_factory.mktemp("hf-hub-cache")  # /v1/models needs an existing cache dir
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    cli = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    cmd = [str(cli), "serve", str(tiny_model_dir), "--host", LOOPBACK, "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{port}"
    try:
        _wait_for_health(url, process, timeout_s=90)
        yield f"{url}/v1", str(tiny_model_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.fixture(autouse=True)
def _fresh_wandb_per_test():
    """Reset wandb after a test that used it: its settings singleton would keep that test's WANDB_DIR
    for every later run in this process, and WANDB_SERVICE would attach child processes to it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
