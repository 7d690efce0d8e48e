"""Writing and loading the prepared dataset (the interface the trainer uses)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, List, Value

from data_prep.splits import SPLITS

DATASET_DIR = "dataset"
FEATURES = Features(
    {
        # TRL conversational format; image parts are {"type": "image", "text": None} placeholders.
        "messages": List(
            {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
        ),
        # Absolute paths, one per image placeholder: a plain string column keeps the dataset small and
        # fast to write (a List(Image()) column would embed every image once per dialogue length).
        "images": List(Value("string")),
        "target": Value("string"),
        "label": Value("string"),
        "category": Value("string"),
        "scenario": Value("string"),
        "id": Value("string"),
        "turns": Value("int32"),
        "source": Value("string"),
        "split_group": Value("string"),
        "intent": Value("string"),
        "form": Value("string"),  # data_prep.forms: single, framed, lead_in, few_shot
    }
)


# Token length under the configured processor (text + image tokens): present when data prep was given a
# processor; the trainer's length-grouped sampler reads it (`train_sampling_strategy: group_by_length`).
LENGTH_COLUMN = "length"


def build_dataset_dict(rows: Sequence[dict[str, Any]], splits: Sequence[str]) -> DatasetDict:
    features = FEATURES
    if rows and LENGTH_COLUMN in rows[0]:
        features = Features({**FEATURES, LENGTH_COLUMN: Value("int32")})
    per_split: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for row, split in zip(rows, splits, strict=True):
        per_split[split].append(row)
    return DatasetDict(
        {
            name: Dataset.from_list(items, features=features)
            if items
            else Dataset.from_dict({column: [] for column in features}, features=features)
            for name, items in per_split.items()
        }
    )


def save_prepared(dataset_dict: DatasetDict, path: str | Path) -> None:
    """``save_to_disk`` that keeps empty splits loadable.

    datasets writes no shard at all for an empty split, and ``load_from_disk`` then fails with an
    IndexError; one explicit (empty) shard per empty split avoids that (e.g. ``test_fraction: 0``).
    """
    num_shards = {name: 1 for name, split in dataset_dict.items() if len(split) == 0}
    dataset_dict.save_to_disk(str(path), num_shards=num_shards or None)


def load_prepared(path: str | Path) -> DatasetDict:
    """Load ``<out>/dataset`` (``path`` may be ``<out>`` or the dataset folder itself).

    ``images`` is cast to ``List(Image())`` so images decode lazily to PIL when a row is read.
    """
    path = Path(path)
    if (path / DATASET_DIR).is_dir():
        path = path / DATASET_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"no prepared dataset at {path} (run python -m data_prep.build first)")
    dataset_dict = datasets.load_from_disk(str(path))
    for split in dataset_dict.values():
        if len(split):
            first = split[0]["images"][0]
            if not Path(first).is_file():
                raise FileNotFoundError(
                    f"{path}: image {first} of record {split[0]['id']!r} is missing; image paths are absolute, "
                    "so rebuild the dataset if its inputs moved"
                )
            break
    return DatasetDict(
        {name: split.cast_column("images", List(datasets.Image())) for name, split in dataset_dict.items()}
    )
