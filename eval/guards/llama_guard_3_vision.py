"""Llama Guard 3 Vision (``meta-llama/Llama-Guard-3-11B-Vision``, Mllama architecture).

Native prompt as the hub chat template renders it: one user message holding the task, the S1..S13
hazard list and the whole conversation as ``User:``/``Agent:`` lines, with ``<|image|> `` (the
dialogue's single image, which belongs to the first user turn) placed before the task as the
template does. It assesses ONLY THE LAST message, which for a SafeMT dialogue is the user's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from PIL import Image

from eval.guards.base import GenerativeGuard, GuardPrompt, GuardResult, validate_dialogue
from eval.guards.llama_guard_format import (
    IMAGE_CATEGORY_CODES,
    LLAMA_GUARD_INSTRUCTION,
    LLAMA_GUARD_TASK,
    ROLE_NAMES,
    assessed_role,
    categories_block,
    parse_llama_guard,
)
from moderator.sanitize import transcript_text

IMAGE_TOKEN = "<|image|>"


def render_llama_guard_3_vision(dialogue: Sequence[Mapping[str, str]], has_image: bool) -> str:
    role = assessed_role(dialogue)
    conversation = "".join(f"{ROLE_NAMES[m['role']]}: {transcript_text(m['content'])}\n\n" for m in dialogue)
    return (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + (f"{IMAGE_TOKEN} " if has_image else "")
        + LLAMA_GUARD_TASK.format(role=role)
        + "\n\n"
        + categories_block(IMAGE_CATEGORY_CODES)
        + "<BEGIN CONVERSATION>\n\n"
        + conversation
        + "<END CONVERSATION>\n\n"
        + LLAMA_GUARD_INSTRUCTION.format(role=role)
        + " <|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    )


class LlamaGuard3Vision(GenerativeGuard):
    kind: ClassVar[str] = "llama_guard_3_vision"
    verdict_prefix: ClassVar[str] = "\n\n"  # the model answers "\n\nsafe" / "\n\nunsafe\nS1"
    score_words: ClassVar[tuple[str, str]] = ("safe", "unsafe")
    default_max_new_tokens: ClassVar[int] = 20

    def build_inputs(self, dialogue: Sequence[Mapping[str, Any]], images: Sequence[Image.Image]) -> list[GuardPrompt]:
        messages = validate_dialogue(dialogue, images)
        return [GuardPrompt(render_llama_guard_3_vision(messages, bool(images)), tuple(images))]

    def parse(self, output: str) -> GuardResult:
        return parse_llama_guard(output, IMAGE_CATEGORY_CODES)
