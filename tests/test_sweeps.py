"""W&B sweep files: they search real training fields, optimise a metric the trainer logs, and the
command a W&B agent builds from them trains the named recipe with the sampled values.

The agent's command is expanded with wandb's own helpers (as ``wandb agent`` does) and run under bash
with a stand-in ``accelerate`` that records its arguments, which are then parsed by the real TrlParser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers.integrations.integration_utils import rewrite_logs
from trl import ModelConfig, SFTConfig, TrlParser
from wandb.sdk.launch.sweeps import utils as sweep_utils

from tests.conftest import REPO_ROOT
from train.config import ModeratorScriptArguments
from train.preflight import training_image_bounds
from train.trainer import moderation_metrics

SWEEPS = sorted((REPO_ROOT / "configs" / "sweeps").glob("*.yaml"))
TRAINING_CLASSES = (ModeratorScriptArguments, SFTConfig, ModelConfig)
TRAINING_FIELDS = {field.name for cls in TRAINING_CLASSES for field in dataclasses.fields(cls)}
TIMEOUT = 60

# Records its arguments as JSON in $FAKE_LOG.
FAKE_ACCELERATE = """#!{python}
import json, os, sys
open(os.environ["FAKE_LOG"], "w").write(json.dumps(sys.argv[1:]))
"""


def load(sweep: Path) -> dict[str, Any]:
    return yaml.safe_load(sweep.read_text())


def parse_training_args(args: list[str]):
    # bf16 is refused at parse time on a machine without a GPU.
    return TrlParser(TRAINING_CLASSES).parse_args_and_config(args=[*args, "--bf16", "false"])


def sample_points(parameters: dict[str, dict], seed: int, n_random: int = 2) -> list[dict[str, Any]]:
    """Points of the search space, as W&B's search would pick them: both ends of every range, then random."""

    def pick(spec: dict, how: str, rng: random.Random) -> Any:
        if "value" in spec:
            return spec["value"]
        if "values" in spec:
            values = spec["values"]
            return values[0] if how == "low" else values[-1] if how == "high" else rng.choice(values)
        low, high = spec["min"], spec["max"]
        if how != "random":
            return low if how == "low" else high
        distribution = spec.get("distribution", "int_uniform" if isinstance(low, int) else "uniform")
        if distribution == "log_uniform_values":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if distribution == "int_uniform":
            return rng.randint(low, high)
        if distribution == "uniform":
            return rng.uniform(low, high)
        raise AssertionError(f"no sampler for distribution {distribution!r}: extend sample_points")

    rng = random.Random(seed)
    hows = ["low", "high"] + ["random"] * n_random
    return [{name: pick(spec, how, rng) for name, spec in parameters.items()} for how in hows]


def agent_command(config: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` runs for one sampled point (mirrors wandb_agent.Agent._command_run)."""
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    sweep_vars.update(env=["/usr/bin/env"], interpreter=["python"], program=[config["program"]])
    command: list[str] = []
    for item in sweep_utils.create_sweep_command(config["command"]):
        if item.startswith("${") and item.endswith("}"):
            command += sweep_vars.get(item[2:-1]) or []
        else:
            command.append(item)
    return command


def run_trial(command: list[str], tmp_path: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "accelerate").write_text(FAKE_ACCELERATE.format(python=sys.executable))
    (bin_dir / "accelerate").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(tmp_path / "accelerate.json")}
    return subprocess.run(
        command, cwd=REPO_ROOT, env={**env, **extra_env}, capture_output=True, text=True, timeout=TIMEOUT
    )


def test_the_documented_sweeps_exist():
    assert {"qwen2_5_vl_7b_lora", "tiny_cpu"} <= {sweep.stem for sweep in SWEEPS}


@pytest.mark.parametrize("sweep", SWEEPS, ids=[s.stem for s in SWEEPS])
def test_sweep_searches_real_training_fields(sweep):
    config = load(sweep)
    assert config["method"] == "bayes"
    parameters = config["parameters"]
    assert not sorted(set(parameters) - TRAINING_FIELDS), "not a field of the training dataclasses"
    assert {"learning_rate", "lora_r", "lora_alpha", "lora_dropout", "max_pixels"} <= set(parameters)
    assert {"num_train_epochs", "max_steps"} & set(parameters)  # how long to train
    for name, spec in parameters.items():
        assert spec.get("values") or spec["min"] < spec["max"], f"{sweep.name}: {name} searches nothing"


@pytest.mark.parametrize("sweep", SWEEPS, ids=[s.stem for s in SWEEPS])
def test_sweep_metric_is_the_unsafe_auprc_the_trainer_logs(sweep):
    metric = load(sweep)["metric"]
    # Ranked by P(unsafe): unsafe, safe, unsafe, unsafe, safe. Precision at each unsafe hit: 1, 2/3, 3/4,
    # each over a third of the recall: AUPRC = (1 + 2/3 + 3/4) / 3 = 29/36 (F1 at 0.5 would be 4/5).
    labels = ["unsafe", "safe", "unsafe", "unsafe", "safe"]
    scores = [0.9, 0.8, 0.7, 0.2, 0.1]
    logged = rewrite_logs(moderation_metrics(labels, scores, threshold=0.5))  # names as W&B records them
    assert metric["name"] in logged, f"{sweep.name}: {metric['name']} is never logged; logged: {sorted(logged)}"
    assert logged[metric["name"]] == pytest.approx(29 / 36)
    assert metric["goal"] == "maximize"


# The data each sweep's recipe trains on, and the processor default that stands for a bound data prep left unset.
SWEEP_DATA = {"qwen2_5_vl_7b_lora": "configs/data/safemt.yaml", "tiny_cpu": "configs/data/demo.yaml"}


@pytest.mark.parametrize("sweep", SWEEPS, ids=[s.stem for s in SWEEPS])
def test_sweep_stays_within_the_pixel_bounds_the_data_lengths_were_checked_at(sweep):
    from tiny_models.moderator import MAX_PIXELS as TINY_MAX_PIXELS
    from tiny_models.moderator import MIN_PIXELS as TINY_MIN_PIXELS

    data = yaml.safe_load((REPO_ROOT / SWEEP_DATA[sweep.stem]).read_text())
    # What data prep writes to stats.json "tokens" for this config.
    stats = {"tokens": {"min_pixels": data.get("min_pixels"), "max_pixels": data.get("max_pixels")}}
    default = (TINY_MIN_PIXELS, TINY_MAX_PIXELS) if data["processor"] == "runs/demo/base" else (None, None)
    assert stats["tokens"]["max_pixels"] or default[1], f"{sweep.stem}: no bound to check against"
    for max_pixels in load(sweep)["parameters"]["max_pixels"]["values"]:
        training_image_bounds(SWEEP_DATA[sweep.stem], stats, (data.get("min_pixels"), max_pixels), default)


@pytest.mark.parametrize("sweep", SWEEPS, ids=[s.stem for s in SWEEPS])
def test_agent_command_trains_the_recipe_with_the_sampled_values(sweep, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    config = load(sweep)
    assert config["program"] == "train/sft.py"
    points = sample_points(config["parameters"], seed=len(sweep.stem))
    for run, point in enumerate(points):
        runs_dir = tmp_path / "sweeps"
        trial = run_trial(
            agent_command(config, point),
            tmp_path,
            {"WANDB_SWEEP_ID": "swp1", "WANDB_RUN_ID": f"run{run}", "SWEEP_RUNS_DIR": str(runs_dir)},
        )
        assert trial.returncode == 0, trial.stderr
        argv = json.loads((tmp_path / "accelerate.json").read_text())
        assert argv[:2] == ["launch", "--config_file"] and (REPO_ROOT / argv[2]).is_file()
        script = argv.index(config["program"])
        assert (REPO_ROOT / argv[script]).is_file()
        train_args = argv[script + 1 :]
        assert train_args[0] == "--config" and (REPO_ROOT / train_args[1]).is_file(), train_args[:2]
        assert sum(arg.startswith("--") and "=" in arg for arg in train_args) == len(point)  # W&B's --key=value

        if argv[2] == "configs/accelerate/cpu_zero3_2proc.yaml":
            # Two CPU processes need gloo, or accelerate and DeepSpeed disagree on the world size. It can
            # only be parsed inside a launched process group, so it is checked here and left out below.
            at = train_args.index("--ddp_backend")
            assert train_args[at + 1] == "gloo"
            train_args = train_args[:at] + train_args[at + 2 :]
        parsed = parse_training_args(train_args)
        for name, value in point.items():
            owner = next(obj for obj in parsed if hasattr(obj, name))
            assert getattr(owner, name) == pytest.approx(value), f"{sweep.name}: --{name} did not reach training"
        training_args = parsed[1]
        # Every trial has its own output_dir: training resumes from whatever checkpoint it finds there.
        assert Path(training_args.output_dir) == runs_dir / "swp1" / f"run{run}"
        assert training_args.run_name == f"run{run}"
        assert "wandb" in training_args.report_to  # the sweep reads its metric from W&B

    # The values really override the recipe: each parameter takes a value the recipe does not have.
    recipe = parse_training_args(["--config", train_args[1]])
    for name in config["parameters"]:
        owner = next(obj for obj in recipe if hasattr(obj, name))
        assert any(point[name] != getattr(owner, name) for point in points), name
    # The recipe keeps its best checkpoint by the metric the sweep maximises.
    assert f"eval/{recipe[1].metric_for_best_model}" == config["metric"]["name"] and recipe[1].greater_is_better


def test_trial_outside_an_agent_fails_before_training(tmp_path):
    config = load(REPO_ROOT / "configs" / "sweeps" / "tiny_cpu.yaml")
    point = sample_points(config["parameters"], seed=0)[0]
    trial = run_trial(agent_command(config, point), tmp_path, {})  # no WANDB_SWEEP_ID / WANDB_RUN_ID
    assert trial.returncode != 0
    assert "run this through wandb agent" in trial.stderr
    assert not (tmp_path / "accelerate.json").exists()


@pytest.mark.slow
def test_tiny_sweep_trial_trains_and_reports_the_sweep_metric_to_wandb(tiny_model_dir, prepared_data_dir, tmp_path):
    """One real trial of the CPU sweep: the agent's command under accelerate (2-process ZeRO-3), W&B offline."""
    from tests.wandb_offline import read_offline_run

    config = load(REPO_ROOT / "configs" / "sweeps" / "tiny_cpu.yaml")
    point = sample_points(config["parameters"], seed=0)[0]
    # Shortened, and pointed at the test's tiny model and data: any --key=value reaches training alike.
    point |= {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "moderation_eval_samples": 2}
    point |= {"model_name_or_path": str(tiny_model_dir), "dataset_path": str(prepared_data_dir)}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the real accelerate
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SWEEP_ID": "swp1",
        "WANDB_RUN_ID": "trial1",
        "SWEEP_RUNS_DIR": str(tmp_path / "sweeps"),
        "DS_ACCELERATOR": "cpu",
    }
    # An earlier in-process wandb.init exports WANDB_SERVICE; a child attached to that service has its
    # run file flushed asynchronously by the parent. The trial gets its own service, as under an agent.
    env.pop("WANDB_SERVICE", None)
    result = subprocess.run(
        agent_command(config, point), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    output_dir = tmp_path / "sweeps" / "swp1" / "trial1"
    assert (output_dir / "adapter_model.safetensors").exists()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-trial1")  # the run id the agent chose
    recorded = read_offline_run(run_dir)
    logged = {key for row in recorded["history"] for key in row}
    assert config["metric"]["name"] in logged, sorted(logged)
    assert recorded["config"]["learning_rate"] == pytest.approx(point["learning_rate"])
