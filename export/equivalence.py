"""Export equivalence check: the checkpoint scored in this process vs. the export loaded in a fresh one.

Both sides run the serving code path (``moderator.inference.Moderator``) on the same rendered
dialogues and images, written to disk first: P(unsafe) must agree within a tolerance and the greedy
verdict texts must be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.manifest import ExportError
from moderator.cli import parse_config
from moderator.taxonomy import REPO_ROOT, Taxonomy

FLOAT32_TOLERANCE = 1e-3
HALF_PRECISION_TOLERANCE = 2e-2  # bf16/fp16 merges round differently from the unmerged sum
BUILTIN_SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "safemt_sample"


class EquivalenceError(ExportError):
    """The exported model does not reproduce the checkpoint's scores or verdicts."""


def _write_samples(prompts: list[Any], images: list[list[Any]], ids: list[str], source: str, directory: Path) -> Path:
    """Samples on disk, so the fresh process reads exactly what this one scored (PNG is lossless)."""
    directory.mkdir(parents=True, exist_ok=True)
    image_names = []
    for row, per_dialogue in enumerate(images):
        names = []
        for index, image in enumerate(per_dialogue):
            name = f"image_{row}_{index}.png"
            image.convert("RGB").save(directory / name, format="PNG")
            names.append(name)
        image_names.append(names)
    path = directory / "samples.json"
    path.write_text(json.dumps({"source": source, "ids": ids, "prompts": prompts, "images": image_names}))
    return path


def write_equivalence_samples(
    n: int, directory: Path, taxonomy: Taxonomy, dataset: str | Path | None = None
) -> tuple[Path, str]:
    """Write ``n`` rendered moderator prompts with their images; return the file and a description.

    From the prepared dataset's validation split when given, else from the real SafeMT sample
    records shipped with the repo (1-, 2- and 4-turn, interleaved) with generated placeholder images.
    """
    if dataset is not None:
        from data_prep.io import load_prepared

        splits = load_prepared(dataset)
        if "validation" not in splits or len(splits["validation"]) == 0:
            raise ExportError(f"{dataset}: the prepared dataset has no validation rows to compare on")
        rows = splits["validation"].select(range(min(n, len(splits["validation"]))))
        prompts = [list(messages[:-1]) for messages in rows["messages"]]  # the last message is the target
        images = [list(per_row) for per_row in rows["images"]]
        return _write_samples(prompts, images, list(rows["id"]), f"validation split of {dataset}", directory), (
            f"validation split of {dataset}"
        )

    from moderator.contract import render_moderator_messages
    from moderator.images import placeholder_image
    from moderator.schema import SAFEMT_IMAGE_TURNS, parse_safemt_record

    files = sorted(BUILTIN_SAMPLE_DIR.glob("*_turn.json"))
    if not files:
        raise ExportError(f"{BUILTIN_SAMPLE_DIR}: built-in SafeMT sample not found; pass --dataset")
    per_file = [json.loads(path.read_text()) for path in files]
    records = []
    for index in range(max(len(records) for records in per_file)):
        for path, raws in zip(files, per_file, strict=True):
            if index < len(raws) and len(records) < n:
                records.append(parse_safemt_record(raws[index], taxonomy, int(path.name.split("_")[0])))
    prompts = [render_moderator_messages(r.dialogue, SAFEMT_IMAGE_TURNS, taxonomy) for r in records]
    images = [[placeholder_image(r.image_path)] for r in records]
    ids = [f"{r.id}@{r.turns}" for r in records]
    source = "built-in SafeMT sample (tests/data/safemt_sample) with placeholder images"
    return _write_samples(prompts, images, ids, source, directory), source


def score_samples(
    model: Any, processor: Any, samples_file: str | Path, max_new_tokens: int, batch_size: int = 4
) -> dict[str, Any]:
    """P(unsafe) and the greedy verdict text for every sample, through the serving code path."""
    from PIL import Image

    from moderator.inference import Moderator

    samples_file = Path(samples_file)
    samples = json.loads(samples_file.read_text())
    moderator = Moderator(model, processor)  # the threshold plays no part: raw scores and texts are compared
    p_unsafe: list[float] = []
    raw: list[str] = []
    for start in range(0, len(samples["prompts"]), batch_size):
        prompts = samples["prompts"][start : start + batch_size]
        images = []
        for names in samples["images"][start : start + batch_size]:
            loaded = []
            for name in names:
                with Image.open(samples_file.parent / name) as image:
                    loaded.append(image.convert("RGB"))
            images.append(loaded)
        for verdict in moderator.moderate_rendered(prompts, images, max_new_tokens):
            p_unsafe.append(verdict.p_unsafe)
            raw.append(verdict.raw)
    return {"ids": samples["ids"], "p_unsafe": p_unsafe, "raw": raw}


def default_device() -> str:
    """The device the checks run on when none is given: the shared rule of ``moderator.loading``."""
    from moderator.loading import resolve_device

    return resolve_device(None)


def load_for_scoring(path: str | Path, dtype: str, device: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The checkpoint or export through the shared loader (``dtype`` "auto": the checkpoint's own).

    No manifest check here: the fresh process scores the export before its manifest is written.
    """
    from moderator.loading import ModelLoadError, load_vlm

    try:
        return load_vlm(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None


def score_in_fresh_process(
    model_dir: str | Path,
    samples_file: str | Path,
    max_new_tokens: int,
    dtype: str,
    device: str,
    offline: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Score ``model_dir`` in a new Python process: nothing cached in this one can leak into the result.

    ``offline`` forbids hub downloads there, so a merged export must load from its own files only.
    """
    with tempfile.TemporaryDirectory(prefix="export-score-") as tmp:
        out = Path(tmp) / "scores.json"
        command = [
            sys.executable, "-m", "export", "_score",
            "--model", str(model_dir), "--samples", str(samples_file), "--out", str(out),
            "--max-new-tokens", str(max_new_tokens), "--dtype", dtype, "--device", device,
        ]  # fmt: skip
        if trust_remote_code:
            command.append("--trust-remote-code")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        if offline:
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp)
        if result.returncode != 0 or not out.is_file():
            raise EquivalenceError(
                f"{model_dir}: the export could not be loaded and scored in a fresh process "
                f"(exit {result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}"
            )
        return json.loads(out.read_text())


def compare_scores(reference: Mapping[str, Any], candidate: Mapping[str, Any], tolerance: float) -> dict[str, Any]:
    """Compare two ``score_samples`` results; raise ``EquivalenceError`` naming the worst dialogue."""
    ids = list(reference["ids"])
    if list(candidate["ids"]) != ids or len(candidate["p_unsafe"]) != len(ids):
        raise EquivalenceError("the export was scored on different dialogues than the checkpoint")
    diffs = [abs(a - b) for a, b in zip(reference["p_unsafe"], candidate["p_unsafe"], strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__) if diffs else None
    max_diff = diffs[worst] if worst is not None else 0.0
    different = [
        (sample_id, ref, cand)
        for sample_id, ref, cand in zip(ids, reference["raw"], candidate["raw"], strict=True)
        if ref != cand
    ]
    problems = []
    if max_diff > tolerance:
        problems.append(
            f"max |P(unsafe) difference| = {max_diff:.6g} > tolerance {tolerance:g} (dialogue {ids[worst]}: "
            f"checkpoint {reference['p_unsafe'][worst]:.6f}, export {candidate['p_unsafe'][worst]:.6f})"
        )
    for sample_id, ref, cand in different[:3]:
        problems.append(f"generated verdict differs on dialogue {sample_id}: checkpoint {ref!r}, export {cand!r}")
    if len(different) > 3:
        problems.append(f"... and {len(different) - 3} more dialogues with a different verdict")
    if problems:
        raise EquivalenceError(
            f"equivalence check failed on {len(ids)} dialogues (max |P(unsafe) difference| = {max_diff:.6g}):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return {
        "n": len(ids),
        "max_abs_diff_p_unsafe": max_diff,
        "tolerance": tolerance,
        "verdicts_identical": True,
    }


def default_tolerance(dtype: Any) -> float:
    import torch

    return FLOAT32_TOLERANCE if dtype in (torch.float32, torch.float64) else HALF_PRECISION_TOLERANCE


def check_equivalence(
    reference_dir: str | Path,
    export_dir: str | Path,
    samples_file: str | Path,
    tolerance: float | None = None,
    max_new_tokens: int = 48,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Score ``reference_dir`` here and ``export_dir`` in a fresh process on the same samples and compare."""
    device = device or default_device()
    model, processor = load_for_scoring(reference_dir, dtype, device, trust_remote_code)
    reference = score_samples(model, processor, samples_file, max_new_tokens)
    resolved_tolerance = tolerance if tolerance is not None else default_tolerance(model.dtype)
    del model
    candidate = score_in_fresh_process(
        export_dir, samples_file, max_new_tokens, dtype, device, offline=True, trust_remote_code=trust_remote_code
    )
    return compare_scores(reference, candidate, resolved_tolerance)


@dataclass
class ScoreArguments:
    """``python -m export _score``: what the fresh process of the equivalence check scores, and where to."""

    model: str = field(metadata={"help": "Model directory to load (the export)."})
    samples: str = field(metadata={"help": "samples.json written by write_equivalence_samples."})
    out: str = field(metadata={"help": "JSON file the scores are written to."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per verdict."})
    dtype: str = field(default="float32", metadata={"help": "Load dtype."})
    device: str = field(default="cpu", metadata={"help": "Device to score on."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the directory."})


def score_main(argv: Sequence[str]) -> int:
    """``python -m export _score``: the fresh process of the equivalence check; writes JSON."""
    (args,) = parse_config((ScoreArguments,), argv, prog="python -m export _score")
    model, processor = load_for_scoring(args.model, args.dtype, args.device, args.trust_remote_code)
    scores = score_samples(model, processor, args.samples, args.max_new_tokens)
    Path(args.out).write_text(json.dumps(scores))
    return 0
