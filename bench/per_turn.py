"""Per-turn moderation cost: ``python -m bench.per_turn [--model DIR] [--user-turns 8]``.

Moderates every user turn of one dialogue (a SafeMT sample dialogue extended to ``--user-turns``
user turns with its own turns, image on the first turn) two ways: ``Moderator.moderate_turns``
(each turn continues the previous prompt's KV cache) and ``moderate()`` on every prefix (recomputed
from scratch). Prints wall time per turn and prompt tokens run for each, their ratio, and the
one-pass vs two-pass time of one decision (``moderate_batch`` vs ``p_unsafe`` + ``generate``).
Without ``--model`` it builds the offline tiny model in a temporary directory. Not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from moderator.inference import Moderator

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FILE = REPO_ROOT / "tests" / "data" / "safemt_sample" / "4_turn.json"


def long_dialogue(user_turns: int) -> list[dict[str, str]]:
    """The first sample dialogue, its turns repeated until it has ``user_turns`` user turns."""
    base = json.loads(SAMPLE_FILE.read_text())[0]["dialogue"]
    dialogue: list[dict[str, str]] = []
    while sum(m["role"] == "user" for m in dialogue) < user_turns:
        for message in base:
            dialogue.append(dict(message))
            if sum(m["role"] == "user" for m in dialogue) == user_turns:
                break
    return dialogue


@contextmanager
def prompt_tokens_run(moderator: Moderator):
    """Counts the tokens the model runs in prefills (forward passes over more than one token)."""
    counted = {"tokens": 0}

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        length = kwargs["input_ids"].shape[1]
        counted["tokens"] += length if length > 1 else 0

    handle = moderator.model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield counted
    finally:
        handle.remove()


def timed(call: Any, repeats: int) -> float:
    call()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="moderator checkpoint (default: the tiny model, built offline)")
    parser.add_argument("--user-turns", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from tiny_models.moderator import build_tiny_qwen2_5_vl

            model_dir = build_tiny_qwen2_5_vl(Path(tmp) / "tiny")
        else:
            model_dir = Path(args.model)
        moderator = Moderator.from_pretrained(model_dir, verify=False)
        dialogue, images = long_dialogue(args.user_turns), [Image.new("RGB", (448, 336), (40, 90, 200))]
        ends = [i for i, m in enumerate(dialogue) if m["role"] == "user"]
        n = args.max_new_tokens

        def reuse() -> None:
            moderator.moderate_turns(dialogue, images, max_new_tokens=n)

        def recompute() -> None:
            for end in ends:
                moderator.moderate_batch([dialogue[: end + 1]], [images], max_new_tokens=n)

        with prompt_tokens_run(moderator) as reuse_tokens:
            reuse()
        with prompt_tokens_run(moderator) as recompute_tokens:
            recompute()
        reuse_s, recompute_s = timed(reuse, args.repeats), timed(recompute, args.repeats)

        text = moderator.prompt_texts([dialogue], [[0]])

        def one_pass() -> None:
            moderator.moderate_texts(text, [images], max_new_tokens=n)

        def two_pass() -> None:
            moderator.p_unsafe(text, [images])
            moderator.generate(text, [images], max_new_tokens=n)

        one_s, two_s = timed(one_pass, args.repeats), timed(two_pass, args.repeats)
        # A model that does not answer "verdict: ..." (the random tiny one) gets the scoring pass as well.
        prefixed = moderator.moderate_texts(text, [images], max_new_tokens=n)[0].raw.startswith("verdict:")

    turns = len(ends)
    print(f"model: {model_dir if args.model else 'tiny (random weights)'}; {turns} user turns, {n} new tokens")
    print(f"reuse:     {reuse_s / turns * 1e3:8.1f} ms/turn, {reuse_tokens['tokens']:6d} prompt tokens run")
    print(f"recompute: {recompute_s / turns * 1e3:8.1f} ms/turn, {recompute_tokens['tokens']:6d} prompt tokens run")
    print(f"one pass:  {one_s * 1e3:8.1f} ms/decision; two passes: {two_s * 1e3:8.1f} ms/decision")
    note = "" if prefixed else " (no verdict prefix generated: the one pass falls back to the scoring pass)"
    print(f"one-pass speed-up = {two_s / one_s:.2f}x{note}")
    print(
        f"per-turn cost ratio at {turns} turns = {reuse_s / recompute_s:.2f} "
        f"(prompt tokens {reuse_tokens['tokens'] / recompute_tokens['tokens']:.2f})"
    )


if __name__ == "__main__":
    main()
