"""Chat models under attack (and the local judge): greedy replies to a dialogue's last user turn.

Backends, both loaded with the project's shared rules (``moderator.loading``: device, dtype,
safetensors only, left padding; ``moderator.images``: pixel bounds):

- Hugging Face transformers (any VLM with a chat template, ``AutoProcessor`` +
  ``AutoModelForImageTextToText``; a text-only model falls back to ``AutoTokenizer`` +
  ``AutoModelForCausalLM``), in left-padded batches of ``batch_size``;
- vLLM, optional and GPU-only, behind an import guard: every request of a ``generate`` call goes to
  the engine at once (it schedules its own batches), and ``close()`` shuts the engine down so the next
  model fits.

The image, if any, goes with the first user turn. Every target is a context manager: ``with
load_target(cfg) as target: target.generate(requests, max_new_tokens)`` frees it on exit.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from eval.registry import registered
from moderator.images import DEFAULT_IMAGE_BOUNDS, ImageBounds, bound_image_pixels, supports_pixel_bounds

logger = logging.getLogger(__name__)

# Used when a policy is injected into a target whose config sets no system prompt of its own.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class ChatRequest:
    dialogue: tuple[Mapping[str, str], ...]  # {"role": "user"|"assistant", "content": str}, ends with a user turn
    system: str | None = None  # None: the chat template's default system prompt
    image: Any | None = None  # a PIL image shown with the first user turn


class ChatModel(Protocol):
    """What the eval loop and the local judge use.

    ``generate`` answers every request it is given, in order, however many (a backend batches
    internally). ``batches_internally`` says whether the caller should hand over large workloads
    (vLLM: its scheduler needs them) or ``batch_size`` at a time (HF: each batch's replies can be cached
    as it returns). ``close`` frees the model; it is idempotent.
    """

    name: str
    batches_internally: bool

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int) -> list[str]: ...

    def close(self) -> None: ...


class _ClosesOnExit(ABC):
    """A chat model that is also a context manager: leaving the ``with`` block frees it (:meth:`close`)."""

    @abstractmethod
    def close(self) -> None:
        """Free the model (and, for vLLM, its engine and GPU memory)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def is_multimodal(path: str | Path, trust_remote_code: bool = False, revision: str | None = None) -> bool:
    """Whether the checkpoint is an image-text-to-text model (else a text-only causal LM)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from moderator.loading import ModelNotFoundError, looks_like_a_path

    if not Path(path).expanduser().is_dir() and looks_like_a_path(str(path)):
        raise ModelNotFoundError(f"{path}: model directory not found")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, revision=revision)
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


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


def render_chat_prompt(processor: Any, request: ChatRequest, multimodal: bool, name: str) -> str:
    """The prompt text for one request with the model's own chat template, ending with the generation prompt."""
    if request.image is not None and not multimodal:
        raise ValueError(
            f"{name}: a text-only model cannot take the dialogue's image "
            "(set images: false in its target config to send it the text only)"
        )
    messages = content_parts_messages(request) if multimodal else string_messages(request)
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2 raises TemplateError from the template's own checks
        if request.system is None or "system" not in str(exc).lower():
            raise
        return processor.apply_chat_template(
            _system_into_first_user(messages), add_generation_prompt=True, tokenize=False
        )


class HFChatModel(_ClosesOnExit):
    batches_internally = False  # the loop hands over batch_size requests at a time and caches each batch

    def __init__(self, model: Any, processor: Any, name: str, multimodal: bool, batch_size: int = DEFAULT_BATCH_SIZE):
        from moderator.loading import require_left_padding

        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        self.model, self.processor, self.name, self.multimodal = model, processor, name, multimodal
        self.batch_size = batch_size
        self.tokenizer = processor.tokenizer if multimodal else processor
        require_left_padding(self.tokenizer, name)  # batched generation appends after the last position

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        name: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        image_bounds: ImageBounds | None = DEFAULT_IMAGE_BOUNDS,
        revision: str | None = None,
    ) -> HFChatModel:
        """Load through ``moderator.loading.load_vlm`` (device, dtype and padding rules there)."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        from moderator.loading import load_vlm

        multimodal = is_multimodal(path, trust_remote_code, revision)
        model, processor = load_vlm(
            path,
            device=device,
            dtype=dtype,
            model_cls=AutoModelForImageTextToText if multimodal else AutoModelForCausalLM,
            processor_cls=AutoProcessor if multimodal else AutoTokenizer,
            trust_remote_code=trust_remote_code,
            revision=revision,
            image_bounds=image_bounds,
        )
        return cls(model, processor, name or str(path), multimodal, batch_size)

    def render(self, request: ChatRequest) -> str:
        """The prompt text for one request, ending with the assistant generation prompt."""
        return render_chat_prompt(self.processor, request, self.multimodal, self.name)

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int) -> list[str]:
        """Replies to every request, ``batch_size`` at a time."""
        if self.model is None:
            raise RuntimeError(f"{self.name}: closed")
        replies: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            replies += self._generate_batch(requests[start : start + self.batch_size], max_new_tokens)
        return replies

    def _generate_batch(self, requests: Sequence[ChatRequest], max_new_tokens: int) -> list[str]:
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


class VLLMChatModel(_ClosesOnExit):
    """vLLM offline inference (GPU only; ``pip install -e .[gpu]``); unit-tested with a stub engine.

    The prompt is rendered with the model's own chat template (as for the HF backend) and passed with
    the image as ``multi_modal_data``, vLLM's stable input format. Engine settings come from the
    target config: ``max_model_len``, ``tensor_parallel_size``, ``gpu_memory_utilization``,
    ``limit_mm_per_prompt`` and the pixel bounds (``mm_processor_kwargs``, for processors with a
    pixel budget).
    """

    batches_internally = True  # hand it large workloads: its scheduler fills the GPU from them

    def __init__(
        self,
        path: str,
        *,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        name: str | None = None,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        limit_mm_per_prompt: Mapping[str, int] | None = None,
        image_bounds: ImageBounds | None = DEFAULT_IMAGE_BOUNDS,
        seed: int = 0,
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError(
                "target backend 'vllm' needs the vllm package (GPU machines: pip install -e .[gpu])"
            ) from exc
        from transformers import AutoProcessor, AutoTokenizer

        self.name = name or path
        self._sampling = SamplingParams
        self.multimodal = is_multimodal(path, trust_remote_code)
        loader = AutoProcessor if self.multimodal else AutoTokenizer
        self.processor = loader.from_pretrained(path, trust_remote_code=trust_remote_code)
        engine_args: dict[str, Any] = {
            "model": path,
            # The shared rule (moderator.loading): bf16 on the GPU unless asked; "auto" = the checkpoint's.
            "dtype": dtype or "bfloat16",
            "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "seed": seed,
        }
        if max_model_len is not None:
            engine_args["max_model_len"] = max_model_len
        if self.multimodal:
            engine_args["limit_mm_per_prompt"] = dict(limit_mm_per_prompt or {"image": 1})
            if image_bounds is not None and image_bounds.is_set and supports_pixel_bounds(self.processor):
                engine_args["mm_processor_kwargs"] = image_bounds.processor_kwargs()
                bound_image_pixels(self.processor, image_bounds.min_pixels, image_bounds.max_pixels)
        self.engine_args = engine_args
        self.llm: Any = LLM(**engine_args)

    def render(self, request: ChatRequest) -> str:
        return render_chat_prompt(self.processor, request, self.multimodal, self.name)

    def generate(self, requests: Sequence[ChatRequest], max_new_tokens: int) -> list[str]:
        """Replies to every request from ONE engine call: vLLM schedules the batches itself."""
        if self.llm is None:
            raise RuntimeError(f"{self.name}: closed")
        if not requests:
            return []
        prompts = []
        for request in requests:
            prompt: dict[str, Any] = {"prompt": self.render(request)}
            if request.image is not None:
                prompt["multi_modal_data"] = {"image": request.image}
            prompts.append(prompt)
        params = self._sampling(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"{self.name}: vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [output.outputs[0].text.strip() for output in outputs]

    def close(self) -> None:
        """Shut the engine down and free its GPU memory, so the next model (target, guard, judge) fits."""
        llm, self.llm = self.llm, None
        if llm is not None:
            shutdown_vllm_engine(llm)
            del llm
        release_vllm_state()
        release_memory(self)


def shutdown_vllm_engine(llm: Any) -> None:
    """Stop the engine's worker processes (vLLM V1 runs the engine core in its own process)."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(engine_core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as exc:  # teardown is best effort: the next steps still free memory
            logger.warning("vLLM engine shutdown failed: %s", exc)


def release_vllm_state() -> None:
    """vLLM's documented teardown: destroy its model-parallel groups and distributed environment."""
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except ImportError:
        return
    for step in (destroy_model_parallel, destroy_distributed_environment):
        try:
            step()
        except Exception as exc:  # e.g. nothing initialised: teardown is best effort
            logger.warning("vLLM teardown step %s failed: %s", step.__name__, exc)
    with contextlib.suppress(ImportError, AssertionError, RuntimeError, ValueError):
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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
    """Build the chat model named by a :class:`eval.config.TargetConfig` (a context manager; ``close()`` frees it)."""
    return target_backend(config.backend).build(config)


# -- the target backends: one entry per backend in TARGETS --------------------------------------------


def _build_hf(config: Any) -> ChatModel:
    return HFChatModel.from_pretrained(
        config.model,
        dtype=config.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
        name=config.label,
        batch_size=config.batch_size or DEFAULT_BATCH_SIZE,
        image_bounds=ImageBounds(config.min_pixels, config.max_pixels),
    )


def _build_vllm(config: Any) -> ChatModel:
    return VLLMChatModel(
        config.model,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        name=config.label,
        max_model_len=config.max_model_len,
        tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        limit_mm_per_prompt=config.limit_mm_per_prompt,
        image_bounds=ImageBounds(config.min_pixels, config.max_pixels),
    )


@dataclass(frozen=True)
class TargetBackend:
    """One target backend: its chat model class and how a target config builds it."""

    model_class: type  # its ``batches_internally`` says how the eval hands it work
    build: Callable[[Any], ChatModel]  # TargetConfig -> the loaded chat model


# Every target backend, by the name a target's ``backend`` gives (eval.config validates against these names).
TARGETS: dict[str, TargetBackend] = {
    "hf": TargetBackend(HFChatModel, _build_hf),
    "vllm": TargetBackend(VLLMChatModel, _build_vllm),
}


def target_backend(backend: str) -> TargetBackend:
    """The registered target backend ``backend``; an unknown one is an error naming the valid backends."""
    return registered(TARGETS, backend, "target backend")
