"""Llama Guard 3 8B (``meta-llama/Llama-Guard-3-8B``), a text-only guard reading the dialogue as text.

Native prompt as the hub chat template renders it (S1..S14, "according our safety policy"). The
guard cannot see the image, so the first user turn starts with a note saying one was there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from PIL import Image

from eval.guards.base import GenerativeGuard, GuardPrompt, GuardResult, validate_dialogue
from eval.guards.llama_guard_format import (
    LLAMA_GUARD_INSTRUCTION,
    LLAMA_GUARD_TASK,
    ROLE_NAMES,
    TEXT_CATEGORY_CODES,
    assessed_role,
    categories_block,
    parse_llama_guard,
)
from moderator.sanitize import transcript_text

DEFAULT_IMAGE_NOTE = "[The user shared an image here, which is not shown.]"


def render_llama_guard_3_text(dialogue: Sequence[Mapping[str, str]], image_note: str | None = None) -> str:
    role = assessed_role(dialogue)
    turns = []
    for i, message in enumerate(dialogue):
        content = transcript_text(message["content"])
        if i == 0 and image_note:
            content = f"{image_note} {content}".strip()
        turns.append(f"{ROLE_NAMES[message['role']]}: {content}\n\n")
    return (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + LLAMA_GUARD_TASK.format(role=role)
        + "\n\n"
        + categories_block(TEXT_CATEGORY_CODES)
        + "<BEGIN CONVERSATION>\n\n"
        + "".join(turns)
        + "<END CONVERSATION>\n\n"
        + LLAMA_GUARD_INSTRUCTION.format(role=role)
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    )


class LlamaGuard3Text(GenerativeGuard):
    kind: ClassVar[str] = "llama_guard_3_text"
    verdict_prefix: ClassVar[str] = "\n\n"
    score_words: ClassVar[tuple[str, str]] = ("safe", "unsafe")
    default_max_new_tokens: ClassVar[int] = 20
    model_loader: ClassVar[str] = "transformers:AutoModelForCausalLM"
    processor_loader: ClassVar[str] = "transformers:AutoTokenizer"

    def __init__(self, model: Any = None, processor: Any = None, *, image_note: str = DEFAULT_IMAGE_NOTE, **kwargs):
        super().__init__(model, processor, **kwargs)
        self.image_note = image_note

    def build_inputs(self, dialogue: Sequence[Mapping[str, Any]], images: Sequence[Image.Image]) -> list[GuardPrompt]:
        messages = validate_dialogue(dialogue, images)
        # The image is not passed on: this guard reads text only.
        return [GuardPrompt(render_llama_guard_3_text(messages, self.image_note if images else None))]

    def parse(self, output: str) -> GuardResult:
        return parse_llama_guard(output, TEXT_CATEGORY_CODES)
