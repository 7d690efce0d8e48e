"""Which checkpoint a relaunch resumes from: the newest *complete* ``checkpoint-N/`` in ``output_dir``.

A ``kill -9`` (or a node failure) during ``Trainer._save_checkpoint`` leaves an empty or partial
``checkpoint-N/``. transformers' ``get_last_checkpoint`` only looks at folder names, so every relaunch
would pick that folder and fail (``Can't find a valid checkpoint``), or resume with a fresh optimizer
when only the optimizer file is missing (the Trainer skips a missing ``optimizer.pt`` silently).
Here the newest folder that passes :func:`checkpoint_problem` wins; newer torn ones are reported and
renamed to ``torn-checkpoint-N`` (kept for inspection, out of the way of transformers' rotation and of
the next save of step N).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR folders
TORN_PREFIX = "torn-"
TRAINER_STATE = "trainer_state.json"
# Weights the Trainer resumes from (safetensors only: this project never loads pickled weights).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"
MODEL_WEIGHTS_INDEX = "model.safetensors.index.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
RNG_SINGLE = "rng_state.pth"
RNG_PER_RANK = re.compile(r"^rng_state_(\d+)\.pth$")
DEEPSPEED_LATEST = "latest"
DEEPSPEED_OPTIM_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
FSDP_MARKERS = ("pytorch_model_fsdp", "optimizer_")  # FSDP's sharded model / optimizer folders


def checkpoint_step(path: Path) -> int | None:
    """N for a ``checkpoint-N`` folder name, else None."""
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def _torch_archive_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file is unusable: missing or cut off (its zip directory is written last)."""
    if not path.is_file():
        return f"no {path.name}"
    try:
        with zipfile.ZipFile(path) as archive:  # reads only the central directory at the end of the file
            if not archive.namelist():
                return f"{path.name} is empty"
    except (zipfile.BadZipFile, OSError, EOFError):
        return f"{path.name} is cut off ({path.stat().st_size} bytes, no complete torch archive)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable: missing, or not the size its own header describes."""
    if not path.is_file():
        return f"no {path.name}"
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < header_len <= size - 8:
                return f"{path.name} is cut off inside its header ({size} bytes)"
            header = json.loads(handle.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, OSError):
        return f"{path.name} has an unreadable header"
    if 8 + header_len + end != size:
        return f"{path.name} is {size} bytes, its header describes {8 + header_len + end} (cut off mid-write)"
    return None


def _weights_problem(path: Path) -> str | None:
    """None when the folder holds a complete set of model or adapter weights."""
    if (path / ADAPTER_WEIGHTS).exists():
        return _safetensors_problem(path / ADAPTER_WEIGHTS)
    if (path / MODEL_WEIGHTS).exists():
        return _safetensors_problem(path / MODEL_WEIGHTS)
    index = path / MODEL_WEIGHTS_INDEX
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return f"{MODEL_WEIGHTS_INDEX} is not a readable index (cut off mid-write?)"
        for shard in shards:
            problem = _safetensors_problem(path / shard)
            if problem:
                return f"sharded weights incomplete: {problem}"
        return None
    if any(child.name.startswith(FSDP_MARKERS[0]) for child in path.iterdir()):
        return None  # FSDP's sharded model: the Trainer loads it through accelerate
    return f"no weights ({ADAPTER_WEIGHTS}, {MODEL_WEIGHTS} or {MODEL_WEIGHTS_INDEX})"


def _rank_indices(names: list[str], pattern: re.Pattern[str]) -> list[int]:
    return sorted(int(m.group(1)) for name in names if (m := pattern.search(name)))


def _deepspeed_problem(path: Path) -> tuple[str | None, int]:
    """(why DeepSpeed's part is unusable or None, number of ranks whose optimizer shards it holds)."""
    latest = path / DEEPSPEED_LATEST
    if not latest.is_file():
        return f"DeepSpeed folders but no '{DEEPSPEED_LATEST}' file (DeepSpeed writes it after every rank saved)", 0
    tag = latest.read_text().strip()
    folder = path / tag
    if not tag or not folder.is_dir():
        return f"'{DEEPSPEED_LATEST}' names {tag!r}, which is not a folder here", 0
    files = sorted(p for p in folder.iterdir() if p.suffix == ".pt")
    if not any(p.name.endswith("model_states.pt") for p in files):
        return f"{tag}/ holds no *model_states.pt", 0
    for file in files:
        problem = _torch_archive_problem(file)
        if problem:
            return f"{tag}/{problem}", 0
    ranks = _rank_indices([p.name for p in files], DEEPSPEED_OPTIM_SHARD)
    if ranks != list(range(len(ranks))):
        return f"{tag}/ has optimizer shards of ranks {ranks}: some are missing", 0
    return None, len(ranks)


def _training_state_problem(path: Path, names: list[str], deepspeed_ranks: int, deepspeed: bool) -> str | None:
    """None when optimizer, scheduler and RNG states are all there for every rank that wrote them."""
    fsdp = any(name.startswith(FSDP_MARKERS[1]) and (path / name).is_dir() for name in names)
    if not deepspeed and not fsdp:
        problem = _torch_archive_problem(path / OPTIMIZER) or _torch_archive_problem(path / SCHEDULER)
        if problem:
            return problem
    # DeepSpeed keeps the optimizer (and its own scheduler) in global_step*/; a Trainer scheduler sits here.
    for optional in (SCHEDULER, SCALER):
        if (path / optional).exists():
            problem = _torch_archive_problem(path / optional)
            if problem:
                return problem
    ranks = _rank_indices(names, RNG_PER_RANK)
    if ranks:
        if ranks != list(range(len(ranks))):
            return f"RNG states of ranks {ranks}: some are missing"
        if deepspeed_ranks and len(ranks) != deepspeed_ranks:
            return f"RNG states of {len(ranks)} ranks but optimizer shards of {deepspeed_ranks}"
        files = [path / f"rng_state_{rank}.pth" for rank in ranks]
    else:
        files = [path / RNG_SINGLE]
    for file in files:
        problem = _torch_archive_problem(file)
        if problem:
            return problem
    return None


def checkpoint_problem(path: str | Path, needs_training_state: bool = True) -> str | None:
    """Why ``path`` cannot be resumed from, or None when the checkpoint is complete.

    Complete means, in this order (cheap checks, no tensor is loaded):

    1. ``trainer_state.json`` is present, parses, and its ``global_step`` is the N of ``checkpoint-N``.
       ``Trainer._save_checkpoint`` (transformers 5.23) writes it last, after the weights, optimizer,
       scheduler, scaler and RNG states, so a save killed earlier never has it, and one killed while
       writing it leaves JSON that does not parse.
    2. DeepSpeed (a ``global_step*`` folder or a ``latest`` file): ``latest`` names a folder holding
       ``*model_states.pt``, optimizer shards of ranks 0..n-1, every ``.pt`` a complete archive.
    3. Weights: ``adapter_model.safetensors``, ``model.safetensors``, or ``model.safetensors.index.json``
       with every shard it maps, each exactly the size its safetensors header describes (a file cut
       off mid-write is shorter). Under DeepSpeed (ZeRO-3 without a 16-bit gather) the weights live
       in ``global_step*/`` only, so none are required beside it; any present must be complete.
    4. With ``needs_training_state`` (false under ``save_only_model``): ``optimizer.pt`` and
       ``scheduler.pt`` (DeepSpeed: in its folder), and ``rng_state.pth`` or ``rng_state_0..k-1.pth``
       with k equal to DeepSpeed's shard count; every ``torch.save`` file must have the zip central
       directory ``torch.save`` writes at its end.

    Limit: in a plain multi-process (DDP) run, rank 0 writes ``trainer_state.json`` without waiting for
    the other ranks' RNG files, and a missing last rank's file cannot be told from a run with fewer
    ranks; the Trainer then only starts that rank's RNG afresh (reproducibility, not correctness).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    try:
        names = sorted(child.name for child in path.iterdir())
        if not names:
            return "empty folder"
        state_file = path / TRAINER_STATE
        if not state_file.is_file():
            return f"no {TRAINER_STATE} (the save was interrupted before its last file)"
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            step = state["global_step"]
        except (ValueError, KeyError, TypeError):
            return f"{TRAINER_STATE} does not parse (cut off mid-write)"
        expected = checkpoint_step(path)
        if expected is not None and step != expected:
            return f"{TRAINER_STATE} is at step {step}, the folder name says {expected}"

        deepspeed = (path / DEEPSPEED_LATEST).exists() or any(name.startswith("global_step") for name in names)
        deepspeed_ranks = 0
        if deepspeed:
            problem, deepspeed_ranks = _deepspeed_problem(path)
            if problem:
                return problem
        weights = _weights_problem(path)
        if weights and not (deepspeed and weights.startswith("no weights")):
            return weights
        if needs_training_state:
            return _training_state_problem(path, names, deepspeed_ranks, deepspeed)
        return None
    except OSError as exc:  # a file vanished or cannot be read while we look: not resumable now
        return f"unreadable ({exc.strerror or exc})"


def find_resume_checkpoint(
    output_dir: str | Path, needs_training_state: bool = True
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete ``checkpoint-N`` in ``output_dir`` or None, the newer torn ones with why).

    Older torn folders are not looked at: they are never resumed from and transformers rotates them.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None, []
    candidates = [p for p in output_dir.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    torn: list[tuple[Path, str]] = []
    for path in sorted(candidates, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(path, needs_training_state)
        if problem is None:
            return path, torn
        torn.append((path, problem))
    return None, torn


def set_aside(checkpoint: Path) -> Path:
    """Rename a torn ``checkpoint-N`` to ``torn-checkpoint-N`` (``.1``, ``.2``... if taken); return the new path.

    Out of ``checkpoint-*``, transformers neither rotates it nor saves step N into its leftover files.
    """
    target = checkpoint.with_name(f"{TORN_PREFIX}{checkpoint.name}")
    suffix = 0
    while target.exists():
        suffix += 1
        target = checkpoint.with_name(f"{TORN_PREFIX}{checkpoint.name}.{suffix}")
    checkpoint.rename(target)
    return target
