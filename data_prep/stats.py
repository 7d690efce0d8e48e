"""Token lengths under the training processor, and the stats report (JSON + a printed table)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_prep.splits import SPLITS
from moderator.images import bound_image_pixels


class TokenCounter:
    """Exact token counts without running the image processor on every image.

    The chat-template text (which holds one image placeholder token per image) is tokenised, and each
    image adds the number of tokens the processor expands its placeholder to, minus the placeholder
    itself, computed from the image's width and height with the processor's own resize rule
    (``processor._get_num_multimodal_tokens``). Matches the full processor (see the tests) at a
    fraction of the cost.
    """

    def __init__(
        self,
        processor_name: str,
        trust_remote_code: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        from transformers import AutoProcessor

        self.name = processor_name
        self.processor = AutoProcessor.from_pretrained(processor_name, trust_remote_code=trust_remote_code)
        bound_image_pixels(self.processor, min_pixels, max_pixels)
        if not hasattr(self.processor, "_get_num_multimodal_tokens"):
            raise ValueError(f"processor {processor_name!r} cannot count image tokens from image sizes")
        self._image_tokens: dict[tuple[int, int], int] = {}

    def image_tokens(self, width: int, height: int) -> int:
        key = (width, height)
        if key not in self._image_tokens:
            data = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            self._image_tokens[key] = int(data["num_image_tokens"][0])
        return self._image_tokens[key]

    def count(
        self, messages: Sequence[list[dict]], images: Sequence[Sequence[str]], sizes: Mapping[str, tuple[int, int]]
    ) -> list[int]:
        lengths: list[int] = []
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        batch = 512
        for start in range(0, len(messages), batch):
            texts = self.processor.apply_chat_template(list(messages[start : start + batch]), tokenize=False)
            # TRL tokenises the rendered template with add_special_tokens=False; so do we.
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for offset, token_ids in enumerate(ids):
                extra = sum(self.image_tokens(*sizes[path]) - 1 for path in images[start + offset])
                lengths.append(len(token_ids) + extra)
        return lengths


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    return {
        "min": float(array.min()),
        "mean": round(float(array.mean()), 2),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
    }


def count_table(rows: Sequence[Mapping[str, Any]], splits: Sequence[str]) -> list[dict[str, Any]]:
    """Examples per split x scenario x turns x label."""
    counts = Counter(
        (split, row["scenario"] or "(benign)", row["turns"], row["label"])
        for row, split in zip(rows, splits, strict=True)
    )
    return [
        {"split": s, "scenario": sc, "turns": t, "label": lab, "count": n}
        for (s, sc, t, lab), n in sorted(counts.items(), key=lambda kv: (SPLITS.index(kv[0][0]), *kv[0][1:]))
    ]


def print_report(stats: dict[str, Any]) -> None:
    """A compact human view of stats.json (rich tables)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    totals = Table(title="data prep: records")
    for column in ("input", "read", "converted", "quarantined"):
        totals.add_column(column, justify="right" if column != "input" else "left")
    for name, counts in stats["by_input"].items():
        totals.add_row(name, *(str(counts[k]) for k in ("read", "converted", "quarantined")))
    totals.add_row("all", *(str(stats[k]) for k in ("read", "converted", "quarantined")), style="bold")
    console.print(totals)

    by_scenario: dict[str, Counter] = {}
    by_turns: dict[tuple[int, str], Counter] = {}
    for entry in stats["counts"]:
        by_scenario.setdefault(entry["scenario"], Counter())[entry["split"]] += entry["count"]
        by_turns.setdefault((entry["turns"], entry["label"]), Counter())[entry["split"]] += entry["count"]
    table = Table(title="examples per scenario")
    table.add_column("scenario")
    for split in SPLITS:
        table.add_column(split, justify="right")
    for scenario in sorted(by_scenario):
        table.add_row(scenario, *(str(by_scenario[scenario][s]) for s in SPLITS))
    table.add_row("total", *(str(stats["examples"][s]) for s in SPLITS), style="bold")
    console.print(table)
    table = Table(title="examples per length and label")
    table.add_column("turns", justify="right")
    table.add_column("label")
    for split in SPLITS:
        table.add_column(split, justify="right")
    for turns, label in sorted(by_turns):
        table.add_row(str(turns), label, *(str(by_turns[(turns, label)][s]) for s in SPLITS))
    console.print(table)
    tokens = stats.get("tokens")
    if tokens:
        table = Table(title=f"tokens per example ({tokens['processor']})")
        table.add_column("split")
        for column in ("min", "mean", "p50", "p95", "max"):
            table.add_column(column, justify="right")
        for split in SPLITS:
            summary = tokens["per_split"].get(split)
            if summary:
                table.add_row(split, *(f"{summary[c]:g}" for c in ("min", "mean", "p50", "p95", "max")))
        console.print(table)
