"""The evaluation loop: target x defence x SafeMT dialogue length -> judged replies -> report.

Phases, each resumable from its own JSONL cache under ``<out_dir>/cache/`` (one model in memory at a
time, so a 7B target, a guard and a local judge need not fit together). A run holds ``<out_dir>/.lock``
(:func:`eval.cache.lock_out_dir`), so a second eval on the same folder fails at once.

Sharding (:class:`Shard`, ``python -m eval.run --shard I/N``): shard I computes only the samples and
test-split rows of the SafeMT and benign ids that hash into it, into ``cache/shard-I-of-N/``, and
writes no report. Every run reads the whole run's cache and every shard's, so the unsharded run that
follows finds everything cached and only writes the report. Each shard needs the whole validation
split to fix the moderator's threshold: :meth:`EvalRun.fix_thresholds` (``--thresholds-only``) scores
it once before the shards.

0. threshold:   each moderator defence scores the prepared validation split (``detection_split``) and
                its decision threshold for the whole run is fixed there, at ``target_fpr``, before
                it decides on anything it is evaluated on (see :func:`eval.defences.choose_threshold`:
                an explicit config threshold wins; no validation data: the checkpoint's). Validation
                scores are keyed without the threshold, so choosing it never invalidates them.
1. decisions:   every defence decides on every sample (SafeMT dialogues at each length, benign
                dialogues), keyed by (defence, settings, id, k, benign); the moderator's settings hold
                the threshold of phase 0, so every row of the report is measured at it. The moderator's
                ``policy`` and ``block`` defences (same model, settings and threshold) share one load and
                one verdict per dialogue; each mode's decision is derived from that verdict.
2. generations: every target answers the final user turn of every sample that was not blocked, with
                the system prompt its defence gave it, keyed by (target, settings, id, k, benign,
                system prompt). Identical prompts (no defence, an unflagged guard) are generated once.
                A target that batches its own work (vLLM) gets the pending requests ``workload_chunk``
                at a time; others get ``batch_size`` at a time (see :meth:`EvalRun.generate`).
3. judgements:  every reply is judged; these are the report rows, keyed by (target, defence, judge,
                id, k, benign, settings). A blocked reply is the fixed refusal and is labelled
                ``safe`` without a judge call; a benign reply gets a refusal check instead of a
                safety label (``label`` None: benign rows never enter the ASR). A cached row whose
                judge call failed (an ``error``, see :func:`eval.judge.row_needs_rejudge`) is judged
                again on the next run, so a judge outage never sticks in the cache.

Then ``eval.report.write_report`` gets the rows, per defence detection metrics (see
:func:`detection_results`) and each moderator's threshold of phase 0 (``report.json`` ``thresholds``).
Last, :func:`eval.judge.check_judge_failures` raises :class:`eval.judge.JudgeFailureError` when more
than ``max_judge_failure_share`` of the judge calls gave no verdict (the report is written first, so
it shows the n/a SIs and the outcome counts of the failed run).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from data_prep.benign import BenignDialogue, iter_candidates, materialize_image, read_candidate, source_name
from data_prep.config import ConfigError, DataPrepConfig
from data_prep.images import check_image, check_images
from data_prep.quarantine import Ledger

# data prep's SafeMT reader (both layouts, quarantine); private there until it moves to data_prep.safemt
from data_prep.safemt import read_safemt
from eval.cache import JsonlCache, compute_missing, lock_out_dir, settings_digest
from eval.config import DefenceConfig, EvalConfig, JudgeConfig, TargetConfig
from eval.defences import (
    BLOCK,
    INJECT,
    Defence,
    DefenceDecision,
    ModeratorDefence,
    ThresholdChoice,
    choose_threshold,
    defence_settings,
    load_defence,
    model_pass_settings,
    policy_system_prompt,
    score_settings,
)
from eval.judge import (
    Judge,
    JudgeItem,
    check_judge_failures,
    heuristic_refusal,
    judge_settings,
    load_judge,
    row_needs_rejudge,
)
from eval.targets import ChatModel, ChatRequest, load_target
from moderator.contract import SAFE, UNSAFE
from moderator.schema import RecordError, parse_row_id
from moderator.taxonomy import Taxonomy, load_taxonomy

logger = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """An eval input is malformed; the message names the file, record and field."""


# Ledger input names, as data prep's quarantine.jsonl names them.
SAFEMT_INPUT, BENIGN_INPUT = "safemt", "benign"
BENIGN_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
QUARANTINE_FILE = "quarantine.jsonl"  # one line per bad input record: input, file, index, id, field, reason
INPUTS_FILE = "inputs.json"  # per input: read, used, quarantined, not_selected


@dataclass(frozen=True)
class EvalSample:
    id: str
    k: int  # user turns
    benign: bool
    dialogue: tuple[dict[str, str], ...]  # ends with the user turn the target answers
    image_path: Path | None  # shown with the first user turn
    question: str | None = None  # SafeMT's original harmful question
    scenario: str | None = None  # SafeMT scenario label
    category: str | None = None  # the scenario's taxonomy id

    @property
    def key(self) -> tuple[str, int, bool]:
        return (self.id, self.k, self.benign)


def _quarantine_failure(ledger: Ledger, input_name: str, what: str) -> EvalDataError | None:
    """``strict``: the error naming the first record ``input_name`` quarantined (None when nothing was)."""
    entries = [e for e in ledger.entries if e.input == input_name]
    if not entries:
        return None
    return EvalDataError(f"strict: {len(entries)} {what} record(s) quarantined; first: {entries[0].message}")


def load_safemt_samples(
    safemt_dir: str | Path,
    turns: Sequence[int],
    limit: int | None,
    taxonomy: Taxonomy,
    *,
    ledger: Ledger | None = None,
    strict: bool = False,
    images_root: str | None = None,
    keep_ids: Collection[str] | None = None,
) -> list[EvalSample]:
    """SafeMT dialogues of the lengths ``turns``, read by data prep's reader (GitHub or hub layout).

    A bad record (schema, duplicate id, an image path leaving ``images_root``, an image that is missing
    or does not decode) is quarantined in ``ledger`` as data prep does, unless ``strict``: then the first
    one raises :class:`EvalDataError` naming file, record and field. ``keep_ids``: only these ids (the
    held-out test split); ``limit``: the first N kept records of each length. A record read but not
    kept is counted in ``ledger.read`` only (read = used + quarantined + not selected).
    """
    ledger = ledger if ledger is not None else Ledger()
    spec = DataPrepConfig(safemt=str(safemt_dir), safemt_turns=list(turns), safemt_images_root=images_root)
    try:
        candidates, _ = read_safemt(spec, taxonomy, ledger)
    except ConfigError as exc:
        raise EvalDataError(f"safemt_dir: {exc}") from None
    chosen: dict[int, list[tuple[Any, Any, str]]] = {k: [] for k in turns}
    for item, record, image in candidates:
        kept = chosen[record.turns]
        if (keep_ids is None or record.id in keep_ids) and (limit is None or len(kept) < limit):
            kept.append((item, record, image))
    selected = [c for k in turns for c in chosen[k]]
    checks = check_images(image for _, _, image in selected)  # decoded now, not halfway through the run
    samples = []
    for item, record, image in selected:
        if checks[image].error:
            ledger.quarantine(SAFEMT_INPUT, item.file, item.index, record.id, "image_path", checks[image].error)
            continue
        ledger.converted[SAFEMT_INPUT] += 1
        samples.append(
            EvalSample(
                id=record.id,
                k=record.turns,
                benign=False,
                dialogue=record.dialogue,
                image_path=Path(image),
                question=record.question,
                scenario=record.scenario,
                category=taxonomy.by_label[record.scenario].id,
            )
        )
    if strict and (error := _quarantine_failure(ledger, SAFEMT_INPUT, "SafeMT")):
        raise error
    return samples


def load_benign_samples(
    path: str | Path,
    limit: int | None,
    *,
    ledger: Ledger | None = None,
    strict: bool = False,
    image_dir: Path | None = None,
) -> list[EvalSample]:
    """Benign dialogues in the source's order, read by data prep's benign reader; the first ``limit`` good ones.

    Usually data prep's ``benign_eval.jsonl`` (``{"id", "messages", "image"?}``, the image relative to
    the file's folder and required to stay inside it); any source data prep reads works. Data prep's
    normalisation applies (system messages dropped, trailing assistant turns dropped so the target
    answers the last user turn). A bad row is quarantined in ``ledger`` (or raises, ``strict``).
    ``image_dir``: where image bytes held in a row are written (without it such a row is quarantined).
    """
    ledger = ledger if ledger is not None else Ledger()
    spec = str(path)
    local = Path(spec)
    if (local.suffix.lower() in BENIGN_FILE_SUFFIXES or spec.startswith((".", "/"))) and not local.exists():
        raise EvalDataError(f"{path}: benign file not found")
    source = source_name(spec, None)
    seen: set[str] = set()
    samples: list[EvalSample] = []
    try:
        for candidate in iter_candidates(spec, "train", seed=None):
            if limit is not None and len(samples) >= limit:
                break
            ledger.read[BENIGN_INPUT] += 1
            index = candidate.index if candidate.index >= 0 else None
            try:
                dialogue = read_candidate(candidate, source, seen)
                image_path = _benign_image(dialogue, candidate.base_dir, image_dir)
            except RecordError as exc:
                ledger.quarantine(BENIGN_INPUT, candidate.file, index, candidate.id, exc.field, exc.reason)
                continue
            seen.add(dialogue.id)
            ledger.converted[BENIGN_INPUT] += 1
            k = (len(dialogue.dialogue) + 1) // 2
            samples.append(
                EvalSample(id=dialogue.id, k=k, benign=True, dialogue=tuple(dialogue.dialogue), image_path=image_path)
            )
    except ConfigError as exc:
        raise EvalDataError(f"benign: {exc}") from None
    if strict and (error := _quarantine_failure(ledger, BENIGN_INPUT, "benign")):
        raise error
    return samples


def _benign_image(dialogue: BenignDialogue, base_dir: Path | None, image_dir: Path | None) -> Path | None:
    """The dialogue's own image, resolved inside its source's folder and decoded once; None: it has none."""
    image = dialogue.source_image
    if image is None:
        return None
    written = (isinstance(image, dict) and image.get("bytes")) or hasattr(image, "save")  # not a path
    if written and image_dir is None:
        raise RecordError("images", "image bytes in the row, and no folder was given to write them to")
    stem = (image_dir or Path(".")) / hashlib.sha256(dialogue.id.encode()).hexdigest()[:16]
    path = materialize_image(image, base_dir, stem)
    check = check_image(path)
    if check.error:
        raise RecordError("images", check.error)
    return Path(path)


def open_images(samples: Sequence[EvalSample]) -> list[list[Any]]:
    """One image list per sample (empty without an image), decoded as RGB."""
    from PIL import Image

    images = []
    for sample in samples:
        if sample.image_path is None:
            images.append([])
            continue
        with Image.open(sample.image_path) as image:
            images.append([image.convert("RGB")])
    return images


SPLIT_ID_PREFIX = "test-split:"  # keeps test-split decisions apart from eval samples in the cache
THRESHOLD_SPLIT = "validation"  # the decision threshold is chosen here, never on test


@dataclass(frozen=True)
class SplitRow:
    """One row of a prepared dataset split (detection metrics on test, the threshold on validation)."""

    index: int
    id: str
    k: int
    benign: bool
    category: str | None
    split: str = "test"
    group: str | None = None  # the dataset's split_group (the SafeMT or benign id); None: from the row id

    @property
    def key(self) -> tuple[str, int, bool]:
        prefix = SPLIT_ID_PREFIX if self.split == "test" else f"{self.split}-split:"
        return (prefix + self.id, self.k, self.benign)

    @property
    def dialogue_id(self) -> str:
        """The SafeMT (or benign) id this row was cut from: every prefix row of an id shares it."""
        return self.group if self.group is not None else parse_row_id(self.id)[0]


def load_detection_split(path: str | Path, split: str = "test") -> tuple[Any, list[SplitRow]]:
    """One split (``test`` by default) of a dataset written by ``data_prep.build`` and its rows' labels."""
    from data_prep.io import load_prepared

    try:
        splits = load_prepared(path)
    except FileNotFoundError as exc:
        raise EvalDataError(f"detection_split: {exc}") from None
    if split not in splits:
        raise EvalDataError(f"{path}: the prepared dataset has no {split!r} split (has {sorted(splits)})")
    data = splits[split]
    missing = [c for c in ("messages", "images", "label", "category", "id", "turns") if c not in data.column_names]
    if missing:
        raise EvalDataError(f"{path}: {split} split lacks column(s) {missing}")
    rows = []
    # Column access reads only that column: the images are not decoded here.
    ids = data["id"]
    # data prep writes split_group (a row's SafeMT or benign id); older datasets: parse the row id.
    groups = data["split_group"] if "split_group" in data.column_names else [None] * len(ids)
    for index, (row_id, label, category, turns, group) in enumerate(
        zip(ids, data["label"], data["category"], data["turns"], groups, strict=True)
    ):
        if label not in (SAFE, UNSAFE):
            raise EvalDataError(
                f"{path}: {split} row {index} (id={row_id!r}): field 'label': {label!r} is not safe/unsafe"
            )
        if group is None:
            try:
                group = parse_row_id(row_id)[0]
            except ValueError as exc:
                raise EvalDataError(f"{path}: {split} row {index}: field 'id': {exc}") from None
        rows.append(SplitRow(index, row_id, int(turns), label == SAFE, category or None, split, group))
    return data, rows


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the SafeMT ids whose stable hash falls in it.

    Every length of an id, its prepared test rows (its prefixes too) and a benign id's rows go to the
    same shard, so the shards of one run split its work without overlap and their caches merge.
    """

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 0 <= I < N, e.g. ``--shard 3/8``."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard: expected I/N (e.g. 0/8), got {text!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard: expected 0 <= I < N, got {text!r}")
        return cls(index, count)

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def holds(self, sample_id: str) -> bool:
        # sha256, not hash(): the same split in every process and Python version.
        return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") % self.count == self.index


@dataclass(frozen=True)
class _Generation:
    sample: EvalSample
    system: str | None


@dataclass(frozen=True)
class _Pending:
    target: TargetConfig
    defence: DefenceConfig
    sample: EvalSample
    decision: DefenceDecision


@dataclass
class EvalRun:
    """One evaluation; the loaders are parameters so tests can wrap or replace the models."""

    config: EvalConfig
    taxonomy: Taxonomy = field(default_factory=load_taxonomy)
    judge: Judge | None = None  # None: built from config.judge when first needed
    target_loader: Callable[[TargetConfig], ChatModel] = load_target
    defence_loader: Callable[[DefenceConfig, Taxonomy], Defence] = load_defence
    judge_loader: Callable[[JudgeConfig, Taxonomy], Judge] = load_judge
    shard: Shard | None = None  # None: the whole run (and the report); else this shard's items only

    def __post_init__(self) -> None:
        self.split: Any = None  # the prepared test split (a datasets.Dataset), when configured
        self.all_split_rows: list[SplitRow] = []  # the whole test split (a shard's are in split_rows)
        self.split_rows: list[SplitRow] = []
        self.threshold_split: Any = None  # the prepared validation split: the moderator's threshold
        self.threshold_rows: list[SplitRow] = []
        # Per moderator defence: the threshold of the whole run, fixed by decide() before any attack decision.
        self.thresholds: dict[str, ThresholdChoice] = {}
        self._defence_sigs: dict[tuple[str, float | None], str] = {}
        self._score_sigs: dict[str, str] = {}
        self.computed: dict[str, int] = {}  # items computed (not found cached) per stage, for the summary
        self.ledger = Ledger()  # the inputs' accounting, filled by load_samples
        self.out_dir = Path(self.config.out_dir)
        self.decisions = self._open_cache("decisions.jsonl", ("defence", "sig", "id", "k", "benign"))
        self.generations = self._open_cache("generations.jsonl", ("target", "sig", "id", "k", "benign", "system_sig"))
        self.judgements = self._open_cache(
            "judgements.jsonl", ("target", "defence", "judge", "id", "k", "benign", "sig")
        )

    @property
    def cache_dir(self) -> Path:
        """Where this process writes: ``cache/`` for a whole run, ``cache/shard-I-of-N/`` for a shard."""
        root = self.out_dir / "cache"
        return root if self.shard is None else root / f"shard-{self.shard.name}"

    def _open_cache(self, name: str, key_fields: Sequence[str]) -> JsonlCache:
        # The whole run's file and every shard's are read (a rerun with another N reuses them too); only
        # this process's own file is written, so concurrent shards never share one.
        root = self.out_dir / "cache"
        others = [root / name, *sorted(root.glob(f"shard-*/{name}"))]
        return JsonlCache(self.cache_dir / name, key_fields, read_also=others)

    # -- inputs -----------------------------------------------------------------------------------
    def load_samples(self) -> list[EvalSample]:
        cfg = self.config
        if cfg.detection_split and self.split is None:
            self.split, self.all_split_rows = load_detection_split(cfg.detection_split)
            self.threshold_split, self.threshold_rows = load_detection_split(cfg.detection_split, THRESHOLD_SPLIT)
            if not any(row.benign for row in self.threshold_rows):
                raise EvalDataError(
                    f"{cfg.detection_split}: the {THRESHOLD_SPLIT} split has no benign (safe) row, so no decision "
                    f"threshold can be chosen for target_fpr={cfg.target_fpr}"
                )
        self.ledger = Ledger()  # what each input read, used and quarantined (see write_input_report)
        held_out = None
        if cfg.restricted_to_split:
            # Only dialogues the moderator never trained on (every prefix row of an id counts).
            held_out = {row.dialogue_id for row in self.all_split_rows if not row.benign}
        samples = load_safemt_samples(
            cfg.safemt_dir,
            cfg.turns,
            cfg.limit,
            self.taxonomy,
            ledger=self.ledger,
            strict=cfg.strict,
            images_root=cfg.safemt_images_root,
            keep_ids=held_out,
        )
        if held_out is not None and not samples:
            raise EvalDataError(f"{cfg.safemt_dir}: no SafeMT id is in the test split of {cfg.detection_split}")
        if cfg.benign:
            limit = cfg.benign_limit if cfg.benign_limit is not None else cfg.limit
            samples += load_benign_samples(
                cfg.benign, limit, ledger=self.ledger, strict=cfg.strict, image_dir=self.out_dir / "benign_images"
            )
        self.split_rows = self.all_split_rows
        if self.shard is not None:
            # After the limits: the shards of a run split exactly the items the whole run evaluates.
            # The validation split is not sharded: each shard needs all of it to fix the run's threshold.
            samples = [s for s in samples if self.shard.holds(s.id)]
            self.split_rows = [r for r in self.all_split_rows if self.shard.holds(r.dialogue_id)]
        return samples

    def write_input_report(self, folder: Path) -> dict[str, dict[str, int]]:
        """``quarantine.jsonl`` (every bad input record: file, index, id, field, reason) and ``inputs.json``
        (per input: read = used + quarantined + not_selected, the last being good records left out by
        ``limit`` or the test-split restriction) in ``folder``; warns when anything was quarantined."""
        counts = {}
        for name in (SAFEMT_INPUT, BENIGN_INPUT):
            totals = self.ledger.totals(name)
            used, quarantined = totals["converted"], totals["quarantined"]
            not_selected = totals["read"] - used - quarantined
            counts[name] = {"read": totals["read"], "used": used, "quarantined": quarantined}
            counts[name]["not_selected"] = not_selected
        folder.mkdir(parents=True, exist_ok=True)
        self.ledger.write(folder / QUARANTINE_FILE)
        (folder / INPUTS_FILE).write_text(json.dumps(counts, indent=2) + "\n")
        if self.ledger.entries:
            logger.warning(
                "%d input record(s) quarantined, see %s",
                len(self.ledger.entries),
                folder / QUARANTINE_FILE,
            )
        return counts

    # -- keys ---------------------------------------------------------------------------------------
    def _defence_sig(self, defence: DefenceConfig) -> str:
        threshold = None
        if defence.kind == "moderator":
            if defence.label not in self.thresholds:
                raise RuntimeError(f"{defence.label}: its threshold is chosen in decide() before any decision")
            threshold = self.thresholds[defence.label].threshold
        # Memoised: the moderator's settings hash files on disk (see defence_settings).
        memo = (defence.label, threshold)
        if memo not in self._defence_sigs:
            self._defence_sigs[memo] = settings_digest(defence_settings(defence, threshold))
        return self._defence_sigs[memo]

    def _score_sig(self, defence: DefenceConfig) -> str:
        if defence.label not in self._score_sigs:
            self._score_sigs[defence.label] = settings_digest(score_settings(defence))
        return self._score_sigs[defence.label]

    def _target_sig(self, target: TargetConfig) -> str:
        settings = {
            "model": target.model,
            "backend": target.backend,
            "dtype": target.dtype,
            "system_prompt": target.system_prompt,
            "max_new_tokens": self.config.max_new_tokens,
        }
        return settings_digest(settings)

    @property
    def judge_name(self) -> str:
        return self.judge.name if self.judge is not None else self.config.judge.label

    def _judge_settings(self) -> dict[str, Any]:
        base = self.judge.settings if self.judge is not None else judge_settings(self.config.judge)
        return {**base, "refusal_check": self.config.judge.refusal_check}

    def _row_sig(self, target: TargetConfig, defence: DefenceConfig) -> str:
        return settings_digest(
            {
                "target": self._target_sig(target),
                "defence": self._defence_sig(defence),
                "judge": self._judge_settings(),
                "refusal_text": self.config.refusal_text,
            }
        )

    def _decision_key(self, defence: DefenceConfig, item: EvalSample | SplitRow) -> tuple:
        # Validation rows serve only their P(unsafe), which the threshold does not change.
        threshold_row = isinstance(item, SplitRow) and item.split == THRESHOLD_SPLIT
        sig = self._score_sig(defence) if threshold_row else self._defence_sig(defence)
        return (defence.label, sig, *item.key)

    def _generation_key(self, target: TargetConfig, item: _Generation) -> tuple:
        return (target.label, self._target_sig(target), *item.sample.key, settings_digest({"system": item.system}))

    def _row_key(self, target: TargetConfig, defence: DefenceConfig, sample: EvalSample) -> tuple:
        return (target.label, defence.label, self.judge_name, *sample.key, self._row_sig(target, defence))

    # -- phase 1: defence decisions -----------------------------------------------------------------
    def _split_rows_for(self, defence: DefenceConfig) -> list[SplitRow]:
        # The prepared rows hold the moderator's rendered prompt, not the raw dialogue: only our
        # moderator can read them, so the baselines' detection metrics come from the eval samples.
        return self.split_rows if defence.kind == "moderator" else []

    def _threshold_rows_for(self, defence: DefenceConfig) -> list[SplitRow]:
        return self.threshold_rows if defence.kind == "moderator" else []

    def _defence_groups(self) -> list[list[DefenceConfig]]:
        """The defences that share one model pass (a moderator's policy and block modes), in config order."""
        groups: dict[str, list[DefenceConfig]] = {}
        for cfg in self.config.defences:
            groups.setdefault(settings_digest(model_pass_settings(cfg)), []).append(cfg)
        return list(groups.values())

    def _missing(self, group: Sequence[DefenceConfig], items: Sequence[EvalSample | SplitRow]) -> list:
        return [item for item in items if any(self._decision_key(cfg, item) not in self.decisions for cfg in group)]

    def decide(self, samples: Sequence[EvalSample], thresholds_only: bool = False) -> None:
        """Phase 0 and 1 (``thresholds_only``: phase 0): each model is loaded at most once, only if needed.

        Defences that share a model pass (the moderator in ``policy`` and ``block`` mode) are decided
        together: the moderator reads each dialogue once and both modes' decisions come from that verdict.
        """
        for group in self._defence_groups():
            first = group[0]
            defence: Defence | None = None
            try:
                validation = self._missing(group, self._threshold_rows_for(first))
                if validation:
                    defence = self.defence_loader(first, self.taxonomy)
                    self._compute_decisions(group, defence, validation, f"{first.label} on {THRESHOLD_SPLIT} split")
                if first.kind == "moderator":
                    # Before any decision the report shows: every one of them is made at this threshold.
                    for cfg in group:
                        self.thresholds[cfg.label] = self.choose_threshold(cfg)
                if thresholds_only:
                    continue
                missing = self._missing(group, samples)
                missing_test = self._missing(group, self._split_rows_for(first))
                if not missing and not missing_test:
                    continue
                if defence is None:
                    defence = self.defence_loader(first, self.taxonomy)
                if first.kind == "moderator":
                    defence.set_threshold(self.thresholds[first.label].threshold)
                self._compute_decisions(group, defence, missing, f"defence {first.label}")
                self._compute_decisions(group, defence, missing_test, f"{first.label} on test split")
            finally:
                if defence is not None:
                    defence.close()

    def _compute_decisions(
        self, group: Sequence[DefenceConfig], defence: Defence, items: Sequence[EvalSample | SplitRow], desc: str
    ) -> None:
        """Decide ``items`` (all missing for some defence of ``group``) a batch at a time, appending each batch.

        One kind of item per call: a batch of split rows reads one prepared dataset.
        """
        if not items:
            return
        decide = self._decide_split_rows if isinstance(items[0], SplitRow) else self._decide_samples
        batch_size = self.config.batch_size
        with tqdm(total=len(items), desc=desc, unit="item") as progress:
            for start in range(0, len(items), batch_size):
                batch = list(items[start : start + batch_size])
                self.decisions.append(decide(group, defence, batch))
                progress.update(len(batch))
        self.computed["decisions"] = self.computed.get("decisions", 0) + len(items)

    def choose_threshold(self, cfg: DefenceConfig) -> ThresholdChoice:
        """The moderator's threshold for this run, from its cached validation decisions (see ``choose_threshold``)."""
        rows = self._threshold_rows_for(cfg)
        choice = choose_threshold(
            cfg, [self.decision(cfg, row) for row in rows], [row.benign for row in rows], self.config.target_fpr
        )
        if rows and choice.source == "manifest":
            logger.warning("%s: %s", cfg.label, choice.detail)
        logger.info("%s: decision threshold %s (%s: %s)", cfg.label, choice.threshold, choice.source, choice.detail)
        return choice

    def _decision_records(self, cfg: DefenceConfig, batch: Sequence[EvalSample | SplitRow], decisions) -> list[dict]:
        return [
            dict(zip(self.decisions.key_fields, self._decision_key(cfg, item), strict=True), **d.to_record())
            for item, d in zip(batch, decisions, strict=True)
        ]

    def _group_records(self, group: Sequence[DefenceConfig], defence: Defence, batch, verdicts) -> list[dict]:
        # One verdict per item; each defence of the group turns it into its own mode's decision.
        return list(
            chain.from_iterable(
                self._decision_records(cfg, batch, [defence.decision(v, cfg.mode) for v in verdicts]) for cfg in group
            )
        )

    def _decide_samples(self, group: Sequence[DefenceConfig], defence: Defence, batch: list[EvalSample]) -> list:
        dialogues, images = [s.dialogue for s in batch], open_images(batch)
        if isinstance(defence, ModeratorDefence):
            return self._group_records(group, defence, batch, defence.verdicts(dialogues, images))
        (cfg,) = group  # a guard or none shares its pass with no other defence
        return self._decision_records(cfg, batch, defence.decide_batch(dialogues, images))

    def _decide_split_rows(self, group: Sequence[DefenceConfig], defence: Defence, batch: list[SplitRow]) -> list:
        data = {"test": self.split, THRESHOLD_SPLIT: self.threshold_split}[batch[0].split]  # one split per batch
        rows = data.select([r.index for r in batch])
        prompts = [_without_target(row["messages"], row["id"]) for row in rows]
        images = [[image.convert("RGB") for image in row["images"]] for row in rows]
        if isinstance(defence, ModeratorDefence):
            return self._group_records(group, defence, batch, defence.verdicts_rendered(prompts, images))
        (cfg,) = group
        return self._decision_records(cfg, batch, defence.decide_rendered(prompts, images))

    def decision(self, defence: DefenceConfig, item: EvalSample | SplitRow) -> DefenceDecision:
        record = self.decisions.get(self._decision_key(defence, item))
        if record is None:
            raise RuntimeError(f"no cached decision of {defence.label} for {item.key}")
        return DefenceDecision.from_record(record)

    # -- phase 2: target replies --------------------------------------------------------------------
    def _system_for(self, target: TargetConfig, decision: DefenceDecision) -> str | None:
        if decision.action == INJECT:
            return policy_system_prompt(target.system_prompt, decision, self.taxonomy)
        return target.system_prompt

    def _generation_items(self, target: TargetConfig, samples: Sequence[EvalSample]) -> list[_Generation]:
        items = []
        for defence in self.config.defences:
            for sample in samples:
                decision = self.decision(defence, sample)
                if decision.action != BLOCK:
                    items.append(_Generation(sample, self._system_for(target, decision)))
        return items

    def generate(self, samples: Sequence[EvalSample]) -> None:
        """Phase 2: one target in memory at a time, closed and dropped before the next one loads."""
        for cfg in self.config.targets:
            items = self._generation_items(cfg, samples)
            if all(self._generation_key(cfg, item) in self.generations for item in items):
                continue
            target: ChatModel | None = self.target_loader(cfg)
            try:
                done = compute_missing(
                    self.generations,
                    # Grouped by length, so a batch holds prompts of similar size (less padding).
                    sorted(items, key=lambda item: (item.sample.benign, item.sample.k)),
                    partial(self._generation_key, cfg),
                    partial(self._generate_batch, cfg, target),
                    self.workload_chunk(cfg, target),
                    desc=f"target {cfg.label}",
                )
                self.computed["generations"] = self.computed.get("generations", 0) + done
            finally:
                close_model(target)
                # Drop the last reference too: the next loader runs before this name is rebound.
                target = None
                gc.collect()

    def workload_chunk(self, cfg: TargetConfig, target: Any) -> int:
        """How many pending requests one ``target.generate`` call gets.

        A target that schedules its own batches (vLLM; any target with ``batches_internally``) gets
        ``config.workload_chunk`` requests per call (default 1024): the
        engine sees a large workload, yet each chunk's replies are cached as soon as it returns, so an
        interrupted run loses at most one chunk and only one chunk's decoded images are in memory.
        Feeding the whole workload in one call would lose resume granularity and hold every image of a
        SafeMT-scale run (~10^5 requests) in RAM. A target that generates everything it is given as one
        padded batch (today's HF backend) gets ``batch_size`` requests.
        """
        if cfg.backend == "vllm" or getattr(target, "batches_internally", False):
            return self.config.workload_chunk
        return self.config.batch_size

    def _generate_batch(self, cfg: TargetConfig, target: ChatModel, batch: list[_Generation]) -> list[dict]:
        images = open_images([item.sample for item in batch])
        requests = [
            ChatRequest(dialogue=item.sample.dialogue, system=item.system, image=imgs[0] if imgs else None)
            for item, imgs in zip(batch, images, strict=True)
        ]
        replies = target.generate(requests, self.config.max_new_tokens)
        sig = self._target_sig(cfg)
        return [
            {
                "target": cfg.label,
                "sig": sig,
                "id": item.sample.id,
                "k": item.sample.k,
                "benign": item.sample.benign,
                "system_sig": settings_digest({"system": item.system}),
                "system": item.system,
                "reply": reply,
            }
            for item, reply in zip(batch, replies, strict=True)
        ]

    # -- phase 3: judge -------------------------------------------------------------------------
    def _reply(self, pending: _Pending) -> str:
        if pending.decision.action == BLOCK:
            return self.config.refusal_text
        item = _Generation(pending.sample, self._system_for(pending.target, pending.decision))
        record = self.generations.get(self._generation_key(pending.target, item))
        if record is None:
            raise RuntimeError(f"no cached reply of {pending.target.label} for {pending.sample.key}")
        return record["reply"]

    def _judge_batch(self, batch: list[_Pending]) -> list[dict]:
        replies = [self._reply(p) for p in batch]
        labels: dict[int, tuple[str | None, str | None]] = {}
        refusals: dict[int, tuple[bool | None, str | None]] = {}
        to_judge, to_check = [], []
        for index, (pending, reply) in enumerate(zip(batch, replies, strict=True)):
            blocked = pending.decision.action == BLOCK
            if pending.sample.benign:
                if blocked:
                    refusals[index] = (True, None)
                elif self.config.judge.refusal_check == "heuristic":
                    refusals[index] = (heuristic_refusal(reply), None)
                else:
                    to_check.append(index)
                labels[index] = (None, None)
            else:
                if blocked:
                    labels[index] = (SAFE, None)  # the fixed refusal, safe by construction
                else:
                    to_judge.append(index)
                refusals[index] = (None, None)
        judge = self._ensure_judge() if (to_judge or to_check) else None
        if to_judge:
            items = [self._judge_item(batch[i], replies[i]) for i in to_judge]
            for index, judgement in zip(to_judge, judge.judge_safety(items), strict=True):
                labels[index] = (judgement.label, judgement.raw)
        if to_check:
            items = [self._judge_item(batch[i], replies[i]) for i in to_check]
            for index, result in zip(to_check, judge.judge_refusal(items), strict=True):
                refusals[index] = (result.refused, result.raw)
        rows = []
        for index, (pending, reply) in enumerate(zip(batch, replies, strict=True)):
            sample, decision = pending.sample, pending.decision
            label, judge_raw = labels[index]
            refused, refusal_raw = refusals[index]
            rows.append(
                {
                    "target": pending.target.label,
                    "defence": pending.defence.label,
                    "judge": self.judge_name,
                    "id": sample.id,
                    "k": sample.k,
                    "benign": sample.benign,
                    "sig": self._row_sig(pending.target, pending.defence),
                    "label": label,
                    "flagged": decision.flagged,
                    "refused": refused,
                    "parse_error": decision.parse_error,
                    "action": decision.action,
                    "category": decision.category,
                    "score": decision.score,
                    "scenario": sample.scenario,
                    "reply": reply,
                    "judge_raw": judge_raw if judge_raw is not None else refusal_raw,
                }
            )
        return rows

    def _judge_item(self, pending: _Pending, reply: str) -> JudgeItem:
        sample = pending.sample
        return JudgeItem(
            dialogue=sample.dialogue,
            reply=reply,
            question=sample.question,
            scenario=sample.scenario,
            has_image=sample.image_path is not None,
        )

    def _ensure_judge(self) -> Judge:
        if self.judge is None:
            self.judge = self.judge_loader(self.config.judge, self.taxonomy)
        return self.judge

    def _pending(self, samples: Sequence[EvalSample]) -> list[_Pending]:
        return [
            _Pending(target, defence, sample, self.decision(defence, sample))
            for target in self.config.targets
            for defence in self.config.defences
            for sample in samples
        ]

    def judge_all(self, samples: Sequence[EvalSample]) -> None:
        pending = self._pending(samples)
        judge = self.config.judge
        # An API judge keeps `concurrency` requests in flight within a chunk (a finished one frees its
        # worker at once); chunks of 8x that keep the wait for the slowest request at a chunk's end rare,
        # while a kill loses at most one chunk of judge calls.
        batch_size = max(judge.batch_size, judge.concurrency * (8 if judge.kind == "openai" else 1))
        self.computed["judgements"] = compute_missing(
            self.judgements,
            pending,
            lambda p: self._row_key(p.target, p.defence, p.sample),
            self._judge_batch,
            batch_size,
            desc="judge",
            recompute=row_needs_rejudge,  # a judge error cached by an earlier run is asked again
        )

    def rows(self, samples: Sequence[EvalSample]) -> list[dict[str, Any]]:
        """The report rows of this config (the cache may also hold rows of other configs)."""
        rows = []
        for pending in self._pending(samples):
            row = self.judgements.get(self._row_key(pending.target, pending.defence, pending.sample))
            if row is None:
                raise RuntimeError(
                    f"no judged row for {pending.target.label}/{pending.defence.label}/{pending.sample.key}"
                )
            rows.append(row)
        return rows

    # -- report -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The whole run, or one shard's part of it (see :meth:`shard_summary`); holds ``out_dir`` meanwhile."""
        with lock_out_dir(self.out_dir, None if self.shard is None else self.shard.name):
            return self._run()

    def fix_thresholds(self) -> dict[str, Any]:
        """Phase 0 alone: score the validation split and fix each moderator's threshold, nothing else.

        Every shard needs the whole validation split to fix the run's threshold; run this once before
        the shards (``python -m eval.run --thresholds-only``) so they find it cached instead of each
        scoring all of it. Returns ``{defence: threshold record}``.
        """
        if self.shard is not None:
            raise ValueError("thresholds are fixed for the whole run: --thresholds-only takes no --shard")
        with lock_out_dir(self.out_dir):
            samples = self.load_samples()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.write_input_report(self.out_dir)
            self.decide(samples, thresholds_only=True)
        return {label: choice.to_record() for label, choice in self.thresholds.items()}

    def _compute(self, samples: Sequence[EvalSample]) -> None:
        try:
            self.decide(samples)
            self.generate(samples)
            self.judge_all(samples)
        finally:
            if self.judge is not None:
                self.judge.close()

    def _run(self) -> dict[str, Any]:
        from eval.report import write_report

        samples = self.load_samples()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # A shard writes only under its own cache folder (each shard reads, and so reports, all inputs).
        self.write_input_report(self.out_dir if self.shard is None else self.cache_dir)
        config_json = json.dumps(self.config.to_dict(), indent=2) + "\n"
        if self.shard is not None:
            # A shard writes only under its own cache folder; the report is the unsharded run's job.
            (self.cache_dir / "config.json").write_text(config_json)
            self._compute(samples)
            return self.shard_summary(samples)
        (self.out_dir / "config.json").write_text(config_json)
        self._compute(samples)
        rows = self.rows(samples)
        with (self.out_dir / "rows.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        detection = detection_results(self, samples)
        # The configured K, as in eval.safety_index and the SafeMT definition: a length without a
        # labelled reply has no ASR, and then the SI is n/a with the reason (never a made-up 1.0).
        report = write_report(
            rows,
            self.out_dir,
            turns=self.config.turns,
            detection=detection or None,
            title=self.config.title,
            thresholds={label: choice.to_record() for label, choice in self.thresholds.items()},
        )
        # After the report, so a failed run still leaves its n/a SIs and outcome counts on disk.
        summary = check_judge_failures(rows, self.max_judge_failure_share, judge=self.judge_name)
        if summary.failed:
            logger.warning("%s", summary.describe())
        return report

    def shard_summary(self, samples: Sequence[EvalSample]) -> dict[str, Any]:
        """What a shard did (it writes no report: ``python -m eval.run`` without ``--shard`` merges them)."""
        assert self.shard is not None
        return {
            "shard": f"{self.shard.index}/{self.shard.count}",
            "samples": len(samples),
            "test_split_rows": len(self.split_rows),
            "computed": {stage: self.computed.get(stage, 0) for stage in ("decisions", "generations", "judgements")},
            "cache": str(self.cache_dir),
        }

    @property
    def max_judge_failure_share(self) -> float:
        """The share of judge calls that may give no verdict before the run fails (``EvalConfig``, default 0.05)."""
        return float(self.config.max_judge_failure_share)


def close_model(model: Any) -> None:
    """Free a target, guard or judge before the next model loads (``close()`` when it has one)."""
    closer = getattr(model, "close", None)
    if callable(closer):
        closer()


def _without_target(messages: list[dict[str, Any]], row_id: str) -> list[dict[str, Any]]:
    if not messages or messages[-1]["role"] != "assistant":
        raise EvalDataError(f"test split row {row_id!r}: field 'messages' does not end with the target (assistant)")
    return messages[:-1]


def detection_results(run: EvalRun, samples: Sequence[EvalSample]) -> dict[str, dict[str, Any]]:
    """Per defence (``none`` excluded): detection metrics, unsafe = positive.

    Our moderator is scored on the prepared dataset's test split when ``detection_split`` is set;
    otherwise, and for the baseline guards always, on the evaluated samples: SafeMT dialogues (every
    length) are the positives, benign dialogues the negatives. The score is the defence's P(unsafe)
    when it gives one, else its flag. Category accuracy is computed for our moderator only (the
    guards' categories are their own codes, not SafeMT scenarios). ``data`` says which set was used.
    The moderator's flags (precision, recall, FPR) are at the run's threshold, ``run.thresholds``,
    which the report records once under ``thresholds``.
    """
    from eval.metrics import detection_metrics

    results = {}
    for defence in run.config.defences:
        if defence.kind == "none":
            continue
        split_rows = run._split_rows_for(defence)
        items: Sequence[EvalSample | SplitRow] = split_rows or samples
        decisions = [run.decision(defence, item) for item in items]
        y_true = [0 if item.benign else 1 for item in items]
        y_pred = [int(d.flagged) for d in decisions]
        y_score = [d.score if d.score is not None else float(d.flagged) for d in decisions]
        categories: dict[str, Any] = {}
        if defence.kind == "moderator":
            categories = {
                "category_true": [item.category or "" for item in items],
                "category_pred": [d.category or "" for d in decisions],
            }
        metrics = detection_metrics(y_true, y_score, y_pred, **categories)
        metrics["data"] = "test split" if split_rows else "eval samples"
        results[defence.label] = metrics
    return results


def run_eval(config: EvalConfig, **kwargs: Any) -> dict[str, Any]:
    """Run the whole evaluation; returns the report dict (also written to ``config.out_dir``).

    With ``shard=Shard(i, n)`` only that shard's items are computed into ``cache/shard-i-of-n/`` and
    the shard's summary is returned instead (no report).
    """
    return EvalRun(config, **kwargs).run()
