"""Cluster launchers: the exact accelerate command each node runs, and the scripts that run it.

The scripts run for real under bash, with stand-ins for Slurm's srun/scontrol/sbatch, accelerate and
wandb on PATH (recording what they were given), so no cluster, GPU or network is needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.commands import (
    LaunchError,
    expand_hostlist,
    hostnames,
    local_gpu_count,
    slurm_env_to_command,
    torchrun_env_to_command,
)
from tests.conftest import REPO_ROOT

TIMEOUT = 60  # every subprocess here is bounded
LAUNCH = REPO_ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
# Allocation of 2 nodes x 8 GPUs, seen from the task on the second node.
TWO_NODES = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "SLURM_NODEID": "1",
    "SLURM_GPUS_ON_NODE": "8",
}
EXPECTED_NODE_1 = [
    "accelerate", "launch",
    "--config_file", "configs/accelerate/zero3_multinode.yaml",
    "--num_machines", "2",
    "--num_processes", "16",
    "--machine_rank", "1",
    "--main_process_ip", "gpu-07",
    "--main_process_port", "29500",
    "train/sft.py", "--config", "configs/sft/qwen2_5_vl_7b_lora.yaml",
    "--learning_rate", "5e-5",
]  # fmt: skip

# Records its argv (JSON) and TORCH_ELASTIC_SHUTDOWN_TIMEOUT in $FAKE_LOG; on SIGTERM writes
# $FAKE_LOG.term and exits 143 like train/sft.py; sleeps $FAKE_SLEEP seconds (default 0).
FAKE_ACCELERATE = """#!{python}
import json, os, signal, sys, time
log = os.environ["FAKE_LOG"]
def stop(*_):
    open(log + ".term", "w").write("TERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
record = {{"argv": sys.argv[1:], "shutdown_timeout": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}}
open(log + ".tmp", "w").write(json.dumps(record))
os.replace(log + ".tmp", log)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""
# Appends its argv to $FAKE_DIR/<name>.log, then behaves like the real tool where the script needs it.
RECORDER = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/{name}.log"
{body}
"""
FAKE_BODIES = {
    # srun: drop its options, run the task here (one node stands in for all).
    "srun": 'while [[ $# -gt 0 && "$1" == -* ]]; do shift; done\nexec "$@"',
    "scontrol": 'if [[ "$1 $2" == "show hostnames" ]]; then printf "gpu-07\\ngpu-08\\n"; fi',
    "sbatch": "echo 'Submitted batch job 77'",
    "wandb": (
        'if [[ "$1" == sweep ]]; then\n'
        "  printf 'wandb: Creating sweep from: x\\nwandb: Creating sweep with ID: \\033[33mabc123\\033[0m\\n' >&2\n"
        "  printf 'wandb: Run sweep agent with: \\033[33mwandb agent me/proj/abc123\\033[0m\\n' >&2\n"
        "fi"
    ),
}


def fake_bin(tmp_path: Path, *names: str) -> Path:
    """A folder of stand-in programs (accelerate and any of FAKE_BODIES)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        text = FAKE_ACCELERATE.format(python=sys.executable) if name == "accelerate" else None
        text = text or RECORDER.format(name=name, body=FAKE_BODIES[name])
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def script_env(tmp_path: Path, extra: dict[str, str], bin_dir: Path | None = None) -> dict[str, str]:
    # VENV="" skips activating .venv, which would put the real accelerate/wandb ahead of the stand-ins.
    path = [str(bin_dir)] if bin_dir else []
    path += [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    return {
        "PATH": os.pathsep.join(path),
        "HOME": str(tmp_path),
        "VENV": "",
        "PYTHON": sys.executable,
        "FAKE_DIR": str(tmp_path),
        "FAKE_LOG": str(tmp_path / "accelerate.json"),
        **extra,
    }


def run_script(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def fake_log(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / f"{name}.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch):
    """Hide any scontrol so that the fallback host-list parser is what runs."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


# --- host lists ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu-[07-08]", ["gpu-07", "gpu-08"]),
        ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("gpu-[09-11],login1", ["gpu-09", "gpu-10", "gpu-11", "login1"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("solo", ["solo"]),
    ],
)
def test_fallback_parser_expands_slurm_host_lists(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "problem"),
    [
        ("gpu-[08-07]", "runs backwards"),
        ("gpu-[07-08", "unbalanced"),
        ("gpu-07]", "unbalanced"),
        ("n[1-9:2]", "unsupported range"),
        ("a,,b", "empty item"),
    ],
)
def test_fallback_parser_refuses_what_it_cannot_read(nodelist, problem):
    with pytest.raises(LaunchError, match=re.escape(problem)) as info:
        expand_hostlist(nodelist)
    assert repr(nodelist) in str(info.value)


def test_scontrol_is_used_when_present(tmp_path, monkeypatch):
    bin_dir = fake_bin(tmp_path, "scontrol")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    assert hostnames("gpu-[07-08],weird{syntax}") == ["gpu-07", "gpu-08"]  # scontrol's answer, not ours
    assert fake_log(tmp_path, "scontrol") == ["show hostnames gpu-[07-08],weird{syntax}"]


# --- the command for one node ------------------------------------------------------------------


def test_two_nodes_of_eight_gpus_give_the_second_node_its_command(no_scontrol):
    assert slurm_env_to_command(TWO_NODES, extra_args=["--learning_rate", "5e-5"]) == EXPECTED_NODE_1
    first = slurm_env_to_command({**TWO_NODES, "SLURM_NODEID": "0"})
    assert first[first.index("--machine_rank") + 1] == "0"
    assert first[first.index("--main_process_ip") + 1] == "gpu-07"  # node 0 hosts the main process


@pytest.mark.parametrize(
    ("gpu_vars", "gpus"),
    [
        ({"SLURM_GPUS_PER_NODE": "h100:4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "a100:2,v100:1"}, 3),
        ({"SLURM_GPUS_PER_NODE": "4"}, 4),
        ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2),
        ({"GPUS_PER_NODE": "6", "SLURM_GPUS_ON_NODE": "8"}, 6),  # explicit override wins
    ],
)
def test_gpus_per_node_come_from_any_slurm_variable(no_scontrol, gpu_vars, gpus):
    env = {k: v for k, v in TWO_NODES.items() if k != "SLURM_GPUS_ON_NODE"} | gpu_vars
    command = slurm_env_to_command(env)
    assert command[command.index("--num_processes") + 1] == str(2 * gpus)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_NNODES": None}, "SLURM_NNODES is not set"),
        ({"SLURM_NNODES": "two"}, "SLURM_NNODES='two' is not an integer"),
        ({"SLURM_JOB_NODELIST": "gpu-[07-09]"}, "names 3 hosts but SLURM_NNODES=2"),
        ({"SLURM_NODEID": "2"}, "machine rank 2 is outside 0..1"),
        ({"SLURM_GPUS_ON_NODE": None}, "--gpus-per-node"),
        ({"MAIN_PROCESS_PORT": "70000"}, "70000 is not a TCP port"),
    ],
)
def test_bad_slurm_environment_is_refused_naming_the_variable(no_scontrol, change, message):
    env = {k: v for k, v in {**TWO_NODES, **change}.items() if v is not None}  # None: unset
    with pytest.raises(LaunchError, match=re.escape(message)):
        slurm_env_to_command(env)


def test_torchrun_variables_give_the_same_command():
    env = {"MASTER_ADDR": "gpu-07", "NNODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "8"}
    assert torchrun_env_to_command(env, extra_args=["--learning_rate", "5e-5"]) == EXPECTED_NODE_1
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        torchrun_env_to_command({"NNODES": "2", "GPUS_PER_NODE": "8"})


def test_gpu_count_without_any_source_is_an_error(no_scontrol):
    assert local_gpu_count({"CUDA_VISIBLE_DEVICES": "3,5"}) == 2
    with pytest.raises(LaunchError, match="set GPUS_PER_NODE"):
        local_gpu_count({})  # no GPUS_PER_NODE, CUDA_VISIBLE_DEVICES or nvidia-smi


# --- the scripts -------------------------------------------------------------------------------


def test_launch_scripts_are_valid_bash():
    names = {path.relative_to(LAUNCH).as_posix() for path in SCRIPTS}
    assert {"sweep.sh", "multinode.sh", "slurm/sft.sbatch", "slurm/eval.sbatch", "slurm/sweep_agent.sbatch"} <= names
    for path in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, f"{path}: {result.stderr}"


def sbatch_directives(script: Path) -> dict[str, str]:
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script.read_text(), flags=re.M)
    return {name: value for name, value in found}


def test_sft_sbatch_asks_for_one_task_per_node_and_a_warning_before_the_time_limit():
    script = LAUNCH / "slurm" / "sft.sbatch"
    directives = sbatch_directives(script)
    assert directives["ntasks-per-node"] == "1"
    assert int(directives["nodes"]) >= 2 and int(directives["gpus-per-node"]) >= 1
    assert "requeue" in directives
    warning = re.fullmatch(r"B:TERM@(\d+)", directives["signal"])
    assert warning, directives["signal"]  # to the batch shell, which forwards it and requeues
    # The workers must be done (or killed) before Slurm's own kill at the time limit.
    grace = re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", script.read_text())
    assert grace and int(grace.group(1)) < int(warning.group(1))


def test_sft_sbatch_dry_run_prints_what_python_builds(tmp_path, no_scontrol):
    result = run_script(
        "launch/slurm/sft.sbatch",
        ["--learning_rate", "5e-5"],
        script_env(tmp_path, {**TWO_NODES, "LAUNCH_DRY_RUN": "1"}),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shlex.join(slurm_env_to_command(TWO_NODES, extra_args=["--learning_rate", "5e-5"]))
    assert shlex.split(result.stdout) == EXPECTED_NODE_1


def test_sft_sbatch_recipe_config_and_port_come_from_the_environment(tmp_path):
    overrides = {
        "RECIPE": "configs/sft/qwen2_vl_2b_full.yaml",
        "ACCELERATE_CONFIG": "configs/accelerate/zero2_multinode.yaml",
        "MAIN_PROCESS_PORT": "29611",
        "LAUNCH_DRY_RUN": "1",
    }
    result = run_script("launch/slurm/sft.sbatch", [], script_env(tmp_path, {**TWO_NODES, **overrides}))
    command = shlex.split(result.stdout)
    assert command[command.index("--config_file") + 1] == overrides["ACCELERATE_CONFIG"]
    assert command[command.index("--config") + 1] == overrides["RECIPE"]
    assert command[command.index("--main_process_port") + 1] == "29611"

    missing = run_script(
        "launch/slurm/sft.sbatch",
        [],
        script_env(tmp_path, {**TWO_NODES, **overrides, "RECIPE": "configs/sft/nope.yaml"}),
    )
    assert missing.returncode == 2 and "recipe configs/sft/nope.yaml not found" in missing.stderr


def test_sft_sbatch_refuses_to_run_outside_slurm(tmp_path):
    env = script_env(tmp_path, {k: v for k, v in TWO_NODES.items() if k != "SLURM_JOB_ID"})
    result = run_script("launch/slurm/sft.sbatch", [], env)
    assert result.returncode == 2 and "not inside a Slurm job" in result.stderr


def test_sft_sbatch_starts_accelerate_on_each_node_through_srun(tmp_path):
    bin_dir = fake_bin(tmp_path, "accelerate", "srun", "scontrol")
    env = script_env(tmp_path, {**TWO_NODES, "SLURM_CPUS_PER_TASK": "32"}, bin_dir)
    result = run_script("launch/slurm/sft.sbatch", ["--learning_rate", "5e-5"], env)
    assert result.returncode == 0, result.stderr
    (srun_call,) = fake_log(tmp_path, "srun")
    assert "--ntasks-per-node=1" in srun_call and "--cpus-per-task=32" in srun_call
    recorded = json.loads((tmp_path / "accelerate.json").read_text())
    assert ["accelerate", *recorded["argv"]] == EXPECTED_NODE_1  # this task's SLURM_NODEID=1
    assert not any("requeue" in call for call in fake_log(tmp_path, "scontrol"))  # finished: no requeue


def test_sft_sbatch_forwards_sigterm_to_training_then_requeues(tmp_path):
    bin_dir = fake_bin(tmp_path, "accelerate", "srun", "scontrol")
    env = script_env(tmp_path, {**TWO_NODES, "FAKE_SLEEP": "30"}, bin_dir)
    process = subprocess.Popen(
        ["bash", "launch/slurm/sft.sbatch"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (tmp_path / "accelerate.json").exists():  # training started (its handler is set)
            assert process.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGTERM)  # what --signal=B:TERM@120 does: the batch shell only
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    assert (tmp_path / "accelerate.json.term").exists(), stderr  # training got it and checkpointed
    assert process.returncode == 143
    assert "requeue 4242" in fake_log(tmp_path, "scontrol")
    # Workers get this long to save before the launcher kills them (torch's default is 30 s).
    assert json.loads((tmp_path / "accelerate.json").read_text())["shutdown_timeout"] == "110"


def test_multinode_sh_dry_run_prints_what_python_builds(tmp_path):
    variables = {"MASTER_ADDR": "gpu-07", "MASTER_PORT": "29500", "NNODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "8"}
    result = run_script(
        "launch/multinode.sh", ["--dry-run", "--", "--learning_rate", "5e-5"], script_env(tmp_path, variables)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shlex.join(
        torchrun_env_to_command(variables, extra_args=["--learning_rate", "5e-5"])
    )
    assert shlex.split(result.stdout) == EXPECTED_NODE_1

    unset = {k: v for k, v in variables.items() if k != "MASTER_ADDR"}
    refused = run_script("launch/multinode.sh", ["--dry-run"], script_env(tmp_path, unset))
    assert refused.returncode == 2 and "MASTER_ADDR is not set" in refused.stderr


def test_multinode_sh_runs_the_command(tmp_path):
    variables = {"MASTER_ADDR": "gpu-07", "NNODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "8"}
    env = script_env(tmp_path, variables, fake_bin(tmp_path, "accelerate"))
    result = run_script("launch/multinode.sh", ["--", "--learning_rate", "5e-5"], env)
    assert result.returncode == 0, result.stderr
    assert ["accelerate", *json.loads((tmp_path / "accelerate.json").read_text())["argv"]] == EXPECTED_NODE_1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus", "--dry-run"], "unknown option --bogus"),  # --dry-run after it used to be a train arg
        (["--dry-run", "--bogus"], "unknown option --bogus"),
        (["--learning_rate", "5e-5", "--dry-run"], "unknown option --learning_rate"),  # train args go after --
        (["recipe.yaml"], "unexpected argument recipe.yaml"),
    ],
)
def test_multinode_sh_refuses_unknown_arguments_and_launches_nothing(tmp_path, args, message):
    variables = {"MASTER_ADDR": "gpu-07", "NNODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "8"}
    env = script_env(tmp_path, variables, fake_bin(tmp_path, "accelerate"))
    result = run_script("launch/multinode.sh", args, env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"multinode.sh: error: {message} (train/sft.py arguments go after --; see --help)"
    assert not (tmp_path / "accelerate.json").exists()  # nothing was launched
    assert result.stdout == ""  # and no command printed as if it were a dry run


def test_multinode_sh_dry_run_is_read_wherever_it_stands_before_the_separator(tmp_path):
    variables = {"MASTER_ADDR": "gpu-07", "NNODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "8"}
    env = script_env(tmp_path, variables, fake_bin(tmp_path, "accelerate"))
    result = run_script("launch/multinode.sh", ["-h", "--dry-run"], env)
    assert result.returncode == 0 and result.stdout.startswith("Usage: launch/multinode.sh")
    # After --, everything is training's, even a flag spelt like the launcher's.
    result = run_script("launch/multinode.sh", ["--dry-run", "--", "--learning_rate", "5e-5", "--dry-run"], env)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[-3:] == ["--learning_rate", "5e-5", "--dry-run"]
    assert not (tmp_path / "accelerate.json").exists()


def test_eval_sbatch_runs_the_eval_entry_point(tmp_path):
    result = run_script("launch/slurm/eval.sbatch", ["--limit", "3"], script_env(tmp_path, {"LAUNCH_DRY_RUN": "1"}))
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        sys.executable,
        "-m",
        "eval.run",
        "--config",
        "configs/eval/safemt_7b.yaml",
        "--limit",
        "3",
    ]
    assert sbatch_directives(LAUNCH / "slurm" / "eval.sbatch")["nodes"] == "1"

    missing = run_script(
        "launch/slurm/eval.sbatch",
        [],
        script_env(tmp_path, {"LAUNCH_DRY_RUN": "1", "EVAL_CONFIG": "configs/eval/x.yaml"}),
    )
    assert missing.returncode == 2 and "configs/eval/x.yaml not found" in missing.stderr


def test_sweep_agent_sbatch_runs_one_agent(tmp_path):
    env = script_env(tmp_path, {"LAUNCH_DRY_RUN": "1", "AGENT_COUNT": "2"})
    result = run_script("launch/slurm/sweep_agent.sbatch", ["me/proj/abc123"], env)
    assert shlex.split(result.stdout) == ["wandb", "agent", "--count", "2", "me/proj/abc123"]
    usage = run_script("launch/slurm/sweep_agent.sbatch", [], env)
    assert usage.returncode == 2 and "usage:" in usage.stderr


# --- sweeps ------------------------------------------------------------------------------------


def test_sweep_sh_dry_run_prints_sweep_and_agent_commands(tmp_path):
    env = script_env(tmp_path, {})
    local = run_script(
        "launch/sweep.sh",
        ["--dry-run", "--project", "proj", "--agents", "2", "--count", "3", "configs/sweeps/tiny_cpu.yaml"],
        env,
    )
    assert local.returncode == 0, local.stderr
    assert local.stdout.splitlines() == [
        "wandb sweep --project proj configs/sweeps/tiny_cpu.yaml",
        "wandb agent --count 3 proj/SWEEP_ID",
        "wandb agent --count 3 proj/SWEEP_ID",
    ]
    array = run_script(
        "launch/sweep.sh",
        [
            "--dry-run",
            "--slurm",
            "--agents",
            "4",
            "--entity",
            "me",
            "--project",
            "proj",
            "configs/sweeps/qwen2_5_vl_7b_lora.yaml",
        ],
        env,
    )
    assert array.stdout.splitlines() == [
        "wandb sweep --project proj --entity me configs/sweeps/qwen2_5_vl_7b_lora.yaml",
        "sbatch --array=0-3 --export=ALL,AGENT_COUNT=1 launch/slurm/sweep_agent.sbatch me/proj/SWEEP_ID",
    ]
    existing = run_script("launch/sweep.sh", ["--dry-run", "--sweep-id", "me/proj/abc123"], env)
    assert existing.stdout.splitlines() == ["wandb agent me/proj/abc123"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["configs/sweeps/nope.yaml"], "sweep file configs/sweeps/nope.yaml not found"),
        (["--agents", "0", "configs/sweeps/tiny_cpu.yaml"], "--agents must be a positive integer"),
        (["--count"], "--count needs a value"),
        (["--bogus", "configs/sweeps/tiny_cpu.yaml"], "unknown option --bogus"),
        ([], "no sweep file given"),
    ],
)
def test_sweep_sh_refuses_bad_arguments(tmp_path, args, message):
    result = run_script("launch/sweep.sh", ["--dry-run", *args], script_env(tmp_path, {}))
    assert result.returncode == 2 and message in result.stderr


def test_sweep_sh_starts_agents_on_the_sweep_wandb_created(tmp_path):
    env = script_env(tmp_path, {}, fake_bin(tmp_path, "wandb", "sbatch"))
    local = run_script(
        "launch/sweep.sh",
        ["--project", "proj", "--entity", "me", "--agents", "3", "--count", "2", "configs/sweeps/tiny_cpu.yaml"],
        env,
    )
    assert local.returncode == 0, local.stderr
    calls = fake_log(tmp_path, "wandb")
    assert calls[0] == "sweep --project proj --entity me configs/sweeps/tiny_cpu.yaml"
    assert calls[1:] == ["agent --count 2 me/proj/abc123"] * 3  # the id read from wandb's coloured output

    array = run_script("launch/sweep.sh", ["--slurm", "--agents", "4", "configs/sweeps/qwen2_5_vl_7b_lora.yaml"], env)
    assert array.returncode == 0, array.stderr
    assert fake_log(tmp_path, "sbatch") == [
        "--array=0-3 --export=ALL,AGENT_COUNT=1 launch/slurm/sweep_agent.sbatch me/proj/abc123"
    ]


def test_sweep_sh_fails_when_wandb_gives_no_sweep_id(tmp_path):
    bin_dir = fake_bin(tmp_path)
    (bin_dir / "wandb").write_text(
        "#!/bin/bash\necho 'wandb: ERROR Error in sweep file' >&2\n"
    )  # exit 0, as wandb does
    (bin_dir / "wandb").chmod(0o755)
    result = run_script("launch/sweep.sh", ["configs/sweeps/tiny_cpu.yaml"], script_env(tmp_path, {}, bin_dir))
    assert result.returncode == 2
    assert "could not read the sweep id" in result.stderr and "Error in sweep file" in result.stderr
