"""What every stage of one eval run shares: the config, the out folder, the caches, the tally and the run's state.

:class:`RunContext` is built once per run (:class:`eval.loop.EvalRun`) and handed to each stage. Its
state is what later stages read from earlier ones: the moderators' thresholds fixed in phase 0 (every
moderator decision key holds its defence's threshold) and the judge, built by the judging stage when a
row first needs a judge call (a row's key names the judge).

The caches live under ``<out_dir>/cache/`` (``cache/shard-I-of-N/`` for a shard): every process reads the
whole run's files and every shard's, and writes only its own (:func:`open_caches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eval.cache import JsonlCache
from eval.config import EvalConfig
from eval.judge import Judge
from eval.progress import RunTally
from eval.shard import Shard
from eval.thresholds import ThresholdChoice
from moderator.taxonomy import Taxonomy

# Each stage's cache file and the fields of its key (see eval.stages.keys).
DECISIONS_FILE, DECISIONS_KEY = "decisions.jsonl", ("defence", "sig", "id", "k", "benign")
GENERATIONS_FILE, GENERATIONS_KEY = "generations.jsonl", ("target", "sig", "id", "k", "benign", "system_sig")
JUDGEMENTS_FILE, JUDGEMENTS_KEY = "judgements.jsonl", ("target", "defence", "judge", "id", "k", "benign", "sig")
TURN_FLAGS_FILE, TURN_FLAGS_KEY = "turn_flags.jsonl", ("defence", "sig", "id", "k")


def cache_dir(out_dir: Path, shard: Shard | None) -> Path:
    """Where this process writes: ``cache/`` for a whole run, ``cache/shard-I-of-N/`` for a shard."""
    root = out_dir / "cache"
    return root if shard is None else root / f"shard-{shard.name}"


def _open_cache(out_dir: Path, shard: Shard | None, name: str, key_fields: Sequence[str]) -> JsonlCache:
    # The whole run's file and every shard's are read (a rerun with another N reuses them too); only
    # this process's own file is written, so concurrent shards never share one.
    root = out_dir / "cache"
    others = [root / name, *sorted(root.glob(f"shard-*/{name}"))]
    return JsonlCache(cache_dir(out_dir, shard) / name, key_fields, read_also=others)


@dataclass
class Caches:
    """The stages' JSONL caches: defence decisions, per-turn flags, replies and judged rows."""

    decisions: JsonlCache
    generations: JsonlCache
    judgements: JsonlCache
    turn_flags: JsonlCache


def open_caches(out_dir: Path, shard: Shard | None) -> Caches:
    return Caches(
        decisions=_open_cache(out_dir, shard, DECISIONS_FILE, DECISIONS_KEY),
        generations=_open_cache(out_dir, shard, GENERATIONS_FILE, GENERATIONS_KEY),
        judgements=_open_cache(out_dir, shard, JUDGEMENTS_FILE, JUDGEMENTS_KEY),
        turn_flags=_open_cache(out_dir, shard, TURN_FLAGS_FILE, TURN_FLAGS_KEY),
    )


@dataclass
class RunContext:
    """One run's (or shard's) shared state; the stages read it and add to its caches, tally, thresholds and judge."""

    config: EvalConfig
    taxonomy: Taxonomy
    out_dir: Path
    shard: Shard | None  # None: the whole run (and the report); else this shard's items only
    caches: Caches
    tally: RunTally = field(default_factory=RunTally)  # per stage: items needed and computed, for the closing line
    # Per moderator defence: the threshold of the whole run, fixed in phase 0 before any attack decision.
    thresholds: dict[str, ThresholdChoice] = field(default_factory=dict)
    judge: Judge | None = None  # None: built from config.judge by the judging stage when first needed
    # Memoised signatures (eval.stages.keys): a moderator's settings hash files on disk.
    signatures: dict[tuple, str] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        return cache_dir(self.out_dir, self.shard)
