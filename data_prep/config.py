"""The data-prep recipe: one dataclass, read from a YAML file (``--config``) with every field overridable by a flag
(the project's config convention, ``moderator.cli.parse_config``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from moderator import cli
from moderator.schema import TURN_COUNTS

NONE_VALUES = ("", "none", "null")
CHITCHAT = "chitchat"
POOL_PLACEHOLDER = "placeholder"
POOL_SAFEMT = "safemt"
# A SafeMT <k>_turn.json is read whole. The real ones are a few MB (the sample's 52 records per length take
# 24-107 KB): the limit stops what is not SafeMT (or is damaged) before it is read.
DEFAULT_MAX_FILE_MB = 256.0
PROG = "python -m data_prep.build"


class ConfigError(cli.UsageError):
    """The recipe or an input is unusable (one ``error:`` line, exit code 2; a ``ValueError``)."""


@dataclass
class DataPrepConfig:
    safemt: str = field(
        default="HappyCorpse/SafeMT",
        metadata={
            "help": "SafeMT input: a GitHub-layout folder ({1,2,4,6,8}_turn.json + images/), a local hub-layout "
            "file or folder (parquet/json/jsonl), or a hub dataset name."
        },
    )
    out: str = field(default="runs/data", metadata={"help": "output folder (dataset/, stats.json, quarantine.jsonl)"})
    safemt_turns: list[int] | None = field(
        default=None,
        metadata={
            "help": "dialogue lengths (user turns) to include; in the GitHub layout each one's <k>_turn.json must "
            "exist and be a regular file, or the build stops (exit 2, strict or not); null: every length whose "
            "file is there"
        },
    )
    safemt_max_file_mb: float = field(
        default=DEFAULT_MAX_FILE_MB,
        metadata={
            "help": "refuse (exit 2, before reading it) a SafeMT <k>_turn.json larger than this many MB (10^6 "
            "bytes); the real files are a few MB each, and one is read whole (several times its size in memory)"
        },
    )
    safemt_images_root: str | None = field(
        default=None,
        metadata={
            "help": "folder that image paths are relative to; default: the GitHub folder, the local file's folder, "
            "or a snapshot of the hub dataset repository"
        },
    )
    safemt_revision: str | None = field(default=None, metadata={"help": "hub revision (commit) to pin the SafeMT copy"})
    benign: str = field(
        default=CHITCHAT,
        metadata={
            "help": "benign dialogues: 'chitchat' (the installed chitchat-dataset), a .jsonl/.json file, any "
            "datasets source (parquet file, folder, hub name) with a messages-style column, or 'none'"
        },
    )
    benign_split: str = field(default="train", metadata={"help": "split of a datasets benign source"})
    benign_name: str | None = field(
        default=None, metadata={"help": "value of the 'source' column for benign rows; default: derived from --benign"}
    )
    benign_ratio: float = field(
        default=1.0,
        metadata={"help": "benign examples per converted SafeMT record (1.0: as many as SafeMT, prefixes aside)"},
    )
    benign_turns: list[int] | None = field(
        default=None,
        metadata={
            "help": "user-turn counts benign dialogues are cut to, spread evenly so length is no shortcut "
            "(default: the lengths of the converted SafeMT records)"
        },
    )
    benign_all_lengths: bool = field(
        default=True,
        metadata={
            "help": "cut each benign dialogue at every open length it reaches, as SafeMT has each query at "
            "several lengths (false: one length per dialogue, more distinct dialogues)"
        },
    )
    benign_eval_size: int = field(
        default=0,
        metadata={
            "help": "held-out benign dialogues written to <out>/benign_eval.jsonl (the eval's over-refusal set, "
            "its images in <out>/benign_eval_images/): drawn from the same seed-shuffled source after the "
            "training pool is filled, so never in any split; one length per dialogue; 0: none"
        },
    )
    benign_image_pool: str = field(
        default=POOL_PLACEHOLDER,
        metadata={
            "help": "images for benign dialogues that have none: a folder of images, 'safemt' (reuse the SafeMT "
            "images) or 'placeholder' (generated, for tests and the demo)"
        },
    )
    placeholder_size: list[int] = field(
        default_factory=lambda: [64, 48], metadata={"help": "width height of generated placeholder images"}
    )
    matched_benign: bool = field(
        default=False,
        metadata={
            "help": "give every unsafe row a benign twin in the same form (same lead-in, image and split, a benign "
            "final question from chatterbot-corpus), so form predicts nothing (data_prep/matched.py)"
        },
    )
    extra_harmful: list[str] = field(
        default_factory=list,
        metadata={"help": "harmful prompt sets wrapped into SafeMT's forms: advbench, donotanswer (needs make assets)"},
    )
    extra_harmful_per_length: int = field(
        default=0, metadata={"help": "extra harmful prompts per dialogue length (each used once)"}
    )
    matched_exclude: str | None = field(
        default=None,
        metadata={
            "help": 'JSON file {"exclude": [source ids]}: benign questions and prompts never to use (test items)'
        },
    )
    max_label_imbalance: float | None = field(
        default=None,
        metadata={
            "help": "refuse the build when a (length, form) cell's unsafe share is further than this from 0.5 "
            "(null: report the shares in stats.json only)"
        },
    )
    prefixes: bool = field(
        default=False, metadata={"help": "also emit each SafeMT dialogue cut after every earlier user turn"}
    )
    prefix_label: Literal["inherit", "safe"] = field(
        default="inherit",
        metadata={"help": "target of an early prefix: 'inherit' the full dialogue's target, or 'safe'"},
    )
    validation_fraction: float = field(default=0.1, metadata={"help": "share of ids in the validation split"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of (non-held-out) ids in the test split"})
    holdout_source: list[str] = field(
        default_factory=list, metadata={"help": "id prefixes (mllm, mm, jbv, beaver, guard) put entirely in test"}
    )
    seed: int = field(default=0, metadata={"help": "seed for splits, benign sampling and benign lengths"})
    processor: str | None = field(
        default=None, metadata={"help": "processor (model dir or hub name) for token-length stats"}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "fail, naming the record, if any example is longer (needs --processor)"}
    )
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "image pixel lower bound for token lengths; keep equal to the SFT config's min_pixels"},
    )
    max_pixels: int | None = field(
        default=None,
        metadata={"help": "image pixel upper bound for token lengths; keep equal to the SFT config's max_pixels"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow remote code when loading the processor"})
    taxonomy: str | None = field(
        default=None, metadata={"help": "taxonomy YAML (default configs/policies/safemt.yaml)"}
    )
    image_check_workers: int = field(default=4, metadata={"help": "threads that fully decode each unique image"})
    strict: bool = field(
        default=False, metadata={"help": "exit non-zero (and write no dataset) if any record is quarantined"}
    )
    push_to_hub: str | None = field(
        default=None, metadata={"help": "hub repo id to push the dataset to (images embedded)"}
    )
    hub_private: bool = field(default=True, metadata={"help": "push as a private dataset"})

    def __post_init__(self) -> None:
        self.benign = "none" if self.benign is None or str(self.benign).strip().lower() in NONE_VALUES else self.benign
        for name in (
            "processor",
            "push_to_hub",
            "safemt_images_root",
            "safemt_revision",
            "taxonomy",
            "benign_name",
            "matched_exclude",
        ):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in NONE_VALUES:
                setattr(self, name, None)

    @property
    def use_benign(self) -> bool:
        return self.benign != "none"

    @property
    def use_matched(self) -> bool:
        return self.matched_benign or bool(self.extra_harmful)

    def validate(self) -> None:
        problems = []
        for name, value in self.to_dict().items():
            if isinstance(value, str) and "\0" in value:
                problems.append(f"{name} contains a NUL byte")
        if self.safemt_turns is not None:
            bad_turns = sorted(set(self.safemt_turns) - set(TURN_COUNTS))
            if not self.safemt_turns:
                problems.append("safemt_turns is empty (null: every length whose file is there)")
            elif bad_turns:
                problems.append(f"safemt_turns {bad_turns} are not SafeMT lengths {list(TURN_COUNTS)}")
        if not (math.isfinite(self.safemt_max_file_mb) and self.safemt_max_file_mb > 0):
            problems.append(f"safemt_max_file_mb must be > 0 (MB), got {self.safemt_max_file_mb}")
        if self.benign_turns is not None and (not self.benign_turns or min(self.benign_turns) < 1):
            problems.append("benign_turns must be positive user-turn counts")
        if self.benign_ratio < 0:
            problems.append("benign_ratio must be >= 0")
        if self.extra_harmful_per_length < 0:
            problems.append("extra_harmful_per_length must be >= 0")
        elif self.extra_harmful and not self.extra_harmful_per_length:
            problems.append("extra_harmful needs extra_harmful_per_length > 0")
        if self.max_label_imbalance is not None and not 0 <= self.max_label_imbalance <= 0.5:
            problems.append("max_label_imbalance must be in [0, 0.5]")
        if self.benign_eval_size < 0:
            problems.append("benign_eval_size must be >= 0")
        elif self.benign_eval_size and not self.use_benign:
            problems.append("benign_eval_size needs a benign source (benign is 'none')")
        for name in ("validation_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1:
            problems.append("validation_fraction + test_fraction must be below 1")
        if self.max_length is not None and not self.processor:
            problems.append("max_length needs a processor to count tokens")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be a positive pixel count")
            elif value is not None and not self.processor:
                problems.append(f"{name} needs a processor to count tokens")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            problems.append("min_pixels must not exceed max_pixels")
        if len(self.placeholder_size) != 2 or min(self.placeholder_size) < 1:
            problems.append("placeholder_size must be two positive integers: width height")
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_config(argv: Sequence[str] | None = None) -> DataPrepConfig:
    """``--config file.yaml`` sets the fields, every flag overrides one; a problem is a one-line ``UsageError``."""
    (config,) = cli.parse_config(
        (DataPrepConfig,), argv, prog=PROG, description="Build the moderator's training dataset."
    )
    try:
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (see {PROG} --help)") from None
    return config
