"""Progress of an eval run: one tqdm bar per stage and one closing line that says what the run did.

Bars go to stderr (tqdm's default) with tqdm's ETA and items/s; a stage that has nothing to compute
shows no bar. :class:`RunTally` counts, per stage, the items the run needed and how many of them it
computed (the rest were found cached: an earlier run's, or a shard's); :meth:`RunTally.line` is the
last line a run or shard prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

# The stages in run order, with the verb and noun of the closing line.
STAGES = {
    "decisions": ("decided", "items"),
    "detections": ("turns-to-detection over", "dialogues"),
    "generations": ("generated", "replies"),
    "judgements": ("judged", "rows"),
}


def stage_bar(total: int, desc: str) -> Any:
    """A progress bar for one stage (per defence, per target, ...): ETA and items/s, hidden when empty."""
    # Only an empty bar is disabled here: a given `disable` would override TQDM_DISABLE=1 from the environment.
    hidden = {} if total else {"disable": True}
    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, **hidden)


@dataclass
class RunTally:
    """Per stage: items needed and items computed (needed - computed were cached); the run's wall time."""

    needed: dict[str, int] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def need(self, stage: str, count: int) -> None:
        self.needed[stage] = self.needed.get(stage, 0) + count

    def add_computed(self, stage: str, count: int) -> None:
        self.computed[stage] = self.computed.get(stage, 0) + count

    def line(self, what: str) -> str:
        """E.g. ``eval run: decided 40 items (32 cached, 8 computed); ...; 12.3 s``."""
        parts = []
        for stage, (verb, noun) in STAGES.items():
            if stage not in self.needed and stage not in self.computed:
                continue
            needed, computed = self.needed.get(stage, 0), self.computed.get(stage, 0)
            parts.append(f"{verb} {needed} {noun} ({needed - computed} cached, {computed} computed)")
        elapsed = time.monotonic() - self.started
        return f"{what}: {'; '.join(parts) or 'nothing to do'}; {elapsed:.1f} s"
