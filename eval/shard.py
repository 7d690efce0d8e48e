"""A shard of an eval run: the SafeMT ids one process of a sharded run (``--shard I/N``) works on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


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
