"""``python -m data_prep.build --config configs/data/safemt.yaml [--flag value ...]``: SafeMT (+ benign) -> dataset.

Writes ``<out>/dataset`` (a DatasetDict with train/validation/test, read back with
``data_prep.io.load_prepared``), ``<out>/stats.json`` and ``<out>/quarantine.jsonl``, all built in a staging
folder beside ``out`` that replaces it only when the build succeeded: a failed build leaves ``out`` as it
was and puts its report in ``<out>.failed/`` (marked as data prep's: a ``<out>.failed/`` it did not write is
never deleted or replaced; the report then goes to a new ``<out>.failed-<time>-<random>/``).
Exit codes: 0 done; 3 ``--strict`` and something was quarantined (no dataset written); 2 bad
configuration or input that stops the run (e.g. an example longer than ``max_length``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.benign import (
    BenignCandidate,
    BenignDialogue,
    LengthQuota,
    cut_dialogue,
    iter_candidates,
    materialize_image,
    normalize,
    source_name,
    user_turns,
)
from data_prep.config import POOL_PLACEHOLDER, POOL_SAFEMT, ConfigError, DataPrepConfig, parse_config
from data_prep.convert import benign_row, make_row, safemt_rows
from data_prep.images import check_images, folder_images, write_placeholder
from data_prep.io import DATASET_DIR, LENGTH_COLUMN, build_dataset_dict, load_prepared, save_prepared
from data_prep.matched import (
    MatchedRow,
    MatchedSources,
    extra_harmful_rows,
    imbalanced_cells,
    label_balance,
    load_pool,
    read_exclusions,
    twin_of,
)
from data_prep.quarantine import Ledger
from data_prep.safemt import read_safemt, unreadable_reason
from data_prep.splits import SPLITS, assign_splits
from data_prep.stats import TokenCounter, count_table, print_report, summarize
from moderator.artefacts import STATS_FILE, write_stats
from moderator.cli import CHECK_FAILED_EXIT_CODE, USER_ERROR_EXIT_CODE, run_cli
from moderator.contract import PROMPT_FORMAT_VERSION
from moderator.schema import RecordError
from moderator.taxonomy import TaxonomyError, load_taxonomy

EXIT_OK, EXIT_QUARANTINED, EXIT_ERROR = 0, CHECK_FAILED_EXIT_CODE, USER_ERROR_EXIT_CODE
BENIGN_IMAGE_DIR = "benign_images"
# The held-out benign set for the eval's over-refusal rate (eval.loop.load_benign_samples reads it):
# one JSON object per line, {"id", "messages", "image"}, image paths relative to the file's folder.
BENIGN_EVAL_FILE = "benign_eval.jsonl"
BENIGN_EVAL_IMAGE_DIR = "benign_eval_images"


@dataclass
class BuildResult:
    stats: dict[str, Any]
    exit_code: int
    message: str = ""
    report_dir: Path | None = None  # where stats.json and quarantine.jsonl are: out, or <out>.failed[-...]


def _file_stem(identifier: str) -> str:
    """A file name for an id; ids that had to be changed get a hash, so two ids never share a file."""
    stem = re.sub(r"[^\w.-]", "_", identifier)[:120]
    if stem != identifier:
        stem += "-" + hashlib.sha256(identifier.encode()).hexdigest()[:10]
    return stem


class BenignImagePool:
    """Where a benign dialogue without an image of its own gets one (see README: one image per example).

    With ``safemt`` the pick waits until splits are assigned and draws from the SafeMT images of the
    dialogue's own split: an image drawn across splits would put test images in training.
    """

    def __init__(self, config: DataPrepConfig, out: Path, safemt_images: Sequence[str]):
        self.mode = config.benign_image_pool
        self.seed = config.seed
        self.size = (int(config.placeholder_size[0]), int(config.placeholder_size[1]))
        self.folder = out / BENIGN_IMAGE_DIR
        self.paths: list[str] = []
        if self.mode == POOL_SAFEMT:
            if not safemt_images:
                raise ConfigError("benign_image_pool 'safemt' needs at least one converted SafeMT record")
        elif self.mode != POOL_PLACEHOLDER:
            self.paths = folder_images(self.mode)
            if not self.paths:
                raise ConfigError(f"benign_image_pool folder {self.mode} holds no images")

    @property
    def per_split(self) -> bool:
        """Whether images are picked after split assignment (``pick_in_split``), not while reading."""
        return self.mode == POOL_SAFEMT

    def _draw(self, dialogue_id: str, paths: Sequence[str]) -> str:
        return paths[random.Random(f"{self.seed}:{dialogue_id}").randrange(len(paths))]

    def pick(self, dialogue_id: str, folder: Path | None = None) -> str:
        """An image for ``dialogue_id``; a placeholder is written into ``folder`` (default ``benign_images/``)."""
        if self.mode == POOL_PLACEHOLDER:
            target = (folder or self.folder) / f"{_file_stem(dialogue_id)}.jpg"
            return write_placeholder(target, dialogue_id, self.size)
        return self._draw(dialogue_id, self.paths)

    def pick_in_split(self, dialogue_id: str, split: str, split_images: Sequence[str]) -> str:
        if not split_images:
            raise ConfigError(
                f"benign_image_pool 'safemt': benign dialogue {dialogue_id!r} is in the {split} split, which has "
                "no SafeMT images to reuse; use a folder or 'placeholder' pool, or more SafeMT records"
            )
        return self._draw(dialogue_id, split_images)


def _matched_row(row: MatchedRow, images: list[str], taxonomy: Any) -> dict[str, Any]:
    """A matched row (a twin or an extra harmful prompt) in the training-row format."""
    scenario = taxonomy.by_id[row.category].label if row.category else ""
    return make_row(
        dialogue=row.dialogue,
        image_turns=[row.image_turn],
        images=images,
        verdict=row.verdict,
        category=row.category,
        scenario=scenario,
        intent=row.intent,
        id=row.id,
        source=row.source,
        split_group=row.split_group,
        taxonomy=taxonomy,
    )


@dataclass
class BenignPick:
    candidate: BenignCandidate
    cuts: list[BenignDialogue]
    id: str
    image: str | None  # None: picked from the pool once splits are known


def _read_benign(
    candidates: Iterator[BenignCandidate],
    quota: LengthQuota,
    every_length: bool,
    name: str,
    image_dir: Path,
    pool: BenignImagePool,
    ledger: Ledger,
    input_name: str,
    seen_ids: set[str],
) -> tuple[list[BenignPick], int]:
    """Benign dialogues from ``candidates`` until every length quota is filled; returns them and how many
    valid dialogues were passed over because no open length fitted them (not counted as read).

    ``candidates`` is one iterator shared by the training pool and the held-out eval set, and
    ``seen_ids`` one set: the eval set continues where the training pool stopped, so they never overlap.
    """
    picked: list[BenignPick] = []
    passed_over = 0
    while not quota.done:  # checked before drawing, so no candidate is consumed and then dropped
        candidate = next(candidates, None)
        if candidate is None:
            break
        if candidate.problem_field:
            ledger.read[input_name] += 1
            index = candidate.index if candidate.index >= 0 else None
            ledger.quarantine(input_name, candidate.file, index, candidate.id, candidate.problem_field, candidate.raw)
            continue
        try:
            dialogue = normalize(candidate)
            dialogue_id = dialogue.id or f"{name}_{candidate.index}"
            if dialogue_id in seen_ids:
                raise RecordError("id", f"duplicate id {dialogue_id!r}")
        except RecordError as exc:
            ledger.read[input_name] += 1
            ledger.quarantine(input_name, candidate.file, candidate.index, candidate.id, exc.field, exc.reason)
            continue
        except Exception as exc:  # anything else about one row's content: quarantine it, go on with the rest
            ledger.read[input_name] += 1
            ledger.quarantine(
                input_name, candidate.file, candidate.index, candidate.id, "<record>", unreadable_reason(exc)
            )
            continue
        taken = quota.take(user_turns(dialogue), every_length)
        if not taken:
            passed_over += 1
            continue
        ledger.read[input_name] += 1
        try:
            image: str | None = None
            if dialogue.source_image is not None:
                stem = image_dir / _file_stem(dialogue_id)
                image = materialize_image(dialogue.source_image, candidate.base_dir, stem)
            elif not pool.per_split:
                image = pool.pick(dialogue_id, image_dir)
        except (RecordError, OSError) as exc:
            for k in taken:
                quota.open[k] += 1
            field, reason = (
                (exc.field, exc.reason) if isinstance(exc, RecordError) else ("images", unreadable_reason(exc))
            )
            ledger.quarantine(input_name, candidate.file, candidate.index, dialogue_id, field, reason)
            continue
        seen_ids.add(dialogue_id)
        picked.append(BenignPick(candidate, [cut_dialogue(dialogue, k) for k in taken], dialogue_id, image))
    return picked, passed_over


def _write_benign_eval(out: Path, picks: Sequence[BenignPick]) -> None:
    """``<out>/benign_eval.jsonl`` with each image copied into ``<out>/benign_eval_images/`` (relative paths,
    so the folder can move and the eval's containment check on the file's folder holds)."""
    image_dir = out / BENIGN_EVAL_IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    with (out / BENIGN_EVAL_FILE).open("w", encoding="utf-8") as handle:
        for pick in picks:
            assert pick.image is not None
            source = Path(pick.image)
            target = source  # a placeholder or materialised image already written there
            if source.parent != image_dir.resolve():
                target = image_dir / f"{_file_stem(pick.id)}{source.suffix.lower() or '.img'}"
                shutil.copyfile(source, target)
            (cut,) = pick.cuts
            row = {"id": pick.id, "messages": cut.dialogue, "image": f"{BENIGN_EVAL_IMAGE_DIR}/{target.name}"}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build_into(config: DataPrepConfig, out: Path, final: Path) -> BuildResult:
    """The build, written into ``out`` (a fresh staging folder); paths recorded are those under ``final``."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [started]

    def lap(name: str) -> None:  # seconds per phase, reported in stats.json
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 2)
        clock[0] = now

    taxonomy = load_taxonomy(config.taxonomy)
    counter = None
    if config.processor:  # loaded first: a wrong name fails in seconds, not after the whole build
        from moderator.loading import looks_like_a_path

        if looks_like_a_path(config.processor) and not Path(config.processor).expanduser().is_dir():
            raise ConfigError(f"processor {config.processor!r}: no such model directory")
        try:
            counter = TokenCounter(config.processor, config.trust_remote_code, config.min_pixels, config.max_pixels)
        except (OSError, ValueError) as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"processor {config.processor!r} cannot be loaded: {detail}") from None
    ledger = Ledger()

    # require_lengths: a configured length whose file is missing (or a FIFO) stops the build, strict or not.
    candidates, safemt_info = read_safemt(config, taxonomy, ledger, require_lengths=True)
    read_lengths = sorted(safemt_info["lengths"])
    lap("read_safemt")
    checks = check_images((image for _, _, image in candidates), config.image_check_workers)
    lap("check_images")
    rows: list[dict[str, Any]] = []
    safemt_images: list[str] = []
    safemt_lengths: list[int] = []
    matched_sources = MatchedSources()
    question_pool = None
    exclude = read_exclusions(config.matched_exclude)
    if config.use_matched:  # read first: a missing asset fails before any conversion work
        question_pool = load_pool(exclude, config.seed, matched_sources)
    for item, record, image in candidates:
        if checks[image].error:
            ledger.quarantine("safemt", item.file, item.index, record.id, "image_path", checks[image].error)
            continue
        ledger.converted["safemt"] += 1
        safemt_images.append(image)
        safemt_lengths.append(record.turns)
        rows.extend(safemt_rows(record, image, taxonomy, config.prefixes, config.prefix_label))
        if config.matched_benign:
            unsafe = MatchedRow(
                [dict(m) for m in record.dialogue],
                "unsafe",
                taxonomy.by_label[record.scenario].id,
                record.question,
                record.id,  # as the SafeMT row's id: the twin is "<id>~benign", (id, turns) stays unique
                record.source,
                record.id,
            )
            rows.append(_matched_row(twin_of(unsafe, question_pool, matched_sources), [image], taxonomy))
    safemt_row_count = len(rows)  # SafeMT rows and their twins: their images are SafeMT's own

    pool: BenignImagePool | None = None
    pool_rows: list[tuple[int, int]] = []  # (first row, rows) of dialogues whose image waits for the split
    if config.use_matched and config.extra_harmful:
        pool = BenignImagePool(config, out, safemt_images)
        lengths = sorted(set(safemt_lengths)) or read_lengths
        extras = extra_harmful_rows(
            config.extra_harmful,
            config.extra_harmful_per_length,
            lengths,
            question_pool,
            exclude,
            config.seed,
            matched_sources,
        )
        for extra in extras:
            pair = [extra] + ([twin_of(extra, question_pool, matched_sources)] if config.matched_benign else [])
            image = None if pool.per_split else pool.pick(extra.split_group)
            if image is None:
                pool_rows.append((len(rows), len(pair)))
            rows.extend(_matched_row(r, [image] if image else [], taxonomy) for r in pair)
        drawn = {row["images"][0] for row in rows[safemt_row_count:] if row["images"]}
        checks.update(check_images(drawn - set(checks), config.image_check_workers))
    benign_info: dict[str, Any] = {"source": None, "examples_requested": 0, "examples": 0, "dialogues": 0}
    eval_picks: list[BenignPick] = []
    eval_info: dict[str, Any] | None = None
    if config.use_benign and (config.benign_ratio > 0 or config.benign_eval_size > 0):
        wanted = round(config.benign_ratio * ledger.converted["safemt"])
        lengths = config.benign_turns or sorted(set(safemt_lengths)) or read_lengths
        pool = pool or BenignImagePool(config, out, safemt_images)
        name = source_name(config.benign, config.benign_name)
        candidates = iter_candidates(config.benign, config.benign_split, config.seed)
        seen_ids: set[str] = set()
        picked, passed_over = _read_benign(
            candidates,
            LengthQuota(wanted, lengths),
            config.benign_all_lengths,
            name,
            out / BENIGN_IMAGE_DIR,
            pool,
            ledger,
            "benign",
            seen_ids,
        )
        if config.benign_eval_size:
            # Same stream, after the training pool: never in training; one length per dialogue, since
            # the eval keys benign samples by id.
            eval_picked, eval_passed_over = _read_benign(
                candidates,
                LengthQuota(config.benign_eval_size, lengths),
                False,
                name,
                out / BENIGN_EVAL_IMAGE_DIR,
                pool,
                ledger,
                "benign_eval",
                seen_ids,
            )
        else:
            eval_picked, eval_passed_over = [], 0
        new_images = {p.image for p in picked + eval_picked if p.image is not None and p.image not in checks}
        checks.update(check_images(new_images, config.image_check_workers))
        produced = dropped_empty = dropped_images = 0
        for pick in picked:
            if pick.image is None:  # rows get a pool image of their split below
                pool_rows.append((len(rows), len(pick.cuts)))
            elif checks[pick.image].error:
                error = checks[pick.image].error
                ledger.quarantine("benign", pick.candidate.file, pick.candidate.index, pick.id, "images", error)
                continue
            ledger.converted["benign"] += 1
            dropped_empty += pick.cuts[0].dropped_empty
            dropped_images += pick.cuts[0].dropped_images
            for cut in pick.cuts:
                rows.append(benign_row(cut.dialogue, cut.image_turn, pick.image, pick.id, name, taxonomy))
                produced += 1
        benign_info = {
            "source": name,
            "lengths": lengths,
            "examples_requested": wanted,
            "examples": produced,
            "dialogues": ledger.converted["benign"],
            "image_pool": config.benign_image_pool,
            "passed_over": passed_over,
            "empty_assistant_messages_dropped": dropped_empty,
            "extra_images_dropped": dropped_images,
        }
        if produced < wanted:
            print(f"warning: asked for {wanted} benign examples, got {produced}", file=sys.stderr)
        if config.benign_eval_size:
            for pick in eval_picked:
                if pick.image is not None and checks[pick.image].error:
                    error = checks[pick.image].error
                    ledger.quarantine(
                        "benign_eval", pick.candidate.file, pick.candidate.index, pick.id, "images", error
                    )
                    continue
                ledger.converted["benign_eval"] += 1
                eval_picks.append(pick)
            eval_info = {
                "file": None,  # set once written
                "requested": config.benign_eval_size,
                "dialogues": len(eval_picks),
                "per_length": {
                    str(k): n for k, n in sorted(Counter(user_turns(p.cuts[0]) for p in eval_picks).items())
                },
                "passed_over": eval_passed_over,
            }
            if len(eval_picks) < config.benign_eval_size:
                print(
                    f"warning: asked for {config.benign_eval_size} held-out benign eval dialogues, got "
                    f"{len(eval_picks)}",
                    file=sys.stderr,
                )

    lap("convert_and_benign")
    splits = assign_splits(
        [row["split_group"] for row in rows],
        [row["scenario"] or "(benign)" for row in rows],
        [row["source"] for row in rows],
        config.validation_fraction,
        config.test_fraction,
        config.holdout_source,
        config.seed,
    )
    if pool is not None and pool.per_split:
        split_images: dict[str, set[str]] = {split: set() for split in SPLITS}
        for row, split in zip(rows[:safemt_row_count], splits[:safemt_row_count], strict=True):
            split_images[split].update(row["images"])  # a twin's image is its SafeMT record's
        for first, count in pool_rows:  # every cut of a dialogue shares its split_group, hence its split
            dialogue_id, split = rows[first]["split_group"], splits[first]
            image = pool.pick_in_split(dialogue_id, split, sorted(split_images[split]))
            for row in rows[first : first + count]:
                row["images"] = [image]
        for pick in eval_picks:  # held-out dialogues get held-out images: the test split's
            if pick.image is None:
                pick.image = pool.pick_in_split(pick.id, "test", sorted(split_images["test"]))
    # Rows were built SafeMT first, benign last; consumers take the first N rows of a split (evaluation
    # subsets, --max_train_samples), so each split is shuffled, deterministically for the seed.
    order = list(range(len(rows)))
    random.Random(f"{config.seed}:row-order").shuffle(order)
    rows = [rows[i] for i in order]
    splits = [splits[i] for i in order]
    sizes = {path: check.size for path, check in checks.items() if check.size}
    used_images = sorted({image for row in rows for image in row["images"]})
    inputs = ("safemt", "benign", "benign_eval") if eval_info is not None else ("safemt", "benign")
    stats: dict[str, Any] = {
        **ledger.totals(),
        "by_input": {name: ledger.totals(name) for name in inputs},
        "examples": {split: splits.count(split) for split in SPLITS},
        "labels": {
            split: dict(Counter(r["label"] for r, s in zip(rows, splits, strict=True) if s == split))
            for split in SPLITS
        },
        "sources": {
            split: dict(Counter(r["source"] for r, s in zip(rows, splits, strict=True) if s == split))
            for split in SPLITS
        },
        "counts": count_table(rows, splits),
        # Label share per (length, form), per source and per split: form must not predict the label.
        "balance": label_balance(rows, splits),
        "matched": matched_sources.to_dict() if config.use_matched else None,
        "images": {
            "unique": len(used_images),
            "width": summarize([sizes[p][0] for p in used_images]),
            "height": summarize([sizes[p][1] for p in used_images]),
        },
        "tokens": None,
        "safemt": safemt_info,
        "benign": benign_info,
        "benign_eval": eval_info,
        "taxonomy": taxonomy.provenance(),
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "config": config.to_dict(),
        "dataset": None,
    }

    too_long: list[str] = []
    lap("split_and_stats")
    if counter is not None and rows:
        lengths = counter.count([row["messages"] for row in rows], [row["images"] for row in rows], sizes)
        for row, n in zip(rows, lengths, strict=True):
            row[LENGTH_COLUMN] = n
        longest = max(range(len(rows)), key=lengths.__getitem__)
        stats["tokens"] = {
            "processor": config.processor,
            "min_pixels": config.min_pixels,  # image bounds the counts assume (the SFT config's)
            "max_pixels": config.max_pixels,
            "per_split": {
                split: summarize([n for n, s in zip(lengths, splits, strict=True) if s == split]) for split in SPLITS
            },
            "longest": {"id": rows[longest]["id"], "turns": rows[longest]["turns"], "tokens": lengths[longest]},
            "max_length": config.max_length,
        }
        if config.max_length is not None:
            over = sorted(
                (n, row["id"], row["turns"], split)
                for row, split, n in zip(rows, splits, lengths, strict=True)
                if n > config.max_length
            )[::-1]  # longest first
            too_long = [f"id {id_!r} ({turns} turns, {split}): {n} tokens" for n, id_, turns, split in over]
            stats["tokens"]["over_max_length"] = len(too_long)

    lap("token_lengths")
    ledger.write(out / "quarantine.jsonl")
    result = BuildResult(stats, EXIT_OK)
    unbalanced = (
        imbalanced_cells(stats["balance"], config.max_label_imbalance) if config.max_label_imbalance is not None else []
    )
    if unbalanced:
        result = BuildResult(
            stats,
            EXIT_ERROR,
            f"label share per length and form is off 0.5 by more than max_label_imbalance "
            f"{config.max_label_imbalance}: {'; '.join(unbalanced)} (a model would learn the form, not the harm; "
            "add matched_benign / extra_harmful or lower benign_ratio)",
        )
    elif too_long:
        shown = "; ".join(too_long[:10]) + (f"; ... and {len(too_long) - 10} more" if len(too_long) > 10 else "")
        result = BuildResult(
            stats,
            EXIT_ERROR,
            f"{len(too_long)} example(s) longer than max_length {config.max_length} tokens "
            f"(TRL would cut the target off and train on them with loss 0): {shown}",
        )
    elif config.strict and ledger.entries:  # the message, naming where the report went, is set by build()
        result = BuildResult(stats, EXIT_QUARANTINED)
    else:
        # Images written during the build (placeholders, benign rows' own bytes) sit in the staging
        # folder; the dataset records where they will be once it is renamed into place.
        staged = str(out.resolve()) + os.sep
        for row in rows:
            row["images"] = [
                str(final) + os.sep + p[len(staged) :] if p.startswith(staged) else p for p in row["images"]
            ]
        save_prepared(build_dataset_dict(rows, splits), out / DATASET_DIR)
        stats["dataset"] = str(final / DATASET_DIR)
        if eval_info is not None:
            _write_benign_eval(out, eval_picks)
            eval_info["file"] = str(final / BENIGN_EVAL_FILE)
    lap("save")
    stats["timings"] = timings
    stats["wall_seconds"] = round(time.perf_counter() - started, 2)
    write_stats(out, stats)
    return result


# What a data-prep output folder may hold: an existing --out with anything else is refused, never replaced.
OUTPUT_NAMES = frozenset(
    {DATASET_DIR, STATS_FILE, "quarantine.jsonl", BENIGN_IMAGE_DIR, BENIGN_EVAL_FILE, BENIGN_EVAL_IMAGE_DIR}
)


def _check_replaceable(final: Path) -> None:
    if final.exists() and not final.is_dir():
        raise ConfigError(f"out {final} is a file, not a folder")
    foreign = sorted(p.name for p in final.iterdir() if p.name not in OUTPUT_NAMES) if final.is_dir() else []
    if foreign:
        raise ConfigError(
            f"out {final} holds {foreign[:5]}, which data prep does not write: a build replaces the whole "
            "folder, so choose an empty or new --out (or a previous data-prep output)"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_dir(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target`` and delete what was there. With an existing target the two are
    swapped atomically where the OS can (a reader sees the old build or the new one, never a mix);
    elsewhere there is a moment with no ``target``, never a half-written one."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # now the old build
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old)


# Written into every failure report folder: only a folder holding it (and nothing data prep does not
# write) is ever replaced or deleted by a later build.
REPORT_MARKER = ".data_prep_failed_build.json"


def _own_report(path: Path) -> bool:
    """Whether ``path`` is a failure report this tool wrote: a real folder (not a link) holding the marker
    and, at its top level, only names data prep writes (a file someone added there keeps it). Anything else
    is left alone."""
    if path.is_symlink() or not path.is_dir() or not (path / REPORT_MARKER).is_file():
        return False
    return all(p.name in OUTPUT_NAMES or p.name == REPORT_MARKER for p in path.iterdir())


def _remove_own_reports(final: Path) -> None:
    """An earlier failure's report no longer applies once a build succeeded: remove ``<out>.failed`` and any
    ``<out>.failed-*`` this tool wrote, and nothing else."""
    for path in [final.parent / f"{final.name}.failed", *final.parent.glob(f"{glob.escape(final.name)}.failed-*")]:
        if _own_report(path):
            shutil.rmtree(path, ignore_errors=True)


def _place_report(staging: Path, final: Path, config: DataPrepConfig) -> Path:
    """Move a failed build's staging folder to ``<out>.failed`` (replacing this tool's earlier report only),
    or, where someone else's folder has that name, to a new ``<out>.failed-<time>-<random>``."""
    marker = {"written_by": "data_prep.build", "out": str(final), "config": config.to_dict()}
    (staging / REPORT_MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    failed = final.parent / f"{final.name}.failed"
    if not os.path.lexists(failed):
        try:
            os.rename(staging, failed)
            return failed
        except OSError:  # appeared meanwhile (a non-empty folder, a file): fall through to a new name
            pass
    elif _own_report(failed):
        _replace_dir(staging, failed)
        return failed
    # An empty folder of a new name (mkdtemp: never an existing one), which the rename then replaces.
    unique = Path(tempfile.mkdtemp(prefix=f"{final.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}-", dir=final.parent))
    os.rename(staging, unique)
    return unique


def build(config: DataPrepConfig) -> BuildResult:
    """Build into a staging folder beside ``out`` and replace ``out`` only if the build succeeded.

    A failed build (bad input, ``--strict`` with quarantined records, an example over ``max_length``, a
    crash) leaves ``out`` byte-identical; the report of a build that ran to the end but failed goes to
    ``<out>.failed/`` (stats.json, quarantine.jsonl), or to ``<out>.failed-<time>-<random>/`` where a
    ``<out>.failed/`` that data prep did not write exists (never deleted). Images the build writes are
    recorded under ``out``.
    """
    final = Path(os.path.realpath(config.out))  # a symlinked out: its target is replaced, not the link
    _check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the published folder from the user's group
    try:
        result = _build_into(config, staging, final)
        if result.exit_code == EXIT_OK:
            _check_replaceable(final)  # again: something may have been put there during the build
            _replace_dir(staging, final)
            _remove_own_reports(final)  # an earlier failure's report no longer applies
            result.report_dir = final
        else:
            result.report_dir = _place_report(staging, final, config)
            if result.exit_code == EXIT_QUARANTINED:
                result.message = (
                    f"--strict: {result.stats['quarantined']} record(s) quarantined, "
                    f"see {result.report_dir / 'quarantine.jsonl'}; no dataset written, {final} left as it was"
                )
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # any exit other than the renames above
    if result.exit_code == EXIT_OK and config.push_to_hub:
        # load_prepared casts images to Image(), so the push embeds the image bytes, not local paths.
        load_prepared(final).push_to_hub(config.push_to_hub, private=config.hub_private)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad configuration or input (one ``error:`` line), 3 ``--strict`` and quarantined."""
    return run_cli(_main, argv, user_errors=(TaxonomyError, FileNotFoundError))


def _main(argv: Sequence[str]) -> int:
    config = parse_config(argv)  # a bad flag or recipe stops here, before datasets is set up
    import datasets

    datasets.disable_progress_bars()  # the report below says what happened; per-split bars are noise
    result = build(config)
    print_report(result.stats)
    quarantined = result.stats["quarantined"]
    if quarantined:
        print(
            f"warning: {quarantined} record(s) quarantined, see {result.report_dir / 'quarantine.jsonl'}",
            file=sys.stderr,
        )
    if result.exit_code != EXIT_OK:
        print(f"error: {result.message}", file=sys.stderr)
    else:
        print(f"dataset written to {result.stats['dataset']}")
    return result.exit_code


if __name__ == "__main__":  # guard: datasets' spawn pools re-import the entry module
    sys.exit(main())
