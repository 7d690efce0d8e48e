"""Export a trained moderator as a self-contained, verifiable serving directory.

``python -m export --checkpoint runs/sft --out runs/export`` (entry: ``export/__main__.py``):

1. loads the checkpoint (a PEFT adapter directory, or a full checkpoint) and scores a few validation
   dialogues with it in this process: P(unsafe) and the greedy verdict text;
2. merges the LoRA adapter into the base (``merge_and_unload``) and saves safetensors weights, the
   processor with its chat template, a greedy generation config, the taxonomy YAML the model was
   trained with and ``moderator_config.json`` (prompt-format version, taxonomy hash, threshold).
   ``--adapter-only`` ships the adapter instead of merged weights; a full checkpoint is re-saved;
3. loads the export in a fresh process and scores the same dialogues: the export is refused when a
   P(unsafe) differs beyond the tolerance or a generated verdict differs;
4. writes a model card (``README.md``) and ``manifest.json`` with the provenance and the sha256 of
   every other file, which ``python -m export verify <dir>`` checks;
5. optionally uploads the directory to the Hugging Face Hub and/or logs it as a W&B model artifact.

The decision threshold shipped is the one the ``--eval-report``'s tables were measured at (its
``thresholds``, fixed by the eval on the validation split before attacking); a ``--threshold`` that
differs from it is refused. Without a report: ``--threshold``, else 0.5.

Parts: ``export/manifest.py`` (hashes, ``verify``), ``export/equivalence.py`` (the fresh-process
check), ``export/card.py`` (the model card); this module holds the inputs, the flow and the CLI.

The export is built in ``.<out>.partial`` next to ``<out>`` and renamed only once everything passed,
so ``<out>`` never holds a half-written or unchecked model.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from export.card import hub_id, render_model_card
from export.equivalence import (
    FLOAT32_TOLERANCE,
    HALF_PRECISION_TOLERANCE,
    compare_scores,
    default_device,
    default_tolerance,
    load_for_scoring,
    score_in_fresh_process,
    score_main,
    score_samples,
    write_equivalence_samples,
)
from export.manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_SHA256_FIELD,
    MANIFEST_SHA256_PLACEHOLDER,
    MODEL_CARD_FILE,
    PICKLE_SUFFIXES,
    TAXONOMY_FILE,
    ExportError,
    VerificationError,
    check_sha256_hex,
    hash_directory,
    manifest_sha256,
    relative_files,
    verify_export,
    write_manifest,
)
from moderator.artefacts import (
    DEFAULT_THRESHOLD,
    EXPORTED_EVAL_REPORT_FILE,
    RUN_RECORD_FILE,
    ModeratorConfigError,
    bounds_record,
    check_threshold,
    measured_threshold,
    read_eval_report,
    read_run_record,
    recorded_image_bounds,
    ship_eval_report,
    write_serving_config,
)
from moderator.cli import USER_ERROR_EXIT_CODE, parse_config
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.images import ImageBounds
from moderator.taxonomy import REPO_ROOT, Taxonomy, load_taxonomy
from train.provenance import git_commit, redact

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
REPORT_KEYS = ("title", "turns", "si_weights", "results")


@dataclass
class ExportArguments:
    checkpoint: str = field(
        metadata={"help": "Training output_dir (PEFT adapter), a checkpoint-N or a full checkpoint."}
    )
    out: str = field(metadata={"help": "Export directory to create (must not exist or be empty, see --overwrite)."})
    adapter_only: bool = field(
        default=False, metadata={"help": "Export the LoRA adapter + processor + taxonomy instead of merged weights."}
    )
    eval_report: str | None = field(
        default=None,
        metadata={
            "help": "report.json from `python -m eval.run`: its tables go into the model card, and the threshold "
            "they were measured at (its `thresholds`) is the one shipped."
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Decision threshold on P(unsafe); default: the one the eval report was measured at, else 0.5. "
            "With --eval-report it must equal the report's."
        },
    )
    equivalence_samples: int = field(
        default=8, metadata={"help": "Dialogues compared between the checkpoint and the export (0 skips the check)."}
    )
    equivalence_tolerance: float | None = field(
        default=None,
        metadata={
            "help": f"Max |P(unsafe) difference|; default {FLOAT32_TOLERANCE} in float32, "
            f"{HALF_PRECISION_TOLERANCE} in bf16/fp16."
        },
    )
    equivalence_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per compared verdict."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "Prepared dataset dir: compare on its validation split (default: built-in SafeMT sample)."},
    )
    dtype: str = field(
        default="auto", metadata={"help": "Load/merge/save dtype: auto (the checkpoint's), float32, bfloat16, float16."}
    )
    device: str | None = field(default=None, metadata={"help": "Device for the checks (default: cuda if available)."})
    taxonomy_path: str | None = field(
        default=None, metadata={"help": "Taxonomy YAML to ship (default: the one recorded by training)."}
    )
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model for the card (and the adapter config of --adapter-only)."},
    )
    license: str = field(
        default="cc-by-nc-4.0", metadata={"help": "Model card licence (SafeMT training data is CC BY-NC 4.0)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing, non-empty --out."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Upload the export to this Hub repo (token from HF_TOKEN / login)."}
    )
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repo as private."})
    wandb_artifact: str | None = field(default=None, metadata={"help": "Log the export as a W&B model artifact."})
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project (default: $WANDB_PROJECT)."})


# --------------------------------------------------------------------------------------------------
# Inputs: provenance, taxonomy, eval report, threshold


def _artefact(read: Any, *args: Any) -> Any:
    """A ``moderator.artefacts`` reader's result, its refusal raised as an ``ExportError``."""
    try:
        return read(*args)
    except ModeratorConfigError as exc:
        raise ExportError(str(exc)) from None


def read_provenance(checkpoint: Path) -> tuple[dict[str, Any], Path]:
    """The run record of a training output (``checkpoint-N`` falls back to its run dir's), checked."""
    found = _artefact(read_run_record, checkpoint)
    if found is None:
        raise ExportError(
            f"{checkpoint / RUN_RECORD_FILE}: missing. An export records the taxonomy and prompt format the model "
            "was trained with; export the output_dir of `train/sft.py` (or one of its checkpoint-N)."
        )
    provenance, path = found
    for key in ("taxonomy_version", "taxonomy_sha256", "prompt_format_version"):
        if not provenance.get(key):
            raise ExportError(f"{path}: field {key!r} is missing")
    if str(provenance["prompt_format_version"]) != PROMPT_FORMAT_VERSION:
        raise ExportError(
            f"{path}: the model was trained with prompt format {provenance['prompt_format_version']!r}, but this "
            f"code renders format {PROMPT_FORMAT_VERSION!r}; export with the code version it was trained with"
        )
    # Recorded configs are redacted at training time; redact again in case an older run was not.
    return redact(provenance), path


def resolve_taxonomy(provenance: Mapping[str, Any], provenance_file: Path, override: str | None) -> Taxonomy:
    """The taxonomy file the model was trained with, checked against the recorded hash."""
    recorded = ((provenance.get("config") or {}).get("ModeratorScriptArguments") or {}).get("taxonomy_path")
    path = override or recorded
    if path is not None and not Path(path).is_absolute() and not Path(path).exists():
        path = REPO_ROOT / path  # recorded relative to the repo root the run started in
    taxonomy = load_taxonomy(path)
    if taxonomy.sha256 != provenance["taxonomy_sha256"]:
        raise ExportError(
            f"{taxonomy.path}: taxonomy sha256 {taxonomy.sha256} (version {taxonomy.version}) differs from "
            f"{provenance['taxonomy_sha256']} (version {provenance['taxonomy_version']}) recorded in "
            f"{provenance_file}; pass --taxonomy_path pointing at the exact file the model was trained with"
        )
    return taxonomy


def load_eval_report(path: str | Path) -> dict[str, Any]:
    from eval.report import render_markdown

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: eval report not found")
    report = _artefact(read_eval_report, path)
    missing = [key for key in REPORT_KEYS if key not in report]
    if missing:
        raise ExportError(f"{path}: not an eval report, missing field(s) {missing}")
    _artefact(measured_threshold, report, path)  # names a bad thresholds field before the tables are rendered
    try:
        render_markdown(report)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"{path}: malformed eval report ({type(exc).__name__}: {exc})") from None
    return report


def threshold_to_ship(
    threshold: float | None, report: Mapping[str, Any] | None, report_path: str | None
) -> tuple[float, str]:
    """``(threshold, where it came from)``: the eval report's, else --threshold, else the default.

    With a report, the threshold shipped is the one its tables were measured at: a --threshold that
    differs from it is refused, so the model card never shows numbers of another threshold.
    """
    explicit = _artefact(check_threshold, threshold, "--threshold") if threshold is not None else None
    measured = _artefact(measured_threshold, report, report_path) if report is not None and report_path else None
    if measured is not None:
        value, where = measured
        if explicit is not None and not math.isclose(explicit, value, rel_tol=0.0, abs_tol=1e-9):
            raise ExportError(
                f"{report_path}: its tables were measured at threshold {value!r} ({where}), but the export "
                f"would ship --threshold {explicit!r}; drop --threshold, or re-run the eval at that threshold"
            )
        return value, where
    if explicit is not None:
        return explicit, "--threshold given to the export"
    return DEFAULT_THRESHOLD, f"default {DEFAULT_THRESHOLD} (no --threshold, no moderator threshold in an eval report)"


# --------------------------------------------------------------------------------------------------
# The export


def _prepare_output(out: Path, overwrite: bool, protected: dict[str, Path]) -> Path:
    """Create the staging directory; refuse an ``--out`` that could replace the checkpoint or its base."""
    for what, path in protected.items():
        if out == path or out in path.parents:
            raise ExportError(f"--out {out} would overwrite the {what} {path}; choose another directory")
        if path in out.parents:
            raise ExportError(f"--out {out} is inside the {what} {path}; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an earlier failed export of the same --out
    staging.mkdir(parents=True)
    return staging


def _set_greedy_generation(model: Any) -> None:
    """The moderator is evaluated with greedy decoding: make that the served default (vLLM reads it too)."""
    config = getattr(model, "generation_config", None)
    if config is not None:
        config.do_sample = False
        config.temperature = None
        config.top_p = None
        config.top_k = None
        config.max_new_tokens = 64


def _copy_adapter(checkpoint: Path, staging: Path, base_model_id: str | None) -> None:
    for name in ADAPTER_FILES:
        if not (checkpoint / name).is_file():
            found = sorted(p.name for p in checkpoint.glob("adapter_model.*"))
            raise ExportError(f"{checkpoint / name}: missing (found {found}); exports hold safetensors only")
        shutil.copyfile(checkpoint / name, staging / name)
    if base_model_id:
        # Point the shipped adapter at the Hub base instead of a path on the training machine.
        config = json.loads((staging / ADAPTER_FILES[0]).read_text())
        config["base_model_name_or_path"] = base_model_id
        (staging / ADAPTER_FILES[0]).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _ExportInputs:
    checkpoint: Path
    out: Path
    export_type: str  # merged | adapter | full
    is_adapter: bool
    provenance: dict[str, Any]
    taxonomy: Taxonomy
    report: dict[str, Any] | None
    threshold: float
    threshold_source: str
    image_bounds: ImageBounds | None
    adapter_config: dict[str, Any] | None
    base_model: str
    device: str


def _check_inputs(args: ExportArguments) -> _ExportInputs:
    """Everything that can be refused before a model is loaded."""
    checkpoint = Path(args.checkpoint).resolve()
    if not checkpoint.is_dir():
        raise ExportError(f"--checkpoint {checkpoint}: not a directory")
    if args.equivalence_samples < 0:
        raise ExportError(f"--equivalence_samples must be >= 0, got {args.equivalence_samples}")
    is_adapter = (checkpoint / "adapter_config.json").is_file()
    if args.adapter_only and not is_adapter:
        raise ExportError(f"--adapter_only: {checkpoint} holds no adapter_config.json (it is a full checkpoint)")
    provenance, provenance_file = read_provenance(checkpoint)
    report = load_eval_report(args.eval_report) if args.eval_report else None
    threshold, threshold_source = threshold_to_ship(args.threshold, report, args.eval_report)
    adapter_config = redact(json.loads((checkpoint / "adapter_config.json").read_text())) if is_adapter else None
    model_config = (provenance.get("config") or {}).get("ModelConfig") or {}
    base_model = (adapter_config or {}).get("base_model_name_or_path") or model_config.get("model_name_or_path")
    return _ExportInputs(
        checkpoint=checkpoint,
        out=Path(args.out).resolve(),
        export_type="adapter" if args.adapter_only else ("merged" if is_adapter else "full"),
        is_adapter=is_adapter,
        provenance=provenance,
        taxonomy=resolve_taxonomy(provenance, provenance_file, args.taxonomy_path),
        report=report,
        threshold=threshold,
        threshold_source=threshold_source,
        image_bounds=_artefact(recorded_image_bounds, provenance, provenance_file),
        adapter_config=adapter_config,
        base_model=str(base_model or checkpoint),
        device=args.device or default_device(),
    )


def _write_model_files(args: ExportArguments, inputs: _ExportInputs, staging: Path) -> dict[str, Any]:
    """Save the serving files into ``staging`` and run the equivalence check; return its record."""
    model, processor = load_for_scoring(inputs.checkpoint, args.dtype, inputs.device, args.trust_remote_code)
    dtype_name = str(model.dtype).removeprefix("torch.")
    tolerance = args.equivalence_tolerance
    if tolerance is None:
        tolerance = default_tolerance(model.dtype)
    with tempfile.TemporaryDirectory(prefix="export-samples-") as tmp:
        reference = samples_file = samples_source = None
        if args.equivalence_samples:
            samples_file, samples_source = write_equivalence_samples(
                args.equivalence_samples, Path(tmp), inputs.taxonomy, args.dataset
            )
            # Before merging: merge_and_unload changes the model in place.
            reference = score_samples(model, processor, samples_file, args.equivalence_max_new_tokens)

        if inputs.export_type == "adapter":
            _copy_adapter(inputs.checkpoint, staging, args.base_model_id)
        else:
            if inputs.export_type == "merged":
                model = model.merge_and_unload()
            _set_greedy_generation(model)
            model.save_pretrained(staging)
        processor.save_pretrained(staging)
        del model  # the fresh process loads its own copy: do not hold two in memory
        _release_memory()

        shutil.copyfile(inputs.taxonomy.path, staging / TAXONOMY_FILE)
        write_serving_config(
            staging,
            {
                "export_type": inputs.export_type,
                "prompt_format_version": PROMPT_FORMAT_VERSION,
                "taxonomy_file": TAXONOMY_FILE,
                "taxonomy_version": inputs.taxonomy.version,
                "taxonomy_sha256": inputs.taxonomy.sha256,
                "decision_threshold": inputs.threshold,
                "image_bounds": bounds_record(inputs.image_bounds),
            },
        )
        if args.eval_report:
            ship_eval_report(args.eval_report, staging)
        pickles = [name for name in relative_files(staging) if name.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ExportError(f"{staging}: pickle files {pickles} were written; exports hold safetensors only")

        if reference is None:
            return {"skipped": True}
        print(f"checking equivalence on {len(reference['ids'])} dialogues in a fresh process", flush=True)
        candidate = score_in_fresh_process(
            staging,
            samples_file,
            args.equivalence_max_new_tokens,
            dtype_name,
            inputs.device,
            # A merged/full export must load from its own files alone; an adapter needs its base.
            offline=inputs.export_type != "adapter",
            trust_remote_code=args.trust_remote_code,
        )
    equivalence = compare_scores(reference, candidate, tolerance)
    return {
        **equivalence,
        "samples": samples_source,
        "reference": f"{inputs.checkpoint} ({'adapter' if inputs.is_adapter else 'full'}, in-process)",
        "dtype": dtype_name,
        "device": inputs.device,
        "max_new_tokens": args.equivalence_max_new_tokens,
    }


def _write_card_and_manifest(
    args: ExportArguments, inputs: _ExportInputs, staging: Path, equivalence: dict[str, Any]
) -> dict[str, Any]:
    manifest: dict[str, Any] = redact(
        {
            "format": MANIFEST_FORMAT,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "export_type": inputs.export_type,
            "checkpoint": str(inputs.checkpoint),
            "base_model": inputs.base_model,
            "base_model_id": args.base_model_id or hub_id(inputs.base_model),
            "adapter_config": inputs.adapter_config,
            "training_config": inputs.provenance.get("config"),
            "data_fingerprint": inputs.provenance.get("data"),
            "taxonomy": {
                "file": TAXONOMY_FILE,
                "version": inputs.taxonomy.version,
                "sha256": inputs.taxonomy.sha256,
            },
            "prompt_format_version": PROMPT_FORMAT_VERSION,
            "git": {"training": inputs.provenance.get("git"), "export": git_commit()},
            "decision_threshold": inputs.threshold,
            "decision_threshold_source": inputs.threshold_source,
            "eval_report": {"file": EXPORTED_EVAL_REPORT_FILE, "source": str(args.eval_report)}
            if args.eval_report
            else None,
            "equivalence": equivalence,
            "license": args.license,
        }
    )
    card = render_model_card(manifest, inputs.taxonomy, inputs.report, args.push_to_hub or str(inputs.out))
    if MANIFEST_SHA256_PLACEHOLDER not in card:
        raise ExportError(f"the model card does not name the manifest's sha256 ({MANIFEST_SHA256_PLACEHOLDER})")
    # The card names the manifest's sha256, which the manifest cannot hold: the manifest records the card's
    # hash with the placeholder in its place (verification puts it back), then the digest is written in.
    (staging / MODEL_CARD_FILE).write_text(card, encoding="utf-8")
    manifest[MANIFEST_SHA256_FIELD] = [MODEL_CARD_FILE]
    manifest["files"] = hash_directory(staging)
    digest = write_manifest(staging, manifest)
    (staging / MODEL_CARD_FILE).write_text(card.replace(MANIFEST_SHA256_PLACEHOLDER, digest), encoding="utf-8")
    return verify_export(staging, expect_manifest_sha256=digest)


def export(args: ExportArguments) -> Path:
    """Run the whole export; return the final directory (see the module docstring)."""
    inputs = _check_inputs(args)
    protected = {"checkpoint": inputs.checkpoint}
    if Path(inputs.base_model).is_dir():
        protected["base model"] = Path(inputs.base_model).resolve()
    staging = _prepare_output(inputs.out, args.overwrite, protected)
    print(f"exporting {inputs.checkpoint} ({inputs.export_type}) via {staging}", flush=True)
    try:
        equivalence = _write_model_files(args, inputs, staging)
        manifest = _write_card_and_manifest(args, inputs, staging, equivalence)
    except ExportError as exc:
        raise ExportError(f"{exc}\nThe unfinished export is left in {staging}; {inputs.out} was not changed.") from exc

    out = inputs.out
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    digest = manifest_sha256(out)
    print(f"exported to {out}: {len(manifest['files'])} files, decision threshold {inputs.threshold:g}", flush=True)
    print(
        f"manifest sha256 {digest} (pins this export: --expect-manifest-sha256 {digest}; also in its model card)",
        flush=True,
    )
    if args.push_to_hub:
        print(f"uploaded to {push_export_to_hub(out, args.push_to_hub, args.hub_private)}", flush=True)
    if args.wandb_artifact:
        log_wandb_artifact(out, args.wandb_artifact, args.wandb_project)
    return out


# --------------------------------------------------------------------------------------------------
# Publishing


def push_export_to_hub(directory: Path, repo_id: str, private: bool = True) -> str:
    """Verify, then upload the export; the token comes from HF_TOKEN or the login cache, never the CLI."""
    from huggingface_hub import HfApi

    manifest = verify_export(directory)
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(directory),
        repo_id=repo_id,
        repo_type="model",
        commit_message=f"Export ({manifest['export_type']}), manifest sha256 {manifest_sha256(directory)}",
    )
    return f"https://huggingface.co/{repo_id}"


def log_wandb_artifact(directory: Path, name: str, project: str | None = None) -> None:
    """Log the verified export as a W&B ``model`` artifact (in the active run, else in a new ``export`` run)."""
    import wandb

    manifest = verify_export(directory)
    run = wandb.run
    started = run is None
    if started:
        run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "safemt-moderator", job_type="export")
    metadata = {
        key: manifest.get(key)
        for key in (
            "export_type",
            "base_model",
            "taxonomy",
            "prompt_format_version",
            "decision_threshold",
            "equivalence",
            "git",
            "data_fingerprint",
        )
    }
    metadata["manifest_sha256"] = manifest_sha256(directory)  # the digest that pins this export
    artifact = wandb.Artifact(name, type="model", description="SafeMT dialogue moderator export", metadata=metadata)
    artifact.add_dir(str(directory))
    run.log_artifact(artifact)
    if started:
        run.finish()


# --------------------------------------------------------------------------------------------------
# Command line


EXPORT_PROG = "python -m export"
VERIFY_PROG = "python -m export verify"


@dataclass
class VerifyArguments:
    directory: str = field(metadata={"help": "Export directory to check against its manifest.json."})
    expect_manifest_sha256: str | None = field(
        default=None,
        metadata={
            "help": "Pin the export: refuse it unless manifest.json's sha256 is this (printed by `python -m "
            "export`, written in the model card)."
        },
    )

    def __post_init__(self) -> None:
        if self.expect_manifest_sha256 is not None:
            self.expect_manifest_sha256 = check_sha256_hex(self.expect_manifest_sha256, "the manifest sha256")


def parse_export_args(argv: Sequence[str] | None = None) -> ExportArguments:
    """Parse the export's flags (``moderator.cli.parse_config``): a problem raises a one-line ``UsageError``."""
    (args,) = parse_config(
        (ExportArguments,),
        argv,
        prog=EXPORT_PROG,
        description="Export a trained moderator (merged or adapter-only) with a manifest, model card and an "
        f"equivalence check. `{VERIFY_PROG} DIR` checks an export against its manifest.",
    )
    return args


def _verify_main(argv: Sequence[str]) -> int:
    (args,) = parse_config(
        (VerifyArguments,),
        argv,
        prog=VERIFY_PROG,
        description="Check an export's files against the sha256 in its manifest.json.",
        positional=("directory",),
    )
    try:
        manifest = verify_export(args.directory, expect_manifest_sha256=args.expect_manifest_sha256)
    except VerificationError as exc:
        print(exc, file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    pinned = ", as pinned" if args.expect_manifest_sha256 else ""
    print(
        f"{args.directory}: OK, {len(manifest['files'])} files match {MANIFEST_FILE} "
        f"(manifest sha256 {manifest_sha256(args.directory)}{pinned})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        return _verify_main(argv[1:])
    if argv[:1] == ["_score"]:
        return score_main(argv[1:])
    args = parse_export_args(argv)
    try:
        export(args)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0
