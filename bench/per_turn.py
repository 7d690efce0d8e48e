"""Per-turn moderation cost: ``python -m bench.per_turn [--model DIR] [--user-turns 8]``.

Kept as an alias of ``python -m bench.streaming --no-service`` (per-turn reuse vs recompute and one
pass vs two passes per decision; see that module). Not a test.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.streaming import long_dialogue, prompt_tokens_run
from bench.streaming import main as streaming_main

__all__ = ["long_dialogue", "main", "prompt_tokens_run"]


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    return streaming_main([*args, "--no-service"] if "--no-service" not in args else args)


if __name__ == "__main__":
    raise SystemExit(main())
