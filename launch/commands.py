"""The exact ``accelerate launch`` command each node runs, built from Slurm or torchrun-style variables.

    python -m launch.commands slurm [--recipe R] [--accelerate-config C] [--port P] [--exec] [-- TRAIN_ARGS...]
    python -m launch.commands torchrun-env [same options]

``slurm`` reads SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST and the GPU count (GPUS_PER_NODE,
SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS or CUDA_VISIBLE_DEVICES); ``torchrun-env``
reads MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK and GPUS_PER_NODE. Without ``--exec`` the command
is printed on one shell-quoted line (the launchers' dry run); with it, this process becomes it.
Arguments after ``--`` go to ``train/sft.py`` (any recipe field, e.g. ``--learning_rate 5e-5``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

TRAIN_SCRIPT = "train/sft.py"
DEFAULT_RECIPE = "configs/sft/qwen2_5_vl_7b_lora.yaml"
DEFAULT_MULTINODE_CONFIG = "configs/accelerate/zero3_multinode.yaml"
DEFAULT_PORT = 29500


class LaunchError(ValueError):
    """A launch setting is missing or inconsistent; the message names the variable at fault."""


def accelerate_command(
    num_machines: int,
    gpus_per_node: int,
    machine_rank: int,
    main_ip: str,
    port: int,
    accelerate_config: str = DEFAULT_MULTINODE_CONFIG,
    recipe: str = DEFAULT_RECIPE,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``accelerate launch`` for one node of a ``num_machines`` x ``gpus_per_node`` run.

    ``--num_processes`` is the total over all machines (accelerate divides it by ``--num_machines``).
    """
    if num_machines < 1:
        raise LaunchError(f"number of machines must be >= 1, got {num_machines}")
    if gpus_per_node < 1:
        raise LaunchError(f"GPUs per node must be >= 1, got {gpus_per_node}")
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(f"machine rank {machine_rank} is outside 0..{num_machines - 1}")
    if not 0 < port < 65536:
        raise LaunchError(f"main process port {port} is not a TCP port")
    if not main_ip:
        raise LaunchError("main process address is empty")
    return [
        "accelerate", "launch",
        "--config_file", accelerate_config,
        "--num_machines", str(num_machines),
        "--num_processes", str(num_machines * gpus_per_node),
        "--machine_rank", str(machine_rank),
        "--main_process_ip", main_ip,
        "--main_process_port", str(port),
        TRAIN_SCRIPT, "--config", recipe,
        *extra_args,
    ]  # fmt: skip


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list without ``scontrol`` (fallback for machines where it is absent).

    Supported: comma-separated items, each a name with any number of bracket groups of numbers and
    ranges, zero padding kept: ``gpu-[07-08]`` -> gpu-07, gpu-08; ``node[1-3,5],login1`` -> node1,
    node2, node3, node5, login1; ``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2. Anything else (strides
    such as ``[1-9:2]``, unbalanced brackets) is refused rather than guessed.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        choices: list[list[str]] = []
        for part in re.split(r"(\[[^\[\]]*\])", item):
            if part.startswith("["):
                choices.append(_expand_ranges(part[1:-1], nodelist))
            elif "[" in part or "]" in part:
                raise LaunchError(f"host list {nodelist!r}: unbalanced brackets in {item!r}")
            elif part:
                choices.append([part])
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    if not hosts:
        raise LaunchError(f"host list {nodelist!r} names no host")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    items, current, depth = [], "", 0
    for char in nodelist.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise LaunchError(f"host list {nodelist!r}: unbalanced or nested brackets")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise LaunchError(f"host list {nodelist!r}: unbalanced brackets")
    items.append(current)
    if any(not item for item in items):
        raise LaunchError(f"host list {nodelist!r}: empty item")
    return items


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    names: list[str] = []
    for chunk in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", chunk)
        if not match:
            raise LaunchError(f"host list {nodelist!r}: unsupported range {chunk!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise LaunchError(f"host list {nodelist!r}: range {chunk!r} runs backwards")
        names += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return names


def hostnames(nodelist: str) -> list[str]:
    """Hosts of a Slurm node list: ``scontrol show hostnames`` where it exists, else ``expand_hostlist``."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return expand_hostlist(nodelist)
    result = subprocess.run(
        [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} failed: {result.stderr.strip()}")
    if not result.stdout.split():
        raise LaunchError(f"scontrol show hostnames {nodelist!r} printed no host")
    return result.stdout.split()


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name, "").strip()
    if not value:
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _first_var(env: Mapping[str, str], *names: str) -> str | None:
    return next((name for name in names if env.get(name, "").strip()), None)


def _count_devices(value: str) -> int:
    return len([device for device in value.split(",") if device.strip()])


def _visible_gpus(env: Mapping[str, str]) -> int | None:
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "NoDevFiles":
        return _count_devices(visible)
    return None


def slurm_gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs on each node: GPUS_PER_NODE (explicit override), else what Slurm says was allocated."""
    if env.get("GPUS_PER_NODE", "").strip():
        return _int_var(env, "GPUS_PER_NODE")
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        return _int_var(env, "SLURM_GPUS_ON_NODE")
    per_node = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if per_node:  # "[type:]count", several types comma-separated: "h100:8" or "a100:4,v100:2"
        try:
            return sum(int(spec.rsplit(":", 1)[-1]) for spec in per_node.split(","))
        except ValueError:
            raise LaunchError(f"SLURM_GPUS_PER_NODE={per_node!r} is not [type:]count") from None
    if env.get("SLURM_JOB_GPUS", "").strip():
        return _count_devices(env["SLURM_JOB_GPUS"])
    visible = _visible_gpus(env)
    if visible:
        return visible
    raise LaunchError(
        "cannot tell how many GPUs each node has: request them with #SBATCH --gpus-per-node=N "
        "(sets SLURM_GPUS_PER_NODE) or set GPUS_PER_NODE"
    )


def slurm_env_to_command(
    env: Mapping[str, str],
    accelerate_config: str = DEFAULT_MULTINODE_CONFIG,
    recipe: str = DEFAULT_RECIPE,
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> list[str]:
    """The command for the node whose Slurm task environment is ``env`` (one task per node).

    The main process runs on the first host of the allocation, which is node 0 in Slurm's numbering.
    """
    nodes_var = _first_var(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or "SLURM_NNODES"
    num_machines = _int_var(env, nodes_var)
    rank_var = _first_var(env, "SLURM_NODEID", "SLURM_PROCID") or "SLURM_NODEID"
    machine_rank = _int_var(env, rank_var)
    list_var = _first_var(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if list_var is None:
        raise LaunchError("SLURM_JOB_NODELIST is not set")
    hosts = hostnames(env[list_var])
    if len(hosts) != num_machines:
        raise LaunchError(f"{list_var}={env[list_var]!r} names {len(hosts)} hosts but {nodes_var}={num_machines}")
    if port is None:
        port = _int_var(env, "MAIN_PROCESS_PORT", DEFAULT_PORT)
    return accelerate_command(
        num_machines, slurm_gpus_per_node(env), machine_rank, hosts[0], port, accelerate_config, recipe, extra_args
    )


def local_gpu_count(env: Mapping[str, str]) -> int:
    """GPUs on this machine: GPUS_PER_NODE, else CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``."""
    if env.get("GPUS_PER_NODE", "").strip():
        return _int_var(env, "GPUS_PER_NODE")
    visible = _visible_gpus(env)
    if visible:
        return visible
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        listed = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60, check=False)
        count = sum(line.startswith("GPU ") for line in listed.stdout.splitlines())
        if listed.returncode == 0 and count:
            return count
    raise LaunchError("cannot tell how many GPUs this node has: set GPUS_PER_NODE")


def torchrun_env_to_command(
    env: Mapping[str, str],
    accelerate_config: str = DEFAULT_MULTINODE_CONFIG,
    recipe: str = DEFAULT_RECIPE,
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> list[str]:
    """The command for one node described by torchrun's variables (NNODES, NODE_RANK, MASTER_ADDR, ...)."""
    num_machines = _int_var(env, "NNODES", 1)
    master_addr = env.get("MASTER_ADDR", "").strip()
    if not master_addr:
        if num_machines > 1:
            raise LaunchError(f"MASTER_ADDR is not set (needed with NNODES={num_machines}: the address of node 0)")
        master_addr = "127.0.0.1"
    if port is None:
        port = _int_var(env, "MASTER_PORT", DEFAULT_PORT)
    return accelerate_command(
        num_machines,
        local_gpu_count(env),
        _int_var(env, "NODE_RANK", 0),
        master_addr,
        port,
        accelerate_config,
        recipe,
        extra_args,
    )


BUILDERS = {"slurm": slurm_env_to_command, "torchrun-env": torchrun_env_to_command}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m launch.commands", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("source", choices=sorted(BUILDERS), help="where the node's settings come from")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="train/sft.py --config (configs/sft/*.yaml)")
    parser.add_argument("--accelerate-config", default=DEFAULT_MULTINODE_CONFIG, help="configs/accelerate/*.yaml")
    parser.add_argument("--port", type=int, default=None, help="main process port (default: from the environment)")
    parser.add_argument("--exec", action="store_true", help="become the command instead of printing it")
    args = parser.parse_args(ours)
    try:
        for label, path in (("recipe", args.recipe), ("accelerate config", args.accelerate_config)):
            if not Path(path).is_file():
                raise LaunchError(
                    f"{label} {path} not found (paths are relative to the repository root; run from there)"
                )
        command = BUILDERS[args.source](os.environ, args.accelerate_config, args.recipe, train_args, args.port)
        if args.exec and shutil.which(command[0]) is None:
            raise LaunchError(f"{command[0]} is not on PATH: activate the training environment first")
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.exec:
        print(f"launch: {shlex.join(command)}", file=sys.stderr, flush=True)
        os.execvp(command[0], command)
    print(shlex.join(command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
