"""Chat models under attack (and the local judge): batched greedy replies to a dialogue's last user turn.

Backends: Hugging Face transformers (any VLM with a chat template, loaded with ``AutoProcessor`` +
``AutoModelForImageTextToText``; a text-only model falls back to ``AutoTokenizer`` +
``AutoModelForCausalLM``), batched with LEFT padding so every row's last position is real; and vLLM,
optional and GPU-only, behind an import guard. The image, if any, goes with the first user turn.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# Used when a policy is injected into a target whose config sets no system prompt of its own.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class ChatRequest:
    dialogue: tuple[Mapping[str, str], ...]  # {"role": "user"|"assistant", "content": str}, ends with a user turn
    system: str | None = None  # None: the chat template's default system prompt
    image: Any | None = None  # a PIL image shown with the first user turn


class ChatModel(Protocol):
    name: str

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int) -> list[str]: ...

    def close(self) -> None: ...


def content_parts_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """Messages in the multimodal chat-template format (content = list of typed parts)."""
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    for index, message in enumerate(request.dialogue):
        parts: list[dict[str, Any]] = []
        if index == 0 and request.image is not None:
            parts.append({"type": "image"})
        parts.append({"type": "text", "text": message["content"]})
        messages.append({"role": message["role"], "content": parts})
    return messages


def string_messages(request: ChatRequest) -> list[dict[str, str]]:
    """Messages for a text-only chat template (content = a string)."""
    messages = [{"role": "system", "content": request.system}] if request.system is not None else []
    return messages + [{"role": m["role"], "content": m["content"]} for m in request.dialogue]


def _system_into_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that reject a system role: prepend the system text to the first user message."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    if isinstance(system["content"], str):
        rest[0]["content"] = f"{system['content']}\n\n{rest[0]['content']}"
    else:
        text = system["content"][0]["text"]
        rest[0]["content"] = [{"type": "text", "text": text + "\n\n"}, *rest[0]["content"]]
    return rest


class HFChatModel:
    def __init__(self, model: Any, processor: Any, name: str, multimodal: bool):
        self.model, self.processor, self.name, self.multimodal = model, processor, name, multimodal
        self.tokenizer = processor.tokenizer if multimodal else processor
        self.tokenizer.padding_side = "left"  # batched generation needs left padding
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: str = "auto", trust_remote_code: bool = False, name: str | None = None
    ) -> HFChatModel:
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        multimodal = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        model_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model = model_class.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            device_map="auto" if torch.cuda.is_available() else None,
        )
        loader = AutoProcessor if multimodal else AutoTokenizer
        processor = loader.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(model.eval(), processor, name or str(path), multimodal)

    def render(self, request: ChatRequest) -> str:
        """The prompt text for one request, ending with the assistant generation prompt."""
        if request.image is not None and not self.multimodal:
            raise ValueError(f"{self.name}: a text-only model cannot take the dialogue's image")
        messages = content_parts_messages(request) if self.multimodal else string_messages(request)
        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2 raises TemplateError from the template's own checks
            if request.system is None or "system" not in str(exc).lower():
                raise
            return self.processor.apply_chat_template(
                _system_into_first_user(messages), add_generation_prompt=True, tokenize=False
            )

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int) -> list[str]:
        import torch

        if not requests:
            return []
        texts = [self.render(request) for request in requests]
        if self.multimodal:
            # One image list per request (some processors, e.g. Mllama's, need the nesting).
            images = [[r.image] if r.image is not None else [] for r in requests]
            has_images = any(images)
            inputs = self.processor(
                text=texts, images=images if has_images else None, padding=True, return_tensors="pt"
            )
        else:
            inputs = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def close(self) -> None:
        release_memory(self)


class VLLMChatModel:
    """vLLM offline inference (GPU only; ``pip install -e .[gpu]``). Not exercised by the CPU tests.

    The prompt is rendered with the model's own processor chat template (as for the HF backend) and
    passed with the image as ``multi_modal_data``, vLLM's stable input format.
    """

    def __init__(self, path: str, dtype: str = "auto", trust_remote_code: bool = False, name: str | None = None):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError(
                "target backend 'vllm' needs the vllm package (GPU machines: pip install -e .[gpu])"
            ) from exc
        from transformers import AutoProcessor

        self.name = name or path
        self._sampling = SamplingParams
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.llm = LLM(model=path, dtype=dtype, trust_remote_code=trust_remote_code, limit_mm_per_prompt={"image": 1})

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int) -> list[str]:
        prompts = []
        for request in requests:
            text = self.processor.apply_chat_template(
                content_parts_messages(request), add_generation_prompt=True, tokenize=False
            )
            prompt: dict[str, Any] = {"prompt": text}
            if request.image is not None:
                prompt["multi_modal_data"] = {"image": request.image}
            prompts.append(prompt)
        params = self._sampling(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [output.outputs[0].text.strip() for output in outputs]

    def close(self) -> None:
        release_memory(self)


def release_memory(holder: Any) -> None:
    """Drop a loaded model so the next one fits (targets, guards and judges are loaded one at a time)."""
    for attribute in ("model", "llm", "processor", "tokenizer"):
        if hasattr(holder, attribute):
            setattr(holder, attribute, None)
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def load_target(config: Any) -> ChatModel:
    """Build the chat model named by a :class:`eval.config.TargetConfig`."""
    if config.backend == "vllm":
        return VLLMChatModel(config.model, config.dtype, config.trust_remote_code, name=config.label)
    return HFChatModel.from_pretrained(
        config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code, name=config.label
    )
