"""Llama Guard 4 (``meta-llama/Llama-Guard-4-12B``, Llama 4 architecture).

Native prompt as the hub chat template renders it (checked against rendered prompts published with
the model): Llama 4 header tokens, "according to our safety policy", S1..S13 when an image is
present and S1..S14 otherwise, the conversation after ``<BEGIN CONVERSATION>\\n`` with each message
ending in a literal backslash-n pair plus a blank line (the hub template writes ``\\n\\n`` as text),
and the image placeholder at the start of the first user turn (images render before text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from PIL import Image

from eval.guards.base import GenerativeGuard, GuardPrompt, GuardResult, validate_dialogue
from eval.guards.llama_guard_format import (
    IMAGE_CATEGORY_CODES,
    LLAMA_GUARD_4_TASK,
    LLAMA_GUARD_INSTRUCTION,
    ROLE_NAMES,
    TEXT_CATEGORY_CODES,
    assessed_role,
    categories_block,
    parse_llama_guard,
)
from moderator.sanitize import transcript_text

IMAGE_TOKEN = "<|image|>"
# transformers 5.24.0's Llama4ForConditionalGeneration.forward reads `image_outputs` from the text
# model's output, which has none (AttributeError on every call). 5.23 works; constraints.txt locks it.
BROKEN_TRANSFORMERS = ("5.24.",)
SUPPORTED_TRANSFORMERS = ">=5.23,<5.24"


def require_supported_transformers(version: str) -> None:
    if version.startswith(BROKEN_TRANSFORMERS):
        raise RuntimeError(
            f"llama_guard_4: transformers {version} cannot run Llama 4 models (AttributeError 'image_outputs' "
            f"in its Llama4ForConditionalGeneration); supported: transformers{SUPPORTED_TRANSFORMERS} "
            "(`pip install -c constraints.txt -e .` uses the tested lock)"
        )


# What the hub template emits after each message: a literal "\n\n" (backslash, n) then a blank line.
MESSAGE_END = "\\n\\n\n\n"


def render_llama_guard_4(dialogue: Sequence[Mapping[str, str]], has_image: bool) -> str:
    role = assessed_role(dialogue)
    turns = []
    for i, message in enumerate(dialogue):
        image = IMAGE_TOKEN if (has_image and i == 0) else ""
        turns.append(f"{ROLE_NAMES[message['role']]}: {image}{transcript_text(message['content'])}{MESSAGE_END}")
    return (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n"
        + LLAMA_GUARD_4_TASK.format(role=role)
        + "\n\n"
        + categories_block(IMAGE_CATEGORY_CODES if has_image else TEXT_CATEGORY_CODES)
        + "<BEGIN CONVERSATION>\n"
        + "".join(turns)
        + "<END CONVERSATION>\n\n"
        + LLAMA_GUARD_INSTRUCTION.format(role=role)
        + " <|eot|><|header_start|>assistant<|header_end|>"
    )


class LlamaGuard4(GenerativeGuard):
    kind: ClassVar[str] = "llama_guard_4"
    verdict_prefix: ClassVar[str] = "\n\n"
    score_words: ClassVar[tuple[str, str]] = ("safe", "unsafe")
    default_max_new_tokens: ClassVar[int] = 20

    @classmethod
    def check_supported(cls) -> None:
        import transformers

        require_supported_transformers(transformers.__version__)

    def build_inputs(self, dialogue: Sequence[Mapping[str, Any]], images: Sequence[Image.Image]) -> list[GuardPrompt]:
        messages = validate_dialogue(dialogue, images)
        return [GuardPrompt(render_llama_guard_4(messages, bool(images)), tuple(images))]

    def parse(self, output: str) -> GuardResult:
        return parse_llama_guard(output, TEXT_CATEGORY_CODES)

    def _processor_inputs(self, prompts: Sequence[GuardPrompt]) -> dict[str, Any]:
        kwargs = super()._processor_inputs(prompts)
        if "images" in kwargs:  # Llama4Processor takes a flat list, in placeholder order
            kwargs["images"] = [image for p in prompts for image in p.images]
        return kwargs
